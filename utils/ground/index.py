"""Building a music index: every track of a library encoded once into memory-mapped arrays.

Index folder (written to a temporary sibling folder that is renamed into place when complete,
so a crash never leaves a folder that looks like an index):

    manifest.json        format, checkpoint path, weights fingerprint, config, dtype, array shapes,
                         and per file of the folder: content digest, stat, .npy header
    music_ids.json       one id per track: the row order of every per-track array
    durations.npy        float64 [N] seconds
    m.npy                [N, d]   global music embedding (dual tower, shortlist, detector query)
    mask.npy             [N, Lm]  1 = valid snippet
    token_offsets.npy    [N+1]    rows of tokens.bin per track
    tokens.bin           [T, d]   snippet tokens of the valid snippets only (detector input)
    blocks.npy, block_rows.npy, block_consts.npy, xpool_keys.bin, xpool_gram.bin
                         model.index_music's X-Pool blocks (see "Storage of model.index_music")
    usage.json           (optional) {music_id: {"start", "uses", "support"}}: canonical clips

Integrity. An index is derived data that users keep for months and copy between machines; a
damaged one ranks tracks wrongly without any error. So the manifest records, for every file
the writer put in the folder (whatever it is: generic over the folder, not a fixed list), a
blake2b content digest, its stat (size, mtime, ctime, inode) and, for .npy files, the header;
and a digest of the manifest itself. open_index checks every time the cheap invariants: the
manifest digest, the folder holds exactly the recorded files, their sizes and .npy headers,
ids (distinct strings, one per row) against the arrays' rows and the manifest's count; it
compares content digests whenever a file's stat differs from the record -- an in-place edit
that keeps the size and restores the mtime still changes the ctime -- and always with
verify=True (`ground.py --verify`, `build_music_index.py --verify INDEX`). A copied index
(new inodes) is therefore digest-checked on every open: about 1 s per GB. A failed check is a
GroundingError naming the index and the build_music_index.py command that rebuilds it.

dtype float32 (default) gives test.py's numbers; float16 halves the size (scores move by ~1e-3).
Size per track (d = 256, n valid snippets of 96): tokens 256n + keys 257n + Gram n(3n+7) values,
e.g. ~38k values at the MGSV-EC mean n ~ 56 -> ~155 KB float32 / ~77 KB float16 (measured: 100k
synthetic tracks = 7.4 GiB in float16; storing all 96 snippet tokens in float32 would take 9.8 GB
for the tokens alone).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch

from utils.data.constants import MAX_M_DURATION
from utils.ground.library import (GRAM_FILE, HEAD_KEYS_FILE, INDEX_FORMAT, KEYS_FILE, MANIFEST, STORE_DTYPES,
                                  TOKENS_FILE, USAGE, TrackStore, file_records, keys_for_storage, open_raw)
from utils.ground.model import GroundingError, GroundingModel
from utils.ground.queries import FP16_MAX, read_music_ids
from utils.io import atomic_save_npy, atomic_write_json, manifest_digest
from utils.train.checkpoint import jsonable_config

INDEX_GROUP = 1024   # tracks per index_music call while building (a multiple of the block size 16)


class _Appender:
    """Appends rows to a raw binary file; shape and dtype go to the manifest (np.memmap reads it)."""

    def __init__(self, path: Path, dtype: np.dtype):
        self.path, self.dtype, self.rows, self.row_shape = path, dtype, 0, None
        self.f = open(path, "wb")

    def add(self, a: np.ndarray) -> int:
        """Write rows; returns the row index of the first one."""
        if self.dtype == np.float16 and np.abs(a[np.isfinite(a)]).max(initial=0.0) > FP16_MAX:
            raise GroundingError(f"{self.path.name}: values exceed the float16 range; build with --dtype float32")
        a = np.ascontiguousarray(a, dtype=self.dtype)
        if self.row_shape is None:
            self.row_shape = a.shape[1:]
        start = self.rows
        self.f.write(a.tobytes())
        self.rows += a.shape[0]
        return start

    def close(self) -> dict:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"file": self.path.name, "dtype": np.dtype(self.dtype).name,
                "shape": [self.rows, *(self.row_shape or ())]}


def _check_padding_zero(tokens: torch.Tensor, mask: torch.Tensor) -> None:
    """The index keeps only valid snippet tokens; MaDe zeroes padded ones (not with --agg_module None)."""
    if bool((tokens.abs().sum(-1) * (mask == 0)).any()):
        raise GroundingError("the music encoder leaves non-zero tokens at padded snippets "
                             "(--agg_module None); the grounding index does not support that configuration")


def _index_order(gm: GroundingModel, mask: np.ndarray) -> np.ndarray:
    """Track order of index_music over the whole library: stable sort by valid snippets."""
    xpool = getattr(gm.model, "xpool", None)
    n_valid = mask.sum(1) if xpool is None or xpool.use_mask else np.zeros(len(mask))
    return np.argsort(n_valid, kind="stable")


@torch.no_grad()
def encode_tracks(gm: GroundingModel, music_feats: torch.Tensor,
                  music_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(m, Sm, mask) of a chunk of tracks from their AST features [n, Lm, 768], [n, Lm], plus the
    boundary head's music keys for a --moment_head boundary model."""
    mask = music_mask.to(gm.device, torch.float32)
    feats = music_feats.to(gm.device, torch.float32)
    m, tokens = gm.model.encode_music(feats, mask)
    head = getattr(gm.model, "boundary_head", None)
    return (m, tokens, mask) if head is None else (m, tokens, mask, head.music_keys(feats) * mask[..., None])


