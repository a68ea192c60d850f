"""Raw media -> the feature tensors the model consumes (CLIP frames, AST windows), as a small Python API.

Used by scripts/extract_features.py (batch extraction into the official folder layout) and by
scripts/ground.py (one video / one track on the fly):

    clip = load_clip("model/pretrained_models/ViT-B-32.pt", device)
    ast = load_ast("model/pretrained_models/audioset_0.4593.pth", device)
    v_feat, v_mask = extract_video_features("clip.mp4", clip, device)            # [50,512], [50]
    m_feat, m_mask = extract_music_features("song.mp3", ast, 2.5, 10.0, device)  # [96,768], [96]

Padded slots are zero with mask 0. Features of padded music windows (window centre after the end of the
track) are not computed at all: the authors' files hold values there, but every consumer masks them
(the data loader zeroes them), so writing zeros is equivalent and saves most of the AST compute for short
tracks.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from model.ast_encoder import ASTEncoder, load_ast
from model.clip_encoder import CLIPImageEncoder, load_clip
from utils.data.constants import MAX_M_DURATION, MUSIC_DIRS, VIDEO_DIR
from utils.data.features import music_dir_for_stride, num_snippets_for
from utils.extract.fbank import SAMPLE_RATE, ast_input
from utils.extract.media import decode_audio, decode_frames_1fps

__all__ = ["load_clip", "load_ast", "extract_video_features", "extract_music_features", "music_windows",
           "music_dir_for_stride", "MAX_V_FRAMES", "MAX_M_DURATION", "MUSIC_DIRS", "VIDEO_DIR"]

MAX_V_FRAMES = 50


def music_windows(duration: float, stride: float, filter_s: float,
                  max_duration: float = MAX_M_DURATION) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Window centres, [start, end) sample indices and validity mask of a track (dataloader_MGSV_EC_rawdata.py).

    Centres are stride * k for k < int(max_duration / stride); window k covers
    [max(0, c - filter/2), min(max_duration, c + filter/2)] (padding 0) and is valid iff c <= duration.
    Returns (centres [K] float64, bounds [K,2] int64 sample indices at 16 kHz, mask [K] bool).
    """
    if stride <= 0 or filter_s <= 0:
        raise ValueError(f"stride and filter must be positive, got {stride}, {filter_s}")
    centres = stride * np.arange(num_snippets_for(stride, max_duration), dtype=np.float64)
    starts = np.maximum(0.0, centres - filter_s / 2)
    ends = np.minimum(max_duration, centres + filter_s / 2)
    bounds = np.stack([(SAMPLE_RATE * starts).astype(np.int64), (SAMPLE_RATE * ends).astype(np.int64)], axis=1)
    return centres, bounds, centres <= duration


@torch.inference_mode()
def extract_video_features(path: str | os.PathLike, clip_model: CLIPImageEncoder,
                           device: str | torch.device | None = None, max_frames: int = MAX_V_FRAMES,
                           batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP embeddings of one frame per second -> (feat [max_frames, 512] float32, mask [max_frames] float32).

    `device` is accepted for API symmetry; computation runs where clip_model lives.
    Raises utils.extract.media.MediaError for unreadable files.
    """
    frames, _ = decode_frames_1fps(path, max_frames)
    embeddings = clip_model.encode_images(frames, batch_size=batch_size)
    feat = torch.zeros(max_frames, clip_model.out_dim)
    mask = torch.zeros(max_frames)
    feat[:len(frames)] = embeddings
    mask[:len(frames)] = 1.0
    return feat, mask


def _window_inputs(waveform: torch.Tensor, bounds: np.ndarray) -> torch.Tensor:
    """AST inputs [K,1024,128] for the given sample ranges of a waveform already padded to 240 s."""
    return torch.stack([ast_input(waveform[int(s):int(e)]) for s, e in bounds])


@torch.inference_mode()
def extract_music_features(path: str | os.PathLike, ast_model: ASTEncoder, stride: float = 2.5,
                           filter: float = 10.0, device: str | torch.device | None = None,
                           batch_size: int = 32, channel: str = "first",
                           max_duration: float = MAX_M_DURATION) -> tuple[torch.Tensor, torch.Tensor]:
    """AST embeddings of windows every `stride` s -> (feat [int(240/stride), 768], mask [same]) float32.

    The track is decoded to 16 kHz mono (first channel by default, see utils.extract.media.decode_audio), its true
    duration D = samples / 16000 decides the mask (centre <= D), then it is zero-padded or cut to 240 s and
    each valid window goes through the Kaldi fbank + AST. `filter` keeps the authors' flag name (window
    length in seconds). `device` is accepted for API symmetry; computation runs where ast_model lives.
    """
    waveform = decode_audio(path, SAMPLE_RATE, channel=channel)
    duration = waveform.numel() / SAMPLE_RATE
    total = int(SAMPLE_RATE * max_duration)
    waveform = torch.nn.functional.pad(waveform[:total], (0, max(0, total - waveform.numel())))
    _, bounds, valid = music_windows(duration, stride, filter, max_duration)
    feat = torch.zeros(len(valid), ast_model.out_dim)
    index = np.flatnonzero(valid)
    # Build the fbank inputs batch by batch: 96 windows x 1024 x 128 floats would be 50 MB at once.
    for start in range(0, len(index), batch_size):
        chunk = index[start:start + batch_size]
        inputs = _window_inputs(waveform, bounds[chunk])
        feat[torch.from_numpy(chunk)] = ast_model.encode(inputs, batch_size=batch_size)
    return feat, torch.from_numpy(valid.astype(np.float32))
