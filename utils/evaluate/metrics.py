"""Metric definitions of the MGSV benchmark (the original's eval_epoch and utils/util_test.py), in numpy.

Three families, all computed per video and averaged over the N videos of a split:

* SmG (single-music grounding): the detector is run on (video, its ground-truth track); the predicted moment
  is clipped to the track and compared with the GT moment by temporal IoU -> mIoU, IoU@0.3/0.5/0.7.
* MsG / V2MR (video-to-music retrieval): a score matrix [Nv, Nm] over all videos x all candidate columns of the
  split; rank0 = 0-based rank of the GT music id after de-duplicating columns by music id -> R@k, MedianR,
  MeanR, MRR.
* MoR (moment retrieval, composite): a video counts as a hit at (k, theta) when its GT track is within the top k
  AND its SmG IoU > theta -> R{k}_iou{theta}.

Conventions kept from the original code (so that numbers are comparable with the paper):
* every "percent" metric is 100 * count / N over ALL videos; mIoU and MRR are fractions;
* IoU thresholds are STRICT (IoU > theta);
* MedianR = np.median(rank0) + 1 (the mean of the two middle values for even N, as numpy does);
* predictions are in seconds, normalised spans are relative to the global constant 240 s (not the track length).

Deliberate deviations (documented where they happen): ties in retrieval scores are broken pessimistically (the
original's order among ties was whatever np.argsort produced), and R{k}_miou is the intended mean rather than the
original's doubly-normalised value, which is still available as R{k}_miou_orig via `extra_metrics`.

No torch import: score matrices may be torch tensors (any float dtype, any device) and are converted chunk by chunk.
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from utils.data.constants import MAX_M_DURATION

METRIC_KEYS: list[str] = [
    "R1", "R3", "R5", "R10", "R20", "R25", "R50", "R100", "MedianR", "MeanR", "MRR",
    "mIoU", "IoU@0.3", "IoU@0.5", "IoU@0.7",
    "R1_iou0.5", "R1_iou0.7", "R10_iou0.5", "R10_iou0.7", "R50_iou0.5", "R50_iou0.7",
    "R100_iou0.5", "R100_iou0.7",
]

RECALL_KS: tuple[int, ...] = (1, 3, 5, 10, 20, 25, 50, 100)
IOU_THRESHOLDS: tuple[float, ...] = (0.3, 0.5, 0.7)
MOR_KS: tuple[int, ...] = (1, 10, 50, 100)
MOR_THRESHOLDS: tuple[float, ...] = (0.5, 0.7)

# Bound on the elements of one [rows, columns] float64 block in gt_ranks: 2**23 * 8 B = 64 MiB, so N=4000
# (16M scores) runs in two chunks and a train-sized matrix never needs a second full-size copy.
_CHUNK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------------------------------------------
# array helpers
# --------------------------------------------------------------------------------------------------------------
def _to_numpy(x: Any) -> np.ndarray:
    """numpy float64 view of a numpy array, torch tensor (any device/dtype, incl. bf16) or nested sequence.

    float64 because the original assembled its similarity matrix in float64 and because converting float32/bf16
    to float64 is exact, so ties and orderings are those of the model's own dtype.
    """
    if hasattr(x, "detach"):  # torch.Tensor, recognised without importing torch
        x = x.detach().cpu()
        if x.is_floating_point():
            x = x.double()  # bf16 has no numpy dtype; the cast to float64 is exact
        x = x.numpy()
    return np.asarray(x, dtype=np.float64)


def _check_finite(name: str, a: np.ndarray) -> None:
    if not np.all(np.isfinite(a)):
        bad = np.argwhere(~np.isfinite(a))[0]
        raise ValueError(f"{name} contains NaN/inf (first at index {tuple(int(i) for i in bad)})")


def _as_se(name: str, a: Any) -> np.ndarray:
    a = _to_numpy(a)
    if a.ndim != 2 or a.shape[1] != 2:
        raise ValueError(f"{name} must have shape [N, 2] (start, end), got {list(a.shape)}")
    _check_finite(name, a)
    return a


# --------------------------------------------------------------------------------------------------------------
# SmG
# --------------------------------------------------------------------------------------------------------------
def moments_to_seconds(pred_cw: Any, max_m_duration: float = MAX_M_DURATION) -> np.ndarray:
    """(center, width) normalised by 240 s -> (start, end) in seconds: ((c - w/2)*240, (c + w/2)*240).

    The detector predicts spans relative to the global 240 s constant (as the original's dataloader normalises
    its targets), not to the track length. The numpy twin of model.spans.spans_to_seconds (this module imports
    no torch), in float64; the torch path is what test.py uses.
    """
    cw = _as_se("pred_cw", pred_cw)
    c, w = cw[:, 0], cw[:, 1]
    return np.stack([c - w / 2.0, c + w / 2.0], axis=1) * float(max_m_duration)


def clip_moments(pred_se_sec: Any, m_duration: Any, max_m_duration: float = MAX_M_DURATION) -> np.ndarray:
    """Clip predicted moments to the track, exactly as the original (eval_epoch in train-MaDe.py).

    start = max(start, 0); end = min(end, max_m_duration, m_duration). The start is deliberately NOT clipped to
    the track end: a prediction entirely past the end of the track keeps start > end (negative length), which
    moment_iou scores as 0, the same as the original.
    """
    se = _as_se("pred_se_sec", pred_se_sec).copy()
    md = _to_numpy(m_duration).reshape(-1)
    if md.shape[0] != se.shape[0]:
        raise ValueError(f"m_duration has {md.shape[0]} entries for {se.shape[0]} moments")
    _check_finite("m_duration", md)
    se[:, 0] = np.maximum(se[:, 0], 0.0)
    se[:, 1] = np.minimum(np.minimum(se[:, 1], float(max_m_duration)), md)
    return se


def moment_iou(pred_se: Any, gt_se: Any) -> np.ndarray:
    """Row-wise temporal IoU [N] of (already clipped) predictions with GT moments, by the original's rules.

    * a degenerate GT (start >= end) gives IoU 0 whatever the prediction;
    * intersection = max(min(ends) - max(starts), 0);
    * union = pred length + GT length - intersection, and union <= 0 gives IoU 0 (a negative-length prediction
      can make the union vanish; without this rule that would be 0/0).
    """
    p, g = _as_se("pred_se", pred_se), _as_se("gt_se", gt_se)
    if p.shape != g.shape:
        raise ValueError(f"pred_se {list(p.shape)} and gt_se {list(g.shape)} differ in shape")
    inter = np.maximum(np.minimum(p[:, 1], g[:, 1]) - np.maximum(p[:, 0], g[:, 0]), 0.0)
    union = (p[:, 1] - p[:, 0]) + (g[:, 1] - g[:, 0]) - inter
    ok = (g[:, 0] < g[:, 1]) & (union > 0)
    iou = np.zeros(p.shape[0], dtype=np.float64)
    iou[ok] = inter[ok] / union[ok]
    return iou


def smg_metrics(ious: Any) -> dict[str, float]:
    """mIoU (fraction) and IoU@theta = 100 * #(IoU > theta) / N (percent, strict >, as the original)."""
    iou = _to_numpy(ious).reshape(-1)
    if iou.size == 0:
        raise ValueError("smg_metrics: no videos")
    out = {"mIoU": float(iou.mean())}
    for t in IOU_THRESHOLDS:
        out[f"IoU@{t}"] = float(100.0 * np.mean(iou > t))
    return out


