"""ground.py --render / utils.ground.render: the query video with the chosen moment as its soundtrack.

What a user relies on: the output plays (PyAV reopens it) with exactly one video and one audio
stream; the picture is the input's, bit for bit (packets copied, frames decoded identical); the
sound is the track's moment (compared, after alignment, with the samples cut from the source WAV
here with numpy, not with the code under test); bad requests give one line and leave no file.
"""
from __future__ import annotations

import json
import math
import wave
from pathlib import Path

import av
import numpy as np
import pandas as pd
import pytest
import torch
from scipy.signal import correlate

from tests.conftest import load_script
from tests.media_helpers import openai_clip_state_dict, write_video
from utils.extract.media import MediaError
from utils.ground.render import RenderError, probe_video, render_preview

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RATE = 16000
FADE = 0.3


def write_sections_wav(path: Path, seconds: float, seed: int) -> Path:
    """Stereo 16-bit WAV: a different tone every 5 s plus noise (so a misplaced cut does not correlate),
    the right channel a different mix from the left."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    freqs = rng.uniform(200, 900, size=int(seconds // 5) + 1)
    left = 0.3 * np.sin(2 * np.pi * freqs[(t // 5).astype(int)] * t) + 0.1 * rng.standard_normal(t.size)
    right = 0.5 * left + 0.1 * rng.standard_normal(t.size)
    pcm = (np.clip(np.stack([left, right], 1), -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(RATE)
        w.writeframes(pcm.tobytes())
    return path


def expected_audio(wav: Path, start: float, seconds: float) -> np.ndarray:
    """The moment cut from the WAV, with linear fades of FADE s (at most a quarter of the cut): [2, n]."""
    with wave.open(str(wav), "rb") as w:
        pcm = np.frombuffer(w.readframes(w.getnframes()), "<i2").reshape(-1, w.getnchannels())
    cut = pcm[round(start * RATE): round(start * RATE) + round(seconds * RATE)].T / 32767.0
    n = min(round(FADE * RATE), cut.shape[1] // 4)
    ramp = np.arange(n) / n
    cut[:, :n] *= ramp
    cut[:, cut.shape[1] - n:] *= ramp[::-1]
    return cut


def decoded_audio(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.concatenate([f.to_ndarray() for f in c.decode(audio=0)], axis=1)


def aligned_correlation(got: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    """Correlation of one channel with the reference at the best lag (the AAC encoder's delay), and that lag."""
    cc = correlate(got, ref, mode="full", method="fft")
    lag = int(np.argmax(cc)) - (len(ref) - 1)
    a, b = got[max(lag, 0):], ref[max(-lag, 0):]
    n = min(len(a), len(b))
    return float(np.corrcoef(a[:n], b[:n])[0, 1]), lag


def video_packets(path: Path) -> list[bytes]:
    with av.open(str(path)) as c:
        return [bytes(p) for p in c.demux(c.streams.video[0]) if p.size]


def video_frames(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


def assert_preview(out: Path, video: Path, wav: Path, start: float, seconds: float) -> None:
    with av.open(str(out)) as c:           # it plays: PyAV reopens it and finds one stream of each kind
        kinds = sorted(s.type for s in c.streams)
    assert kinds == ["audio", "video"]
    assert video_packets(out) == video_packets(video)
    frames_in, frames_out = video_frames(video), video_frames(out)
    assert len(frames_out) == len(frames_in) and all(np.array_equal(a, b) for a, b in zip(frames_in, frames_out))
    got, ref = decoded_audio(out), expected_audio(wav, start, seconds)
    assert got.shape[0] == 2
    for ch in range(2):
        corr, lag = aligned_correlation(got[ch], ref[ch])
        assert corr > 0.99, f"channel {ch}: correlation {corr:.4f}"
        assert abs(lag) <= 2048, f"channel {ch}: the sound is {lag / RATE:.3f} s off"  # encoder delay at most
    assert abs(got.shape[1] / RATE - seconds) < 0.1


@pytest.fixture(scope="module")
def setup(tiny_demo: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("render")
    # A library of the demo's long tracks: the random-weight detector places its moments 60-70 s into a
    # track, which is past the end of the short ones (nothing to play there, see the unit tests below).
    rows = pd.concat([pd.read_csv(p, dtype=str) for p in tiny_demo["root"].glob("dataset/MGSV-EC/*_data.csv")])
    long = rows[rows["music_total_duration"].astype(float) > 150].drop_duplicates("music_id")
    long.to_csv(tmp / "long_tracks.csv", index=False)
    index = tmp / "long.index"
    assert load_script("build_music_index").run(
        ["--load_uni_model_path", str(tiny_demo["ckpt"]), "--frozen_feature_path", str(tiny_demo["features"]),
         "--music_ids", str(tmp / "long_tracks.csv"), "--out", str(index), "--device", "cpu", "--quiet"]) == 0
    clip = tmp / "ViT-B-32.pt"
    torch.save(openai_clip_state_dict(width=64, layers=2, seed=1), clip)
    video = write_video(tmp / "query.mp4", seconds=6.4)
    base = ["--load_uni_model_path", str(tiny_demo["ckpt"]), "--index", str(index), "--video", str(video),
            "--clip_weights", str(clip), "--device", "cpu", "--quiet", "--topk", "3"]
    assert load_script("ground").run([*base, "--out", str(tmp / "results.json")]) == 0
    tracks = json.loads((tmp / "results.json").read_text())[0]["tracks"]
    assert all(t["end"] > t["start"] for t in tracks[:2]), f"fixture: moments past the track end: {tracks}"
    music = tmp / "music"
    music.mkdir()
    for seed, t in enumerate(tracks[:2]):   # the two best tracks get audio, different from each other
        write_sections_wav(music / f"{t['music_id']}.wav", t["end"] + 1.0, seed)
    return {"tmp": tmp, "base": base, "video": video, "music": music, "tracks": tracks}


def test_render_top1(setup: dict) -> None:
    top = setup["tracks"][0]
    out = setup["tmp"] / "top1.mp4"
    assert load_script("ground").run([*setup["base"], "--render", str(out), "--music_dir", str(setup["music"])]) == 0
    seconds = min(top["end"] - top["start"], probe_video(setup["video"]).duration)
    assert_preview(out, setup["video"], setup["music"] / f"{top['music_id']}.wav", top["start"], seconds)


def test_render_track(setup: dict) -> None:
    second = setup["tracks"][1]
    out = setup["tmp"] / "second.mkv"      # another container, same guarantees
    assert load_script("ground").run([*setup["base"], "--render", str(out), "--music_dir", str(setup["music"]),
                                      "--render_track", second["music_id"]]) == 0
    seconds = min(second["end"] - second["start"], probe_video(setup["video"]).duration)
    assert_preview(out, setup["video"], setup["music"] / f"{second['music_id']}.wav", second["start"], seconds)


def test_render_bad_requests(setup: dict, capsys: pytest.CaptureFixture) -> None:
    never = setup["tmp"] / "never.mp4"
    cases = [(["--render", str(never), "--music_dir", str(setup["music"]), "--render_track", "no-such-track"],
              "raise --topk"),
             (["--render", str(setup["tmp"] / "never.avi")], "write a .mp4"),
             (["--render_track", "x"], "--render_track goes with --render")]
    for extra, phrase in cases:
        assert load_script("ground").run([*setup["base"], *extra]) == 2
        err = capsys.readouterr().err
        assert phrase in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not never.exists()


def test_render_without_audio_or_video(setup: dict, tiny_demo: dict, capsys: pytest.CaptureFixture) -> None:
    ground = load_script("ground")
    out = setup["tmp"] / "none.mp4"
    empty = setup["tmp"] / "empty_music"
    empty.mkdir(exist_ok=True)
    assert ground.run([*setup["base"], "--render", str(out), "--music_dir", str(empty)]) == 2
    assert "no audio file found for track" in capsys.readouterr().err
    feature_query = [*setup["base"][:4], "--video_feature", str(tiny_demo["csv"]),
                     "--frozen_feature_path", str(tiny_demo["features"])]
    assert ground.run([*feature_query, "--render", str(out)]) == 2
    assert "--render needs the query video" in capsys.readouterr().err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ utils.ground.render
def test_moment_longer_or_shorter_than_the_video(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", seconds=4.0)
    wav = write_sections_wav(tmp_path / "t.wav", 30.0, seed=5)
    long = render_preview(video, wav, 10.0, 25.0, tmp_path / "long.mp4", fade=FADE)
    assert long.audio_seconds == pytest.approx(4.0, abs=1e-3)            # never longer than the video
    assert_preview(tmp_path / "long.mp4", video, wav, 10.0, 4.0)
    short = render_preview(video, wav, 2.0, 4.5, tmp_path / "short.mp4", fade=FADE)
    assert short.audio_seconds == pytest.approx(2.5, abs=1e-3)           # the moment, then silence
    assert_preview(tmp_path / "short.mp4", video, wav, 2.0, 2.5)


def test_failed_render_keeps_the_previous_file(tmp_path: Path) -> None:
    video = write_video(tmp_path / "v.mp4", seconds=2.0)
    not_audio = tmp_path / "song.mp3"
    not_audio.write_text("not audio\n")
    out = tmp_path / "preview.mp4"
    out.write_bytes(b"an earlier preview")
    with pytest.raises(MediaError, match="song.mp3"):
        render_preview(video, not_audio, 0.0, 2.0, out)
    with pytest.raises(RenderError, match="past the end"):
        render_preview(video, write_sections_wav(tmp_path / "t.wav", 10.0, 0), 12.0, 10.0, out)
    assert out.read_bytes() == b"an earlier preview"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["preview.mp4", "song.mp3", "t.wav", "v.mp4"]


def empty_video(path: Path) -> Path:
    """An MP4 whose video stream never received a frame."""
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    return path


def test_probe_rejects_what_is_not_a_video(tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("this is a text file renamed .mp4\n")
    with pytest.raises(MediaError, match="notes.mp4: cannot open"):
        probe_video(text)
    with pytest.raises(MediaError, match="empty.mp4: no video"):
        probe_video(empty_video(tmp_path / "empty.mp4"))
    assert probe_video(write_video(tmp_path / "ok.mp4", seconds=3.2)).duration == pytest.approx(3.2, abs=1e-6)
    assert math.isfinite(probe_video(tmp_path / "ok.mp4").start)
