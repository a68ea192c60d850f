"""Training losses (the authors' modules/loss.py and music_detr/loss_detr.py, xxayt/MGSV).

    loss = ret_loss_weight * L_ret + loc_loss_weight * L_loc
    L_ret: symmetric InfoNCE over in-batch similarities, per --vmr_loss
    L_loc: per decoder layer 4 * L1 + 1 * (1 - gIoU) + 0.8 * CE(label) + 0.2 * contrastive align
"""
from __future__ import annotations

import argparse
import hashlib
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast_ops
from .spans import generalized_temporal_iou, span_cw_to_se
from .boundary_head import BoundaryCriterion
from .config_flags import FOREGROUND
from .matcher import HungarianMatcher

# Loss weights and matcher costs: hard-coded in the original (no flags).
SPAN_WEIGHTS = {"loss_span": 4.0, "loss_giou": 1.0, "loss_label": 0.8, "loss_contrastive_align": 0.2}
REGRESSION_L1_WEIGHT = 20.0
EOS_COEF = 0.1                 # background-class weight of the label loss
CONTRASTIVE_TEMPERATURE = 0.07


def clip_loss(sim: Tensor, logit_scale: Tensor, same_music: Tensor | None = None,
              sim_cols: Tensor | None = None, offset: int = 0) -> Tensor:
    """Symmetric InfoNCE over a square similarity matrix (positives on the diagonal).

    0.5 * (CE over rows + CE over columns) of exp(logit_scale) * sim. same_music [B, B]
    (True = another pair of the batch with the same track) removes those entries from the
    negatives in both directions (fix flag --mask_same_music; the original never masks).

    Global batch split over ranks (training under torchrun): sim [b, B] holds this rank's
    rows (local videos x all tracks), sim_cols [B, b] its columns (all videos x local
    tracks), offset the position of its first pair in the global batch, and same_music is
    [b, B]. The value is then this rank's share: the mean over ranks of the per-rank values
    is the global loss, because every row and every column is owned by exactly one rank
    and all ranks own b of them.
    """
    scale = logit_scale.exp()
    rows = scale * sim                                              # [b, B]
    cols = scale * (sim.T if sim_cols is None else sim_cols.T)      # [b, B]: local tracks x all videos
    if same_music is not None:
        # "Same track" is symmetric, so one mask serves the rows and the transposed columns.
        rows, cols = rows.masked_fill(same_music, float("-inf")), cols.masked_fill(same_music, float("-inf"))
    target = offset + torch.arange(rows.shape[0], device=sim.device)
    return 0.5 * (F.cross_entropy(rows, target) + F.cross_entropy(cols, target))


def music_id_codes(music_ids: list[str], device: torch.device) -> Tensor:
    """int64 code per music id, identical in every process (a hash, so ranks can compare ids
    with one tensor all-gather; 63 bits make a collision in a batch practically impossible)."""
    return torch.tensor([int.from_bytes(hashlib.blake2b(str(m).encode(), digest_size=8).digest(), "little",
                                        signed=True) for m in music_ids], dtype=torch.long, device=device)


def same_music_mask(music_ids: list[str], device: torch.device, all_codes: Tensor | None = None,
                    offset: int = 0) -> Tensor:
    """[B, B] True where i != j share a music id.

    With all_codes (music_id_codes of the whole global batch) and this rank's offset:
    [b, B], local pair i against global pair j, True where they share a track and j is not i.
    """
    if all_codes is None:
        codes = {mid: k for k, mid in enumerate(dict.fromkeys(music_ids))}
        ids = torch.tensor([codes[mid] for mid in music_ids], device=device)
        same = ids[:, None] == ids[None, :]
        return same & ~torch.eye(len(music_ids), dtype=torch.bool, device=device)
    local = music_id_codes(list(music_ids), device)
    same = local[:, None] == all_codes.to(device)[None, :]
    own = offset + torch.arange(len(music_ids), device=device)
    same[torch.arange(len(music_ids), device=device), own] = False
    return same


