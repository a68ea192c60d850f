"""ground(): a batch of query videos through retrieval and detection, with a result per query
(top tracks, each with its moment; the ground-truth track's rank when known)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from utils.evaluate.metrics import moment_iou
from utils.ground.library import MusicLibrary
from utils.ground.model import GroundingError, GroundingModel
from utils.ground.search import (AUTO_SHORTLIST_ABOVE, AUTO_SHORTLIST_K, detect_pairs, exhaustive_scores, top_by_score,
                                 two_stage_scores)


@dataclass
class TrackHit:
    rank: int
    music_id: str
    score: float
    start: float
    end: float
    confidence: float
    duration: float
    canonical_start: float | None = None   # the track's canonical clip in the index's usage history,
    canonical_end: float | None = None     # trimmed to the query's length; None without history
    uses: int = 0                          # videos of the usage history that use this track


@dataclass
class GroundTruth:
    music_id: str
    start: float | None
    end: float | None
    rank: int | None                 # 1-based rank of the GT track (None: not scored, e.g. outside the shortlist)
    score: float | None
    pred_start: float | None         # the detector's moment on the GT track (test.py's SmG prediction)
    pred_end: float | None
    confidence: float | None
    iou: float | None
    in_library: bool
    duration: float | None = None    # track length (s) from the index


@dataclass
class QueryResult:
    video_id: str
    tracks: list[TrackHit]
    mode: str                        # "exhaustive" or "two-stage(K)"
    gt: GroundTruth | None = None

    def to_json(self) -> dict:
        out = {"video_id": self.video_id, "mode": self.mode,
               "tracks": [{**{k: getattr(t, k) for k in ("music_id", "score", "start", "end", "confidence")},
                           "canonical": None if t.canonical_start is None else
                           {"start": t.canonical_start, "end": t.canonical_end, "uses": t.uses}}
                          for t in self.tracks]}
        if self.gt is not None:
            out["ground_truth"] = dataclasses.asdict(self.gt)
        return out


def resolve_shortlist(shortlist_k: int | None, num_tracks: int) -> int:
    """0 = exhaustive. None = automatic: exhaustive up to AUTO_SHORTLIST_ABOVE tracks."""
    if shortlist_k is None or shortlist_k < 0:
        return AUTO_SHORTLIST_K if num_tracks > AUTO_SHORTLIST_ABOVE else 0
    return 0 if shortlist_k >= num_tracks else int(shortlist_k)


@torch.no_grad()
def ground(gm: GroundingModel, library: MusicLibrary, frame_feats: torch.Tensor, frame_mask: torch.Tensor,
           topk: int = 10, shortlist_k: int | None = None, batch_size: int = 32,
           video_ids: Sequence[str] | None = None, gt_music_ids: Sequence[str | None] | None = None,
           gt_moments: Sequence[tuple[float, float] | None] | None = None) -> list[QueryResult]:
    """Top-k tracks of the library for each query, each with its predicted moment.

    frame_feats [Lv, 512] or [Q, Lv, 512] (and masks alike), e.g. from load_video /
    load_query_csv. Queries are processed `batch_size` at a time; the detector runs on
    all (query, top track) pairs of a batch together.
    """
    if frame_feats.dim() == 2:
        frame_feats, frame_mask = frame_feats[None], frame_mask[None]
    if frame_feats.dim() != 3 or frame_feats.shape[-1] != 512 or frame_mask.shape != frame_feats.shape[:2]:
        raise GroundingError(f"frame_feats {list(frame_feats.shape)} / frame_mask {list(frame_mask.shape)}: "
                             "expected [Q, Lv, 512] and [Q, Lv] (see load_video / prepare_video)")
    n = frame_feats.shape[0]
    video_ids = list(video_ids) if video_ids is not None else [f"query{i}" for i in range(n)]
    gt_music_ids = list(gt_music_ids) if gt_music_ids is not None else [None] * n
    gt_moments = list(gt_moments) if gt_moments is not None else [None] * n
    if not (len(video_ids) == len(gt_music_ids) == len(gt_moments) == n) or frame_mask.shape[0] != n:
        raise GroundingError("video_ids, gt_music_ids, gt_moments and frame_mask must have one entry per query")
    k_short = resolve_shortlist(shortlist_k, len(library))
    mode = f"two-stage(K={k_short})" if k_short else "exhaustive"
    results: list[QueryResult] = []
    for lo in range(0, n, batch_size):
        sl = slice(lo, min(lo + batch_size, n))
        results += _ground_batch(gm, library, frame_feats[sl], frame_mask[sl], topk, k_short, mode,
                                 video_ids[sl], gt_music_ids[sl], gt_moments[sl])
    return results


def _ground_batch(gm: GroundingModel, library: MusicLibrary, feats: torch.Tensor, masks: torch.Tensor,
                  topk: int, k_short: int, mode: str, video_ids: list[str], gt_ids: list[str | None],
                  gt_moments: list[tuple[float, float] | None]) -> list[QueryResult]:
    feats, masks = feats.to(gm.device, torch.float32), masks.to(gm.device, torch.float32)
    v, Fv = gm.model.encode_video(feats, masks)
    if k_short:
        cand_rows, scores = two_stage_scores(gm, library, v, k_short)
    else:
        cand_rows, scores = None, exhaustive_scores(gm, library, v)
    top_rows, top_scores = top_by_score(scores, cand_rows, topk)
    gt_rows = [library.row_of(g) if g is not None else None for g in gt_ids]
    pair_query, pair_row, slot = _detection_pairs(top_rows, gt_rows)
    se, conf = detect_pairs(gm, library, Fv, masks, v, pair_query, pair_row, frame_feats=feats)
    # The query's length, for trimming canonical clips: the GT moment's when known, else from its
    # 1-fps frames (n frames at whole seconds 0..floor(L): L in [n-1, n), the middle taken).
    lengths = [(m[1] - m[0]) if m is not None else float(masks[i].sum()) - 0.5 for i, m in enumerate(gt_moments)]
    results = []
    for i in range(top_rows.shape[0]):
        hits = []
        for j, row in enumerate(top_rows[i]):
            p = slot[i, row]
            music_id, duration = library.music_ids[row], float(library.durations[row])
            used = library.usage.get(music_id)
            c_start = None if used is None else float(used["start"])
            hits.append(TrackHit(rank=j + 1, music_id=music_id, score=float(top_scores[i, j]),
                                 start=float(se[p, 0]), end=float(se[p, 1]), confidence=float(conf[p]),
                                 duration=duration, canonical_start=c_start,
                                 canonical_end=None if used is None else min(c_start + lengths[i], duration),
                                 uses=0 if used is None else int(used["uses"])))
        result = QueryResult(video_ids[i], hits, mode)
        if gt_ids[i] is not None:
            pred = (se[slot[i, gt_rows[i]]], float(conf[slot[i, gt_rows[i]]])) if gt_rows[i] is not None else None
            result.gt = _ground_truth(library, gt_ids[i], gt_rows[i], gt_moments[i], scores[i],
                                      None if cand_rows is None else cand_rows[i], pred)
        results.append(result)
    return results


def _detection_pairs(top_rows: np.ndarray, gt_rows: list[int | None]) -> tuple[np.ndarray, np.ndarray, dict]:
    """(query, track row) pairs for the detector: every top track, plus the GT track when it is
    known and not already among them. slot[query, row] = the pair's position."""
    slot: dict = {}
    queries, rows = [], []
    for i, top in enumerate(top_rows):
        for row in list(top) + ([gt_rows[i]] if gt_rows[i] is not None else []):
            if (i, int(row)) not in slot:
                slot[i, int(row)] = len(rows)
                queries.append(i)
                rows.append(int(row))
    return np.asarray(queries, dtype=np.int64), np.asarray(rows, dtype=np.int64), slot


