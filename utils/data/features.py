"""Frozen-feature store: per-id .pt files (official layout) or a packed memory-mapped copy.

Official layout under `--frozen_feature_path` (e.g. features/Kuai_feature):

    vit_feature1/vit_feature/<video_id>.pt      float32 [50, 512]  CLIP ViT-B/32, 1 fps
    vit_feature1/vit_mask/<video_id>.pt         float   [50]       1 = frame present
    ast_feature2p5/ast_feature/<music_id>.pt    float32 [96, 768]  AST, 10 s windows every 2.5 s
    ast_feature2p5/ast_mask/<music_id>.pt       float   [96]       1 = window centre <= duration
    (ast_feature5 / ast_feature7p5 / ast_feature10 for the other strides: int(240/stride) windows)

Validation policy (why it is split in two): checking the *content* of all ~53k video
and ~4k music files costs ~100k torch.load calls, which is as slow as an epoch of the
original loader. So `FeatureStore.check` verifies that every file EXISTS for every id
(one directory listing per folder, fast) and loads the content of only a few ids, and
EVERY later load validates what it read (shape, dtype, finite values, 0/1 mask that is
not all zeros, mask length = feature rows), so a bad file fails on first use with its
path instead of producing NaNs. `scripts/pack_features.py` reads (and thus fully
validates) every file once and writes a packed store, after which loading is a
memory-mapped fancy-index per batch.

The packed store is utils/data/packed.py; utils/data/store.py chooses between the two.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

# The folder names are defined in utils/data/constants.py (imported by the torch-free flag parser too).
from utils.data.constants import MAX_M_DURATION, MUSIC_DIRS, VIDEO_DIR
from utils.data.tensorfile import read_tensor
from utils.io import UnsafeFileError, describe_load_failure, torch_load_plain

VIDEO_DIM = 512
MUSIC_DIM = 768
PACKED_DIR = "packed"
PACK_FORMAT = "mgsv-packed-v2"  # v2: content digests
FP16_MAX = 65504.0
# CLIP and AST embeddings stay within a few tens; values beyond this bound (a broken extractor,
# wrong units) are finite but overflow the encoders' attention to NaN, which then shows up as
# a NaN loss far from the file that caused it. It is also the float16 range (--amp, --fp16).
MAX_ABS_FEATURE = FP16_MAX
MAX_LISTED = 5  # paths/ids listed in an error before "... and N more"
README_HINT = "See features/README.md for the expected layout."


class FeatureError(ValueError):
    """A missing, unreadable or malformed feature file, or an unusable feature folder."""


def music_dir_for_stride(stride: float) -> str:
    """Folder name of the music features extracted with window hop `stride` seconds."""
    try:
        return MUSIC_DIRS[float(stride)]
    except KeyError:
        raise FeatureError(f"--stride {stride} is not supported: music features exist only for "
                           f"strides {sorted(MUSIC_DIRS)} ({MUSIC_DIRS}).") from None


def num_snippets_for(stride: float, max_m_duration: float = MAX_M_DURATION) -> int:
    """Music windows per track: one centre every `stride` s over max_m_duration (96 at 2.5 s)."""
    return int(max_m_duration / stride)


@dataclass(frozen=True)
class Modality:
    """Where one modality's per-id files live and what shape they must have."""

    name: str        # "video" or "music" (used in messages)
    base: Path       # e.g. <root>/vit_feature1
    feat_sub: str    # "vit_feature" / "ast_feature"
    mask_sub: str    # "vit_mask" / "ast_mask"
    rows: int        # 50 frames / 96 snippets
    dim: int         # 512 / 768

    def feat_path(self, item_id: str) -> Path:
        return self.base / self.feat_sub / f"{item_id}.pt"

    def mask_path(self, item_id: str) -> Path:
        return self.base / self.mask_sub / f"{item_id}.pt"

    @property
    def packed_dir(self) -> Path:
        return self.base.parent / PACKED_DIR / self.base.name


def video_modality(root: str | os.PathLike, num_frames: int = 50) -> Modality:
    return Modality("video", Path(root) / VIDEO_DIR, "vit_feature", "vit_mask", num_frames, VIDEO_DIM)