# --------------------------------------------------------------------------------------------------------------
# MsG / V2MR
# --------------------------------------------------------------------------------------------------------------
class _DedupPlan:
    """How to fold the Nm score columns into K unique music ids (max over duplicate columns).

    Why the max: the original walks the columns by descending score and counts an id only the first time it
    appears, i.e. every id sits at the position of its best column. In the original duplicate columns even have
    identical scores (same track, same features), so max == first occurrence there, and max is the exact
    generalisation otherwise.
    """

    def __init__(self, column_music_ids: Sequence[str]):
        ids = np.asarray([str(m) for m in column_music_ids], dtype=object)
        if ids.size == 0:
            raise ValueError("no candidate music columns")
        self.unique_ids, inverse = np.unique(ids, return_inverse=True)  # unique_ids sorted
        self.num_columns = int(ids.size)
        self.is_identity = self.unique_ids.size == ids.size
        if self.is_identity:
            self.unique_of_column = inverse  # column j holds unique id inverse[j]
            self.column_of_unique = np.argsort(inverse)
        else:
            self.order = np.argsort(inverse, kind="stable")
            sorted_inv = inverse[self.order]
            self.starts = np.concatenate([[0], np.flatnonzero(np.diff(sorted_inv)) + 1])
        self._index = {m: i for i, m in enumerate(self.unique_ids.tolist())}

    @property
    def num_unique(self) -> int:
        return int(self.unique_ids.size)

    def index_of(self, music_ids: Sequence[str], what: str = "GT music id") -> np.ndarray:
        idx = np.fromiter((self._index.get(str(m), -1) for m in music_ids), dtype=np.int64, count=len(music_ids))
        if np.any(idx < 0):
            bad = np.flatnonzero(idx < 0)
            shown = ", ".join(f"row {i}: {music_ids[i]!r}" for i in bad[:5])
            raise ValueError(f"{bad.size} {what}(s) are not among the {self.num_unique} candidate music ids "
                             f"(columns of the score matrix): {shown}{' ...' if bad.size > 5 else ''}")
        return idx

    def fold(self, block: np.ndarray) -> np.ndarray:
        """[rows, Nm] column scores -> [rows, K] per-id scores in unique_ids order."""
        if self.is_identity:
            return block[:, self.column_of_unique]
        return np.maximum.reduceat(block[:, self.order], self.starts, axis=1)


