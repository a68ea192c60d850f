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

Packed layout (one folder per source folder, so strides are packed independently):

    <root>/packed/vit_feature1/{feats.npy [N,50,512], masks.npy [N,50], ids.json, manifest.json}
    <root>/packed/ast_feature2p5/{feats.npy [M,96,768], masks.npy [M,96], ids.json, manifest.json}

Integrity. A store is built in a staging folder and renamed into place at the end, so a
failed rebuild (--force) leaves the previous store usable. manifest.json records a content
digest (blake2b) of every per-id source file and of the store's own files, their stat
(size, mtime, ctime, inode), and a digest of the manifest itself. Every open checks the
cheap invariants: manifest digest, ids (unique strings, one per row), the arrays' dtype,
shape and byte size; every read checks the rows it returns (finite, in range, 0/1 masks).
Content digests are compared when something looks changed -- a store file's stat, or the
per-id files' fingerprint (names, sizes, mtimes, ctimes, inodes: an in-place edit that
restores the mtime still changes the ctime) -- and always with verify=True
(`scripts/pack_features.py --verify`). A store whose per-id sources changed is ignored with
a warning (the per-id files are read instead); a damaged store with no per-id files left
is an error naming the store and the command that rebuilds it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from utils.io import (UnsafeFileError, atomic_open, atomic_save_npy, atomic_write_json, describe_load_failure,
                      file_digest, manifest_digest, npy_header, stat_record, torch_load_plain)
from utils.tensorfile import read_tensor

VIDEO_DIR = "vit_feature1"
MUSIC_DIRS: dict[float, str] = {2.5: "ast_feature2p5", 5.0: "ast_feature5",
                                7.5: "ast_feature7p5", 10.0: "ast_feature10"}
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
_README_HINT = "See features/README.md for the expected layout."


class FeatureError(ValueError):
    """A missing, unreadable or malformed feature file, or an unusable feature folder."""


def music_dir_for_stride(stride: float) -> str:
    """Folder name of the music features extracted with window hop `stride` seconds."""
    try:
        return MUSIC_DIRS[float(stride)]
    except KeyError:
        raise FeatureError(f"--stride {stride} is not supported: music features exist only for "
                           f"strides {sorted(MUSIC_DIRS)} ({MUSIC_DIRS}).") from None


def num_snippets_for(stride: float, max_m_duration: float = 240.0) -> int:
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
                   max_m_duration: float = 240.0) -> Modality:
    return Modality("music", Path(root) / music_dir_for_stride(stride), "ast_feature", "ast_mask",
                    num_snippets_for(stride, max_m_duration), MUSIC_DIM)


# --------------------------------------------------------------------------------------------
# Loading and validating one (feature, mask) pair


def _torch_load(path: Path) -> Any:
    try:
        # The plain torch.save layout is read as data (utils/tensorfile.py, ~6x faster than
        # torch.load); any other file goes through torch.load(weights_only=True) as before.
        tensor = read_tensor(path)
        return tensor if tensor is not None else torch_load_plain(path)
    except FileNotFoundError:
        raise FeatureError(f"{path}: file not found. {_README_HINT}") from None
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


def _list_ids(folder: Path) -> set[str]:
    """Ids that have a .pt file in `folder` (one directory listing, no per-file stat)."""
    try:
        with os.scandir(folder) as it:
            return {e.name[:-3] for e in it if e.name.endswith(".pt")}
    except FileNotFoundError:
        return set()


def _unique(ids: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(str(i) for i in ids))


def _listed(items: Sequence[Any], total: int | None = None) -> str:
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
        have_feat, have_mask = _list_ids(m.base / m.feat_sub), _list_ids(m.base / m.mask_sub)
        out: dict[str, list[str]] = {}
        for i in ids:
            paths = [str(p) for p, have in ((m.feat_path(i), have_feat), (m.mask_path(i), have_mask))
                     if i not in have]
            if paths:
                out[i] = paths
        return out

    def describe(self) -> str:
        return f"per-id files in {self.modality.base}"