class RetrievalLoss(nn.Module):
    """L_ret for every working --vmr_loss (as model_Uni.py forms it)."""

    def __init__(self, vmr_loss: str = "dual_single_loss_fuse", weight: float = 1.0,
                 mask_same_music: bool = False):
        super().__init__()
        self.vmr_loss = vmr_loss
        self.weight = weight  # --dual_single_loss_weight (ignored by loss_fuse, as in the original)
        self.mask_same_music = mask_same_music
        # Under torchrun with global negatives, the training setup sets this to the differentiable
        # all-gather (utils/train/distributed.gather_with_grad): the id masking then compares this
        # rank's ids with every rank's.
        self.gather: Callable[[Tensor], Tensor] | None = None

    def forward(self, sims: dict, logit_scale: Tensor, music_ids: list[str] | None = None) -> dict:
        """sims from MaDe.forward: square in-batch "dual"/"single", or, for a global batch split
        over ranks, this rank's row blocks "dual"/"single" [b, B] with "dual_cols"/"single_cols"
        [B, b] and "offset" (see clip_loss)."""
        offset = int(sims.get("offset", 0))
        blocks = "dual_cols" in sims
        same = None
        if self.mask_same_music:
            if music_ids is None:
                raise ValueError("--mask_same_music 1 needs the batch's music_id list")
            device = sims["dual"].device
            if blocks:  # the other ranks' tracks are negatives too: compare with the gathered ids
                if self.gather is None:
                    raise ValueError("rank blocks of a global batch need RetrievalLoss.gather (set under torchrun)")
                all_codes = self.gather(music_id_codes(list(music_ids), device))
                same = same_music_mask(list(music_ids), device, all_codes, offset)
            else:
                same = same_music_mask(list(music_ids), device)

        def loss(key_or_sum: tuple[str, ...]) -> Tensor:
            rows = sum(sims[k] for k in key_or_sum)
            cols = sum(sims[f"{k}_cols"] for k in key_or_sum) if blocks else None
            return clip_loss(rows, logit_scale, same, cols, offset)

        if self.vmr_loss == "dual_single_loss_fuse":
            parts = {"loss_dual": loss(("dual",)), "loss_single": loss(("single",))}
            parts["retrieval_loss"] = parts["loss_dual"] + parts["loss_single"]
            return parts
        if self.vmr_loss == "dual":
            keys: tuple[str, ...] = ("dual",)
        elif self.vmr_loss == "dual_single_sim_fuse":
            keys = ("dual", "single")
        else:  # "single", "dual_single_feature_fuse" (single = cos(v, (P + m) / 2) there)
            keys = ("single",)
        return {"retrieval_loss": self.weight * loss(keys)}


