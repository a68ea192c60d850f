"""Ground new short videos against a music library: the Python API behind
scripts/build_music_index.py and scripts/ground.py.

    gm = load_model("RUN/pytorch_model.bin.best_r1")          # weights + config + fingerprint
    build_index(gm, "tracks.csv", "features/Kuai_feature", "music.index")
    library = open_index("music.index", gm)                    # refuses an index of other weights
    feat, mask = load_video("clip.pt")
    result = ground(gm, library, feat, mask, topk=10)[0]       # top tracks, each with its moment

Why an index. Encoding a track (projection + temporal transformer) and its X-Pool keys/values
costs much more than scoring a query against it, and a library changes rarely; so the library
is encoded once into a folder of .npy arrays that are memory-mapped at query time (a 100k-track
library does not have to fit in RAM, only the chunk being scored).

What a query returns, and why it equals test.py. The retrieval score of a (video, track) pair
is `model.score_videos` on the stored output of `model.index_music` -- the test-time MsG score
of test.py (dual + single similarity for the paper's --vmr_loss), built in the same track order
and blocks as test.py builds it for the same tracks. The moment of each returned track is the
detector on that (video, track) pair, converted with utils.engine.top_moment/spans_to_seconds
and clipped with utils.metrics.clip_moments, i.e. exactly test.py's SmG prediction when the
track is the ground truth. A CSV's repeated ids (an MGSV-EC split lists a track once per video)
are one track, in first-occurrence order, which is how test.py orders the columns of its score
matrix; ties are broken by that order. A text file or list that repeats an id is refused.

Two-stage retrieval (large libraries). Exhaustive X-Pool scoring costs O(tracks x snippets x d)
per query. `shortlist=K` first ranks the whole library by the dual-tower cosine v.m (one matrix
product; faiss IndexFlatIP when installed, same exact result) and then re-scores only those K
tracks with the same score function as the exhaustive path. Default (shortlist=None):
exhaustive up to AUTO_SHORTLIST_ABOVE tracks, K = AUTO_SHORTLIST_K above; shortlist=0 forces
exhaustive. The dual cosine is a good proxy because it is one of the two summed terms and the
X-Pool term pools the same snippet tokens; bench_grounding measures how often it keeps the
exhaustive top-1/top-10.

Usage history (optional). Built with a prior CSV (normally the training split), the index also
stores each track's canonical clip there: the start most of its videos take, and how many
videos use the track (utils/track_prior.py). Each returned track then carries that clip,
trimmed to the query's length, beside the model's moment: where the model would cut, and where
others cut this track. Tracks without history carry none.

Track durations (for clipping and plots) come from the CSV's music_total_duration when given;
otherwise from the mask: number of valid snippets x stride (an estimate: a window centre every
`stride` seconds is valid while centre <= duration, so it can be off by up to one stride).

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

import argparse
import dataclasses
import hashlib
import io
import json
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from utils.checkpoint import (adopt_checkpoint_config, jsonable_config, load_checkpoint,
                              load_model_weights, unwrap)
from utils.engine import foreground_index, spans_to_seconds, top_moment
from utils.io import (atomic_open, atomic_save_npy, atomic_write_json, describe_load_failure, file_digest,
                      manifest_digest, npy_header, stat_record, torch_load_plain)
from utils.metrics import clip_moments, moment_iou

INDEX_FORMAT = "mgsv-music-index/2"  # 2: content digests and stats of every file, digest of the manifest
MANIFEST = "manifest.json"
USAGE = "usage.json"
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
# Measured with scripts/bench_grounding.py (1 CPU thread, float16 index): one exhaustive query costs
# ~0.05 ms of CPU per track (20k: ~1 s, 100k: ~5 s); a K=1000 shortlist ~0.15-0.25 s at any size and
# kept the exhaustive top-10 of every benchmark query (K=100: top-1 always, top-10 set 93 % at 100k).
AUTO_SHORTLIST_ABOVE = 20_000
AUTO_SHORTLIST_K = 1000
DETECT_CHUNK = 256       # (video, track) pairs per detector call
FP16_MAX = 65504.0


class GroundingError(ValueError):
    """Unusable input to the grounding tools: bad feature file, missing id, mismatched index."""


# --------------------------------------------------------------------------------------------
# Model


@dataclass
class GroundingModel:
    """A MaDe in eval mode with the configuration it was trained with and a weights fingerprint."""

    model: torch.nn.Module
    args: argparse.Namespace
    checkpoint: str
    fingerprint: str
    device: torch.device

    @property
    def num_frames(self) -> int:
        return int(getattr(self.args, "max_v_frames", 50))

    @property
    def max_m_duration(self) -> float:
        return float(getattr(self.args, "max_m_duration", 240.0))

    @property
    def stride(self) -> float:
        return float(getattr(self.args, "stride", 2.5))


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes), in name order.

    Hashing the weights rather than the file means a checkpoint re-saved with other
    metadata (e.g. `.last` with a newer resume state), or the authors' layout converted
    to ours, keeps its fingerprint, while any change of a weight changes it.
    """
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def resolve_device(name: str | torch.device) -> torch.device:
    from utils.runtime import resolve_device as _resolve
    return name if isinstance(name, torch.device) else _resolve(str(name))


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> GroundingModel:
    """Build MaDe with the checkpoint's own settings (as test.py does) and load its weights."""
    from model.made import build_model
    from utils.options import parse_args
    state = load_checkpoint(checkpoint)
    args = parse_args([], mode="test")
    adopt_checkpoint_config(args, state)
    cfg = state.get("config") or {}
    # The frame slots are a data setting (not in MODEL_KEYS) that the video input needs too.
    if "max_v_frames" in cfg:
        args.max_v_frames = int(cfg["max_v_frames"])
    dev = resolve_device(device)
    model = build_model(args)
    load_model_weights(model, state, checkpoint)
    model = model.to(dev).eval()
    return GroundingModel(model=model, args=args, checkpoint=str(checkpoint),
                          fingerprint=weights_fingerprint(model), device=dev)