class PackedSource:
    """Memory-mapped feats.npy/masks.npy + ids.json written by pack_modality().

    The memmaps are opened lazily and dropped when pickled, so DataLoader workers
    started with 'spawn' reopen the files instead of receiving a multi-GB copy.
    """

    kind = "packed"

    def __init__(self, modality: Modality, directory: Path, manifest: dict[str, Any]):
        self.modality = modality
        self.directory = directory
        self.manifest = manifest
        with open(directory / manifest["files"]["ids"], encoding="utf-8") as f:
            ids = json.load(f)
        self.index: dict[str, int] = {str(i): n for n, i in enumerate(ids)}
        self._feats: np.ndarray | None = None
        self._masks: np.ndarray | None = None

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        if self._feats is None or self._masks is None:
            files = self.manifest["files"]
            try:  # np.load never unpickles (allow_pickle=False): an object array is refused here
                self._feats = np.load(self.directory / files["feats"], mmap_mode="r")
                self._masks = np.load(self.directory / files["masks"], mmap_mode="r")
            except (OSError, ValueError) as e:
                raise FeatureError(f"packed store {self.directory}: cannot read its arrays ({e}); rebuild it "
                                   f"with {rebuild_command(self.modality)}.") from None
        return self._feats, self._masks

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_feats"] = state["_masks"] = None
        return state

    def _rows(self, ids: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter((self.index[i] for i in ids), dtype=np.int64, count=len(ids))
        except KeyError as exc:
            raise FeatureError(
                f"{self.modality.name} id {exc.args[0]!r} is not in the packed store {self.directory}; "
                "re-run scripts/pack_features.py after adding its per-id files.") from None

    def get(self, item_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        feats, masks = self.get_many([item_id])
        return feats[0], masks[0]

    def get_many(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched gather: one fancy-index per array (the training hot path)."""
        rows = self._rows(ids)
        feats, masks = self._arrays()
        f = np.asarray(feats[rows]).astype(np.float32, copy=False)
        m = np.asarray(masks[rows]).astype(np.float32, copy=False)
        # Packing validated every row; what is read is checked again (~1 ms a batch), so a store
        # damaged since then fails here with its name instead of turning into a NaN loss.
        bad = ~(np.isfinite(f).all(axis=(1, 2)) & (np.abs(f).max(axis=(1, 2), initial=0.0) <= MAX_ABS_FEATURE)
                & ((m == 0) | (m == 1)).all(axis=1))
        if bad.any():
            raise FeatureError(f"packed store {self.directory}: the rows of {self.modality.name} id(s) "
                               f"{_listed([ids[i] for i in np.flatnonzero(bad)])} hold NaN/inf, out-of-range values "
                               f"or a non-0/1 mask: the store is damaged. Rebuild it with "
                               f"{rebuild_command(self.modality)}.")
        return torch.from_numpy(f), torch.from_numpy(m)

    def missing(self, ids: Sequence[str]) -> dict[str, list[str]]:
        return {i: [f"id {i!r} (not in the packed store)"] for i in ids if i not in self.index}

    def describe(self) -> str:
        return f"packed {self.manifest['feats_dtype']} store {self.directory}"


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


# --------------------------------------------------------------------------------------------
# Packing


def _source_entries(modality: Modality) -> list[tuple[str, os.stat_result]]:
    entries = []
    for sub in (modality.feat_sub, modality.mask_sub):
        try:
            with os.scandir(modality.base / sub) as it:
                entries += [(f"{sub}/{e.name}", e.stat()) for e in it if e.name.endswith(".pt")]
        except FileNotFoundError:
            pass
    return sorted(entries, key=lambda e: e[0])


def source_fingerprint(modality: Modality) -> dict[str, Any]:
    """Count, total size, newest mtime and a hash of (name, size, mtime, ctime, inode) of the
    per-id files. One scandir per folder (~0.5 s for the 106k video files). ctime and inode
    are in it because nobody can set them back: an edit that keeps the size and restores the
    mtime still changes the fingerprint (and so triggers the content check)."""
    entries = _source_entries(modality)
    h = hashlib.sha1()
    for name, st in entries:
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\0{st.st_ino}\n".encode())
    return {"files": len(entries), "bytes": sum(st.st_size for _, st in entries),
            "mtime_ns_max": max((st.st_mtime_ns for _, st in entries), default=0), "sha1": h.hexdigest()}


def source_digests(modality: Modality) -> dict[str, str]:
    """{"vit_feature/<id>.pt": digest, ...} of every per-id file of `modality`."""
    return {name: file_digest(modality.base / name) for name, _ in _source_entries(modality)}


def _write_npy_rows(path: Path, shape: tuple[int, ...], dtype: np.dtype,
                    rows: Iterator[np.ndarray]) -> None:
    """Stream rows into an .npy file atomically without holding the whole array in memory."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": shape}
    written = 0
    with atomic_open(path, "wb") as f:
        np.lib.format.write_array_header_2_0(f, header)
        for row in rows:
            f.write(np.ascontiguousarray(row, dtype=dtype).tobytes())
            written += 1
    if written != shape[0]:  # pragma: no cover - guards against a logic error
        raise RuntimeError(f"{path}: wrote {written} rows, expected {shape[0]}")


def pack_modality(modality: Modality, fp16: bool = False, progress: bool = True) -> dict[str, Any]:
    """Read (and validate) every per-id file of `modality`; write its packed store.

    The store is written into a staging folder beside the final one and swapped in at the
    end: an interrupted or failed run (bad file, full disk) leaves the previous store, if
    any, exactly as it was. Returns the manifest.
    """
    fingerprint = source_fingerprint(modality)  # before reading: later edits make it stale
    feat_ids = _list_ids(modality.base / modality.feat_sub)
    mask_ids = _list_ids(modality.base / modality.mask_sub)
    if not feat_ids:
        raise FeatureError(f"no per-id {modality.name} features in {modality.base / modality.feat_sub}. "
                           f"{_README_HINT}")
    unpaired = sorted(feat_ids ^ mask_ids)
    if unpaired:
        raise FeatureError(f"{len(unpaired)} {modality.name} id(s) have a feature without a mask or "
                           f"vice versa in {modality.base}: {_listed(unpaired)}. Restore or delete them.")
    ids = sorted(feat_ids)
    final = modality.packed_dir
    staging = final.with_name(f".{final.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    dtype = np.dtype(np.float16 if fp16 else np.float32)
    masks = np.zeros((len(ids), modality.rows), dtype=np.float32)
    digests: dict[str, str] = {}

    def rows() -> Iterator[np.ndarray]:
        it: Iterable[str] = ids
        if progress:
            from tqdm import tqdm
            it = tqdm(ids, desc=f"pack {modality.base.name}", unit="file")
        for n, item_id in enumerate(it):
            feat, mask = load_pair(modality, item_id)
            if fp16 and feat.abs().max().item() > FP16_MAX:
                raise FeatureError(f"{modality.feat_path(item_id)}: values exceed the float16 range; "
                                   "pack without --fp16.")
            for sub, path in ((modality.feat_sub, modality.feat_path(item_id)),
                              (modality.mask_sub, modality.mask_path(item_id))):
                digests[f"{sub}/{item_id}.pt"] = file_digest(path)
            masks[n] = mask.numpy()
            yield feat.numpy()

    files = {"feats": "feats.npy", "masks": "masks.npy", "ids": "ids.json"}
    try:
        _write_npy_rows(staging / files["feats"], (len(ids), modality.rows, modality.dim), dtype, rows())
        atomic_save_npy(masks, staging / files["masks"])
        atomic_write_json(ids, staging / files["ids"], indent=None)
        manifest = {"format": PACK_FORMAT, "modality": modality.name, "source_dir": modality.base.name,
                    "num_items": len(ids), "rows": modality.rows, "dim": modality.dim,
                    "feats_dtype": dtype.name, "files": files, "source": fingerprint, "source_digests": digests,
                    "digests": {name: file_digest(staging / name) for name in files.values()},
                    "stats": {name: stat_record(staging / name) for name in files.values()}}
        manifest["manifest_digest"] = manifest_digest(manifest)
        atomic_write_json(manifest, staging / "manifest.json")
        _swap_into_place(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _swap_into_place(staging: Path, final: Path) -> None:
    """Rename the finished staging folder to `final`; a previous store is moved aside, then deleted."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def rebuild_command(modality: Modality) -> str:
    return f"`python scripts/pack_features.py --frozen_feature_path {modality.base.parent} --force`"


def _store_problem(modality: Modality, directory: Path, manifest: Any, verify: bool) -> str | None:
    """What is wrong with a packed store (cheap invariants always, digests when due), or None."""
    if not isinstance(manifest, dict) or manifest.get("format") != PACK_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        return f"of unknown format {found!r} (expected {PACK_FORMAT})"
    if manifest.get("manifest_digest") != manifest_digest(manifest):
        return "inconsistent: manifest.json was edited since packing"
    if (manifest.get("rows"), manifest.get("dim")) != (modality.rows, modality.dim):
        return (f"built for rows/dim {manifest.get('rows')}/{manifest.get('dim')}, not the expected "
                f"{modality.rows}/{modality.dim}")
    files, n = manifest["files"], manifest["num_items"]
    if any(not (directory / name).is_file() for name in files.values()):
        return "incomplete (a data file is missing)"
    try:
        ids = json.loads((directory / files["ids"]).read_text(encoding="utf-8"))
        feats_shape, feats_dtype, feats_offset = npy_header(directory / files["feats"])
        masks_shape, masks_dtype, masks_offset = npy_header(directory / files["masks"])
    except (OSError, ValueError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if not (isinstance(ids, list) and all(isinstance(i, str) for i in ids) and len(set(ids)) == len(ids) == n):
        return f"inconsistent: {files['ids']} does not hold {n} distinct id strings"
    expected = ((feats_shape, feats_dtype.name, feats_offset + feats_dtype.itemsize * n * modality.rows * modality.dim),
                (masks_shape, masks_dtype.name, masks_offset + 4 * n * modality.rows))
    found = ((feats_shape, feats_dtype.name, (directory / files["feats"]).stat().st_size),
             (masks_shape, masks_dtype.name, (directory / files["masks"]).stat().st_size))
    if found != ((( n, modality.rows, modality.dim), manifest["feats_dtype"], expected[0][2]),
                 ((n, modality.rows), "float32", expected[1][2])):
        return "inconsistent: the arrays' shape, dtype or size disagree with the manifest"
    for name in files.values():
        if verify or stat_record(directory / name) != manifest["stats"].get(name):
            if file_digest(directory / name) != manifest["digests"].get(name):
                return f"damaged: {name} changed since packing (its content digest differs)"
    if modality.base.is_dir() and (verify or source_fingerprint(modality) != manifest["source"]):
        if source_digests(modality) != manifest["source_digests"]:
            return f"out of date: the per-id files in {modality.base} changed since packing"
    return None


def inspect_packed(modality: Modality, verify: bool = False) -> tuple[PackedSource | None, str | None]:
    """(store, None) when the packed store of `modality` is usable, (None, what is wrong) when
    it is present but unusable, (None, None) when there is none. verify=True compares every
    content digest, whatever the files' stat says."""
    directory = modality.packed_dir
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        return None, None
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        problem = _store_problem(modality, directory, manifest, verify)
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # edited manifest of the wrong shape
        problem = f"unreadable (manifest.json: {type(e).__name__}: {e})"
    if problem is None:
        return PackedSource(modality, directory, manifest), None
    return None, problem


def open_packed(modality: Modality, warn: bool = True, verify: bool = False) -> PackedSource | None:
    """The packed store of `modality` if present and sound, else None (see the module docstring).

    A store that is out of date or damaged is ignored with a warning while the per-id files
    are there to read instead; without them it is a FeatureError naming the store."""
    store, problem = inspect_packed(modality, verify)
    if problem is None:
        return store
    message = f"packed store {modality.packed_dir} is {problem}"
    if not modality.base.is_dir():
        raise FeatureError(f"{message}, and it is the only copy of these features (no {modality.base}). Rebuild "
                           f"it from the original per-id files with {rebuild_command(modality)}.")
    if warn:
        warnings.warn(f"{message}; reading per-id files instead. To use the fast path, re-run "
                      f"{rebuild_command(modality)}.", stacklevel=3)
    return None


# --------------------------------------------------------------------------------------------
# The store used by datasets


class FeatureStore:
    """Frozen video/music features by id, from the packed store when usable else per-id files.

    All returned tensors are float32 with padded rows zeroed; the packed and per-id paths
    give identical tensors (fp16 packing, opt-in, gives close ones).
    """

    def __init__(self, root: str | os.PathLike, stride: float = 2.5, max_m_duration: float = 240.0,
                 num_frames: int = 50, use_packed: bool = True, music_cache_size: int | None = None):
        self.root = Path(root)
        self.stride = float(stride)
        self.num_frames = int(num_frames)
        self.num_snippets = num_snippets_for(self.stride, max_m_duration)
        if not self.root.is_dir():
            raise FeatureError(f"feature root {self.root} does not exist. Download and unzip "
                               "MGSV_feature.zip into features/Kuai_feature, pass --frozen_feature_path, "
                               f"or make synthetic data with scripts/make_demo_data.py. {_README_HINT}")
        self.video_modality = video_modality(self.root, self.num_frames)
        self.music_modality = music_modality(self.root, self.stride, max_m_duration)
        # Music is read once per track (tracks repeat across rows), videos once per row.
        self._video = self._source(self.video_modality, use_packed, cache_size=0)
        self._music = self._source(self.music_modality, use_packed, cache_size=music_cache_size)

    def _source(self, modality: Modality, use_packed: bool,
                cache_size: int | None) -> PerIdSource | PackedSource | UnavailableSource:
        packed = open_packed(modality) if use_packed else None
        if packed is not None:
            return packed
        if not modality.base.is_dir():
            # Not an error yet: a music-only root (e.g. a library to index) never asks for videos.
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            return UnavailableSource(modality, (
                f"{modality.base} not found (needed for {modality.name} features at stride "
                f"{self.stride:g}); {self.root} contains {present}. Check --frozen_feature_path "
                f"and --stride. {_README_HINT}"))
        return PerIdSource(modality, cache_size=cache_size)

    @property
    def is_packed(self) -> bool:
        """Both modalities come from the packed (memory-mapped) store."""
        return self._video.kind == "packed" and self._music.kind == "packed"

    @property
    def backends(self) -> dict[str, str]:
        """Where each modality is read from (for logs)."""
        return {"video": self._video.describe(), "music": self._music.describe()}

    def video(self, video_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(feat [num_frames, 512], mask [num_frames]) float32."""
        return self._video.get(str(video_id))

    def music(self, music_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(feat [num_snippets, 768], mask [num_snippets]) float32."""
        return self._music.get(str(music_id))

    def videos(self, video_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched video(): ([B, num_frames, 512], [B, num_frames])."""
        return self._video.get_many([str(i) for i in video_ids])

    def musics(self, music_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched music(): ([B, num_snippets, 768], [B, num_snippets])."""
        return self._music.get_many([str(i) for i in music_ids])

    def check(self, video_ids: Iterable[str], music_ids: Iterable[str], content_sample: int = 4) -> None:
        """Fail before training if any id lacks its files; validate a few files' content.

        Existence is checked for every id (directory listings, fast); content is
        validated for the first `content_sample` ids of each modality here (wrong
        stride, dtype or shape shows up at once) and for every other id when it is
        first loaded. `content_sample=-1` loads everything (slow on the full dataset).
        """
        problems = []
        checks = ((self._video, _unique(video_ids)), (self._music, _unique(music_ids)))
        for source, ids in checks:
            missing = source.missing(ids)
            if missing:
                paths = [p for group in missing.values() for p in group]
                problems.append(f"{len(missing)} of {len(ids)} {source.modality.name} id(s) have no "
                                f"feature files ({source.describe()}); first missing: {_listed(paths)}")
        if problems:
            raise FeatureError(
                "\n".join(problems) + "\nDownload/unzip the features (features/README.md), fix "
                "--frozen_feature_path / --stride, or drop those rows from the CSV.")
        for source, ids in checks:
            sample = ids if content_sample < 0 else ids[:content_sample]
            for item_id in sample:
                source.get(item_id)
