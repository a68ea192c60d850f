"""Synthesise audio and video files for a few tracks and queries of the demo data, so that every
button of scripts/app.py (moment players, preview) does something on a machine without media.

    python scripts/make_demo_media.py --demo demo_out [--queries 6] \
        [--load_uni_model_path CKPT --index demo_out/music.index --topk 5]

Writes (the demo's CSVs are left untouched):
    DEMO/media/videos/<video_id>.mp4      the first --queries test queries: a coloured clip as long as
                                          the video (video_total_duration), H.264 when available
    DEMO/media/music/<dir>/<file>.mp3     their ground-truth tracks, plus, with a checkpoint and an
                                          index, the --topk tracks the model returns for them; placed
                                          where the CSV's music_path points (its last two parts), so
                                          the page finds them through music_path, as with MGSV-EC

What they sound and look like follows the generator of scripts/make_demo_data.py (rebuilt from
DEMO/demo_data.json): every section of a track (the 8-24 s stretches that make its features
change) is its own chord of tones, with a beat, so a moment is audibly "a part of the song"; a
query video shows, second by second, a colour taken from the latent of its ground-truth track at
that time of the moment, so its colour changes where the music's sections change. The files are
illustrations, not inputs: the features the model sees are the demo's feature files.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import av
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.io import atomic_open  # noqa: E402

AUDIO_RATE = 22050
SCALE = 220.0 * 2 ** (np.array([0, 2, 4, 7, 9, 12, 14, 16, 19, 21]) / 12)   # A major pentatonic, 2 octaves
VIDEO_SIZE = (180, 320)       # width, height: a small portrait clip, like the platform's videos
VIDEO_FPS = 10


def load_generator(demo: Path):
    """The demo's track model (sections and latents), rebuilt from its settings file."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_demo_data as gen
    marker = demo / gen.MARKER
    if not marker.is_file():
        raise FileNotFoundError(f"{marker} not found: --demo must be a folder written by make_demo_data.py")
    settings = json.loads(marker.read_text(encoding="utf-8"))
    names = {f.name for f in dataclasses.fields(gen.DemoConfig)}
    cfg = gen.DemoConfig(**{k: v for k, v in settings.items() if k in names})
    # make_tracks is the generator's first use of its random stream, so this gives the same tracks.
    return gen.make_tracks(np.random.default_rng(cfg.seed), cfg), cfg


def section_bounds(tracks, j: int, cfg, duration: float) -> list[tuple[float, int]]:
    """(start time, section number) of track j's sections; a section every 15 s without sections."""
    if tracks.section_start is None:
        return [(float(t), k) for k, t in enumerate(np.arange(0.0, duration, 15.0))]
    return [(float(t), k) for k, t in enumerate(tracks.section_start[j]) if np.isfinite(t)]