# --------------------------------------------------------------------------------------------
# Inputs: music id lists and video features


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
    from utils.features import MAX_ABS_FEATURE
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
    from utils.features import FeatureError, FeatureStore
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


# --------------------------------------------------------------------------------------------
# Storage of model.index_music's result (model/xpool.py MusicIndex).
#
# index_music sorts tracks by number of valid snippets and cuts them into blocks of 16; a block
# of Nb tracks padded to Lb snippets holds keys [d+1, Nb*Lb] (LN1 snippets + a mask-offset row,
# track after track), gram [Nb, Lb, 3*Lb+7] (three Lb-wide Gram matrices + 7 linear columns) and
# consts [Nb, 10]. The index folder keeps those tensors block after block (keys transposed, so
# blocks append row-wise): the exhaustive path hands them back to model.score_videos unchanged,
# and the shortlist path gathers single tracks and re-pads them to a common Lb (padded snippets
# get zero Gram rows/columns and masked keys, which the scorer weights by exactly 0).
# tests/test_grounding.py pins both against model.score_videos on a freshly built index.

KEYS_FILE, GRAM_FILE, TOKENS_FILE = "xpool_keys.bin", "xpool_gram.bin", "tokens.bin"
HEAD_KEYS_FILE = "head_keys.bin"   # the boundary head's music keys (model/boundary_head.py), same rows as tokens
BLOCK_COLUMNS = ("first", "count", "length", "key_start", "gram_start")  # per row of blocks.npy
INDEX_GROUP = 1024   # tracks per index_music call while building (a multiple of the block size 16)


def _masked_offset() -> float:
    from model.xpool import _MASKED
    return float(_MASKED)


