"""Temporal span helpers (torch).

Spans are stored in two conventions:
  * (center, width)  -- what the span head predicts, normalised by 240 s;
  * (start, end)     -- what IoU and the metrics use.
The conversions do not clamp: the original computes gIoU on unclamped spans (its
SetCriterion's span loss), and clamping to the track happens only at evaluation.

Decoding the detector's output into one moment (top_moment, spans_to_seconds) lives here too,
so that test.py, the grounding tools and the boundary head decode alike.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .config_flags import FOREGROUND


def span_cw_to_se(cw: Tensor) -> Tensor:
    """(center, width) -> (start, end), last dim of size 2."""
    center, width = cw.unbind(-1)
    return torch.stack([center - 0.5 * width, center + 0.5 * width], dim=-1)


def span_se_to_cw(se: Tensor) -> Tensor:
    """(start, end) -> (center, width), last dim of size 2."""
    start, end = se.unbind(-1)
    return torch.stack([0.5 * (start + end), end - start], dim=-1)


def temporal_iou(spans1: Tensor, spans2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU of (start, end) spans.

    spans1 [N, 2], spans2 [M, 2] -> (iou [N, M], union [N, M]).
    """
    len1 = spans1[:, 1] - spans1[:, 0]
    len2 = spans2[:, 1] - spans2[:, 0]
    left = torch.max(spans1[:, None, 0], spans2[None, :, 0])
    right = torch.min(spans1[:, None, 1], spans2[None, :, 1])
    inter = (right - left).clamp(min=0)
    union = len1[:, None] + len2[None, :] - inter
    return inter / union, union


def generalized_temporal_iou(spans1: Tensor, spans2: Tensor) -> Tensor:
    """Pairwise generalised IoU of (start, end) spans: IoU - (enclosing - union) / enclosing.

    spans1 [N, 2], spans2 [M, 2] -> [N, M]; 1 for identical spans, towards -1 for
    spans that are short and far apart.
    """
    iou, union = temporal_iou(spans1, spans2)
    left = torch.min(spans1[:, None, 0], spans2[None, :, 0])
    right = torch.max(spans1[:, None, 1], spans2[None, :, 1])
    enclosing = (right - left).clamp(min=0)
    return iou - (enclosing - union) / enclosing


def foreground_index(args: Any) -> int:
    """The class index of "foreground" in pred_logits for parsed flags (--fb_label)."""
    return FOREGROUND[args.fb_label]


def top_moment(detection: dict, fg_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, width) of the highest-scoring query and its foreground probability."""
    prob = detection["pred_logits"].float().softmax(-1)[..., fg_index]      # [B, Q]
    score, best = prob.max(dim=1)
    spans = detection["pred_spans"].float()                                   # [B, Q, 2]
    span = spans.gather(1, best[:, None, None].expand(-1, 1, spans.shape[-1]))[:, 0]
    return span, score


def spans_to_seconds(span_cw: torch.Tensor, max_m_duration: float) -> torch.Tensor:
    """Normalised (center, width) -> (start, end) in seconds, unclipped."""
    return span_cw_to_se(span_cw) * max_m_duration

