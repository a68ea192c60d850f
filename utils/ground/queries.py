"""Inputs of the grounding tools: track id lists (a CSV, a text file or a list) with any known
durations, and query videos (one feature file, or an annotation CSV's videos)."""
from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from utils.ground.model import GroundingError
from utils.io import describe_load_failure, torch_load_plain

FP16_MAX = 65504.0


def read_music_ids(source: str | os.PathLike | Sequence[str]) -> tuple[list[str], dict[str, float]]:
    """Track ids (distinct, in first-occurrence order) and any known durations.

    `source`: a CSV with a music_id column (e.g. an MGSV-EC split, where a track is on one row
    per video that uses it: those repeats are one track; music_total_duration is used when
    present and must agree across a track's rows), a text file with one id per line (blank
    lines and #-comments skipped; a repeated id is an error), or a sequence of ids (likewise).
    """
    if not isinstance(source, (str, os.PathLike)):
        ids = [str(x).strip() for x in source]
        return _checked_ids(ids, source_name="the id list"), {}
    path = Path(source)
    if not path.is_file():
        raise GroundingError(f"--music_ids {path}: file not found")
    with open(path, encoding="utf-8") as f:
        first = f.readline()
    if path.suffix.lower() == ".csv" or "music_id" in first.split(","):
        return _read_csv_ids(path)
    with open(path, encoding="utf-8") as f:
        ids = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    return _checked_ids(ids, source_name=str(path)), {}


def _read_csv_ids(path: Path) -> tuple[list[str], dict[str, float]]:
    import pandas as pd
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:  # empty file, bad quoting, ...
        raise GroundingError(f"{path}: cannot be read as CSV ({type(e).__name__}: {e})") from None
    if "music_id" not in df.columns:
        raise GroundingError(f"{path}: no music_id column (columns: {', '.join(df.columns[:8])})")
    ids = [s.strip() for s in df["music_id"]]
    _checked_ids(ids, str(path), repeats_allowed=True)
    durations = _csv_durations(path, ids, df["music_total_duration"]) if "music_total_duration" in df.columns else {}
    return list(dict.fromkeys(ids)), durations


def _csv_durations(path: Path, ids: list[str], cells: Iterable[str]) -> dict[str, float]:
    """{music_id: seconds} from a music_total_duration column. A track's rows must agree: two
    lengths for one id mean two different files under that id, and either would mis-clip moments."""
    durations: dict[str, float] = {}
    conflicts: list[str] = []
    for line, (mid, cell) in enumerate(zip(ids, cells), start=2):  # line 1 is the header
        cell = cell.strip()
        if not cell:
            continue  # unknown: estimated from the mask
        try:
            value = float(cell)
        except ValueError:
            value = math.nan
        if not (math.isfinite(value) and value > 0):
            raise GroundingError(f"{path}: line {line}: music_total_duration {cell!r} of {mid} is not a positive "
                                 "number of seconds; correct it or leave the cell empty")
        if durations.setdefault(mid, value) != value and len(conflicts) < 3:
            conflicts.append(f"{mid} ({durations[mid]:g} and {value:g} s, line {line})")
    if conflicts:
        raise GroundingError(f"{path}: music_total_duration differs between rows of one track: "
                             f"{'; '.join(conflicts)}. A track has one length: correct the rows.")
    return durations


def _checked_ids(ids: list[str], source_name: str, repeats_allowed: bool = False) -> list[str]:
    """`ids` if none is empty and (unless `repeats_allowed`) none repeats; else a one-line error."""
    if any(not i for i in ids):
        raise GroundingError(f"{source_name}: empty music id")
    if not ids:
        raise GroundingError(f"{source_name}: no music ids")
    if not repeats_allowed and len(set(ids)) != len(ids):
        repeated = list(dict.fromkeys(i for i, n in Counter(ids).items() if n > 1))
        shown = ", ".join(repeated[:5]) + (f" and {len(repeated) - 5} more" if len(repeated) > 5 else "")
        raise GroundingError(f"{source_name}: music ids listed more than once: {shown}. Each id names one track "
                             "of the index: remove the repeated lines.")
    return ids


def _load_tensor(path: Path, what: str) -> torch.Tensor:
    if not path.is_file():
        raise GroundingError(f"{what} {path}: file not found")
    try:
        x = torch_load_plain(path)
    except Exception as e:  # refused pickled object, truncated file, not a torch file
        raise GroundingError(f"{what} {path}: cannot be read as a torch tensor ({describe_load_failure(e)})") from None
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not torch.is_tensor(x):
        raise GroundingError(f"{what} {path}: holds a {type(x).__name__}, expected a tensor")
    return x


def video_mask_from_rows(feat: torch.Tensor) -> torch.Tensor:
    """1 for rows with any non-zero value: padded frames are stored as zero rows."""
    return (feat != 0).any(dim=-1).to(torch.float32)