class SetCriterion(nn.Module):
    """DETR-style moment losses on the final output and on every auxiliary decoder layer."""

    def __init__(self, matcher: HungarianMatcher, foreground_label: int = 0, eos_coef: float = EOS_COEF,
                 contrastive_align: bool = True, weights: dict | None = None):
        super().__init__()
        self.matcher = matcher
        self.foreground_label = foreground_label
        self.background_label = 1 - foreground_label
        self.contrastive_align = contrastive_align
        self.weights = dict(weights or SPAN_WEIGHTS)
        if not contrastive_align:
            self.weights.pop("loss_contrastive_align", None)
        empty_weight = torch.ones(2)
        empty_weight[self.background_label] = eos_coef
        self.register_buffer("empty_weight", empty_weight)

    def forward(self, detection: dict, targets: Tensor | list[Tensor]) -> dict:
        """targets [B, T, 2] or list of [T_b, 2] (center, width) -> losses and class_error.

        Keys: loss_span, loss_giou, loss_label, [loss_contrastive_align], class_error for the
        final layer, the same with suffix _<i> for auxiliary layer i, and localization_loss
        (the weighted sum over all layers).
        """
        if (fast_ops.FAST_PATHS and torch.is_tensor(targets) and targets.dim() == 3 and targets.shape[1] == 1
                and detection["pred_spans"].shape[1] == 1):
            return self._single_query_losses(detection, targets)
        targets = [t[t[:, 1] > 0] for t in targets]
        losses = self._layer_losses(detection, targets)
        for i, aux in enumerate(detection.get("aux_outputs", [])):
            losses.update({f"{k}_{i}": v for k, v in self._layer_losses(aux, targets).items()})
        losses["localization_loss"] = sum(self.weights[k.rsplit("_", 1)[0] if k[-1].isdigit() else k] * v
                                          for k, v in losses.items() if k.startswith("loss_"))
        return losses

    def _single_query_losses(self, detection: dict, targets: Tensor) -> dict:
        """forward() for one query and one target per sample, all layers at once.

        The matching is then trivial (query 0 <-> target 0, unless the target has zero width
        and is dropped), so the per-layer, per-sample loop becomes masked means over a
        [layers, B] stack: no solver, no Python loop over samples, no host sync.
        """
        layers = [*detection.get("aux_outputs", []), detection]          # aux 0..n-1, final last
        spans = torch.stack([o["pred_spans"][:, 0] for o in layers])      # [layers, B, 2]
        logits = torch.stack([o["pred_logits"][:, 0] for o in layers])    # [layers, B, 2]
        tgt = targets[:, 0].to(spans)                                     # [B, 2]
        matched = tgt[:, 1] > 0                                           # zero-width targets are dropped
        valid = matched.to(spans.dtype)
        n_valid = valid.sum()
        denom = n_valid.clamp(min=1)
        per_layer = {}
        # Mean over matched spans and both coordinates (0 when nothing is matched, as the loop).
        per_layer["loss_span"] = ((spans - tgt).abs().sum(-1) * valid).sum(-1) / (2 * denom)
        giou = _paired_giou(span_cw_to_se(spans), span_cw_to_se(tgt).expand_as(spans))
        per_layer["loss_giou"] = torch.where(matched, 1 - giou, torch.zeros_like(giou)).sum(-1) / denom
        classes = torch.where(matched, self.foreground_label, self.background_label).expand(len(layers), -1)
        per_layer["loss_label"] = F.cross_entropy(logits.reshape(-1, 2), classes.reshape(-1),
                                                  self.empty_weight.to(logits.dtype),
                                                  reduction="none").view(len(layers), -1).mean(-1)
        with torch.no_grad():
            correct = (logits.argmax(-1) == self.foreground_label).to(spans.dtype)
            error = 100 - 100 * (correct * valid).sum(-1) / denom
            per_layer["class_error"] = torch.where(n_valid > 0, error, torch.zeros_like(error))
        if self.contrastive_align:
            queries = torch.stack([o["proj_queries"][:, 0] for o in layers])  # [layers, B, c]
            frames = detection["proj_vid_mem"].sum(1)                          # sum over frames first
            x = (queries * frames).sum(-1) / CONTRASTIVE_TEMPERATURE             # [layers, B]
            # -positive logit / n_pos + logsumexp over the single query (= x): 0 when matched.
            per_layer["loss_contrastive_align"] = (-(x * valid) + x[..., None].logsumexp(-1)).mean(-1)
        losses = {}
        last = len(layers) - 1
        for key, values in per_layer.items():
            losses[key] = values[last]
            for i in range(last):
                losses[f"{key}_{i}"] = values[i]
        losses["localization_loss"] = sum(self.weights[k] * v.sum() for k, v in per_layer.items()
                                          if k.startswith("loss_"))
        return losses

    def _layer_losses(self, out: dict, targets: list[Tensor]) -> dict:
        indices = self.matcher(out, targets)
        batch_idx = torch.cat([torch.full_like(src, b) for b, (src, _) in enumerate(indices)])
        query_idx = torch.cat([src for src, _ in indices])
        device = out["pred_spans"].device
        batch_idx, query_idx = batch_idx.to(device), query_idx.to(device)
        losses = {}

        # Spans: mean L1 over matched spans and both coordinates; mean (1 - gIoU) in (start, end).
        src_spans = out["pred_spans"][batch_idx, query_idx]
        tgt_spans = torch.cat([t[tgt.to(t.device)] for t, (_, tgt) in zip(targets, indices)]).to(src_spans)
        if src_spans.shape[0] == 0:
            zero = out["pred_spans"].sum() * 0
            losses["loss_span"], losses["loss_giou"] = zero, zero
        else:
            losses["loss_span"] = F.l1_loss(src_spans, tgt_spans)
            giou = torch.diag(generalized_temporal_iou(span_cw_to_se(src_spans), span_cw_to_se(tgt_spans)))
            losses["loss_giou"] = (1 - giou).mean()

        # Labels: foreground for matched queries, background (weight eos_coef) otherwise.
        logits = out["pred_logits"]
        target_classes = torch.full(logits.shape[:2], self.background_label, dtype=torch.int64, device=device)
        target_classes[batch_idx, query_idx] = self.foreground_label
        losses["loss_label"] = F.cross_entropy(logits.transpose(1, 2), target_classes,
                                               self.empty_weight.to(logits.dtype), reduction="none").mean()
        with torch.no_grad():
            matched = logits[batch_idx, query_idx]
            correct = (matched.argmax(-1) == self.foreground_label).float()
            losses["class_error"] = 100 - 100 * correct.mean() if correct.numel() else logits.new_zeros(())

        if self.contrastive_align:
            losses["loss_contrastive_align"] = self._contrastive(out, batch_idx, query_idx)
        return losses

    @staticmethod
    def _contrastive(out: dict, batch_idx: Tensor, query_idx: Tensor) -> Tensor:
        """-mean logit of matched queries + logsumexp over queries, logits summed over frames.

        Identically 0 with one query (-x + logsumexp([x])), as in the original.
        """
        logits = torch.einsum("bqd,btd->bq", out["proj_queries"], out["proj_vid_mem"]) / CONTRASTIVE_TEMPERATURE
        positive = torch.zeros_like(logits, dtype=torch.bool)
        positive[batch_idx, query_idx] = True
        pos_term = logits.masked_fill(~positive, 0).sum(1)
        num_pos = positive.sum(1).clamp(min=1)
        return (-pos_term / num_pos + logits.logsumexp(1)).mean()