def _row_chunks(n_rows: int, n_cols: int, chunk_rows: int | None) -> Iterable[tuple[int, int]]:
    step = chunk_rows or max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
    for a in range(0, n_rows, step):
        yield a, min(a + step, n_rows)


def _as_matrix(scores: Any) -> Any:
    """Keep torch tensors / numpy arrays as they are (converted per chunk later); lists become numpy."""
    return scores if hasattr(scores, "shape") else np.asarray(scores, dtype=np.float64)


def _check_score_shape(scores: Any, column_music_ids: Sequence[str], gt_music_ids: Sequence[str]) -> None:
    shape = tuple(scores.shape)
    if len(shape) != 2:
        raise ValueError(f"scores must be a 2-D [num_videos, num_music] matrix, got shape {list(shape)}")
    if shape[1] != len(column_music_ids):
        raise ValueError(f"scores has {shape[1]} columns but {len(column_music_ids)} column music ids were given")
    if shape[0] != len(gt_music_ids):
        raise ValueError(f"scores has {shape[0]} rows but {len(gt_music_ids)} GT music ids were given")


def _folded_blocks(scores: Any, plan: _DedupPlan, chunk_rows: int | None) -> Iterable[tuple[int, int, np.ndarray]]:
    """Yield (row_start, row_end, [rows, K] float64 per-id scores), converting/validating chunk by chunk."""
    for a, b in _row_chunks(int(scores.shape[0]), int(scores.shape[1]), chunk_rows):
        block = _to_numpy(scores[a:b])
        if np.isnan(block).any():
            r, c = np.argwhere(np.isnan(block))[0]
            raise ValueError(f"scores contain NaN (first at row {a + int(r)}, column {int(c)})")
        yield a, b, plan.fold(block)