def prepare_video(feat: torch.Tensor, mask: torch.Tensor | None = None, num_frames: int = 50,
                  name: str = "video feature") -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one CLIP frame sequence [T<=num_frames, 512]; pad to num_frames; zero padded rows.

    Without a mask, frames are the non-zero rows (how the feature files store padding).
    """
    if not torch.is_tensor(feat):
        raise GroundingError(f"{name}: expected a tensor, got {type(feat).__name__}")
    if feat.dim() != 2 or feat.shape[1] != 512:
        raise GroundingError(f"{name}: shape {list(feat.shape)}, expected [frames <= {num_frames}, 512] "
                             "(CLIP ViT-B/32 image embeddings at 1 fps)")
    if feat.shape[0] > num_frames:
        raise GroundingError(f"{name}: {feat.shape[0]} frames, the model takes at most {num_frames} "
                             "(1 fps); cut the video or its features")
    if not torch.is_floating_point(feat):
        raise GroundingError(f"{name}: dtype {feat.dtype}, expected floating point")
    feat = feat.to(torch.float32)
    if mask is None:
        if not torch.isfinite(feat).all():
            raise GroundingError(f"{name}: contains NaN or inf values")
        mask = video_mask_from_rows(feat)
    else:
        if not torch.is_tensor(mask) or mask.dim() != 1 or mask.shape[0] != feat.shape[0]:
            shape = list(mask.shape) if torch.is_tensor(mask) else type(mask).__name__
            raise GroundingError(f"{name}: mask {shape} does not match {feat.shape[0]} frames "
                                 f"(expected a 1-D 0/1 tensor [{feat.shape[0]}])")
        if not ((mask == 0) | (mask == 1)).all():
            raise GroundingError(f"{name}: mask values must be 0 or 1")
        mask = mask.to(torch.float32)
        if not torch.isfinite(feat[mask.bool()]).all():
            raise GroundingError(f"{name}: contains NaN or inf values in valid frames")
    if not mask.any():
        raise GroundingError(f"{name}: no valid frame (all rows are zero or masked out)")
    from utils.data.features import MAX_ABS_FEATURE
    peak = float(feat[mask.bool()].abs().max())
    if peak > MAX_ABS_FEATURE:
        raise GroundingError(f"{name}: values up to {peak:.3g}, beyond +-{MAX_ABS_FEATURE:g}; CLIP features stay far "
                             "below that and such values overflow the model to NaN (a broken extractor?)")
    out = torch.zeros(num_frames, 512)
    out_mask = torch.zeros(num_frames)
    out[: feat.shape[0]] = feat.masked_fill(~mask.bool()[:, None], 0.0)
    out_mask[: feat.shape[0]] = mask
    return out, out_mask


def load_video(feature_path: str | os.PathLike, mask_path: str | os.PathLike | None = None,
               num_frames: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """One query from .pt files: (feat [num_frames, 512], mask [num_frames]) float32."""
    feat = _load_tensor(Path(feature_path), "--video_feature")
    mask = None if mask_path is None else _load_tensor(Path(mask_path), "--video_mask")
    return prepare_video(feat, mask, num_frames, name=str(feature_path))


@dataclass
class Queries:
    """A batch of queries; optional ground truth (from a CSV row) for plots and checks."""

    video_ids: list[str]
    feats: torch.Tensor                     # [Q, Lv, 512]
    masks: torch.Tensor                     # [Q, Lv]
    gt_music_ids: list[str | None] = field(default_factory=list)
    gt_moments: list[tuple[float, float] | None] = field(default_factory=list)


def load_query_csv(csv_path: str | os.PathLike, feature_root: str | os.PathLike,
                   num_frames: int = 50, use_packed: bool = True) -> Queries:
    """Queries listed in a CSV with a video_id column, features from the feature store.

    When the CSV also has music_id / music_start / music_end (an MGSV-EC split), they are
    kept as the ground truth for the JSON output and the plots.
    """
    import pandas as pd

    from utils.data.features import FeatureError
    from utils.data.store import FeatureStore
    path = Path(csv_path)
    if not path.is_file():
        raise GroundingError(f"--video_feature {path}: file not found")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as e:
        raise GroundingError(f"{path}: cannot be read as CSV ({type(e).__name__}: {e})") from None
    if "video_id" not in df.columns:
        raise GroundingError(f"{path}: no video_id column (columns: {', '.join(df.columns[:8])})")
    if len(df) == 0:
        raise GroundingError(f"{path}: no rows")
    ids = [s.strip() for s in df["video_id"]]
    try:
        store = FeatureStore(feature_root, num_frames=num_frames, use_packed=use_packed)
        store.check(ids, [])
        feats, masks = store.videos(ids)
    except FeatureError as e:
        raise GroundingError(str(e)) from None
    gt_ids: list[str | None] = [None] * len(ids)
    gt_moments: list[tuple[float, float] | None] = [None] * len(ids)
    if "music_id" in df.columns:
        gt_ids = [s.strip() or None for s in df["music_id"]]
        if {"music_start", "music_end"} <= set(df.columns):
            st = pd.to_numeric(df["music_start"], errors="coerce").to_numpy(float)
            ed = pd.to_numeric(df["music_end"], errors="coerce").to_numpy(float)
            gt_moments = [(float(a), float(b)) if np.isfinite(a) and np.isfinite(b) else None
                          for a, b in zip(st, ed)]
    return Queries(ids, feats, masks, gt_ids, gt_moments)