def check_out_folder(out: Path, overwrite: bool) -> None:
    """An existing index is replaced only with overwrite; anything else there is never touched.
    The folder that will hold it must take new files (checked before any encoding)."""
    from utils.io import OutputError, check_writable_dir
    try:
        check_writable_dir(out.parent, f"--out {out}: the folder that holds it,")
    except OutputError as e:
        raise GroundingError(str(e)) from None
    if not out.exists():
        return
    if not overwrite:
        raise GroundingError(f"{out} already exists; pass --overwrite to replace it or choose another --out")
    if not (out / MANIFEST).is_file():
        raise GroundingError(f"refusing to replace {out}: it is not a music index (no {MANIFEST})")


def _swap_into_place(staging: Path, out: Path) -> None:
    """Rename the finished staging folder to `out`; an old index is moved aside first, then deleted."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _write_tracks(staging: Path, chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                  num_tracks: int, dtype: np.dtype) -> tuple[TrackStore, dict]:
    """Pass 1: global embeddings, masks and valid snippet tokens, in library row order."""
    tokens = _Appender(staging / TOKENS_FILE, dtype)
    head_keys = None
    m_rows, mask_rows, counts = [], [], []
    for m, sm, mask, *extra in chunks:
        _check_padding_zero(sm, mask)
        mask_np = mask.float().cpu().numpy()
        tokens.add(sm.float().cpu().numpy()[mask_np > 0])
        if extra:   # the boundary head's music keys, stored like the tokens
            head_keys = head_keys or _Appender(staging / HEAD_KEYS_FILE, np.dtype(np.float32))
            head_keys.add(extra[0].float().cpu().numpy()[mask_np > 0])
        m_rows.append(m.float().cpu().numpy())
        mask_rows.append(mask_np)
        counts.append((mask_np > 0).sum(1))
    m_all = np.concatenate(m_rows).astype(dtype) if m_rows else np.zeros((0, 0), dtype)
    mask_all = np.concatenate(mask_rows) if mask_rows else np.zeros((0, 0), np.float32)
    if len(m_all) != num_tracks:
        raise GroundingError(f"encoded {len(m_all)} tracks, expected {num_tracks}")
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    atomic_save_npy(m_all, staging / "m.npy")
    atomic_save_npy(mask_all, staging / "mask.npy")
    atomic_save_npy(offsets, staging / "token_offsets.npy")
    info = {"tokens": tokens.close()}
    if head_keys is not None:
        info["head_keys"] = head_keys.close()
    store = TrackStore(m_all, mask_all, offsets, open_raw(staging, info["tokens"]))
    return store, info


@torch.no_grad()
def _write_xpool(gm: GroundingModel, staging: Path, store: TrackStore, dtype: np.dtype) -> dict:
    """Pass 2: model.index_music over the library in its own length order, blocks appended."""
    keys, gram = _Appender(staging / KEYS_FILE, dtype), _Appender(staging / GRAM_FILE, dtype)
    order = _index_order(gm, store.mask)
    rows_in_block_order, consts, blocks = [], [], []
    first = 0
    for lo in range(0, len(order), INDEX_GROUP):
        group = order[lo: lo + INDEX_GROUP]
        index = gm.model.index_music(*store.get(group, gm.device))
        for blk in index.blocks:
            cols = blk.columns.cpu().numpy()
            nb = len(cols)
            key_start = keys.add(keys_for_storage(blk.keys.T.float().cpu().numpy(), dtype))
            gram_start = gram.add(blk.gram.float().cpu().numpy().reshape(-1))
            blocks.append((first, nb, blk.length, key_start, gram_start))
            rows_in_block_order.append(group[cols])
            consts.append(blk.consts.float().cpu().numpy())
            first += nb
    info = {"keys": keys.close(), "gram": gram.close()}
    if blocks:  # an index without X-Pool (--vmr_loss dual) has no blocks: dual scores only
        if first != len(order):
            raise RuntimeError(f"index_music returned {first} tracks in blocks for {len(order)}")
        atomic_save_npy(np.asarray(blocks, dtype=np.int64), staging / "blocks.npy")
        atomic_save_npy(np.concatenate(rows_in_block_order).astype(np.int64), staging / "block_rows.npy")
        atomic_save_npy(np.concatenate(consts).astype(np.float32), staging / "block_consts.npy")
    return info


def write_index(gm: GroundingModel, music_ids: Sequence[str],
                chunks: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], out: str | os.PathLike,
                durations: dict[str, float] | None = None, dtype: str = "float32", overwrite: bool = False,
                extra: dict | None = None, usage: dict | None = None) -> Path:
    """Write an index folder from chunks of (m, Sm, mask) in `music_ids` order.

    Shared by build_index (AST features from disk) and the benchmark (synthetic MaDe-space
    tracks). Everything goes to a staging folder renamed into place at the end.
    """
    if dtype not in STORE_DTYPES:
        raise GroundingError(f"--dtype {dtype}: expected one of {', '.join(STORE_DTYPES)}")
    out = Path(out)
    check_out_folder(out, overwrite)
    ids = list(music_ids)
    if len(set(ids)) != len(ids):
        raise GroundingError("music ids must be unique in an index")
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    t0 = time.time()
    np_dtype = np.dtype(STORE_DTYPES[dtype])
    try:
        store, arrays = _write_tracks(staging, chunks, len(ids), np_dtype)
        t_encode = time.time() - t0
        arrays.update(_write_xpool(gm, staging, store, np_dtype))
        durations = durations or {}
        dur = np.array([durations.get(mid, np.nan) for mid in ids], dtype=np.float64)
        from_mask = ~np.isfinite(dur)
        dur[from_mask] = (store.mask[from_mask] > 0).sum(1) * gm.stride
        atomic_save_npy(dur, staging / "durations.npy")
        atomic_write_json(ids, staging / "music_ids.json", indent=None)
        if usage is not None:
            atomic_write_json({m: dataclasses.asdict(c) for m, c in usage.items() if m in set(ids)},
                              staging / USAGE, indent=None)
        manifest = {
            "format": INDEX_FORMAT, "num_tracks": len(ids), "dtype": dtype,
            "checkpoint": str(Path(gm.checkpoint).resolve()), "fingerprint": gm.fingerprint,
            "stride": gm.stride, "max_m_duration": gm.max_m_duration,
            "num_snippets": int(store.mask.shape[1]) if len(ids) else 0,
            "durations_from_mask": int(from_mask.sum()), "arrays": arrays,
            "encode_seconds": round(t_encode, 3), "build_seconds": round(time.time() - t0, 3),
            "created": time.strftime("%Y-%m-%d %H:%M:%S"), "config": jsonable_config(gm.args), **(extra or {}),
        }
        del store
        manifest["files"] = file_records(staging)  # last: every file the index holds is written
        manifest["manifest_digest"] = manifest_digest(manifest)
        atomic_write_json(manifest, staging / MANIFEST)
        _swap_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def build_index(gm: GroundingModel, music_ids: str | os.PathLike | Sequence[str],
                feature_root: str | os.PathLike, out: str | os.PathLike, batch_size: int = 64,
                dtype: str = "float32", overwrite: bool = False, use_packed: bool = True,
                progress: bool = False, prior_csv: str | os.PathLike | None = None) -> Path:
    """Encode a music library (AST features under `feature_root`) into an index folder.

    prior_csv: an annotation CSV (normally the training split) whose canonical clip per track
    is stored with the index (see "Usage history" above)."""
    from utils.data.features import FeatureError
    from utils.data.store import FeatureStore
    ids, durations = read_music_ids(music_ids)
    usage = None if prior_csv is None else read_usage(prior_csv, gm.max_m_duration)
    try:
        store = FeatureStore(feature_root, stride=gm.stride, max_m_duration=gm.max_m_duration,
                             num_frames=gm.num_frames, use_packed=use_packed)
        store.check([], ids)
    except FeatureError as e:
        raise GroundingError(str(e)) from None

    def chunks() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        starts: Iterable[int] = range(0, len(ids), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="encode tracks", unit="batch")
        for lo in starts:
            try:
                feats, masks = store.musics(ids[lo: lo + batch_size])
            except FeatureError as e:
                raise GroundingError(str(e)) from None
            yield encode_tracks(gm, feats, masks)

    extra = {"feature_root": str(Path(feature_root).resolve()),
             "music_ids_source": str(Path(music_ids).resolve()) if isinstance(music_ids, (str, os.PathLike))
             else "list"}  # absolute: the rebuild command an integrity error prints works from anywhere
    if usage is not None:
        extra.update(usage_source=str(Path(prior_csv).resolve()), tracks_with_usage=sum(m in usage for m in ids))
    return write_index(gm, ids, chunks(), out, durations, dtype, overwrite, extra, usage)


def read_usage(prior_csv: str | os.PathLike, max_m_duration: float = MAX_M_DURATION) -> dict:
    """{music_id: CanonicalClip} of an annotation CSV; a bad CSV is a GroundingError naming it."""
    from utils.data.annotations import AnnotationError, load_annotations
    from utils.evaluate.track_prior import canonical_clips
    try:
        return canonical_clips(load_annotations(prior_csv, max_m_duration))
    except AnnotationError as e:
        raise GroundingError(f"--prior_csv: {e}") from None
