"""Packed feature store: one memory-mapped copy of a feature folder, built by scripts/pack_features.py.

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
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from utils.data.features import (FP16_MAX, MAX_ABS_FEATURE, PACK_FORMAT, README_HINT, FeatureError, Modality, list_ids,
                                 listed, load_pair)
from utils.io import (atomic_open, atomic_save_npy, atomic_write_json, file_digest, manifest_digest, npy_header,
                      stat_record)


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
                               f"{listed([ids[i] for i in np.flatnonzero(bad)])} hold NaN/inf, out-of-range values "
                               f"or a non-0/1 mask: the store is damaged. Rebuild it with "
                               f"{rebuild_command(self.modality)}.")
        return torch.from_numpy(f), torch.from_numpy(m)

    def missing(self, ids: Sequence[str]) -> dict[str, list[str]]:
        return {i: [f"id {i!r} (not in the packed store)"] for i in ids if i not in self.index}

    def describe(self) -> str:
        return f"packed {self.manifest['feats_dtype']} store {self.directory}"


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
    feat_ids = list_ids(modality.base / modality.feat_sub)
    mask_ids = list_ids(modality.base / modality.mask_sub)
    if not feat_ids:
        raise FeatureError(f"no per-id {modality.name} features in {modality.base / modality.feat_sub}. "
                           f"{README_HINT}")
    unpaired = sorted(feat_ids ^ mask_ids)
    if unpaired:
        raise FeatureError(f"{len(unpaired)} {modality.name} id(s) have a feature without a mask or "
                           f"vice versa in {modality.base}: {listed(unpaired)}. Restore or delete them.")
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
