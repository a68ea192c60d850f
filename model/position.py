"""Positional encodings.

Two different sine encodings are used by MaDe (the authors' model/model_Base.py and
music_detr/position_encoding.py):
  * SinusoidalPositionalEncoding: the classic absolute table added to the projected
    frames / snippets before the temporal self-attention layer (position = row index).
  * sine_positions_1d: DETR's normalised 1-D sine embedding computed from a padding
    mask (position = cumulative count of valid tokens, scaled to [0, 2*pi]).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoid_table(length: int, dim: int) -> Tensor:
    """PE[p, 2i] = sin(p / 10000^(2i/dim)), PE[p, 2i+1] = cos(same); p = 0..length-1."""
    position = torch.arange(length, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(length, dim)
    table[:, 0::2] = torch.sin(position * inv_freq)
    table[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return table


class SinusoidalPositionalEncoding(nn.Module):
    """Adds the fixed sinusoid table to a [B, L, dim] sequence (first L rows)."""

    def __init__(self, dim: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        # Not persistent: the table is a function of (max_len, dim), so checkpoints do
        # not need it (checkpoint_compat re-creates the authors' copy when exporting).
        self.register_buffer("pe", sinusoid_table(max_len, dim), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} positions exceeds the positional table ({self.max_len})")
        return x + self.pe[:length]


def sine_positions_1d(mask: Tensor, dim: int, temperature: float = 10000.0,
                      scale: float = 2 * math.pi) -> Tensor:
    """DETR-style normalised 1-D sine embedding from a padding mask.

    mask [B, L] (1 valid / 0 padding) -> [B, L, dim]. The position of token t is
    cumsum(mask)_t / (cumsum(mask)_last + 1e-6) * scale, so padded tokens repeat the
    last valid position; channel c uses frequency temperature^(2*floor(c/2)/dim),
    even channels sin, odd channels cos (interleaved).
    """
    x_embed = mask.float().cumsum(dim=1)
    x_embed = x_embed / (x_embed[:, -1:] + 1e-6) * scale
    dim_t = torch.arange(dim, dtype=torch.float32, device=mask.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / dim)
    pos = x_embed[:, :, None] / dim_t
    return torch.stack([pos[:, :, 0::2].sin(), pos[:, :, 1::2].cos()], dim=3).flatten(2)