def _keys_for_storage(keys_t: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float16 cannot hold the keys' mask offset (-1e30): store -inf there, restored on reading."""
    if dtype != np.float16:
        return keys_t
    keys_t = keys_t.copy()
    keys_t[:, -1] = np.where(keys_t[:, -1] < 0, -np.inf, 0.0)
    return keys_t


def _keys_from_storage(keys_t: torch.Tensor, stored: np.dtype) -> torch.Tensor:
    """Undo _keys_for_storage (on a float32 copy). -inf would give 0 * -inf = NaN in the scorer."""
    if stored != np.float32:
        keys_t[:, -1].clamp_(min=_masked_offset())
    return keys_t


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


def _open_raw(folder: Path, info: dict) -> np.ndarray:
    shape = tuple(info["shape"])
    if shape[0] == 0:
        return np.zeros(shape, dtype=info["dtype"])
    # mode "c" (copy-on-write): torch.from_numpy accepts it without a copy or a read-only warning.
    # A plain ndarray view: np.memmap's per-slice Python overhead dominates gathering K tracks.
    return np.memmap(folder / info["file"], dtype=info["dtype"], mode="c", shape=shape).view(np.ndarray)


def _to_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor of a memory-mapped slice: no copy for float32; torch converts float16 (fast)."""
    t = torch.from_numpy(a) if a.flags.writeable else torch.from_numpy(np.array(a))
    return t.to(device=device, dtype=torch.float32)


class _TrackStore:
    """Per-track arrays in library row order: m [N, d], mask [N, L] and the snippet tokens of
    valid snippets only (ragged: tracks average ~60 % of the 96 windows), rebuilt zero-padded."""

    def __init__(self, m: np.ndarray, mask: np.ndarray, offsets: np.ndarray, tokens: np.ndarray,
                 head_keys: np.ndarray | None = None):
        self.m, self.mask, self.offsets, self.tokens, self.head_keys = m, mask, offsets, tokens, head_keys

    def get(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(m [k, d], Sm [k, L, d] padded rows 0, mask [k, L]) float32 for library rows `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        mask = np.asarray(self.mask[rows], dtype=np.float32)
        m = np.asarray(self.m[rows], dtype=np.float32)
        return (torch.from_numpy(m).to(device), self._padded(self.tokens, rows, mask, device),
                torch.from_numpy(mask).to(device))

    def get_head_keys(self, rows: np.ndarray, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(boundary-head music keys [k, L, p+1] padded rows 0, mask [k, L]) for library rows `rows`."""
        rows = np.asarray(rows, dtype=np.int64)
        mask = np.asarray(self.mask[rows], dtype=np.float32)
        return self._padded(self.head_keys, rows, mask, device), torch.from_numpy(mask).to(device)

    def _padded(self, values: np.ndarray, rows: np.ndarray, mask: np.ndarray, device: torch.device) -> torch.Tensor:
        """Per-snippet rows of `values` (stored for valid snippets only) rebuilt as [k, L, width]."""
        n = self.offsets[rows + 1] - self.offsets[rows]
        src = np.repeat(self.offsets[rows], n) + _ranges(n)
        out = np.zeros((len(rows), mask.shape[1], values.shape[1]), dtype=np.float32)
        out[mask > 0] = values[src]  # row-major order of mask > 0 = valid snippets track by track
        return torch.from_numpy(out).to(device)


def _ranges(n: np.ndarray) -> np.ndarray:
    """concatenate(arange(k) for k in n), vectorised."""
    n = np.asarray(n, dtype=np.int64)
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(n) - n, n)
    return np.arange(total, dtype=np.int64) - starts


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
                  num_tracks: int, dtype: np.dtype) -> tuple[_TrackStore, dict]:
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
    store = _TrackStore(m_all, mask_all, offsets, _open_raw(staging, info["tokens"]))
    return store, info


@torch.no_grad()
def _write_xpool(gm: GroundingModel, staging: Path, store: _TrackStore, dtype: np.dtype) -> dict:
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
            key_start = keys.add(_keys_for_storage(blk.keys.T.float().cpu().numpy(), dtype))
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
        manifest["files"] = _file_records(staging)  # last: every file the index holds is written
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
    from utils.features import FeatureError, FeatureStore
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


def read_usage(prior_csv: str | os.PathLike, max_m_duration: float = 240.0) -> dict:
    """{music_id: CanonicalClip} of an annotation CSV; a bad CSV is a GroundingError naming it."""
    from utils.annotations import AnnotationError, load_annotations
    from utils.track_prior import canonical_clips
    try:
        return canonical_clips(load_annotations(prior_csv, max_m_duration))
    except AnnotationError as e:
        raise GroundingError(f"--prior_csv: {e}") from None


# --------------------------------------------------------------------------------------------
# Opening an index


