"""Decoding raw media with PyAV: video frames at 1 fps and audio as 16 kHz mono float32.

Both decoders raise MediaError (with the file name) for anything that cannot be read, so the extraction
script can report the file and move on instead of dying with an FFmpeg traceback.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal

import av
import numpy as np
import torch
from PIL import Image

VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".mov", ".avi", ".m4v", ".flv", ".mpg", ".mpeg", ".ts", ".3gp")
AUDIO_EXTENSIONS = (".mp3", ".wav", ".flac", ".m4a", ".aac", ".ogg", ".opus", ".wma", ".aiff", ".aif", ".mp4",
                    ".webm", ".mkv")

# A frame is taken "at t = i seconds" when its presentation time is <= i (+ this slack, which absorbs
# timestamps such as 0.99999 from rational time bases).
_TIME_EPS = 1e-3


class MediaError(RuntimeError):
    """A media file could not be opened or decoded."""


def open_media(path: str | os.PathLike) -> av.container.InputContainer:
    """Open a media file for reading; MediaError (naming the file) when it is missing or not media."""
    if not Path(path).is_file():
        raise MediaError(f"{path}: file not found")
    try:
        return av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise MediaError(f"{path}: cannot open ({e})") from e


def first_audio_stream(container: av.container.InputContainer, path: str | os.PathLike) -> av.AudioStream:
    """The container's first audio stream; MediaError (naming the file) when it has none."""
    if not container.streams.audio:
        raise MediaError(f"{path}: no audio stream")
    return container.streams.audio[0]


def _frame_time(frame: av.VideoFrame, index: int, fallback_rate: float) -> float:
    """Presentation time in seconds; falls back to index / rate for streams without timestamps."""
    if frame.time is not None:
        return float(frame.time)
    return index / fallback_rate


def _frame_duration(frame: av.VideoFrame, fallback: float) -> float:
    duration = getattr(frame, "duration", None)
    if duration and frame.time_base is not None:
        return float(duration * frame.time_base)
    return fallback


def decode_frames_1fps(path: str | os.PathLike, max_frames: int = 50) -> tuple[list[Image.Image], float]:
    """One RGB frame per second of video: slot i shows the frame on screen at t = i seconds.

    Slot i holds the last decoded frame whose presentation time is <= i (the first frame if the stream starts
    late). The number of slots is min(max_frames, floor(D) + 1) where D is the end time of the last frame,
    so a 12.4 s clip gives 13 frames (t = 0..12). For a clip of exactly 12.0 s the slot t = 12 shows the final
    frame, mirroring the authors' frame dumps ("<i>.jpg" plus "end.jpg").

    Returns (frames as PIL images, duration D in seconds). Frames are decoded sequentially and only the
    selected ones are converted, so memory stays small for long clips.
    """
    container = open_media(path)
    try:
        if not container.streams.video:
            raise MediaError(f"{path}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        selected: list[Image.Image] = []
        last: av.VideoFrame | None = None
        end_time = 0.0
        try:
            for index, frame in enumerate(container.decode(stream)):
                t = _frame_time(frame, index, rate)
                # Every slot whose time lies before this frame shows the previous frame.
                while last is not None and len(selected) < max_frames and len(selected) < t - _TIME_EPS:
                    selected.append(last.to_image())
                last = frame
                end_time = t + _frame_duration(frame, 1.0 / rate)
                if len(selected) >= max_frames:
                    break
        except (av.FFmpegError, OSError, ValueError) as e:
            if last is None:
                raise MediaError(f"{path}: cannot decode video ({e})") from e
            # A truncated file: keep what was decoded (FFmpeg itself plays such files up to the damage).
        if last is None:
            raise MediaError(f"{path}: no decodable video frames")
        n_slots = min(max_frames, math.floor(end_time + _TIME_EPS) + 1)
        if len(selected) < n_slots:
            final = last.to_image()
            selected.extend([final] * (n_slots - len(selected)))
        return selected[:n_slots], end_time
    finally:
        container.close()


def decode_audio(path: str | os.PathLike, sample_rate: int = 16000,
                 channel: Literal["first", "mean"] = "first") -> torch.Tensor:
    """Decode the first audio stream, resample to `sample_rate` with FFmpeg's resampler, return mono [N] float32.

    channel="first" keeps the first channel, which is what the authors' torchaudio.load +
    kaldi.fbank(channel=-1 -> 0) pipeline fed to AST; "mean" averages all channels instead.
    Samples are floats in [-1, 1] (integer PCM divided by its full scale, like torchaudio.load).
    """
    if channel not in ("first", "mean"):
        raise ValueError(f"channel must be 'first' or 'mean', got {channel!r}")
    container = open_media(path)
    try:
        stream = first_audio_stream(container, path)
        # Planar float keeps channels separate ([C, n] per frame); layout None keeps the source layout.
        resampler = av.AudioResampler(format="fltp", layout=None, rate=sample_rate)
        chunks: list[np.ndarray] = []

        def add(frames: list[av.AudioFrame]) -> None:
            for f in frames:
                data = f.to_ndarray()
                chunks.append(data[0] if channel == "first" else data.mean(axis=0))

        try:
            for frame in container.decode(stream):
                frame.pts = None  # let the resampler ignore gaps/overlaps in timestamps
                add(resampler.resample(frame))
            add(resampler.resample(None))  # flush the filter's delay line
        except (av.FFmpegError, OSError, ValueError) as e:
            if not chunks:
                raise MediaError(f"{path}: cannot decode audio ({e})") from e
        if not chunks or sum(c.size for c in chunks) == 0:
            raise MediaError(f"{path}: no decodable audio samples")
        return torch.from_numpy(np.concatenate(chunks).astype(np.float32, copy=False))
    finally:
        container.close()