def gt_ranks(scores: Any, music_ids_of_columns: Sequence[str], gt_music_ids: Sequence[str],
             chunk_rows: int | None = None) -> np.ndarray:
    """0-based rank of each video's GT music id among the distinct candidate music ids -> int64 [Nv].

    scores: [Nv, Nm] (numpy or torch, any float dtype, higher = better); column j is the track
    music_ids_of_columns[j] (the split's rows, so ids may repeat); row i's positive is gt_music_ids[i].

    De-duplication: each distinct id is scored by its best column (see _DedupPlan), which reproduces the
    original's "walk columns by descending score, count each id the first time it is seen" exactly.

    Ties are counted PESSIMISTICALLY: rank0_i = #{other ids u : score_i(u) >= score_i(gt)}. The original broke
    ties by np.argsort order, i.e. arbitrarily; any optimistic or arbitrary rule lets a degenerate model (e.g. all
    scores equal, or collapsed embeddings) reach R1 = 100, while the pessimistic rule gives it the worst rank.
    For real-valued model scores ties have probability ~0, so this changes nothing for a working model.

    Vectorised: one comparison per (video, id) in row chunks of at most ~8M elements (64 MiB float64), no
    Python loop over videos. -inf scores are allowed (they simply rank last); NaN is an error.
    """
    scores = _as_matrix(scores)
    _check_score_shape(scores, music_ids_of_columns, gt_music_ids)
    plan = _DedupPlan(music_ids_of_columns)
    gt_idx = plan.index_of(gt_music_ids)
    rank0 = np.empty(len(gt_music_ids), dtype=np.int64)
    for a, b, per_id in _folded_blocks(scores, plan, chunk_rows):
        g = per_id[np.arange(b - a), gt_idx[a:b]]
        # the GT id itself satisfies >= and is subtracted; every other id tied with it ranks ahead
        rank0[a:b] = np.count_nonzero(per_id >= g[:, None], axis=1) - 1
    return rank0


def ranked_music_ids(scores: Any, music_ids_of_columns: Sequence[str], gt_music_ids: Sequence[str] | None = None,
                     top_k: int | None = None, chunk_rows: int | None = None) -> list[list[str]]:
    """Distinct music ids per video, best first (what utils.evaluate.offline reads as "ranked_music_ids").

    Same de-duplication as gt_ranks. When gt_music_ids is given, the GT id is placed AFTER every id it ties
    with, so that the position of the GT id in the list equals gt_ranks(...) exactly (the pessimistic rule
    made explicit in the list); without it, ties keep the sorted-id order. top_k keeps a prefix; the
    evaluator then ranks an unlisted GT id last (see ranks_from_ranked_lists).
    """
    scores = _as_matrix(scores)
    if gt_music_ids is None:
        gt_music_ids = [music_ids_of_columns[0]] * int(scores.shape[0])
        mark_gt = False
    else:
        mark_gt = True
    _check_score_shape(scores, music_ids_of_columns, gt_music_ids)
    plan = _DedupPlan(music_ids_of_columns)
    gt_idx = plan.index_of(gt_music_ids)
    k = plan.num_unique if top_k is None else max(1, min(int(top_k), plan.num_unique))
    out: list[list[str]] = []
    col = np.arange(plan.num_unique)
    for a, b, per_id in _folded_blocks(scores, plan, chunk_rows):
        is_gt = (col[None, :] == gt_idx[a:b, None]) if mark_gt else np.zeros_like(per_id, dtype=bool)
        # lexsort: last key is primary -> by descending score, then non-GT before GT
        order = np.lexsort((is_gt, -per_id), axis=-1)[:, :k]
        out.extend(plan.unique_ids[order].tolist())
    return out