@dataclass
class MusicLibrary:
    """An opened index: ids, durations and memory-mapped arrays (rows = tracks)."""

    path: Path
    manifest: dict
    music_ids: list[str]
    durations: np.ndarray            # [N] seconds
    tracks: _TrackStore              # m, mask, snippet tokens (library row order)
    blocks: np.ndarray               # [NB, 5] BLOCK_COLUMNS; empty without X-Pool
    block_rows: np.ndarray           # [N] library row of each track in block order
    block_consts: np.ndarray         # [N, 10] in block order
    keys: np.ndarray                 # [C, d+1] IndexBlock.keys transposed, block after block
    gram: np.ndarray                 # [G] IndexBlock.gram flattened, block after block
    usage: dict[str, dict] = field(default_factory=dict)   # music_id -> {"start", "uses", "support"}
    _row_of: dict[str, int] | None = None
    _music_emb: torch.Tensor | None = None
    _position: np.ndarray | None = None      # block-order position of each library row
    _block_of: np.ndarray | None = None      # block of each block-order position
    _faiss_index: Any = None

    def __len__(self) -> int:
        return len(self.music_ids)

    @property
    def has_xpool(self) -> bool:
        return len(self.blocks) > 0

    def row_of(self, music_id: str) -> int | None:
        if self._row_of is None:
            self._row_of = {m: i for i, m in enumerate(self.music_ids)}
        return self._row_of.get(music_id)

    def music_emb(self) -> torch.Tensor:
        """L2-normalised global embeddings [N, d] float32 (what index_music scores with)."""
        if self._music_emb is None:
            self._music_emb = torch.nn.functional.normalize(
                torch.from_numpy(np.asarray(self.tracks.m, dtype=np.float32)), dim=-1)
        return self._music_emb

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())

    def _positions(self) -> tuple[np.ndarray, np.ndarray]:
        if self._position is None:
            self._position = np.empty(len(self), dtype=np.int64)
            self._position[self.block_rows] = np.arange(len(self))
            self._block_of = np.repeat(np.arange(len(self.blocks)), self.blocks[:, 1])
        return self._position, self._block_of


def _file_records(folder: Path) -> dict[str, dict]:
    """{name: {"digest", "stat"[, "npy"]}} of every file in an index folder but its manifest."""
    records = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST or not p.is_file():
            continue
        records[p.name] = {"digest": file_digest(p), "stat": stat_record(p)}
        if p.suffix == ".npy":
            shape, dtype, _ = npy_header(p)
            records[p.name]["npy"] = {"shape": list(shape), "dtype": dtype.str}
    return records


def index_rebuild_command(path: str | os.PathLike, manifest: Any = None) -> str:
    """The build_music_index.py call that rebuilds the index at `path` from what its manifest says
    it was built from (placeholders in capitals where the manifest is unreadable or silent)."""
    import shlex
    m = manifest if isinstance(manifest, dict) else {}

    def known(key: str, placeholder: str) -> str:
        value = m.get(key)
        return value if isinstance(value, str) and value not in ("", "list") else placeholder

    argv = ["python", "scripts/build_music_index.py", "--load_uni_model_path", known("checkpoint", "CHECKPOINT"),
            "--frozen_feature_path", known("feature_root", "FEATURE_ROOT"),
            "--music_ids", known("music_ids_source", "MUSIC_IDS"), "--out", str(path)]
    if m.get("dtype") in STORE_DTYPES:
        argv += ["--dtype", m["dtype"]]
    if isinstance(m.get("stride"), (int, float)) and not isinstance(m.get("stride"), bool):
        argv += ["--stride", f"{m['stride']:g}"]
    if isinstance(m.get("usage_source"), str):
        argv += ["--prior_csv", m["usage_source"]]
    return f"`{shlex.join(argv)} --overwrite`"


