"""Kaldi-compatible fbank (utils/extract/fbank.py).

torchaudio (the authors' implementation) has no build for this project's torch version, so it cannot be the
reference here. Instead the fbank is pinned by (a) an independent float64 numpy implementation written from
Kaldi's definition, frame by frame, and (b) hand-checked properties: frame counts, the mel bin of a pure tone,
log-energy scaling, DC removal, the AST padding/normalisation recipe.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from utils.extract.fbank import AST_MEAN, AST_STD, ast_input, fbank, mel_filterbank, num_frames

SR = 16000
EPS32 = float(np.finfo(np.float32).eps)


def numpy_fbank(x: np.ndarray, n_mels: int = 128, eps: float = EPS32) -> np.ndarray:
    """Kaldi compute-fbank-feats (snip_edges, 25/10 ms, DC removal, preemph 0.97 with x[-1] := x[0], symmetric
    Hanning, 512-point power spectrum, HTK mel triangles 20 Hz..Nyquist over bins 0..255, log with eps floor)."""
    x = x.astype(np.float64)
    size, shift, n_fft = 400, 160, 512
    n = np.arange(size)
    window = 0.5 - 0.5 * np.cos(2 * math.pi * n / (size - 1))
    mel = lambda f: 1127.0 * np.log(1.0 + f / 700.0)
    points = mel(20.0) + (mel(SR / 2) - mel(20.0)) / (n_mels + 1) * np.arange(n_mels + 2)
    bin_mel = mel(np.arange(n_fft // 2 + 1) * SR / n_fft)
    filters = np.zeros((n_mels, n_fft // 2 + 1))
    for j in range(n_mels):
        left, centre, right = points[j:j + 3]
        for b in range(n_fft // 2):  # Kaldi's filters never touch the Nyquist bin
            m = bin_mel[b]
            if left < m <= centre:
                filters[j, b] = (m - left) / (centre - left)
            elif centre < m < right:
                filters[j, b] = (right - m) / (right - centre)
    rows = []
    for t in range(1 + (len(x) - size) // shift):
        frame = x[t * shift:t * shift + size].copy()
        frame -= frame.mean()
        frame = frame - 0.97 * np.concatenate([frame[:1], frame[:-1]])
        spectrum = np.abs(np.fft.rfft(frame * window, n_fft)) ** 2
        rows.append(np.log(np.maximum(filters @ spectrum, eps)))
    return np.array(rows)


def _signal(seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    chirp = np.sin(2 * math.pi * (200 * t + 1500 * t ** 2))
    return (0.3 * chirp + 0.1 * rng.standard_normal(t.size)).astype(np.float32)


@pytest.mark.parametrize("n,expected", [(399, 0), (400, 1), (559, 1), (560, 2), (16000, 98), (80000, 498),
                                        (120000, 748), (160000, 998)])
def test_frame_count_snip_edges(n, expected):
    assert num_frames(n) == expected == max(0, 1 + (n - 400) // 160)
    assert fbank(torch.zeros(n)).shape == (expected, 128)


def test_matches_independent_numpy_implementation_float64():
    """Same algorithm: in float64 the two agree to rounding error."""
    x = _signal(1.0).astype(np.float64)
    ours = fbank(torch.from_numpy(x)).numpy()
    ref = numpy_fbank(x, eps=float(np.finfo(np.float64).eps))
    assert ours.shape == ref.shape == (98, 128)
    np.testing.assert_allclose(ours, ref, atol=1e-8, rtol=0)


def test_matches_independent_numpy_implementation_float32():
    """The production path (float32, as torchaudio computes for float32 audio) is within 1e-4 of the float64
    reference wherever the band has real energy; only near-silent bands (log energy < -9, i.e. < 1e-4, here
    low bands after pre-emphasis) see float32 FFT rounding above 1e-4, and stay within 1e-3."""
    x = _signal(1.0)
    ours = fbank(torch.from_numpy(x)).numpy()
    ref = numpy_fbank(x)
    assert ours.dtype == np.float32 and ours.shape == ref.shape == (98, 128)
    loud = ref > -9.0
    assert loud.mean() > 0.9
    np.testing.assert_allclose(ours[loud], ref[loud], atol=1e-4, rtol=0)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)


def test_filterbank_shape_and_triangles():
    fb = mel_filterbank(128, 512, SR)
    assert fb.shape == (128, 257)
    assert torch.all(fb[:, -1] == 0) and torch.all(fb >= 0) and torch.all(fb <= 1)
    # every filter above the lowest few has support, and consecutive triangles overlap (sum ~1 in between)
    assert (fb.sum(1) > 0).sum() >= 120


def test_pure_tone_peaks_at_its_mel_bin():
    freq = 1000.0
    t = np.arange(SR) / SR
    x = torch.from_numpy((0.5 * np.sin(2 * math.pi * freq * t)).astype(np.float32))
    peak = int(fbank(x).mean(0).argmax())
    mel = lambda f: 1127.0 * math.log(1 + f / 700.0)
    centres = [mel(20) + (k + 1) * (mel(8000) - mel(20)) / 129 for k in range(128)]
    assert peak == int(np.argmin([abs(c - mel(freq)) for c in centres]))


def test_log_energy_scales_with_amplitude():
    """Power spectrum: amplitude x3 adds 2 ln 3 to every band above the floor (the lowest mel filters contain
    no FFT bin at 31.25 Hz resolution and stay at log(eps), as in Kaldi)."""
    x = torch.from_numpy(_signal(0.5))
    base, loud = fbank(x).numpy(), fbank(3.0 * x).numpy()
    floored = base <= math.log(EPS32) + 1e-6
    assert 0 < floored[0].sum() < 10 and np.all(loud[floored] == base[floored])
    np.testing.assert_allclose(loud[~floored], base[~floored] + 2 * math.log(3.0), atol=1e-3)
    x64 = x.double()  # without float32 rounding the identity is exact
    base64 = fbank(x64).numpy()
    np.testing.assert_allclose(fbank(3.0 * x64).numpy()[~floored], base64[~floored] + 2 * math.log(3.0), atol=1e-9)


def test_dc_offset_removed_per_frame():
    x = torch.from_numpy(_signal(0.5)).double()
    np.testing.assert_allclose(fbank(x + 0.25).numpy(), fbank(x).numpy(), atol=1e-6)
    # a constant signal is all DC: every frame is zero after DC removal, so every bin sits at the log floor
    const = fbank(torch.full((4000,), 0.7))
    np.testing.assert_allclose(const.numpy(), math.log(EPS32), atol=1e-6)


def test_preemphasis_first_sample_against_itself():
    """A single impulse at the start of a frame: with x[-1] := x[0] the pre-emphasised frame starts with
    0.03 * x0, which the numpy reference reproduces (zero-padding x[-1] = 0 would not)."""
    x = np.zeros(400, np.float32)
    x[0] = 1.0
    np.testing.assert_allclose(fbank(torch.from_numpy(x)).numpy(), numpy_fbank(x), atol=1e-4)


def test_rejects_multichannel_input():
    with pytest.raises(ValueError, match="mono"):
        fbank(torch.zeros(2, 1000))


def test_ast_input_pads_then_normalises():
    short = torch.from_numpy(_signal(5.0))  # 498 frames
    out = ast_input(short)
    assert out.shape == (1024, 128)
    torch.testing.assert_close(out[:498], (fbank(short) - AST_MEAN) / (2 * AST_STD))
    torch.testing.assert_close(out[498:], torch.full((526, 128), -AST_MEAN / (2 * AST_STD)))
    assert abs(float(out[-1, 0]) - 0.467) < 1e-3
    long = torch.from_numpy(_signal(12.0))  # 1198 frames -> cut to the first 1024
    torch.testing.assert_close(ast_input(long), (fbank(long)[:1024] - AST_MEAN) / (2 * AST_STD))