def track_audio(tracks, j: int, cfg, rng: np.random.Generator) -> np.ndarray:
    """Mono float32 at AUDIO_RATE: one chord per section, on a beat of the track's own tempo."""
    duration = float(tracks.duration[j])
    t = np.arange(int(duration * AUDIO_RATE)) / AUDIO_RATE
    out = np.zeros_like(t)
    bounds = section_bounds(tracks, j, cfg, duration) + [(duration, -1)]
    tempo = 1.6 + 0.8 * rng.random()                       # beats per second
    beat = 0.55 + 0.45 * np.exp(-6.0 * ((t * tempo) % 1.0))
    for (lo, k), (hi, _) in zip(bounds[:-1], bounds[1:]):
        sel = (t >= lo) & (t < hi)
        if tracks.section_vec is not None:
            code = tracks.section_vec[j, k, :3]
            root = int(np.abs(code[0]) * 7) % 6
            third = 2 if code[1] > 0 else 1
        else:
            root, third = (j + k) % 6, 2
        for step, gain in ((root, 0.22), (root + third, 0.14), (root + 4, 0.10)):
            out[sel] += gain * np.sin(2 * np.pi * SCALE[step] * t[sel])
    return (out * beat + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def write_mp3(samples: np.ndarray, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        container = av.open(f, "w", format="mp3")
        try:
            stream = container.add_stream("libmp3lame" if "libmp3lame" in av.codecs_available else "mp3",
                                          rate=AUDIO_RATE, layout="mono")
            stream.bit_rate = 32_000
            for lo in range(0, samples.size, 1152):
                frame = av.AudioFrame.from_ndarray(samples[None, lo:lo + 1152], format="fltp", layout="mono")
                frame.sample_rate, frame.pts = AUDIO_RATE, lo
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode(None):
                container.mux(packet)
        finally:
            container.close()


def colour(latent: np.ndarray) -> np.ndarray:
    """An RGB colour for a latent vector: its first three dimensions squashed into 40..215."""
    return (127.5 + 87.5 * np.tanh(latent[:3])).astype(np.uint8)


def write_video(path: Path, seconds: float, colours: np.ndarray) -> None:
    """A clip whose background is colours[second] during each second, with a bar sweeping across."""
    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    width, height = VIDEO_SIZE
    with atomic_open(path, "wb") as f:
        container = av.open(f, "w", format="mp4")
        try:
            stream = container.add_stream(codec, rate=VIDEO_FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            if codec == "libx264":
                stream.options = {"preset": "veryfast", "crf": "28"}
            for k in range(max(1, round(seconds * VIDEO_FPS))):
                img = np.empty((height, width, 3), np.uint8)
                img[:] = colours[min(k // VIDEO_FPS, len(colours) - 1)]
                y = int((k % VIDEO_FPS) / VIDEO_FPS * (height - 12))
                img[y:y + 12] = 255 - img[y:y + 12]
                for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        finally:
            container.close()


def model_tracks(checkpoint: str, index: str, feature_root: Path, video_ids: list[str], topk: int) -> set[str]:
    """The tracks the model returns for these queries (so the page has audio for what it shows)."""
    from utils.data.store import FeatureStore
    from utils.ground.grounding import ground
    from utils.ground.library import open_index
    from utils.ground.model import load_model
    gm = load_model(checkpoint, "cpu")
    library = open_index(index, gm)
    feats, masks = FeatureStore(feature_root, num_frames=gm.num_frames).videos(video_ids)
    results = ground(gm, library, feats, masks, topk=topk, video_ids=video_ids)
    return {t.music_id for r in results for t in r.tracks}


def make_demo_media(demo: str | Path, num_queries: int = 6, checkpoint: str | None = None,
                    index: str | None = None, topk: int = 5, seed: int = 0) -> dict[str, int]:
    demo = Path(demo)
    tracks, cfg = load_generator(demo)
    csv = demo / "dataset" / "MGSV-EC" / "test_data.csv"
    df = pd.read_csv(csv, dtype=str, keep_default_na=False).head(num_queries)
    if len(df) == 0:
        raise ValueError(f"{csv}: no queries")
    row_of = {m: j for j, m in enumerate(tracks.ids)}
    wanted = set(df["music_id"])
    if not wanted <= set(row_of):
        raise ValueError(f"{csv} names tracks that {demo}/demo_data.json does not generate; "
                         "rerun scripts/make_demo_data.py")
    if checkpoint and index:
        wanted |= model_tracks(checkpoint, index, demo / "features" / "Kuai_feature", list(df["video_id"]), topk)
    # music_path of every track, from all splits (a returned track need not be a test query's).
    paths: dict[str, str] = {}
    for split in ("train", "val", "test"):
        split_df = pd.read_csv(demo / "dataset" / "MGSV-EC" / f"{split}_data.csv", dtype=str, keep_default_na=False)
        paths.update(zip(split_df["music_id"], split_df["music_path"]))
    for music_id in sorted(wanted):
        j = row_of[music_id]
        rel = Path(*Path(paths.get(music_id, f"{music_id}.mp3")).parts[-2:])
        write_mp3(track_audio(tracks, j, cfg, np.random.default_rng([seed, j])), demo / "media" / "music" / rel)
    for _, row in df.iterrows():
        j = row_of[row["music_id"]]
        seconds = float(row["video_total_duration"])
        t = float(row["music_start"]) + np.arange(int(np.ceil(seconds)) + 1)
        colours = np.stack([colour(z) for z in tracks.latent(np.array(j), t, cfg)])
        write_video(demo / "media" / "videos" / f"{row['video_id']}.mp4", seconds, colours)
    return {"videos": len(df), "tracks": len(wanted)}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", required=True, help="folder written by make_demo_data.py (e.g. demo_out)")
    p.add_argument("--queries", type=int, default=6, help="test queries that get a video")
    p.add_argument("--load_uni_model_path", default=None, help="checkpoint, to add the tracks it returns")
    p.add_argument("--index", default=None, help="index built with that checkpoint")
    p.add_argument("--topk", type=int, default=5, help="returned tracks per query that get audio")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if args.queries < 1 or args.topk < 1:
        print("error: --queries and --topk must be >= 1", file=sys.stderr)
        return 2
    if (args.load_uni_model_path is None) != (args.index is None):
        print("error: --load_uni_model_path and --index go together", file=sys.stderr)
        return 2
    from utils.ground.model import GroundingError
    from utils.train.checkpoint import CheckpointError
    try:
        done = make_demo_media(args.demo, args.queries, args.load_uni_model_path, args.index, args.topk)
    except (FileNotFoundError, ValueError, GroundingError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {done['videos']} videos to {args.demo}/media/videos and {done['tracks']} tracks to "
          f"{args.demo}/media/music")
    return 0


if __name__ == "__main__":
    sys.exit(main())