def _read_manifest(path: Path) -> dict:
    """The manifest of the index folder `path`, of this code's format; GroundingError otherwise."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise GroundingError(f"--index {path}: not a music index (no {MANIFEST}); "
                             "build one with scripts/build_music_index.py")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:  # ValueError: bad JSON, bad UTF-8, a 5000-digit number
        raise GroundingError(f"index {path}: {MANIFEST} is unreadable ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); rebuild it with "
                             f"{index_rebuild_command(path)}") from None
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found == "mgsv-music-index/1":
        raise GroundingError(f"index {path} was built by an earlier version (format {found}) that recorded no "
                             f"content digests; rebuild it with {index_rebuild_command(path, manifest)}")
    if found != INDEX_FORMAT:
        raise GroundingError(f"index {path} has format {str(found)[:40]!r}, this code reads {INDEX_FORMAT!r}; "
                             f"rebuild it with {index_rebuild_command(path, manifest)}")
    return manifest


def _npy_problem(path: Path, record: dict) -> str | None:
    """A .npy file whose header or size disagrees with its record (reads the header only)."""
    shape, dtype, offset = npy_header(path)
    if [list(shape), dtype.str] != [record["npy"]["shape"], record["npy"]["dtype"]]:
        return f"{path.name} holds a {dtype.str} array of shape {list(shape)}, not the one it was built with"
    if offset + dtype.itemsize * int(np.prod(shape)) != path.stat().st_size:
        return f"{path.name} is not the size its header says (truncated or extended)"
    return None


def _index_problem(path: Path, manifest: dict, verify: bool) -> str | None:
    """What is wrong with an index folder (cheap invariants always, digests when due), or None."""
    if manifest.get("manifest_digest") != manifest_digest(manifest):
        return f"inconsistent: {MANIFEST} was edited since the index was built"
    records = manifest["files"]
    present = {p.name for p in path.iterdir() if p.is_file() and not p.name.startswith(".")} - {MANIFEST}
    if present != set(records):
        missing, extra = sorted(set(records) - present), sorted(present - set(records))
        return (f"incomplete: {', '.join(missing)} missing" if missing else
                f"not as built: it holds {', '.join(extra[:3])}, which the index was not built with")
    for name, record in records.items():
        if (path / name).stat().st_size != record["stat"][0]:
            return f"damaged: {name} is not the size it was built with"
    for name, record in records.items():  # the content, when the stat says the file was touched
        if (verify or stat_record(path / name) != record["stat"]) and file_digest(path / name) != record["digest"]:
            return f"damaged: {name} changed since the index was built (its content digest differs)"
    for name, record in records.items():
        problem = _npy_problem(path / name, record) if "npy" in record else None
        if problem:
            return f"damaged: {problem}"
    for info in manifest["arrays"].values():  # raw .bin files: size = rows x row size
        expected = np.dtype(info["dtype"]).itemsize * int(np.prod(info["shape"]))
        if (path / info["file"]).stat().st_size != expected:
            return f"damaged: {info['file']} is not the size its manifest entry says"
    return None


def _read_ids(path: Path, n: int) -> list[str]:
    ids = json.loads((path / "music_ids.json").read_text(encoding="utf-8"))
    if not (isinstance(ids, list) and len(ids) == n and all(isinstance(i, str) for i in ids)
            and len(set(ids)) == n):
        raise ValueError(f"music_ids.json does not hold {n} distinct id strings")
    return ids


def _load_library(path: Path, manifest: dict) -> MusicLibrary:
    """Memory-map the arrays of a checked index folder."""
    arrays, n = manifest["arrays"], manifest["num_tracks"]
    ids = _read_ids(path, n)
    load = lambda name: np.load(path / name, mmap_mode="c").view(np.ndarray)  # noqa: E731
    tracks = _TrackStore(load("m.npy"), load("mask.npy"), np.load(path / "token_offsets.npy"),
                         _open_raw(path, arrays["tokens"]),
                         _open_raw(path, arrays["head_keys"]) if "head_keys" in arrays else None)
    has_blocks = (path / "blocks.npy").is_file()
    library = MusicLibrary(
        path, manifest, ids, np.load(path / "durations.npy"), tracks,
        blocks=np.load(path / "blocks.npy") if has_blocks else np.zeros((0, 5), np.int64),
        block_rows=np.load(path / "block_rows.npy") if has_blocks else np.arange(n),
        block_consts=load("block_consts.npy") if has_blocks else np.zeros((n, 10), np.float32),
        keys=_open_raw(path, arrays["keys"]), gram=_open_raw(path, arrays["gram"]),
        usage=_read_usage_file(path / USAGE))
    offsets = tracks.offsets
    if (library.durations.shape != (n,) or tracks.m.shape[0] != n or tracks.mask.shape[0] != n
            or len(library.block_rows) != n or offsets.shape != (n + 1,) or offsets[0] != 0
            or np.any(np.diff(offsets) < 0) or offsets[-1] != tracks.tokens.shape[0]):
        raise ValueError(f"the arrays disagree with the {n} tracks of the manifest")
    return library


def _check_finite(path: Path, library: MusicLibrary) -> None:
    """The per-track arrays are small (N x d); a NaN there would make a track's score NaN, and a
    NaN score never ranks, so the track would vanish from every result without a word."""
    n, ids = len(library), library.music_ids
    for name, array in (("m.npy", library.tracks.m), ("mask.npy", library.tracks.mask),
                        ("durations.npy", library.durations), ("block_consts.npy", library.block_consts)):
        finite = np.isfinite(np.asarray(array, dtype=np.float64).reshape(n, -1)).all(axis=1) if n else []
        if not np.all(finite):
            bad = [ids[i] for i in np.flatnonzero(~np.asarray(finite))[:3]]
            raise GroundingError(f"{path / name}: NaN/inf values for track(s) {', '.join(bad)}; the index is damaged: "
                                 f"rebuild it with {index_rebuild_command(path, library.manifest)}")


def open_index(path: str | os.PathLike, gm: GroundingModel | None = None, verify: bool = False) -> MusicLibrary:
    """Open an index folder after checking its integrity (see "Integrity" above; verify=True
    compares every content digest); with `gm`, refuse an index built with other weights."""
    path = Path(path)
    manifest = _read_manifest(path)
    try:
        problem = _index_problem(path, manifest, verify)
        library = None if problem else _load_library(path, manifest)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError) as e:
        problem = f"unreadable or inconsistent ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    if problem:
        raise GroundingError(f"index {path} is {problem}; rebuild it with {index_rebuild_command(path, manifest)}")
    if gm is not None:
        check_index_matches(manifest, gm, path)
    _check_finite(path, library)
    return library


def _read_usage_file(path: Path) -> dict[str, dict]:
    """usage.json of an index ({} when the index was built without a prior CSV)."""
    if not path.is_file():
        return {}
    usage = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(usage, dict) or not all(
            isinstance(u, dict) and isinstance(u.get("start"), (int, float)) and isinstance(u.get("uses"), int)
            for u in usage.values()):
        raise ValueError(f"{path.name} is not a {{music_id: {{start, uses, support}}}} object")
    return usage


def check_index_matches(manifest: dict, gm: GroundingModel, path: Path | str = "<index>") -> None:
    """The index must come from the same weights: its tokens and keys are that model's encodings."""
    if manifest.get("fingerprint") != gm.fingerprint:
        raise GroundingError(
            f"index {path} was built with checkpoint {manifest.get('checkpoint')} "
            f"(weights sha256 {str(manifest.get('fingerprint'))[:12]}...), but the model was loaded from "
            f"{gm.checkpoint} (weights sha256 {gm.fingerprint[:12]}...). Its encodings are not valid for "
            "these weights: rebuild it with scripts/build_music_index.py --load_uni_model_path "
            f"{gm.checkpoint}, or pass the checkpoint it was built with.")


