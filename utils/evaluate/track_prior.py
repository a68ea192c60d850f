"""How tracks are used: canonical clips, the track-prior baseline, seen/unseen breakdowns, split statistics.

On MGSV-EC a track is used with one canonical clip: most videos of a track take the same cut of
it, trimmed to their own length (measured on the real CSVs: 66.8 % of the test videos whose
track occurs in val start within 0.01 s of that track's val moment, 80.7 % within 1 s). So a
moment can be right because the model read the music and the video, or because it remembered
where this track is usually cut. This module separates the two:

* canonical_clips(prior): each track's most common start in a "prior" split (the training CSV,
  or another split), with its number of uses;
* the track_prior baseline: that start with the video's length, start 0 for a track the prior
  split has never seen; it uses no feature at all;
* subset_masks / subset_metrics: the SmG and MoR metrics on the videos whose track is seen vs
  unseen in the prior split, and on the moments on vs off their track's canonical start
  (both of these subsets hold seen tracks only; an unseen track has no canonical start);
* dataset_stats / format_stats: the numbers above for any pair of CSVs.

numpy + pandas only (no torch): `python -m utils.evaluate --stats` stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from utils.evaluate.metrics import metrics_from_ranks

# Starts closer than this (seconds) count as the same cut of a track.
CANONICAL_TOLERANCE = 1.0
SUBSETS: tuple[str, ...] = ("seen", "unseen", "canonical", "off_canonical")
SUBSET_METRICS: tuple[str, ...] = ("mIoU", "IoU@0.5", "IoU@0.7", "R1", "R1_iou0.5")


@dataclass(frozen=True)
class CanonicalClip:
    """A track's canonical start in the prior split."""

    start: float      # seconds
    uses: int         # videos of the prior split that use the track
    support: int      # of those, how many start within CANONICAL_TOLERANCE of `start`


def canonical_clips(prior: pd.DataFrame, tolerance: float = CANONICAL_TOLERANCE) -> dict[str, CanonicalClip]:
    """{music_id: CanonicalClip} from the (music_id, music_start) rows of a prior split.

    The canonical start is the start with the most other starts of the same track within
    `tolerance` (near-ties merged: 23.2 and 23.22 are one cut); among equally supported starts the
    one repeated most exactly (within 0.01 s) wins, then the earliest, so the rule is deterministic
    and a cut trimmed a little off the canonical one does not displace it.
    """
    out: dict[str, CanonicalClip] = {}
    starts = prior["music_start"].to_numpy(dtype=np.float64)
    ids = prior["music_id"].astype(str).to_numpy()
    order = np.lexsort((starts, ids))
    ids, starts = ids[order], starts[order]
    bounds = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1], True])
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = starts[a:b]                                  # sorted
        support = _count_within(s, tolerance)
        best = int(np.argmax(support * (b - a + 1) + _count_within(s, 0.01)))   # first maximum = earliest
        out[str(ids[a])] = CanonicalClip(float(s[best]), int(b - a), int(support[best]))
    return out


def _count_within(sorted_starts: np.ndarray, tolerance: float) -> np.ndarray:
    """For each start, how many starts (itself included) lie within `tolerance` of it."""
    s = sorted_starts
    return np.searchsorted(s, s + tolerance, side="right") - np.searchsorted(s, s - tolerance, side="left")


def track_starts(prior: pd.DataFrame) -> dict[str, np.ndarray]:
    """{music_id: every start (s) of the track in the prior split}: its whole usage history."""
    return {str(m): g.to_numpy(dtype=np.float64) for m, g in prior.groupby(prior["music_id"].astype(str))["music_start"]}


def canonical_starts(music_ids: Sequence[str], clips: Mapping[str, CanonicalClip]) -> np.ndarray:
    """Canonical start per video (NaN where the track is unseen in the prior split)."""
    return np.array([clips[m].start if m in clips else np.nan for m in map(str, music_ids)], dtype=np.float64)


def track_prior_starts(music_ids: Sequence[str], clips: Mapping[str, CanonicalClip]) -> np.ndarray:
    """The track-prior baseline's start per video: the canonical start, or 0 for an unseen track."""
    return np.nan_to_num(canonical_starts(music_ids, clips), nan=0.0)


def subset_masks(music_ids: Sequence[str], gt_starts: Any, clips: Mapping[str, CanonicalClip],
                 tolerance: float = CANONICAL_TOLERANCE) -> dict[str, np.ndarray]:
    """Boolean masks over the videos: seen / unseen track, and (seen only) on / off its canonical start."""
    canon = canonical_starts(music_ids, clips)
    seen = ~np.isnan(canon)
    on = seen & (np.abs(np.asarray(gt_starts, dtype=np.float64) - np.nan_to_num(canon)) <= tolerance)
    return {"seen": seen, "unseen": ~seen, "canonical": on, "off_canonical": seen & ~on}


def subset_metrics(rank0: Any, ious: Any, masks: Mapping[str, np.ndarray],
                   keys: Sequence[str] = SUBSET_METRICS) -> dict[str, float]:
    """{"<subset>/n": count, "<subset>/<metric>": value} for every non-empty subset (empty ones are left out)."""
    rank0, ious = np.asarray(rank0), np.asarray(ious, dtype=np.float64)
    out: dict[str, float] = {}
    for name, mask in masks.items():
        out[f"{name}/n"] = float(mask.sum())
        if mask.any():
            m = metrics_from_ranks(rank0[mask], ious[mask])
            out.update({f"{name}/{k}": m[k] for k in keys})
    return out


