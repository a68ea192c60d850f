"""The evaluation protocol, shared by train.py's per-epoch validation and test.py.

It follows the authors' protocol (xxayt/MGSV train-MaDe.py `eval_epoch`, test-MaDe.py):
  * SmG: the detector runs on every (video, ground-truth track) pair;
  * MsG: every video is scored against every track of the split
    (dual + single similarity for the default --vmr_loss), ranks deduplicated
    by music id;
  * MoR: both combined.
Unlike the original, tracks are encoded once and videos are scored in
memory-bounded chunks (MaDe.score_videos), which gives the same scores.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import torch
from tqdm import tqdm

from model.spans import foreground_index, spans_to_seconds, top_moment
from utils.evaluate import metrics as M
from utils.logger import get_logger
from utils.stopwatch import Stopwatch, timed_iter
from utils.train import distributed as D
from utils.train.loop import RunningMeans, autocast_context, to_device


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
        raise ValueError("evaluation under torchrun needs a loader built by utils.train.setup.make_eval_loader "
                         "(utils.train.distributed.ShardSampler), so that every row is evaluated exactly once")
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
        scores = msg_scores(model, c, args.eval_chunk)
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
    from utils.train.checkpoint import unwrap
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