# --------------------------------------------------------------------------------------------
# Scoring


def _music_index(music_emb: torch.Tensor, blocks: list) -> Any:
    from model.xpool import MusicIndex
    return MusicIndex(music_emb, blocks)


def _assemble_block(library: MusicLibrary, pos: np.ndarray, columns: torch.Tensor, device: torch.device) -> Any:
    """The tracks at block-order positions `pos` as ONE model IndexBlock, re-padded to their longest
    stored length: padded snippets get zero Gram rows/columns and masked keys, which the scorer
    weights by exactly 0, so every track keeps its stored numbers."""
    from model.xpool import IndexBlock
    _, block_of = library._positions()
    blk_id = block_of[pos]
    blk = library.blocks[blk_id]                                   # [k, 5] BLOCK_COLUMNS
    within, lb = pos - blk[:, 0], blk[:, 2]
    length, k = int(lb.max()), len(pos)
    # keys: track t's Lb_t stored columns -> columns t*length .. t*length+Lb_t; the rest masked.
    keys = np.zeros((k * length, library.keys.shape[1]), dtype=np.float32)
    keys[:, -1] = _masked_offset()
    keys[np.repeat(np.arange(k) * length, lb) + _ranges(lb)] = \
        library.keys[np.repeat(blk[:, 3] + within * lb, lb) + _ranges(lb)]
    _keys_from_storage(torch.from_numpy(keys), library.keys.dtype)   # in place: -inf -> the mask offset
    # gram [Lb, 3*Lb+7] -> [length, 3*length+7]: Gram sub-block s column c -> s*length + c.
    gram = np.zeros((k, length, 3 * length + 7), dtype=np.float32)
    order = np.argsort(blk_id, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(blk_id[order]) != 0])
    for group in np.split(order, starts[1:]):   # one copy per stored block, not per track
        first, nb, b, _, gram_start = library.blocks[blk_id[group[0]]].tolist()
        src = library.gram[gram_start: gram_start + nb * b * (3 * b + 7)].reshape(nb, b, 3 * b + 7)
        within_block = pos[group] - first
        if not np.array_equal(within_block, np.arange(nb)):  # part of the block: gather those tracks
            src = src[within_block]
        for s_ in range(3):
            gram[group, :b, s_ * length: s_ * length + b] = src[:, :, s_ * b: (s_ + 1) * b]
        gram[group, :b, 3 * length:] = src[:, :, 3 * b:]
    consts = np.asarray(library.block_consts[pos], dtype=np.float32)
    return IndexBlock(columns.to(device), torch.from_numpy(keys).to(device).T, torch.from_numpy(gram).to(device),
                      torch.from_numpy(consts).to(device), length)