def _paired_giou(a: Tensor, b: Tensor) -> Tensor:
    """Generalised IoU of matching (start, end) spans a[..., i] and b[..., i] (elementwise, not pairwise)."""
    inter = (torch.min(a[..., 1], b[..., 1]) - torch.max(a[..., 0], b[..., 0])).clamp(min=0)
    union = (a[..., 1] - a[..., 0]) + (b[..., 1] - b[..., 0]) - inter
    enclosing = (torch.max(a[..., 1], b[..., 1]) - torch.min(a[..., 0], b[..., 0])).clamp(min=0)
    return inter / union - (enclosing - union) / enclosing


class RegressionCriterion(nn.Module):
    """--mml_localization regression: 20 * L1 on the single predicted span."""

    def forward(self, detection: dict, targets: Tensor | list[Tensor]) -> dict:
        tgt = torch.stack([t[0] for t in targets]).to(detection["pred_spans"])
        l1 = F.l1_loss(detection["pred_spans"][:, 0], tgt)
        return {"loss_span": l1, "localization_loss": REGRESSION_L1_WEIGHT * l1}


class Criterion(nn.Module):
    """criterion(outputs, batch) -> (loss, parts); loss = w_ret * L_ret + w_loc * L_loc."""

    def __init__(self, retrieval: RetrievalLoss, localization: nn.Module, ret_loss_weight: float = 1.0,
                 loc_loss_weight: float = 1.0):
        super().__init__()
        self.retrieval = retrieval
        self.localization = localization
        self.ret_loss_weight = ret_loss_weight
        self.loc_loss_weight = loc_loss_weight

    def forward(self, outputs: dict, batch: dict) -> tuple[Tensor, dict]:
        parts = self.retrieval(outputs["similarities"], outputs["logit_scale"], batch.get("music_id"))
        parts.update(self.localization(outputs["detection"], batch["spans_target"]))
        loss = self.ret_loss_weight * parts["retrieval_loss"] + self.loc_loss_weight * parts["localization_loss"]
        return loss, parts


def build_criterion(args: argparse.Namespace) -> Criterion:
    foreground = FOREGROUND[args.fb_label]
    retrieval = RetrievalLoss(args.vmr_loss, args.dual_single_loss_weight, bool(args.mask_same_music))
    if args.moment_head == "boundary":
        localization: nn.Module = BoundaryCriterion(args.stride, args.max_m_duration)
    elif args.mml_localization == "regression":
        localization = RegressionCriterion()
    else:
        matcher = HungarianMatcher(foreground_label=foreground)
        localization = SetCriterion(matcher, foreground, contrastive_align=bool(args.contrastive_align_loss))
    return Criterion(retrieval, localization, args.ret_loss_weight, args.loc_loss_weight)