def subset_table(flat: Mapping[str, float], keys: Sequence[str] = SUBSET_METRICS) -> dict[str, dict[str, float]]:
    """Prefixed keys -> {subset (n videos): {metric: value}}, the shape utils.evaluate.metrics.format_table prints."""
    table: dict[str, dict[str, float]] = {}
    for name in SUBSETS:
        n = flat.get(f"{name}/n")
        if n is None:
            continue
        table[f"{name} ({int(n)})"] = {k: flat.get(f"{name}/{k}") for k in keys}
    return table


# --------------------------------------------------------------------------------------------------------------
# statistics
# --------------------------------------------------------------------------------------------------------------
def _quantiles(x: np.ndarray, qs: Sequence[float] = (0.25, 0.5, 0.75)) -> list[float]:
    return [float(v) for v in np.quantile(x, qs)] if x.size else [float("nan")] * len(qs)


def dataset_stats(df: pd.DataFrame, prior: pd.DataFrame | None = None) -> dict[str, Any]:
    """The numbers that describe how a split's moments are placed, and (with a prior split) how
    strongly its tracks keep their canonical clip. Shares are fractions; times in seconds."""
    start = df["music_start"].to_numpy(dtype=np.float64)
    track = df["music_total_duration"].to_numpy(dtype=np.float64)
    v_len = (df["video_end"] - df["video_start"]).to_numpy(dtype=np.float64)
    m_len = (df["music_end"] - df["music_start"]).to_numpy(dtype=np.float64)
    later = start >= 1.0
    stats: dict[str, Any] = {
        "videos": int(len(df)), "tracks": int(df["music_id"].nunique()),
        "start_at_0": float(np.mean(start < 0.01)),
        "start_in_first_second": float(np.mean(start < 1.0)),
        "later_start_quartiles_s": _quantiles(start[later]),
        "later_start_over_track_quartiles": _quantiles(start[later] / track[later]),
        "video_length_median_s": float(np.median(v_len)),
        "moment_length_equals_video_length": float(np.mean(np.abs(m_len - v_len) < 0.05)),
    }
    if prior is None:
        return stats
    clips = canonical_clips(prior)
    ids = df["music_id"].astype(str).tolist()
    canon = canonical_starts(ids, clips)
    seen = ~np.isnan(canon)
    diff = np.abs(start[seen] - canon[seen])
    on = diff <= CANONICAL_TOLERANCE
    c_on, t_on = canon[seen][on], track[seen][on]
    c_later = c_on >= 1.0
    stats.update({
        "prior_tracks": len(clips),
        "tracks_seen_in_prior": float(np.mean([m in clips for m in df["music_id"].astype(str).unique()])),
        "videos_of_seen_tracks": int(seen.sum()),
        "within_0.01s_of_canonical": float(np.mean(diff <= 0.01)) if diff.size else float("nan"),
        "within_1s_of_canonical": float(np.mean(on)) if diff.size else float("nan"),
        "within_2s_of_canonical": float(np.mean(diff <= 2.0)) if diff.size else float("nan"),
        "median_distance_to_canonical_s": float(np.median(diff)) if diff.size else float("nan"),
        "canonical_in_first_second": float(np.mean(~c_later)) if c_on.size else float("nan"),
        "later_canonical_over_track_quartiles": _quantiles(c_on[c_later] / t_on[c_later]),
        "later_canonical_median_s": float(np.median(c_on[c_later])) if c_later.any() else float("nan"),
        "off_canonical_in_first_second": float(np.mean(start[seen][~on] < 1.0)) if (~on).any() else float("nan"),
    })
    return stats


_STAT_LABELS = {
    "videos": "videos", "tracks": "distinct tracks",
    "start_at_0": "moments starting at 0 s",
    "start_in_first_second": "moments starting within the first second",
    "later_start_quartiles_s": "later starts (>= 1 s): quartiles, s",
    "later_start_over_track_quartiles": "later starts / track length: quartiles",
    "video_length_median_s": "video length: median, s",
    "moment_length_equals_video_length": "moment length = video length (within 0.05 s)",
    "prior_tracks": "tracks in the prior split",
    "tracks_seen_in_prior": "tracks seen in the prior split",
    "videos_of_seen_tracks": "videos whose track is seen",
    "within_0.01s_of_canonical": "  of those, start within 0.01 s of the canonical start",
    "within_1s_of_canonical": "  within 1 s",
    "within_2s_of_canonical": "  within 2 s",
    "median_distance_to_canonical_s": "  median distance, s",
    "canonical_in_first_second": "canonical starts of those within 1 s: in the first second",
    "later_canonical_over_track_quartiles": "  the later ones / track length: quartiles",
    "later_canonical_median_s": "  the later ones: median, s",
    "off_canonical_in_first_second": "videos off their canonical start (> 1 s): in the first second",
}
_SHARES = {"start_at_0", "start_in_first_second", "moment_length_equals_video_length", "tracks_seen_in_prior",
           "within_0.01s_of_canonical", "within_1s_of_canonical", "within_2s_of_canonical",
           "canonical_in_first_second", "off_canonical_in_first_second"}


def format_stats(stats: Mapping[str, Any]) -> str:
    """One line per statistic: shares in percent, quartile lists as a/b/c."""
    def fmt(key: str, v: Any) -> str:
        if isinstance(v, list):
            return " / ".join(f"{x:.3f}" if "over_track" in key else f"{x:.1f}" for x in v)
        if key in _SHARES:
            return f"{100 * v:.1f} %"
        return f"{v:.3f}" if isinstance(v, float) else str(v)
    width = max(len(_STAT_LABELS.get(k, k)) for k in stats)
    return "\n".join(f"{_STAT_LABELS.get(k, k).ljust(width)}  {fmt(k, v)}" for k, v in stats.items())
