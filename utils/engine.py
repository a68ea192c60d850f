"""The training step and the evaluation protocol, shared by train.py and test.py.

Evaluation follows the authors' protocol (reference section 5):
  * SmG: the detector runs on every (video, ground-truth track) pair;
  * MsG: every video is scored against every track of the split
    (dual + single similarity for the default --vmr_loss), ranks deduplicated
    by music id;
  * MoR: both combined.
Unlike the original, tracks are encoded once and videos are scored in
memory-bounded chunks (MaDe.score_videos), which gives the same scores.
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from utils import distributed as D
from utils import metrics as M
from utils.logger import Scalars, get_logger
from utils.stopwatch import Stopwatch, timed_iter

TENSOR_KEYS = ("frame_feats", "frame_mask", "music_feats", "music_mask", "spans_target", "gt_moment")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the run stops and keeps its last good checkpoint."""


def to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in batch.items()}


def autocast_context(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA when asked; fp32 everywhere else (the paper's setting)."""
    if amp == "none" or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def foreground_index(args: Any) -> int:
    # fb_label "01": class 0 = foreground (the original's default), "10": class 1.
    return 0 if getattr(args, "fb_label", "01") == "01" else 1


def top_moment(detection: dict, fg_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(center, width) of the highest-scoring query and its foreground probability."""
    prob = detection["pred_logits"].float().softmax(-1)[..., fg_index]      # [B, Q]
    score, best = prob.max(dim=1)
    spans = detection["pred_spans"].float()                                   # [B, Q, 2]
    span = spans.gather(1, best[:, None, None].expand(-1, 1, spans.shape[-1]))[:, 0]
    return span, score


def spans_to_seconds(span_cw: torch.Tensor, max_m_duration: float) -> torch.Tensor:
    """Normalised (center, width) -> (start, end) in seconds, unclipped."""
    center, width = span_cw[:, 0], span_cw[:, 1]
    return torch.stack([center - width / 2, center + width / 2], dim=1) * max_m_duration


@dataclass
class RunningMeans:
    """Sums of detached loss parts on the device; converted to floats once per log interval."""
    sums: dict = field(default_factory=dict)
    count: int = 0

    def update(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            if torch.is_tensor(v):
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        """Means over the updates; under torchrun over every rank's updates (a collective: all
        ranks call it at the same point, with the same keys)."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        stacked = torch.stack([self.sums[k].reshape(()) for k in keys] + [self.sums[keys[0]].new_tensor(self.count)])
        values = D.all_reduce_sum(stacked).cpu().tolist()  # one host sync
        count = values.pop()
        return {k: v / max(1.0, count) for k, v in zip(keys, values)}


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """Loss scaling for --amp fp16 on CUDA (bf16 and float32 need none)."""
    return torch.amp.GradScaler("cuda") if (amp == "fp16" and device.type == "cuda") else None


def optimization_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                      scaler: torch.amp.GradScaler | None = None) -> None:
    """backward, gradient clipping, optimizer step, zeroed gradients: one training update."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    # The original clips each parameter group separately (temporal, matching, detection).
    for group in optimizer.param_groups:
        torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, loader: Iterable,
                    optimizer: torch.optim.Optimizer, scheduler, device: torch.device, epoch: int,
                    args: Any, scalars: Scalars, global_step: int, show_progress: bool = True,
                    max_steps: int | None = None) -> tuple[dict[str, float], int]:
    """One pass over the training loader; returns (epoch means incl. train mIoU, new global step)."""
    model.train()
    criterion.train()
    log = get_logger()
    fg = foreground_index(args)
    epoch_means, interval_means = RunningMeans(), RunningMeans()
    pred_se, gt_se, m_dur = [], [], []
    num_steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    log_every = max(1, math.ceil(num_steps / max(1, args.num_display)))
    scaler = grad_scaler(args.amp, device)
    bar = tqdm(loader, total=num_steps, desc=f"train {epoch}", disable=not show_progress, leave=False,
               dynamic_ncols=True)
    t0 = time.time()
    for step, batch in enumerate(bar):
        if step >= num_steps:
            break
        batch = to_device(batch, device)
        with autocast_context(device, args.amp):
            outputs = model(batch)
            loss, parts = criterion(outputs, batch)
        # Every rank takes the same branch (one raising while the others wait in backward would hang).
        if not D.all_true(bool(torch.isfinite(loss)), device):
            raise NonFiniteLossError(
                f"non-finite training loss (this process: {loss.item()}) at epoch {epoch}, step {step + 1}; "
                f"parts: { {k: float(v) for k, v in parts.items() if torch.is_tensor(v) and v.numel() == 1} }. "
                "Check the input features for extreme values, or lower --matching_lr/--detection_lr.")
        optimization_step(loss, optimizer, args.max_grad_norm, scaler)
        scheduler.step()
        global_step += 1

        parts = {"loss": loss, **parts}
        epoch_means.update(parts)
        interval_means.update(parts)
        with torch.no_grad():
            span, _ = top_moment(outputs["detection"], fg)
            pred_se.append(spans_to_seconds(span, args.max_m_duration).detach())
            gt_se.append(batch["gt_moment"][:, 0].detach())
            m_dur.append(batch["m_duration"].detach() if torch.is_tensor(batch["m_duration"])
                         else torch.as_tensor(batch["m_duration"]))
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
            means = interval_means.means()
            interval_means = RunningMeans()
            lr = optimizer.param_groups[0]["lr"]
            for key in ("loss", "retrieval_loss", "localization_loss", "loss_span", "loss_giou",
                        "loss_label", "class_error", "loss_contrastive_align"):
                if key in means:
                    scalars.add(f"train/{key}", means[key], global_step)
            scalars.add("train/lr", lr, global_step)
            rate = (step + 1) * _batch_size(batch) * D.get_world_size() / max(1e-9, time.time() - t0)
            log.info(f"epoch {epoch} step {step + 1}/{num_steps} loss {means.get('loss', float('nan')):.4f} "
                     f"ret {means.get('retrieval_loss', float('nan')):.4f} "
                     f"loc {means.get('localization_loss', float('nan')):.4f} lr {lr:.2e} {rate:.1f} samples/s")
    bar.close()
    results = epoch_means.means()
    if pred_se:
        pred = torch.cat(pred_se).cpu().double().numpy()
        gt = torch.cat(gt_se).cpu().double().numpy()
        dur = torch.cat([d.reshape(-1) for d in m_dur]).cpu().double().numpy()
        ious = M.moment_iou(M.clip_moments(pred, dur, args.max_m_duration), gt)
        if D.is_dist():  # train mIoU over every rank's videos
            ious = D.all_gather_varlen(torch.from_numpy(ious).to(device)).cpu().numpy()
        results.update({f"train_{k}": v for k, v in M.smg_metrics(ious).items()})
    return results, global_step


def _batch_size(batch: dict) -> int:
    return int(batch["frame_feats"].shape[0])


@dataclass
class Collected:
    """Everything the metrics need from one pass over a split."""
    video_ids: list[str]
    music_ids: list[str]                  # ground-truth track of each video
    video_emb: torch.Tensor               # [Nv, d]
    pred_se: np.ndarray                   # [Nv, 2] seconds, unclipped (SmG on the GT track)
    pred_score: np.ndarray                # [Nv] foreground probability
    gt_se: np.ndarray                     # [Nv, 2] seconds
    m_duration: np.ndarray                # [Nv]
    unique_music_ids: list[str]           # the candidate collection (one column per distinct track)
    music_emb: torch.Tensor               # [Nm, d]
    snippet_tokens: torch.Tensor          # [Nm, Lm, d]
    music_mask: torch.Tensor              # [Nm, Lm]
    losses: dict[str, float]
    start_logits: np.ndarray | None = None   # [Nv, Lm] float32, boundary head only (decoding with a prior)


@torch.no_grad()
def collect(model: torch.nn.Module, criterion: torch.nn.Module | None, loader: Iterable,
            device: torch.device, args: Any, show_progress: bool = True,
            watch: Stopwatch | None = None) -> Collected:
    """Forward every (video, GT track) pair once: embeddings, SmG predictions and eval losses
    (none without a criterion). `watch` gets the time spent waiting for batches ("load") and
    the rest ("encode")."""
    model.eval()
    if criterion is not None:
        criterion.eval()
    fg = foreground_index(args)
    means = RunningMeans()
    video_ids, music_ids, v_list, pred, score, gt, dur = [], [], [], [], [], [], []
    seen: dict[str, int] = {}
    m_list, s_list, mask_list, start_list = [], [], [], []
    watch = watch if watch is not None else Stopwatch()
    batches = timed_iter(loader, watch, "load")
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(batches, total=total, desc="eval", disable=not show_progress, leave=False, dynamic_ncols=True):
        with watch.phase("encode"):
            batch = to_device(batch, device)
            with autocast_context(device, args.amp):
                outputs = model(batch, losses=criterion is not None)
                if criterion is not None:
                    loss, parts = criterion(outputs, batch)
                    means.update({"loss": loss, **parts})
            span, prob = top_moment(outputs["detection"], fg)
            video_ids.extend(batch["video_id"])
            music_ids.extend(batch["music_id"])
            v_list.append(outputs["video_emb"].float())
            pred.append(spans_to_seconds(span, args.max_m_duration))
            score.append(prob)
            if "start_logits" in outputs["detection"]:
                start_list.append(outputs["detection"]["start_logits"].float())
            gt.append(batch["gt_moment"][:, 0].float())
            d = batch["m_duration"]
            dur.append(d.float() if torch.is_tensor(d) else torch.as_tensor(d, dtype=torch.float32))
            # Each distinct track is kept once: it is one column of the MsG score matrix.
            keep = []
            for i, mid in enumerate(batch["music_id"]):
                if mid not in seen:
                    seen[mid] = len(seen)
                    keep.append(i)
            if keep:
                idx = torch.as_tensor(keep, device=device)
                m_list.append(outputs["music_emb"].float()[idx])
                s_list.append(outputs["snippet_tokens"].float()[idx])
                mask_list.append(batch["music_mask"][idx])
    with watch.phase("encode"):  # concatenation, gathering under torchrun, copies to the host
        per_video = ([torch.cat(xs) for xs in (v_list, pred, score, gt, dur)]
                     + ([torch.cat(start_list)] if start_list else []))
        unique_ids = list(seen)
        music = [torch.cat(xs) for xs in (m_list, s_list, mask_list)]
        if D.is_dist():
            video_ids, music_ids, per_video, unique_ids, music = _gather_collected(
                loader, video_ids, music_ids, per_video, unique_ids, music)
        video_emb, pred_t, score_t, gt_t, dur_t, *starts = per_video
        cpu = lambda x: x.cpu().double().numpy()
        return Collected(
            video_ids=video_ids, music_ids=music_ids,
            video_emb=video_emb,
            pred_se=cpu(pred_t), pred_score=cpu(score_t), gt_se=cpu(gt_t), m_duration=cpu(dur_t),
            unique_music_ids=unique_ids,
            music_emb=music[0], snippet_tokens=music[1], music_mask=music[2],
            losses=means.means(),
            start_logits=starts[0].cpu().numpy() if starts else None,
        )


def _gather_collected(loader, video_ids: list[str], music_ids: list[str], per_video: list[torch.Tensor],
                      unique_ids: list[str], music: list[torch.Tensor]):
    """Every rank's share of a collection pass -> the whole split, as one process collects it.

    The eval loader's ShardSampler gives rank r the contiguous rows [r*s, (r+1)*s) (the last
    shards padded with repeats of the last row): concatenating in rank order and keeping the
    split's n rows restores its order without duplicates. Tracks keep their first appearance.
    """
    sampler = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    if not isinstance(sampler, D.ShardSampler):
        raise ValueError("evaluation under torchrun needs a loader built by utils.runtime.make_eval_loader "
                         "(utils.distributed.ShardSampler), so that every row is evaluated exactly once")
    n = sampler.num_rows
    if len(video_ids) != sampler.shard_len:
        raise RuntimeError(f"this rank collected {len(video_ids)} rows, its shard has {sampler.shard_len}")
    per_video = [D.all_gather_varlen(x)[:n] for x in per_video]
    video_ids = [v for part in D.all_gather_objects(video_ids) for v in part][:n]
    music_ids = [m for part in D.all_gather_objects(music_ids) for m in part][:n]
    every = [m for part in D.all_gather_objects(unique_ids) for m in part]
    music = [D.all_gather_varlen(x) for x in music]
    first: dict[str, int] = {}
    for k, mid in enumerate(every):
        first.setdefault(mid, k)
    keep = torch.as_tensor(list(first.values()), device=music[0].device)
    return video_ids, music_ids, per_video, list(first), [x[keep] for x in music]


@torch.no_grad()
def msg_scores(model: torch.nn.Module, c: Collected, chunk_size: int = 0) -> torch.Tensor:
    """[Nv, Nm] test-time retrieval scores of every video against every distinct track."""
    index = model.index_music(c.music_emb, c.snippet_tokens, c.music_mask)
    if not D.is_dist():
        return model.score_videos(c.video_emb, index, chunk_size)
    # Under torchrun each rank scores a contiguous slice of the videos; every rank gets all rows.
    start, stop, _ = D.shard_bounds(c.video_emb.shape[0], D.get_rank(), D.get_world_size())
    return D.all_gather_varlen(model.score_videos(c.video_emb[start:stop], index, chunk_size))


def evaluate_collected(model: torch.nn.Module, c: Collected, args: Any,
                       watch: Stopwatch | None = None) -> tuple[dict, dict]:
    """All metrics of the paper from one collection pass. Returns (metrics, per-video details).
    `watch` gets the MsG scoring ("score") and the ranking and IoUs ("metrics")."""
    watch = watch if watch is not None else Stopwatch()
    with watch.phase("score"):
        scores = msg_scores(model, c, getattr(args, "eval_chunk", 0))
        scores_np = scores.double().cpu().numpy()
    with watch.phase("metrics"):
        rank0 = M.gt_ranks(scores_np, c.unique_music_ids, c.music_ids)
        clipped = M.clip_moments(c.pred_se, c.m_duration, args.max_m_duration)
        ious = M.moment_iou(clipped, c.gt_se)
        metrics = M.metrics_from_ranks(rank0, ious)
    details = {"scores": scores_np, "rank0": rank0, "ious": ious, "pred_se_clipped": clipped}
    return metrics, details


def ious_with_usage_prior(model: torch.nn.Module, c: Collected, track_starts: dict, args: Any) -> np.ndarray:
    """SmG IoUs of the boundary head decoded together with each track's usage history
    (model/boundary_head.usage_log_prior): the head alone for a track the history lacks."""
    from model.boundary_head import usage_log_prior
    from utils.checkpoint import unwrap
    head = unwrap(model).boundary_head
    logits = torch.from_numpy(c.start_logits)
    cache: dict[str, torch.Tensor] = {}
    for m in c.music_ids:
        if m not in cache:
            cache[m] = usage_log_prior(track_starts.get(m, ()), head.stride, logits.shape[1])
    start, _ = head.decode(logits, torch.stack([cache[m] for m in c.music_ids]))
    start = start.double().numpy()
    length = c.pred_se[:, 1] - c.pred_se[:, 0]                 # the video's length, as the head predicts it
    pred = np.stack([start, start + length], axis=1)
    return M.moment_iou(M.clip_moments(pred, c.m_duration, args.max_m_duration), c.gt_se)


def per_video_predictions(c: Collected, details: dict, topk: int = 10) -> list[dict]:
    """Rows of the --save_json file: one per video, predictions clipped to the track."""
    scores = details["scores"]
    k = min(topk, scores.shape[1])
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    rows = []
    for i, vid in enumerate(c.video_ids):
        rows.append({
            "video_id": vid,
            "music_id": c.music_ids[i],
            "topk_music_ids": [c.unique_music_ids[j] for j in top[i]],
            "topk_scores": [round(float(scores[i, j]), 6) for j in top[i]],
            "gt_rank": int(details["rank0"][i]) + 1,
            "iou": round(float(details["ious"][i]), 4),
            "m_duration": round(float(c.m_duration[i]), 3),
            "gt_st": round(float(c.gt_se[i, 0]), 3),
            "gt_ed": round(float(c.gt_se[i, 1]), 3),
            "pred_st": round(float(details["pred_se_clipped"][i, 0]), 3),
            "pred_ed": round(float(details["pred_se_clipped"][i, 1]), 3),
            "pred_score": round(float(c.pred_score[i]), 4),
        })
    return rows


EVAL_PHASES = ("load", "encode", "score", "metrics")


def evaluate(model: torch.nn.Module, criterion: torch.nn.Module | None, loader: Iterable,
             device: torch.device, args: Any, show_progress: bool = True,
             watch: Stopwatch | None = None) -> tuple[dict, Collected, dict]:
    """collect + evaluate_collected; logs where the time went (EVAL_PHASES, seconds), and adds
    it to `watch` when given."""
    own = Stopwatch(device)
    t0 = time.perf_counter()
    c = collect(model, criterion, loader, device, args, show_progress, watch=own)
    metrics, details = evaluate_collected(model, c, args, watch=own)
    get_logger().info(f"evaluation of {len(c.video_ids)} videos x {len(c.unique_music_ids)} tracks: "
                      + own.line(EVAL_PHASES, total=time.perf_counter() - t0))
    if watch is not None:
        watch.add(own)
    return metrics, c, details