def ranks_from_ranked_lists(ranked_lists: Sequence[Sequence[str]], gt_music_ids: Sequence[str],
                            num_candidates: int) -> np.ndarray:
    """0-based GT ranks from per-video ranked lists of music ids (best first), possibly top-k prefixes.

    rank0 = number of DISTINCT ids listed before the first occurrence of the GT id (the original's dedup walk).
    A GT id that is not listed ranks after every other candidate (rank0 = num_candidates - 1): ids missing from a
    prefix are ranked after all listed ones, and pessimistically, so a truncated list can never look better
    than the full one. Candidate membership is validated by the caller (utils.evaluate.offline).
    """
    if len(ranked_lists) != len(gt_music_ids):
        raise ValueError(f"{len(ranked_lists)} ranked lists for {len(gt_music_ids)} videos")
    rank0 = np.empty(len(gt_music_ids), dtype=np.int64)
    for i, (lst, gt) in enumerate(zip(ranked_lists, gt_music_ids)):
        try:
            p = lst.index(gt) if isinstance(lst, list) else list(lst).index(gt)
        except ValueError:
            rank0[i] = num_candidates - 1
            continue
        rank0[i] = p if p == 0 else len(set(lst[:p]))  # set() only matters when the list repeats ids
    return rank0


def msg_metrics(rank0: Any) -> dict[str, float]:
    """R@k = 100*#(rank0 < k)/N (percent), MedianR/MeanR 1-based, MRR = mean(1/(rank0+1)) (fraction)."""
    r = np.asarray(rank0, dtype=np.float64).reshape(-1)
    if r.size == 0:
        raise ValueError("msg_metrics: no videos")
    out = {f"R{k}": float(100.0 * np.mean(r < k)) for k in RECALL_KS}
    out["MedianR"] = float(np.median(r) + 1.0)
    out["MeanR"] = float(np.mean(r) + 1.0)
    out["MRR"] = float(np.mean(1.0 / (r + 1.0)))
    return out


# --------------------------------------------------------------------------------------------------------------
# MoR
# --------------------------------------------------------------------------------------------------------------
def mor_metrics(rank0: Any, ious: Any) -> dict[str, float]:
    """R{k}_iou{theta} = 100 * #{rank <= k and IoU > theta} / N over ALL videos (rank = rank0 + 1, strict >).

    The IoU is the SmG IoU on the GT track (the original never grounds on the retrieved track), so this is
    "retrieved within top k AND grounded well".
    """
    r, iou = _rank_iou(rank0, ious)
    return {f"R{k}_iou{t}": float(100.0 * np.mean((r + 1 <= k) & (iou > t))) for k in MOR_KS for t in MOR_THRESHOLDS}


def extra_metrics(rank0: Any, ious: Any) -> dict[str, float]:
    """Metrics outside METRIC_KEYS: R{k}_miou (fixed) and R{k}_miou_orig (the original's value).

    R{k}_miou = mean IoU over the videos whose GT track ranks <= k (0 when there are none).
    The original (utils/util_test.py) divided twice: sum(IoU over those videos) / N / count; that value
    is kept as R{k}_miou_orig only to compare with old logs (it was never logged by the original either).
    """
    r, iou = _rank_iou(rank0, ious)
    n = r.size
    out: dict[str, float] = {}
    for k in MOR_KS:
        hit = r + 1 <= k
        cnt = int(hit.sum())
        s = float(iou[hit].sum())
        out[f"R{k}_miou"] = s / cnt if cnt else 0.0
        out[f"R{k}_miou_orig"] = s / n / cnt if cnt else 0.0
    return out


def _rank_iou(rank0: Any, ious: Any) -> tuple[np.ndarray, np.ndarray]:
    r = np.asarray(rank0, dtype=np.int64).reshape(-1)
    iou = _to_numpy(ious).reshape(-1)
    if r.shape != iou.shape:
        raise ValueError(f"{r.size} ranks but {iou.size} IoUs")
    if r.size == 0:
        raise ValueError("no videos")
    return r, iou


