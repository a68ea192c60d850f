"""Ground short videos in a music library: the best tracks and, in each, the moment that fits.

    python scripts/ground.py --load_uni_model_path CKPT --index INDEX --video_feature clip.pt \
        [--video_mask clip_mask.pt] [--topk 10] [--out results.json] [--plot results.png]
    python scripts/ground.py --load_uni_model_path CKPT --index INDEX \
        --video_feature dataset/MGSV-EC/test_data.csv --frozen_feature_path features/Kuai_feature

--video_feature takes a CLIP frame-feature tensor [frames <= 50, 512] (.pt), or a CSV with a
video_id column whose features are read from --frozen_feature_path (many queries in one call;
music_id/music_start/music_end columns, when present, are reported as the ground truth).
Without --video_mask the valid frames are the non-zero rows (padding is stored as zeros).

Output: a table on stdout; --out writes JSON, a list with one object per query
{"video_id", "mode", "tracks": [{"music_id", "score", "start", "end", "confidence"}, ...]}
ordered best first (+ "ground_truth" when known). score = the test-time retrieval score
(as test.py's MsG); start/end = the detector's moment in seconds within that track, clipped
to [0, min(240, track duration)] like test.py's SmG (start can exceed end when the moment lies
past the end of the track, as in the original's evaluation); confidence = its foreground
probability.

--shortlist K: rank the library by the dual-tower cosine, re-score only the top K with the
full score. Default: exhaustive up to 20,000 tracks, K = 1000 above; --shortlist 0 = always
exhaustive. Bad input: one-line error, exit status 2.

--render OUT.mp4 (with --video): the query video with the top-1 track's moment (or that of
--render_track MUSIC_ID, one of the returned tracks) as its soundtrack: the video stream copied
unchanged, the cut audio faded in/out (--fade s) and encoded as AAC (utils/ground/render.py). The
track's audio file comes from the music_path column of the CSV the index was built from, looked
up as written and under --music_dir, or from <music_dir>/<music_id>.<ext>.

The index is checked before any query is answered: sizes, headers and ids always, the content
digest of any file whose size, mtime, ctime or inode changed since it was built, and with
--verify the content digests of all its files (about 1 s per GB).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load_uni_model_path", required=True, help="MaDe checkpoint the index was built with")
    p.add_argument("--index", required=True, help="folder written by scripts/build_music_index.py")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--video_feature", help="frame features .pt, or a CSV with a video_id column")
    src.add_argument("--video", help="a raw video file (e.g. .mp4): CLIP features are extracted first "
                                     "(needs --clip_weights)")
    p.add_argument("--clip_weights", default="model/pretrained_models/ViT-B-32.pt",
                   help="OpenAI CLIP ViT-B/32 checkpoint, for --video")
    p.add_argument("--video_mask", default=None, help="frame mask .pt (default: non-zero rows)")
    p.add_argument("--frozen_feature_path", default=None, help="feature root, with a CSV --video_feature")
    p.add_argument("--topk", type=int, default=10, help="tracks returned per query")
    p.add_argument("--shortlist", type=int, default=-1,
                   help="K for two-stage retrieval; 0 = exhaustive; -1 = automatic (K=1000 above 20k tracks)")
    p.add_argument("--batch_size", type=int, default=32, help="queries per batch")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--use_packed", type=int, choices=[0, 1], default=1)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--plot", default=None,
                   help="PNG of each query's top tracks (several queries: NAME_<video_id>.png)")
    p.add_argument("--plot_max", type=int, default=20, help="at most this many plots")
    p.add_argument("--quiet", action="store_true", help="no table on stdout")
    p.add_argument("--render", default=None, metavar="OUT.mp4",
                   help="write the --video with the chosen track's moment as its soundtrack (.mp4/.mov/.mkv)")
    p.add_argument("--render_track", default=None, metavar="MUSIC_ID",
                   help="with --render: use this returned track instead of the top-1")
    p.add_argument("--music_dir", default=None, help="folder of the tracks' audio files, for --render")
    p.add_argument("--fade", type=float, default=0.3, help="fade in/out of the rendered soundtrack (s)")
    p.add_argument("--verify", action="store_true",
                   help="compare the content digest of every index file, not only of files whose stat changed")
    return p


def load_queries(args: argparse.Namespace, num_frames: int):
    from utils.ground.model import GroundingError
    from utils.ground.queries import Queries, load_query_csv, load_video
    if args.video is not None:
        return extract_query(args, num_frames)
    path = Path(args.video_feature)
    if path.suffix.lower() == ".csv":
        if args.frozen_feature_path is None:
            raise GroundingError("--video_feature is a CSV: pass --frozen_feature_path (the feature root)")
        if args.video_mask is not None:
            raise GroundingError("--video_mask goes with a .pt --video_feature, not with a CSV")
        return load_query_csv(path, args.frozen_feature_path, num_frames, bool(args.use_packed))
    feat, mask = load_video(path, args.video_mask, num_frames)
    return Queries([path.stem], feat[None], mask[None], [None], [None])


def extract_query(args: argparse.Namespace, num_frames: int):
    """CLIP features of a raw video, exactly as scripts/extract_features.py writes them."""
    from model.clip_encoder import load_clip
    from utils.device import resolve_device
    from utils.extract.extract import extract_video_features
    from utils.ground.queries import Queries
    path = Path(args.video)
    if not path.is_file():
        raise FileNotFoundError(f"--video {path}: no such file")
    device = resolve_device(args.device)
    clip = load_clip(args.clip_weights, device)            # clear error naming the file if it is missing
    feat, mask = extract_video_features(path, clip, device, max_frames=num_frames)
    return Queries([path.stem], feat[None], mask[None], [None], [None])


def plot_paths(base: str, video_ids: list[str], limit: int) -> list[Path]:
    base_path = Path(base)
    if len(video_ids) == 1:
        return [base_path]
    suffix = base_path.suffix or ".png"
    return [base_path.with_name(f"{base_path.stem}_{v}{suffix}") for v in video_ids[:limit]]


def main(argv: list[str] | None = None) -> int:
    from utils.ground.grounding import ground
    from utils.ground.library import check_index_matches, open_index
    from utils.ground.model import load_model
    from utils.ground.report import format_results, plot_result
    from utils.io import atomic_write_json
    args = get_parser().parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        raise ValueError("--topk and --batch_size must be >= 1")
    check_render_args(args)
    # Cheap checks first (index folder, query files), so bad input fails before the model loads.
    library = open_index(args.index, verify=args.verify)
    num_frames = int(library.manifest.get("config", {}).get("max_v_frames", 50))
    queries = load_queries(args, num_frames)
    gm = load_model(args.load_uni_model_path, args.device)
    check_index_matches(library.manifest, gm, args.index)
    t0 = time.time()
    results = ground(gm, library, queries.feats, queries.masks, topk=args.topk,
                     shortlist_k=None if args.shortlist < 0 else args.shortlist, batch_size=args.batch_size,
                     video_ids=queries.video_ids, gt_music_ids=queries.gt_music_ids,
                     gt_moments=queries.gt_moments)
    elapsed = time.time() - t0
    if not args.quiet:
        print(format_results(results))
        print(f"{len(results)} quer{'y' if len(results) == 1 else 'ies'} against {len(library)} tracks "
              f"in {elapsed:.2f} s ({results[0].mode})")
    if args.out:
        atomic_write_json([r.to_json() for r in results], args.out)
        print(f"results written to {args.out}")
    if args.plot:
        paths = plot_paths(args.plot, [r.video_id for r in results], args.plot_max)
        for r, path in zip(results, paths):
            plot_result(r, path, gm.max_m_duration)
        print(f"{len(paths)} plot(s) written: {paths[0]}{' ...' if len(paths) > 1 else ''}")
    if args.render:
        render(args, results[0], library)
    return 0


def check_render_args(args: argparse.Namespace) -> None:
    """--render's inputs, checked before the model loads."""
    from utils.ground.render import CONTAINERS
    if args.render is None:
        if args.render_track is not None:
            raise ValueError("--render_track goes with --render OUT.mp4")
        return
    if args.video is None:
        raise ValueError("--render needs the query video itself: pass --video FILE")
    if Path(args.render).suffix.lower() not in CONTAINERS:
        raise ValueError(f"--render {args.render}: write a {', '.join(CONTAINERS)} file")
    if args.music_dir is not None and not Path(args.music_dir).is_dir():
        raise FileNotFoundError(f"--music_dir {args.music_dir}: no such folder")
    if args.fade < 0:
        raise ValueError("--fade must be >= 0")


def render(args: argparse.Namespace, result, library) -> None:
    from utils.extract.media_paths import index_source_csv, music_locator
    from utils.ground.render import pick_track, render_hit
    hit = pick_track(result.tracks, args.render_track)
    find_audio = music_locator(args.music_dir, [index_source_csv(library.manifest)]).find
    done = render_hit(hit, args.video, args.render, find_audio, args.fade)
    print(f"preview written to {done.path}: track {hit.music_id} from {done.audio_start:.2f} s for "
          f"{done.audio_seconds:.2f} s under {done.video_seconds:.2f} s of video")


def run(argv: list[str] | None = None) -> int:
    """main() with bad input reported as one line on stderr and exit status 2 (no traceback)."""
    from utils.extract.media import MediaError
    from utils.ground.model import GroundingError
    from utils.train.checkpoint import CheckpointError
    try:
        return main(argv)
    # utils.ground.render.RenderError is a ValueError.
    except (GroundingError, CheckpointError, MediaError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
