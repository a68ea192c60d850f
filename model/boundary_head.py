"""Boundary head (--moment_head boundary): the moment's start as a distribution over the music snippets.

Not in the paper; opt-in. The paper's detector is a one-query DETR that regresses (centre, width)
and needs many GPU epochs to read the music. Two facts make a simpler head possible:
  * the moment lasts as long as the video (|moment - video length| < 0.05 s in 98.7 % of the
    real MGSV-EC rows), so only the start is unknown;
  * the start is a position on the snippet grid (a window every `stride` seconds), so it can be
    classified instead of regressed: a softmax over the snippets, trained with cross-entropy.

The start logit of snippet k adds two terms, each of which a reader can check on its own:

    alignment(k) = scale * mean_i cos(Wv x_i, Wm y_a(k,i))   frame i (video second i) against the
                                                             snippet at music time stride*k + i:
                                                             does the video fit the music from k on?
    music(k)     = conv(y_k-2 .. y_k+2)                      what the music alone says: does a clip
                                                             start here (a hook, a usual cut)?

x_i are the CLIP frame features and y_k the AST snippet features, read directly through the
head's own projections rather than through MaDe's video/music encoders. Measured on the demo
data without canonical clips (make_demo_data.py --canonical_share 0, 6 epochs): on the
encoders' tokens the head stayed at the start-of-track prior (val mIoU 0.514, start0 0.517),
on the features it localises (0.81 after 6 epochs with the head alone): the encoders' 0.8
dropout (the original's, kept by default) and their sharing with the retrieval loss hide the
per-second content that alignment needs. So the retrieval branch, its encoders and its losses
are exactly the paper's, and the head adds its own small set of weights.

Decoding: the best snippet, refined by the probability-weighted mean over it and its two
neighbours (the targets are two-hot between the grid points around the true start, so this
recovers starts between grid points); end = start + video length. The output has the DETR
detector's contract (pred_spans as normalised (centre, width), pred_logits whose foreground
probability is the best snippet's probability), so evaluation, grounding and checkpoints work
with either head; it adds start_logits [B, Lm] for the loss. A music library is indexed once
(music_keys: the projected snippets and their music(k) term) and queries are scored against
those keys (from_keys), as the grounding tools do.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class BoundaryHead(nn.Module):
    def __init__(self, video_dim: int, music_dim: int, stride: float, max_m_duration: float,
                 proj_dim: int = 128, foreground: int = 0):
        super().__init__()
        self.stride = float(stride)
        self.max_m_duration = float(max_m_duration)
        self.foreground = foreground
        self.video_proj = nn.Linear(video_dim, proj_dim)
        self.music_proj = nn.Linear(music_dim, proj_dim)
        # Cosines are in [-1, 1]: a learnt scale (log-parametrised, starting at 10) makes them logits.
        self.log_scale = nn.Parameter(torch.tensor(2.302585))
        self.music_prior = nn.Sequential(nn.Conv1d(music_dim, 64, kernel_size=5, padding=2), nn.GELU(),
                                         nn.Conv1d(64, 1, kernel_size=1))

    # ------------------------------------------------------------------ keys
    def video_keys(self, frame_feats: Tensor) -> Tensor:
        """[B, Lv, video_dim] -> unit-norm frame keys [B, Lv, p]."""
        return F.normalize(self.video_proj(frame_feats), dim=-1)

    def music_keys(self, music_feats: Tensor) -> Tensor:
        """[B, Lm, music_dim] -> [B, Lm, p + 1]: unit-norm snippet keys, then the music(k) term.
        What a music index stores for this head (the keys do not depend on the query)."""
        keys = F.normalize(self.music_proj(music_feats), dim=-1)
        prior = self.music_prior(music_feats.transpose(1, 2)).transpose(1, 2)          # [B, Lm, 1]
        return torch.cat([keys, prior], dim=-1)

    def aligned_snippets(self, num_frames: int, num_snippets: int, device: torch.device) -> Tensor:
        """a(k, i) [Lm, Lv]: the snippet whose window centre is nearest to music time stride*k + i + 0.5
        (frame i covers video second [i, i+1)); clamped to the last snippet."""
        k = torch.arange(num_snippets, device=device, dtype=torch.float64)[:, None]
        i = torch.arange(num_frames, device=device, dtype=torch.float64)[None, :]
        return torch.round((k * self.stride + i + 0.5) / self.stride).long().clamp(max=num_snippets - 1)

    def start_logits(self, video_keys: Tensor, frame_mask: Tensor, music_keys: Tensor, music_mask: Tensor) -> Tensor:
        """[B, Lm] logits of the start snippet from video_keys and music_keys; padded snippets get -1e4."""
        sim = video_keys @ music_keys[..., :-1].transpose(1, 2)                    # [B, Lv, Lm]
        b, lv, lm = sim.shape
        at = self.aligned_snippets(lv, lm, sim.device)                             # [Lm, Lv]
        # sim[b, i, at[k, i]] for every (k, i): one gather along the snippet axis.
        per_frame = sim.gather(2, at.T[None].expand(b, -1, -1))                    # [B, Lv, Lm]
        # ... counting only the frames whose aligned snippet is still inside the track.
        inside = music_mask.to(sim.dtype).gather(1, at.reshape(1, -1).expand(b, -1)).view(b, lm, lv)
        weight = frame_mask.to(sim.dtype)[:, None, :] * inside                       # [B, Lm, Lv]
        alignment = (per_frame.transpose(1, 2) * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)
        logits = self.log_scale.exp() * alignment + music_keys[..., -1]
        return logits.masked_fill(music_mask == 0, -1e4)

    # ------------------------------------------------------------------ decoding
    def decode(self, logits: Tensor, log_prior: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(start seconds [B], probability of the best snippet [B]) from start logits [B, Lm];
        log_prior [B, Lm] (usage_log_prior) is added to the logits first, when given."""
        if log_prior is not None:
            logits = logits.float() + log_prior
        prob = logits.float().softmax(-1)
        best_p, best = prob.max(-1)
        idx = best[:, None] + torch.arange(-1, 2, device=prob.device)[None]    # the best and its neighbours
        inside = (idx >= 0) & (idx < prob.shape[1])
        near = prob.gather(1, idx.clamp(0, prob.shape[1] - 1)) * inside
        start = (near * idx).sum(-1) / near.sum(-1) * self.stride
        return start, best_p

    def from_keys(self, video_keys: Tensor, frame_mask: Tensor, music_keys: Tensor, music_mask: Tensor,
                  v_duration: Tensor) -> dict:
        """The detector's output contract from precomputed keys (see the module docstring)."""
        logits = self.start_logits(video_keys, frame_mask, music_keys, music_mask)
        start, confidence = self.decode(logits.detach())
        width = v_duration.to(start.dtype) / self.max_m_duration
        center = start / self.max_m_duration + width / 2
        spans = torch.stack([center, width], dim=-1)[:, None, :]              # [B, 1, 2]
        p = confidence.clamp(1e-6, 1 - 1e-6)
        fg_bg = [p.log(), (1 - p).log()] if self.foreground == 0 else [(1 - p).log(), p.log()]
        return {"pred_logits": torch.stack(fg_bg, dim=-1)[:, None, :], "pred_spans": spans,
                "start_logits": logits, "aux_outputs": []}

    def forward(self, frame_feats: Tensor, frame_mask: Tensor, music_feats: Tensor, music_mask: Tensor,
                v_duration: Tensor) -> dict:
        return self.from_keys(self.video_keys(frame_feats), frame_mask, self.music_keys(music_feats), music_mask,
                              v_duration)