class _StoredBlocks:
    """The stored X-Pool blocks as the model's IndexBlocks, materialised one at a time while
    model.score_videos iterates over them: one call scores the whole library (its per-call set-up
    is paid once), float32 blocks are zero-copy views of the memory map, and a float16 index is
    converted a block at a time (bounded memory). Columns are library rows, so the scores come
    back in library order. (Merging stored blocks into bigger ones was measured: the re-padding
    copies cost more than the scorer's per-block overhead they save.)"""

    def __init__(self, library: MusicLibrary, device: torch.device):
        self.library, self.device = library, device

    def __len__(self) -> int:
        return len(self.library.blocks)

    def __iter__(self) -> Iterator[Any]:
        from model.xpool import IndexBlock
        lib, dev = self.library, self.device
        for first, nb, lb, key_start, gram_start in lib.blocks.tolist():
            keys = _keys_from_storage(_to_tensor(lib.keys[key_start: key_start + nb * lb], dev), lib.keys.dtype).T
            gram = _to_tensor(lib.gram[gram_start: gram_start + nb * lb * (3 * lb + 7)], dev)
            consts = _to_tensor(lib.block_consts[first: first + nb], dev)
            cols = torch.from_numpy(lib.block_rows[first: first + nb]).to(dev)
            yield IndexBlock(cols, keys, gram.view(nb, lb, 3 * lb + 7), consts, lb)


@torch.no_grad()
def exhaustive_scores(gm: GroundingModel, library: MusicLibrary, v: torch.Tensor) -> torch.Tensor:
    """[B, N] scores of every query against every track: model.score_videos on the stored index
    (the same blocks index_music builds for the whole library, so test.py's numbers)."""
    blocks = _StoredBlocks(library, gm.device) if library.has_xpool else []
    index = _music_index(library.music_emb().to(gm.device), blocks)
    return gm.model.score_videos(v, index, v.shape[0]).float()


def select_tracks(library: MusicLibrary, rows: np.ndarray, device: torch.device,
                  block_size: int = 64) -> Any:
    """The model's MusicIndex of just `rows` (columns in that order), gathered from the stored
    blocks: no re-encoding, the same numbers as the exhaustive path. The selected tracks are
    sorted by stored length and cut into blocks of block_size, so re-padding stays small."""
    rows = np.asarray(rows, dtype=np.int64)
    emb = library.music_emb()[torch.from_numpy(rows)].to(device)
    if not library.has_xpool:
        return _music_index(emb, [])
    position, block_of = library._positions()
    pos = position[rows]
    by_length = np.argsort(library.blocks[block_of[pos], 2], kind="stable")
    blocks = [_assemble_block(library, pos[part], torch.from_numpy(part), device)
              for part in np.split(by_length, range(block_size, len(rows), block_size))]
    return _music_index(emb, blocks)


def _faiss():
    try:
        import faiss  # optional: exact inner-product search over the global embeddings
        return faiss
    except ImportError:
        return None


@torch.no_grad()
def shortlist(library: MusicLibrary, v: torch.Tensor, k: int) -> np.ndarray:
    """[B, k] rows with the highest dual-tower cosine v.m (both L2-normalised)."""
    k = min(k, len(library))
    emb = library.music_emb()
    vv = torch.nn.functional.normalize(v.float().cpu(), dim=-1)
    faiss = _faiss()
    if faiss is not None:
        if library._faiss_index is None:
            library._faiss_index = faiss.IndexFlatIP(emb.shape[1])
            library._faiss_index.add(np.ascontiguousarray(emb.numpy()))
        return library._faiss_index.search(np.ascontiguousarray(vv.numpy()), k)[1].astype(np.int64)
    return (vv @ emb.T).topk(k, dim=1).indices.numpy()