def _ground_truth(library: MusicLibrary, music_id: str, row: int | None, moment: tuple[float, float] | None,
                  scores: torch.Tensor, cand_rows: np.ndarray | None,
                  pred: tuple[np.ndarray, float] | None) -> GroundTruth:
    """The GT track's rank (pessimistic ties, as utils.evaluate.metrics.gt_ranks) and the detector's moment on it."""
    start, end = (moment if moment is not None else (None, None))
    if row is None:
        return GroundTruth(music_id, start, end, rank=None, score=None, pred_start=None, pred_end=None,
                           confidence=None, iou=None, in_library=False)
    s = scores.double().cpu().numpy()
    rank = score = None
    hit = np.nonzero((np.arange(len(s)) if cand_rows is None else cand_rows) == row)[0]
    if hit.size:  # not scored when a shortlist left it out
        score = float(s[hit[0]])
        rank = int((s >= score).sum())  # 1-based: ties (and itself) ranked ahead
    se, confidence = pred
    iou = None if moment is None else float(moment_iou(se[None], np.array([moment], dtype=np.float64))[0])
    return GroundTruth(music_id, start, end, rank=rank, score=score, pred_start=float(se[0]),
                       pred_end=float(se[1]), confidence=confidence, iou=iou, in_library=True,
                       duration=float(library.durations[row]))
