"""A query video with the music moment the model picked as its soundtrack (PyAV only, no ffmpeg binary).

    info = probe_video("clip.mp4")                               # duration; MediaError if unreadable
    render_preview("clip.mp4", "song.mp3", 31.5, 52.0, "preview.mp4")
    write_moment_clip("song.mp3", 31.5, 52.0, "moment.wav")      # the cut alone, for a player

The video stream is copied packet for packet (no re-encoding: the picture is bit-identical to the
upload and rendering takes a fraction of a second); the audio is the track from `start` for as long
as the moment lasts, but never longer than the video, with a short linear fade in and out so the
cut does not click, encoded as AAC. Any other stream of the input (its own sound, subtitles) is
left out. Outputs are written through utils.io.atomic_open: a failed render never leaves a
truncated file, and an earlier render under the same name survives until the new one is complete.
"""
from __future__ import annotations

import contextlib
import fractions
import os
import wave
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Sequence

import av
import numpy as np

from utils.extract.media import MediaError, first_audio_stream, open_media
from utils.io import atomic_open

DEFAULT_FADE = 0.3          # seconds; long enough to hide the cut, short enough to keep the beat
AAC_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)
CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
AUDIO_FRAME = 1024          # samples per frame handed to the AAC encoder (its frame size)


class RenderError(ValueError):
    """A preview cannot be made from these inputs (empty moment, unsupported output, ...)."""


@dataclass
class VideoInfo:
    duration: float          # seconds from the first frame to the end of the last one
    start: float             # presentation time of the first frame (s); the soundtrack starts there
    codec: str
    width: int
    height: int


@dataclass
class RenderResult:
    path: Path
    video_seconds: float
    audio_start: float       # where the soundtrack starts in the track (s)
    audio_seconds: float     # how much of the track was used
    fade: float
    sample_rate: int