# --------------------------------------------------------------------------------------------------------------
# everything
# --------------------------------------------------------------------------------------------------------------
def metrics_from_ranks(rank0: Any, ious: Any) -> dict[str, float]:
    """All METRIC_KEYS from per-video GT ranks (0-based) and SmG IoUs. Shared by compute_all and utils.evaluate.offline
    so that a score matrix and the equivalent ranked lists give identical numbers by construction."""
    out: dict[str, float] = {}
    out.update(msg_metrics(rank0))
    out.update(smg_metrics(ious))
    out.update(mor_metrics(rank0, ious))
    return {k: float(out[k]) for k in METRIC_KEYS}


def compute_all(scores: Any, column_music_ids: Sequence[str], gt_music_ids: Sequence[str], pred_se_sec: Any,
                gt_se_sec: Any, m_duration: Any, max_m_duration: float = MAX_M_DURATION) -> dict[str, float]:
    """Every benchmark metric -> flat dict with exactly METRIC_KEYS (python floats).

    scores [Nv, Nm]: retrieval scores (columns labelled by column_music_ids); gt_music_ids [Nv];
    pred_se_sec [Nv, 2]: UNclipped predicted moment (seconds) on each video's GT track; gt_se_sec [Nv, 2];
    m_duration [Nv]: GT track length (s). Clipping to [0, min(240, m_duration)] happens here.
    """
    rank0 = gt_ranks(scores, column_music_ids, gt_music_ids)
    ious = smg_ious(pred_se_sec, gt_se_sec, m_duration, max_m_duration)
    if ious.size != rank0.size:
        raise ValueError(f"{rank0.size} score rows but {ious.size} moments")
    return metrics_from_ranks(rank0, ious)


def smg_ious(pred_se_sec: Any, gt_se_sec: Any, m_duration: Any, max_m_duration: float = MAX_M_DURATION) -> np.ndarray:
    """Clip predictions to the track, then IoU with the GT (whose end is clamped to 240 s like the original's
    dataloader_MGSV_EC_feature.py; a no-op for MGSV-EC where every track is shorter than 240 s)."""
    gt = _as_se("gt_se_sec", gt_se_sec).copy()
    gt[:, 1] = np.minimum(gt[:, 1], float(max_m_duration))
    return moment_iou(clip_moments(pred_se_sec, m_duration, max_m_duration), gt)


# --------------------------------------------------------------------------------------------------------------
# presentation
# --------------------------------------------------------------------------------------------------------------
_FRACTION_KEYS = {"mIoU", "MRR"}


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "-"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    # "seen/mIoU" or "mIoU seen (150)": a subset's metric formats as the metric itself.
    key = key.rsplit("/", 1)[-1].split(" ", 1)[0]
    if key in _FRACTION_KEYS or key.endswith("_miou") or key.endswith("_miou_orig"):
        return f"{v:.4f}"
    return f"{v:.2f}"


def format_table(metrics: Mapping[str, Any], columns: Sequence[str] | None = None) -> str:
    """Readable text table: one metric per line, one column per named result (model vs baselines side by side).

    metrics: either one flat {metric: value} dict, or {name: {metric: value}} for several results (insertion
    order = column order). columns: the metric names (rows) to show, default METRIC_KEYS then any other keys
    present. Returns the string (callers print it or send it to their logger). mIoU/MRR show 4 decimals (they
    are fractions), everything else 2 (percent or ranks). Missing values show as '-'.
    """
    if not metrics:
        return "(no metrics)"
    nested = all(isinstance(v, Mapping) for v in metrics.values())
    named: dict[str, Mapping[str, Any]] = dict(metrics) if nested else {"value": metrics}
    if columns is None:
        seen = [k for k in METRIC_KEYS if any(k in d for d in named.values())]
        extra = [k for d in named.values() for k in d if k not in METRIC_KEYS]
        columns = seen + list(dict.fromkeys(extra))
    header = ["metric", *named.keys()]
    rows = [[k, *(_fmt(k, d.get(k)) for d in named.values())] for k in columns]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