def start_targets(start_seconds: Tensor, stride: float, num_snippets: int) -> Tensor:
    """Two-hot targets [B, Lm]: the start split between the grid points around it, by proximity."""
    pos = (start_seconds.float() / stride).clamp(0, num_snippets - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp(max=num_snippets - 1)
    w_hi = pos - lo.float()
    target = torch.zeros(start_seconds.shape[0], num_snippets, device=start_seconds.device)
    target.scatter_add_(1, lo[:, None], (1 - w_hi)[:, None])
    target.scatter_add_(1, hi[:, None], w_hi[:, None])
    return target


def usage_log_prior(track_starts: Sequence[float], stride: float, num_snippets: int, kappa: float = 4.0,
                    temper: float = 0.1) -> Tensor:
    """temper * log q [Lm]: how a track was used, as a prior over its start snippet.

    q = w * (the two-hot targets of the track's n known starts, averaged) + (1 - w) * uniform,
    w = n / (n + kappa): a track used once is a weak prior, a track used a dozen times at one
    cut a strong one, a track never seen none at all (q uniform: decoding is the head's own).
    Added to the start logits it makes the decoding a product of the head and the usage
    history, so a head that is sure of another start (a video cut elsewhere) can still win;
    `temper` < 1 flattens the history for that reason. The head's music term already finds
    the clips that tracks are usually cut at, so the history adds little once the head is
    trained: on the demo's val split of two runs temper 0.1 was the best or within 0.001 of
    it on the seen tracks (+0.003 and +0.006 mIoU), while temper 0.5 and 1 cost the videos
    cut off their track's canonical clip more than they gained on the others.
    """
    n = len(track_starts)
    if n == 0:
        return torch.zeros(num_snippets)
    q = start_targets(torch.as_tensor(list(track_starts), dtype=torch.float64), stride, num_snippets).mean(0)
    w = n / (n + kappa)
    return temper * (w * q + (1 - w) / num_snippets).log()


class BoundaryCriterion(nn.Module):
    """Cross-entropy of the start logits against two-hot targets from the ground-truth span."""

    def __init__(self, stride: float, max_m_duration: float):
        super().__init__()
        self.stride, self.max_m_duration = float(stride), float(max_m_duration)

    def forward(self, detection: dict, targets: Tensor | list[Tensor]) -> dict:
        logits = detection["start_logits"]
        span = torch.stack([t[0] for t in targets]).to(logits.device).float()   # normalised (centre, width)
        start = (span[:, 0] - span[:, 1] / 2) * self.max_m_duration
        target = start_targets(start, self.stride, logits.shape[1])
        loss = -(target * logits.float().log_softmax(-1)).sum(-1).mean()
        return {"loss_start": loss, "localization_loss": loss}
