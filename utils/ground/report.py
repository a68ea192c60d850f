"""Grounding results for people: a text table and a plot of the tracks with their moments."""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from utils.data.constants import MAX_M_DURATION
from utils.ground.grounding import GroundTruth, QueryResult
from utils.io import atomic_open


def format_results(results: Sequence[QueryResult]) -> str:
    """Human-readable table, one block per query."""
    lines = []
    for r in results:
        lines.append(f"video {r.video_id}  [{r.mode}]")
        lines.append(f"  {'rank':>4}  {'music_id':<24} {'score':>8} {'start':>8} {'end':>8} {'conf':>6} {'track':>7}"
                     f"  {'canonical clip (uses)':>22}")
        for t in r.tracks:
            mark = "  past the track end" if t.start > t.end else ""
            mark += "  <- ground truth" if r.gt is not None and t.music_id == r.gt.music_id else ""
            canon = "-" if t.canonical_start is None else \
                f"{t.canonical_start:.2f}-{t.canonical_end:.2f}s ({t.uses})"
            lines.append(f"  {t.rank:>4}  {t.music_id:<24} {t.score:>8.4f} {t.start:>7.2f}s {t.end:>7.2f}s "
                         f"{t.confidence:>6.3f} {t.duration:>6.1f}s  {canon:>22}{mark}")
        g = r.gt
        if g is not None:
            if not g.in_library:
                lines.append(f"  ground truth {g.music_id}: not in the index")
            else:
                rank = f"rank {g.rank}" if g.rank is not None else "outside the shortlist"
                gt_moment = f"{g.start:.2f}-{g.end:.2f}s, " if g.start is not None else ""
                iou = f" IoU {g.iou:.3f}" if g.iou is not None else ""
                lines.append(f"  ground truth {g.music_id}: {rank}, moment {gt_moment}"
                             f"predicted {g.pred_start:.2f}-{g.pred_end:.2f}s (conf {g.confidence:.3f}){iou}")
        lines.append("")
    return "\n".join(lines)


def plot_result(result: QueryResult, path: str | os.PathLike, max_m_duration: float = MAX_M_DURATION) -> Path:
    """A picture of one query against its top tracks, written atomically as PNG.

    One horizontal timeline per returned track (length = track duration), the predicted moment
    shaded, the ground-truth moment hatched on the ground-truth track (drawn as an extra last
    row when it is not among the top tracks), score and confidence in a column on the right.
    """
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    tracks = list(result.tracks)
    gt = result.gt
    show_gt_row = gt is not None and gt.in_library and gt.pred_start is not None \
        and all(t.music_id != gt.music_id for t in tracks)
    n_rows = len(tracks) + int(show_gt_row)
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.5 * n_rows))
    label_x = max_m_duration + 4
    labels = []
    for y, t in enumerate(tracks):
        is_gt = gt is not None and t.music_id == gt.music_id
        _draw_track(ax, y, t.duration, t.start, t.end, gt if is_gt else None, max_m_duration)
        if t.canonical_start is not None:   # where others cut this track: an outline over the track
            ax.barh(y, t.canonical_end - t.canonical_start, left=t.canonical_start, height=0.72, color="none",
                    edgecolor="#2ca02c", linewidth=1.4, linestyle="--")
        uses = f"  {t.uses} uses" if t.canonical_start is not None else ""
        ax.text(label_x, y, f"score {t.score:.3f}  conf {t.confidence:.2f}{uses}", va="center", fontsize=8)
        labels.append(f"#{t.rank} {t.music_id}" + ("  (GT)" if is_gt else ""))
    if show_gt_row:  # the GT track is outside the top-k: drawn below them, for comparison
        y = len(tracks)
        _draw_track(ax, y, gt.duration, gt.pred_start, gt.pred_end, gt, max_m_duration)
        rank = f"rank {gt.rank}" if gt.rank is not None else "not shortlisted"
        ax.text(label_x, y, f"{rank}  conf {gt.confidence:.2f}", va="center", fontsize=8)
        labels.append(f"GT {gt.music_id}")
        ax.axhline(len(tracks) - 0.5, color="#999999", linewidth=0.6, linestyle=":")
    ax.set_yticks(range(n_rows), labels, fontsize=8)
    ax.set_ylim(n_rows - 0.5, -0.5)
    ax.set_xlim(0, max_m_duration + 62)
    ax.set_xticks(np.arange(0, max_m_duration + 1, 30))
    ax.set_xlabel("time in track (s)")
    ax.set_title(f"video {result.video_id}: top {len(tracks)} tracks [{result.mode}]", fontsize=10)
    handles = [Patch(facecolor="#dddddd", edgecolor="#999999", label="track"),
               Patch(facecolor="#1f77b4", alpha=0.8, label="predicted moment")]
    if gt is not None and gt.start is not None:
        handles.append(Patch(facecolor="none", edgecolor="#d62728", hatch="///", label="ground-truth moment"))
    if any(t.canonical_start is not None for t in tracks):
        handles.append(Patch(facecolor="none", edgecolor="#2ca02c", linestyle="--", label="canonical clip"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (1 + 0.3 * n_rows)),
              ncol=len(handles), fontsize=8, frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    path = Path(path)
    with atomic_open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def _draw_track(ax: Any, y: float, duration: float, start: float, end: float, gt: GroundTruth | None,
                max_m_duration: float = MAX_M_DURATION) -> None:
    ax.barh(y, duration, left=0, height=0.5, color="#dddddd", edgecolor="#999999", linewidth=0.6)
    if end > start:
        ax.barh(y, end - start, left=start, height=0.5, color="#1f77b4", alpha=0.8)
    else:  # clip_moments keeps start > end when the detector's moment lies past the end of the track
        x = duration + 2 if duration < 0.5 * max_m_duration else 2
        ax.text(x, y, f"predicted moment starts at {start:.1f} s, past the track end", va="center",
                fontsize=7, color="#1f77b4")
    if gt is not None and gt.start is not None and gt.end is not None:
        ax.barh(y, gt.end - gt.start, left=gt.start, height=0.5, color="none", edgecolor="#d62728",
                hatch="///", linewidth=1.2)
