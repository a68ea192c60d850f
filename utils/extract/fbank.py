"""Kaldi-compatible log-mel filterbank features and the AST input recipe, in plain torch.

The authors computed AST inputs with ``torchaudio.compliance.kaldi.fbank``. torchaudio is
not a dependency of this project (its wheels are pinned to one exact torch build, which makes it hard to
install next to an arbitrary torch), so the subset of Kaldi's ``compute-fbank-feats`` that the recipe uses is
re-implemented here:

* frames of 25 ms every 10 ms, "snip edges" (only frames that fit entirely: ``1 + (N - 400) // 160``);
* per frame: remove the DC offset, pre-emphasis 0.97 (the first sample is pre-emphasised against itself, as
  Kaldi does), symmetric Hanning window, zero-pad to the next power of two (512), power spectrum;
* HTK-style mel filterbank (``mel = 1127 ln(1 + f/700)``), triangles in the mel domain between 20 Hz and
  Nyquist, no energy coefficient, no dither;
* natural log with a floor at the machine epsilon of the compute dtype (float32 for audio).

``ast_input`` then pads/truncates to 1024 frames and applies the AudioSet normalisation of the AST
checkpoint, exactly in that order (so padded frames end up at ``(0 + 4.27) / 9.14 ≈ 0.467``, not 0).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from model.ast_encoder import AST_TARGET_LENGTH, NUM_MEL_BINS

SAMPLE_RATE = 16000
FRAME_LENGTH_MS = 25.0
FRAME_SHIFT_MS = 10.0
PREEMPHASIS = 0.97
LOW_FREQ = 20.0

# Mean and std of the AudioSet fbank features used to train the AST checkpoint (audioset_0.4593.pth).
AST_MEAN = -4.2677393
AST_STD = 4.5689974


def num_frames(num_samples: int, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of Kaldi frames with snip_edges=True (0 if the signal is shorter than one frame)."""
    size, shift = _window_size(sample_rate), _window_shift(sample_rate)
    return 0 if num_samples < size else 1 + (num_samples - size) // shift


def _window_size(sample_rate: int) -> int:
    return int(sample_rate * FRAME_LENGTH_MS / 1000.0)


def _window_shift(sample_rate: int) -> int:
    return int(sample_rate * FRAME_SHIFT_MS / 1000.0)


def _next_power_of_two(n: int) -> int:
    return 1 if n == 0 else 2 ** (n - 1).bit_length()


def _mel(freq: torch.Tensor | float) -> torch.Tensor | float:
    """HTK mel scale (Kaldi's MelScale)."""
    if isinstance(freq, torch.Tensor):
        return 1127.0 * torch.log1p(freq / 700.0)
    return 1127.0 * math.log1p(freq / 700.0)


@lru_cache(maxsize=8)
def mel_filterbank(num_bins: int, n_fft: int, sample_rate: int, low_freq: float = LOW_FREQ,
                   high_freq: float = 0.0) -> torch.Tensor:
    """Kaldi's triangular mel filters as a [num_bins, n_fft // 2 + 1] float64 matrix.

    Triangles are linear in the *mel* domain (not in Hz), centred on num_bins + 2 equally spaced mel points;
    the Nyquist bin gets weight 0 (Kaldi builds the filters over n_fft / 2 bins only). Kept in float64 and
    cast to the signal's dtype at use; cached because every window of every track uses the same matrix.
    """
    nyquist = 0.5 * sample_rate
    if high_freq <= 0.0:
        high_freq += nyquist  # Kaldi: non-positive high_freq is an offset from Nyquist
    mel_low, mel_high = _mel(low_freq), _mel(high_freq)
    delta = (mel_high - mel_low) / (num_bins + 1)
    bins = torch.arange(num_bins, dtype=torch.float64).unsqueeze(1)
    left = mel_low + bins * delta
    center = mel_low + (bins + 1.0) * delta
    right = mel_low + (bins + 2.0) * delta
    fft_bin_width = sample_rate / n_fft
    mel = _mel(fft_bin_width * torch.arange(n_fft // 2, dtype=torch.float64)).unsqueeze(0)
    up = (mel - left) / (center - left)
    down = (right - mel) / (right - center)
    weights = torch.clamp(torch.minimum(up, down), min=0.0)
    weights = torch.nn.functional.pad(weights, (0, 1))  # Nyquist bin
    return weights


def fbank(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE, num_mel_bins: int = NUM_MEL_BINS) -> torch.Tensor:
    """Kaldi log-mel fbank of a mono waveform [N] (float, ~[-1, 1]) -> [num_frames(N), num_mel_bins].

    Matches ``torchaudio.compliance.kaldi.fbank(waveform[None], htk_compat=True, sample_frequency=sample_rate,
    use_energy=False, window_type='hanning', num_mel_bins=num_mel_bins, dither=0.0, frame_shift=10)``.
    Like torchaudio, it computes in the input's dtype (float64 stays float64, anything else becomes float32)
    and floors the mel energies at that dtype's machine epsilon before the log.
    """
    if waveform.dim() != 1:
        raise ValueError(f"fbank expects a mono waveform [N], got shape {tuple(waveform.shape)}")
    dtype = torch.float64 if waveform.dtype == torch.float64 else torch.float32
    waveform = waveform.to(dtype)
    size, shift = _window_size(sample_rate), _window_shift(sample_rate)
    n_frames = num_frames(waveform.numel(), sample_rate)
    if n_frames == 0:
        return waveform.new_zeros((0, num_mel_bins))
    frames = waveform.unfold(0, size, shift)  # [T, size], snip_edges: only complete frames
    frames = frames - frames.mean(dim=1, keepdim=True)  # remove DC offset
    # Pre-emphasis; Kaldi treats the sample before the first one as the first sample itself.
    previous = torch.cat([frames[:, :1], frames[:, :-1]], dim=1)
    frames = frames - PREEMPHASIS * previous
    window = torch.hann_window(size, periodic=False, dtype=dtype, device=waveform.device)
    frames = frames * window
    n_fft = _next_power_of_two(size)
    power = torch.fft.rfft(frames, n=n_fft).abs().pow(2.0)  # [T, n_fft // 2 + 1]
    filters = mel_filterbank(num_mel_bins, n_fft, sample_rate).to(device=waveform.device, dtype=dtype)
    mel_energies = power @ filters.T
    eps = torch.finfo(dtype).eps
    return torch.clamp(mel_energies, min=eps).log()


def pad_or_truncate(features: torch.Tensor, target_length: int = AST_TARGET_LENGTH) -> torch.Tensor:
    """Zero-pad at the end (in the log-mel domain, as the authors' extractor does) or cut to target_length frames."""
    missing = target_length - features.shape[0]
    if missing > 0:
        return torch.nn.functional.pad(features, (0, 0, 0, missing))
    return features[:target_length]


def ast_input(waveform: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """AST model input for one audio window: fbank -> pad/cut to 1024 frames -> AudioSet normalisation.

    Returns [1024, 128] in the waveform's compute dtype (float32 for decoded audio).
    """
    features = pad_or_truncate(fbank(waveform, sample_rate), AST_TARGET_LENGTH)
    return (features - AST_MEAN) / (2.0 * AST_STD)