def music_modality(root: str | os.PathLike, stride: float = 2.5,
                   max_m_duration: float = MAX_M_DURATION) -> Modality:
    return Modality("music", Path(root) / music_dir_for_stride(stride), "ast_feature", "ast_mask",
                    num_snippets_for(stride, max_m_duration), MUSIC_DIM)


# --------------------------------------------------------------------------------------------
# Loading and validating one (feature, mask) pair


def _torch_load(path: Path) -> Any:
    try:
        # The plain torch.save layout is read as data (utils/data/tensorfile.py, ~6x faster than
        # torch.load); any other file goes through torch.load(weights_only=True) as before.
        tensor = read_tensor(path)
        return tensor if tensor is not None else torch_load_plain(path)
    except FileNotFoundError:
        raise FeatureError(f"{path}: file not found. {README_HINT}") from None
    except UnsafeFileError as exc:
        raise FeatureError(f"{exc}. A feature file holds two tensors' worth of data only: re-extract it.") from None
    except Exception as exc:  # truncated zip, not a torch file, ...
        raise FeatureError(
            f"{path}: cannot be read as a torch tensor ({describe_load_failure(exc)}). The file is "
            "truncated or corrupt: re-extract it or unzip MGSV_feature.zip again.") from None


def validate_pair(feat: Any, mask: Any, modality: Modality, feat_path: Path,
                  mask_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Check one loaded (feature, mask) pair; return float32 copies with padded rows zeroed.

    Accepts any floating feature dtype (cast to float32) and a bool/int/float mask of 0/1.
    NaN/inf are only rejected in valid rows: padded rows are overwritten with zeros.
    """
    what = f"{modality.name} feature"
    fix = "Re-extract or re-download this file (or drop its rows from the CSV)."
    if not isinstance(feat, torch.Tensor):
        raise FeatureError(f"{feat_path}: contains a {type(feat).__name__}, expected a torch.Tensor "
                           f"[{modality.rows}, {modality.dim}]. {fix}")
    if not isinstance(mask, torch.Tensor):
        raise FeatureError(f"{mask_path}: contains a {type(mask).__name__}, expected a torch.Tensor "
                           f"[{modality.rows}]. {fix}")
    if not torch.is_floating_point(feat):
        raise FeatureError(f"{feat_path}: dtype {feat.dtype}, expected a floating-point {what} "
                           f"(float32). This is not a feature file. {fix}")
    if feat.dim() != 2 or feat.shape[1] != modality.dim:
        raise FeatureError(f"{feat_path}: shape {list(feat.shape)}, expected [{modality.rows}, "
                           f"{modality.dim}] ({what}). {fix}")
    if mask.dim() != 1:
        raise FeatureError(f"{mask_path}: shape {list(mask.shape)}, expected a 1-D mask "
                           f"[{modality.rows}]. {fix}")
    if mask.shape[0] != feat.shape[0]:
        raise FeatureError(f"{mask_path}: mask length {mask.shape[0]} disagrees with the "
                           f"{feat.shape[0]} feature rows of {feat_path}. {fix}")
    if feat.shape[0] != modality.rows:
        hint = " (features of another stride, or a --max_m_duration / --max_v_frames mismatch?)"
        raise FeatureError(f"{feat_path}: {feat.shape[0]} rows, expected {modality.rows} in "
                           f"{modality.base}{hint}. {fix}")
    # numpy for the element checks: tiny tensors, and torch boolean indexing costs ~1 ms here.
    if mask.dtype.is_complex:
        raise FeatureError(f"{mask_path}: complex mask dtype {mask.dtype}; expected 0/1 values. {fix}")
    m = mask.detach().to(torch.float32).numpy()
    binary = (m == 0.0) | (m == 1.0)
    if not binary.all():
        bad = m[~binary][:3].tolist()
        raise FeatureError(f"{mask_path}: mask values must be 0 or 1, found {bad}. {fix}")
    valid = m == 1.0
    if not valid.any():
        unit = "frame" if modality.name == "video" else "snippet"
        raise FeatureError(f"{mask_path}: mask is all zeros (no valid {unit}); "
                           f"the {modality.name} is empty. {fix}")
    f = feat.detach().to(torch.float32).numpy()
    # Padded rows are zeroed first, so the checks run on the output in two reductions (this is
    # the per-file cost of the per-id path): max/min propagate NaN, and the largest magnitude
    # of the valid rows is max(hi, -lo) since the zeros cannot exceed it.
    out = f.copy()                  # (np.where with a broadcast row mask was the slowest step)
    out[~valid] = 0.0
    hi, lo = float(out.max()), float(out.min())
    if not (np.isfinite(hi) and np.isfinite(lo)):
        raise FeatureError(f"{feat_path}: contains NaN or inf values in valid rows. {fix}")
    peak = max(hi, -lo)
    if peak > MAX_ABS_FEATURE:
        raise FeatureError(f"{feat_path}: values up to {peak:.3g} in valid rows, beyond +-{MAX_ABS_FEATURE:g}: "
                           f"{modality.name} features stay far below that, and such values overflow the encoders "
                           f"to NaN (a broken extractor?). {fix}")
    return torch.from_numpy(out), torch.from_numpy(valid.astype(np.float32))


def load_pair(modality: Modality, item_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Load and validate the per-id files of one video or track."""
    feat_path, mask_path = modality.feat_path(item_id), modality.mask_path(item_id)
    return validate_pair(_torch_load(feat_path), _torch_load(mask_path), modality, feat_path, mask_path)


def list_ids(folder: Path) -> set[str]:
    """Ids that have a .pt file in `folder` (one directory listing, no per-file stat)."""
    try:
        with os.scandir(folder) as it:
            return {e.name[:-3] for e in it if e.name.endswith(".pt")}
    except FileNotFoundError:
        return set()


def unique_in_order(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(str(i) for i in ids))


def listed(items: Sequence[Any], total: int | None = None) -> str:
    total = len(items) if total is None else total
    shown = ", ".join(str(x) for x in items[:MAX_LISTED])
    return shown + (f", ... ({total - MAX_LISTED} more)" if total > MAX_LISTED else "")


# --------------------------------------------------------------------------------------------
# Sources: where one modality's tensors come from


class PerIdSource:
    """Reads <base>/<sub>/<id>.pt on every call; optional LRU cache (used for music)."""

    kind = "per-id"

    def __init__(self, modality: Modality, cache_size: int | None = 0):
        self.modality = modality
        self.cache_size = cache_size  # 0: no cache, None: unbounded
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    def get(self, item_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Validated (feat, mask); cached tensors are shared, treat them as read-only."""
        if item_id in self._cache:
            self._cache.move_to_end(item_id)
            return self._cache[item_id]
        pair = load_pair(self.modality, item_id)
        if self.cache_size is None or self.cache_size > 0:
            self._cache[item_id] = pair
            if self.cache_size is not None and len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return pair

    def get_many(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        pairs = [self.get(i) for i in ids]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    def missing(self, ids: Sequence[str]) -> dict[str, list[str]]:
        """{id: its missing file paths (feature and/or mask)} for the ids lacking a file."""
        m = self.modality
        have_feat, have_mask = list_ids(m.base / m.feat_sub), list_ids(m.base / m.mask_sub)
        out: dict[str, list[str]] = {}
        for i in ids:
            paths = [str(p) for p, have in ((m.feat_path(i), have_feat), (m.mask_path(i), have_mask))
                     if i not in have]
            if paths:
                out[i] = paths
        return out

    def describe(self) -> str:
        return f"per-id files in {self.modality.base}"


class UnavailableSource:
    """Stands in for a modality whose folder does not exist; raises on first real use."""

    kind = "unavailable"

    def __init__(self, modality: Modality, message: str):
        self.modality = modality
        self.message = message

    def get(self, item_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        raise FeatureError(self.message)

    def get_many(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        raise FeatureError(self.message)

    def missing(self, ids: Sequence[str]) -> dict[str, list[str]]:
        if ids:
            raise FeatureError(self.message)
        return {}

    def describe(self) -> str:
        return f"missing folder {self.modality.base}"
