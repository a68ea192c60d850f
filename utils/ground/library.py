"""Opening a music index (MusicLibrary) and checking it: the cheap invariants on every open, the
content digests when a file's stat changed or with verify=True (utils/ground/index.py says what
the folder holds and why)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.ground.model import GroundingError, GroundingModel
from utils.io import file_digest, manifest_digest, npy_header, stat_record

INDEX_FORMAT = "mgsv-music-index/2"  # 2: content digests and stats of every file, digest of the manifest
MANIFEST = "manifest.json"
USAGE = "usage.json"
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}


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


# --------------------------------------------------------------------------------------------
# Opening an index


@dataclass
class MusicLibrary:
    """An opened index: ids, durations and memory-mapped arrays (rows = tracks)."""

    path: Path
    manifest: dict
    music_ids: list[str]
    durations: np.ndarray            # [N] seconds
    tracks: TrackStore              # m, mask, snippet tokens (library row order)
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


def file_records(folder: Path) -> dict[str, dict]:
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
    tracks = TrackStore(load("m.npy"), load("mask.npy"), np.load(path / "token_offsets.npy"),
                         open_raw(path, arrays["tokens"]),
                         open_raw(path, arrays["head_keys"]) if "head_keys" in arrays else None)
    has_blocks = (path / "blocks.npy").is_file()
    library = MusicLibrary(
        path, manifest, ids, np.load(path / "durations.npy"), tracks,
        blocks=np.load(path / "blocks.npy") if has_blocks else np.zeros((0, 5), np.int64),
        block_rows=np.load(path / "block_rows.npy") if has_blocks else np.arange(n),
        block_consts=load("block_consts.npy") if has_blocks else np.zeros((n, 10), np.float32),
        keys=open_raw(path, arrays["keys"]), gram=open_raw(path, arrays["gram"]),
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


def masked_offset() -> float:
    from model.xpool import _MASKED
    return float(_MASKED)


def keys_for_storage(keys_t: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float16 cannot hold the keys' mask offset (-1e30): store -inf there, restored on reading."""
    if dtype != np.float16:
        return keys_t
    keys_t = keys_t.copy()
    keys_t[:, -1] = np.where(keys_t[:, -1] < 0, -np.inf, 0.0)
    return keys_t


def keys_from_storage(keys_t: torch.Tensor, stored: np.dtype) -> torch.Tensor:
    """Undo keys_for_storage (on a float32 copy). -inf would give 0 * -inf = NaN in the scorer."""
    if stored != np.float32:
        keys_t[:, -1].clamp_(min=masked_offset())
    return keys_t


def open_raw(folder: Path, info: dict) -> np.ndarray:
    shape = tuple(info["shape"])
    if shape[0] == 0:
        return np.zeros(shape, dtype=info["dtype"])
    # mode "c" (copy-on-write): torch.from_numpy accepts it without a copy or a read-only warning.
    # A plain ndarray view: np.memmap's per-slice Python overhead dominates gathering K tracks.
    return np.memmap(folder / info["file"], dtype=info["dtype"], mode="c", shape=shape).view(np.ndarray)


def to_tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    """float32 tensor of a memory-mapped slice: no copy for float32; torch converts float16 (fast)."""
    t = torch.from_numpy(a) if a.flags.writeable else torch.from_numpy(np.array(a))
    return t.to(device=device, dtype=torch.float32)


class TrackStore:
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
        src = np.repeat(self.offsets[rows], n) + block_ranges(n)
        out = np.zeros((len(rows), mask.shape[1], values.shape[1]), dtype=np.float32)
        out[mask > 0] = values[src]  # row-major order of mask > 0 = valid snippets track by track
        return torch.from_numpy(out).to(device)


def block_ranges(n: np.ndarray) -> np.ndarray:
    """concatenate(arange(k) for k in n), vectorised."""
    n = np.asarray(n, dtype=np.int64)
    total = int(n.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(n) - n, n)
    return np.arange(total, dtype=np.int64) - starts