# ------------------------------------------------------------------------------------------------ reading
def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Check that `path` holds a decodable video stream and measure it, without decoding it all.

    Raises MediaError (one line, naming the file) for a file that is not a video (e.g. text renamed
    .mp4), a file without a video stream, or a video stream without frames.
    """
    container = open_media(path)
    try:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        tb = stream.time_base
        first: float | None = None
        end = 0.0
        decoded = False
        try:
            for packet in container.demux(stream):
                if packet.pts is not None and tb is not None:
                    t = float(packet.pts * tb)
                    first = t if first is None else min(first, t)
                    end = max(end, t + float((packet.duration or 0) * tb))
                if not decoded and packet.size:
                    decoded = bool(packet.decode())  # one real frame proves the stream is usable
        except (av.FFmpegError, OSError, ValueError) as e:
            raise MediaError(f"{path}: cannot decode video ({e})") from e
        if not decoded:
            try:  # decoders with delay give their first frame only when flushed
                decoded = bool(stream.codec_context.decode(None))
            except (av.FFmpegError, ValueError):
                decoded = False
        if not decoded:
            raise MediaError(f"{path}: no decodable video frames")
        first = max(first or 0.0, 0.0)   # an edit list may start the packets before 0
        duration = end - first
        if duration <= 0 and container.duration:
            duration = container.duration / av.time_base
        return VideoInfo(duration=max(duration, 0.0), start=first, codec=stream.codec_context.name,
                         width=stream.codec_context.width, height=stream.codec_context.height)
    finally:
        container.close()


def read_audio_moment(path: str | os.PathLike, start: float, seconds: float) -> tuple[np.ndarray, int]:
    """Samples [channels, n] float32 of the track from `start` for `seconds` (fewer if the track ends
    first), at the track's own rate when AAC can carry it (else 48 kHz), mono or stereo as the source
    (more channels are mixed down to stereo). Positions count decoded samples from the file's first
    one, as utils.extract.media.decode_audio does for the features."""
    if start < 0 or seconds <= 0:
        raise RenderError(f"audio cut {start:.2f} s + {seconds:.2f} s: start must be >= 0 and length > 0")
    container = open_media(path)
    try:
        stream = first_audio_stream(container, path)
        rate = stream.rate if stream.rate in AAC_RATES else 48000
        layout = "mono" if (stream.channels or 1) == 1 else "stereo"
        resampler = av.AudioResampler(format="fltp", layout=layout, rate=rate)
        first, count = round(start * rate), round(seconds * rate)
        chunks: list[np.ndarray] = []
        position = 0                      # samples decoded so far

        def take(frames: list[av.AudioFrame]) -> None:
            nonlocal position
            for f in frames:
                data = f.to_ndarray()
                lo, hi = max(first - position, 0), min(first + count - position, data.shape[1])
                if hi > lo:
                    chunks.append(data[:, lo:hi])
                position += data.shape[1]

        try:
            for frame in container.decode(stream):
                frame.pts = None          # a continuous sample count, whatever the timestamps say
                take(resampler.resample(frame))
                if position >= first + count:
                    break
            else:
                take(resampler.resample(None))
        except (av.FFmpegError, OSError, ValueError) as e:
            if position == 0:
                raise MediaError(f"{path}: cannot decode audio ({e})") from e
        if not chunks:
            raise RenderError(f"{path}: the track ends at {position / rate:.2f} s, before the moment "
                              f"starts ({start:.2f} s)")
        return np.ascontiguousarray(np.concatenate(chunks, axis=1), dtype=np.float32), rate
    finally:
        container.close()


def apply_fades(samples: np.ndarray, rate: int, fade: float) -> np.ndarray:
    """Linear fade in and out of `fade` seconds (at most a quarter of the clip each), on a copy."""
    out = samples.astype(np.float32, copy=True)
    n = min(int(round(fade * rate)), out.shape[-1] // 4)
    if n > 0:
        ramp = np.linspace(0.0, 1.0, n, endpoint=False, dtype=np.float32)
        out[..., :n] *= ramp
        out[..., -n:] *= ramp[::-1]
    return out


# ------------------------------------------------------------------------------------------------ writing
def check_moment(start: float, end: float, what: str = "the moment") -> None:
    if not (np.isfinite(start) and np.isfinite(end)) or start < 0:
        raise RenderError(f"{what} {start}-{end} s is not a valid time range")
    if end <= start:
        raise RenderError(f"{what} starts at {start:.2f} s and ends at {end:.2f} s: it lies past the end of "
                          "the track (or is empty), so there is nothing to play")


def write_wav(samples: np.ndarray, rate: int, path: str | os.PathLike) -> Path:
    """16-bit PCM WAV of [channels, n] float samples in [-1, 1], written atomically."""
    path = Path(path)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2").T
    with atomic_open(path, "wb") as f:
        with wave.open(f, "wb") as w:
            w.setnchannels(pcm.shape[1])
            w.setsampwidth(2)
            w.setframerate(rate)
            w.writeframes(pcm.tobytes())
    return path


def write_moment_clip(audio: str | os.PathLike, start: float, end: float, out: str | os.PathLike,
                      fade: float = DEFAULT_FADE) -> Path:
    """The moment [start, end] of a track as a WAV file with the preview's fades (what the page plays)."""
    check_moment(start, end)
    samples, rate = read_audio_moment(audio, start, end - start)
    return write_wav(apply_fades(samples, rate, fade), rate, out)


def _encode_audio(stream: av.AudioStream, samples: np.ndarray, rate: int, offset: int) -> list[av.Packet]:
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    time_base = fractions.Fraction(1, rate)
    packets: list[av.Packet] = []
    for lo in range(0, samples.shape[1], AUDIO_FRAME):
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(samples[:, lo:lo + AUDIO_FRAME]),
                                           format="fltp", layout=layout)
        frame.sample_rate, frame.time_base, frame.pts = rate, time_base, offset + lo
        packets += stream.encode(frame)
    packets += stream.encode(None)
    return packets