@torch.no_grad()
def two_stage_scores(gm: GroundingModel, library: MusicLibrary, v: torch.Tensor,
                     k: int) -> tuple[np.ndarray, torch.Tensor]:
    """(rows [B, K] ascending, scores [B, K]): each query's shortlist re-scored by
    model.score_videos on that query's own K tracks (the exhaustive score function)."""
    rows = np.sort(shortlist(library, v, k), axis=1)  # ascending rows: ties resolve as in exhaustive
    scores = torch.stack([gm.model.score_videos(v[b: b + 1], select_tracks(library, rows[b], gm.device), 1)[0]
                          for b in range(v.shape[0])])
    return rows, scores.float()


def top_by_score(scores: torch.Tensor, rows: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k best (row, score), ties broken by the lower row (= test.py's column order)."""
    s = scores.double().cpu().numpy()
    if not np.isfinite(s).all():  # a NaN score never ranks: its track would vanish silently
        raise GroundingError("the index gives NaN/inf scores for some tracks: its token, key or Gram arrays are "
                             "damaged; rebuild it with scripts/build_music_index.py")
    cols = np.broadcast_to(np.arange(s.shape[1]), s.shape) if rows is None else rows
    k = min(k, s.shape[1])
    top_rows = np.empty((s.shape[0], k), dtype=np.int64)
    top_scores = np.empty((s.shape[0], k), dtype=np.float64)
    for b in range(s.shape[0]):
        cand = np.argpartition(-s[b], k - 1)[:k] if k < s.shape[1] else np.arange(s.shape[1])
        cand = np.nonzero(s[b] >= s[b, cand].min())[0]   # everything tied with the k-th too
        order = np.lexsort((cols[b, cand], -s[b, cand]))[:k]
        top_rows[b], top_scores[b] = cols[b, cand[order]], s[b, cand[order]]
    return top_rows, top_scores


# --------------------------------------------------------------------------------------------
# Detection


@torch.no_grad()
def detect_pairs(gm: GroundingModel, library: MusicLibrary, Fv: torch.Tensor, frame_mask: torch.Tensor,
                 v: torch.Tensor, query: np.ndarray, rows: np.ndarray,
                 frame_feats: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Moments (seconds, clipped to each track) and foreground probabilities of (query, row) pairs.
    frame_feats (the queries' CLIP frames) is needed by a --moment_head boundary model."""
    head = getattr(gm.model, "boundary_head", None)
    if head is not None and (library.tracks.head_keys is None or frame_feats is None):
        raise GroundingError(f"{library.path}: a --moment_head boundary model needs an index with its music "
                             "keys and the query's frames: rebuild the index with scripts/build_music_index.py")
    if getattr(gm.model.cfg, "moment_query_type", "video") == "xpool":
        raise GroundingError("--moment_query_type xpool depends on the other videos of a batch; "
                             "the grounding tools support the paper's 'video' (and music/zero) queries")
    fg = foreground_index(gm.args)
    se_all, conf_all = [], []
    for lo in range(0, len(rows), DETECT_CHUNK):
        q = torch.from_numpy(query[lo: lo + DETECT_CHUNK]).to(gm.device)
        # --predict_center 1 and the boundary head need the video length: 1 frame per second.
        if head is not None:
            keys, mask = library.tracks.get_head_keys(rows[lo: lo + DETECT_CHUNK], gm.device)
            det = head.from_keys(head.video_keys(frame_feats[q]), frame_mask[q], keys, mask,
                                 v_duration=frame_mask[q].sum(1))
        else:
            m, sm, mask = library.tracks.get(rows[lo: lo + DETECT_CHUNK], gm.device)
            det = gm.model.detect(Fv[q], frame_mask[q], sm, mask, v[q], m, v_duration=frame_mask[q].sum(1))
        span, prob = top_moment(det, fg)
        se_all.append(spans_to_seconds(span, gm.max_m_duration).double().cpu().numpy())
        conf_all.append(prob.double().cpu().numpy())
    se = np.concatenate(se_all) if se_all else np.zeros((0, 2))
    conf = np.concatenate(conf_all) if conf_all else np.zeros(0)
    return clip_moments(se, library.durations[rows], gm.max_m_duration), conf


# --------------------------------------------------------------------------------------------
# Grounding queries


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
    """The GT track's rank (pessimistic ties, as utils.metrics.gt_ranks) and the detector's moment on it."""
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


# --------------------------------------------------------------------------------------------
# Output: table and picture


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


def plot_result(result: QueryResult, path: str | os.PathLike, max_m_duration: float = 240.0) -> Path:
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
                max_m_duration: float = 240.0) -> None:
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