def render_preview(video: str | os.PathLike, audio: str | os.PathLike, start: float, end: float,
                   out: str | os.PathLike, fade: float = DEFAULT_FADE) -> RenderResult:
    """Write `out` (.mp4/.m4v/.mov/.mkv): the video stream of `video` copied unchanged, with the moment
    [start, end] s of the track `audio` as its only sound (see the module docstring)."""
    out = Path(out)
    fmt = CONTAINERS.get(out.suffix.lower())
    if fmt is None:
        raise RenderError(f"{out}: the preview is written as {', '.join(CONTAINERS)}; pick one of those")
    check_moment(start, end)
    info = probe_video(video)
    seconds = min(end - start, info.duration) if info.duration > 0 else end - start
    samples, rate = read_audio_moment(audio, start, seconds)
    samples = apply_fades(samples, rate, fade)
    source = open_media(video)
    try:
        in_video = source.streams.video[0]
        try:
            with atomic_open(out, "wb") as f:
                _mux(source, in_video, f, fmt, samples, rate, info.start)
        except av.FFmpegError as e:
            raise RenderError(f"cannot write {out} ({e}); the video stream ({info.codec}) may not fit in "
                              f"{out.suffix} -- try .mkv") from e
    finally:
        source.close()
    return RenderResult(out, info.duration, float(start), samples.shape[1] / rate, fade, rate)


def _mux(source: av.container.InputContainer, in_video: av.VideoStream, f: IO[bytes], fmt: str, samples: np.ndarray,
         rate: int, video_start: float) -> None:
    target = av.open(f, "w", format=fmt)
    try:
        _copy_and_interleave(source, in_video, target, samples, rate, video_start)
    except BaseException:
        with contextlib.suppress(Exception):   # the first error is the one to report
            target.close()
        raise
    target.close()


def _copy_and_interleave(source: av.container.InputContainer, in_video: av.VideoStream,
                         target: av.container.OutputContainer, samples: np.ndarray, rate: int,
                         video_start: float) -> None:
    out_video = target.add_stream_from_template(in_video)
    out_audio = target.add_stream("aac", rate=rate, layout="mono" if samples.shape[0] == 1 else "stereo")
    out_audio.bit_rate = 96_000 * samples.shape[0]
    # The soundtrack starts with the first picture, whatever the video's first timestamp.
    pending = iter(_encode_audio(out_audio, samples, rate, offset=round(video_start * rate)))
    next_audio = next(pending, None)
    for packet in source.demux(in_video):
        if packet.dts is None:        # the demuxer's end-of-stream marker
            continue
        t = float(packet.dts * packet.time_base)
        # Interleave by time, so players need not buffer one stream to reach the other.
        while next_audio is not None and float(next_audio.dts * next_audio.time_base) <= t:
            target.mux(next_audio)
            next_audio = next(pending, None)
        packet.stream = out_video
        target.mux(packet)
    while next_audio is not None:
        target.mux(next_audio)
        next_audio = next(pending, None)


# ------------------------------------------------------------------------------------ from a grounding result
def pick_track(tracks: Sequence, music_id: str | None = None):
    """The hit to render: the top-1, or the one with `music_id` (it must be among the returned tracks)."""
    if not tracks:
        raise RenderError("no tracks were returned for this query")
    if music_id is None:
        return tracks[0]
    for hit in tracks:
        if hit.music_id == music_id:
            return hit
    raise RenderError(f"track {music_id} is not among the {len(tracks)} tracks returned for this query; "
                      "raise --topk to include it")


def render_hit(hit, video: str | os.PathLike, out: str | os.PathLike, find_audio: Callable[[str], Path | None],
               fade: float = DEFAULT_FADE) -> RenderResult:
    """Render `video` with the moment of a grounding hit (utils.ground.grounding.TrackHit) as its soundtrack."""
    audio = find_audio(hit.music_id)
    if audio is None:
        raise RenderError(f"no audio file found for track {hit.music_id}: pass --music_dir (a folder with "
                          f"{hit.music_id}.<ext>, or the tree the index CSV's music_path points into)")
    return render_preview(video, audio, hit.start, hit.end, out, fade)
