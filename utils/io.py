"""Atomic file writes.

Everything the project writes (checkpoints, metrics, predictions, packed feature
stores, indexes) goes through these helpers: the data is written to a temporary
file in the destination folder, flushed to disk, then renamed over the final
name. A crash mid-write leaves the previous file (or nothing) under the final
name, never a truncated one.

Files get the mode a plain open() would give (0o666 less the umask), not mkstemp's 0o600,
so a group that reads the user's logs can read the checkpoints and predictions too.

A write that fails (disk full, file size limit, read-only location) raises WriteError
naming the file; check_writable_dir/check_writable_file let a command find a location it
cannot write before it spends hours computing what goes there. torch_load_plain is the
one way the project reads torch files: tensors and plain values only, never code.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np


class OutputError(ValueError):
    """An output location that cannot be written: found before any work (bad input, exit 2)."""


class WriteError(OSError):
    """A write that failed part-way (disk full, size limit): the run failed (exit 1); the previous
    file under the final name is intact."""


class UnsafeFileError(ValueError):
    """A torch file that holds pickled Python objects besides tensors and plain values."""


_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    # The only portable way to read the umask is to set it; the lock keeps threads from seeing 0.
    with _UMASK_LOCK:
        mask = os.umask(0)
        os.umask(mask)
    return mask


def _describe_write_failure(path: Path, exc: BaseException) -> str:
    code = getattr(exc, "errno", None)
    # torch's writer hides the OS error behind "unexpected pos N vs M"; say what that means.
    reason = os.strerror(code) if code else "the write stopped part-way"
    try:
        free = shutil.disk_usage(path.parent).free
        space = f"; {free / 2**20:.1f} MiB free on its disk"
    except OSError:
        space = ""
    hint = " (disk full?)" if code in (None, errno.ENOSPC, errno.EFBIG, errno.EDQUOT) else ""
    return f"cannot write {path}: {reason}{hint}{space}. The previous file under that name, if any, is unchanged"


def check_writable_dir(folder: str | os.PathLike, what: str = "output folder") -> None:
    """OutputError unless new files can be created in `folder` (or, when it does not exist yet, in
    the nearest existing folder above it, where it would be created). Creates nothing that stays."""
    folder = Path(folder)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{what} {folder}: {probe} is a file, not a folder; choose another location.")
    try:
        fd, tmp = tempfile.mkstemp(prefix=".write-test-", dir=str(probe))
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"{what} {folder}: cannot create files in {probe} ({e.strerror or e}); choose a "
                          "writable location or change its permissions.") from None


def check_writable_file(path: str | os.PathLike, what: str = "output file") -> None:
    """OutputError unless `path` can be (re)written: its folder takes new files and an existing
    file there is not read-only (someone protected it: it is not replaced behind their back)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path} is a folder; give a file name.")
    if path.exists() and not os.access(path, os.W_OK):
        raise OutputError(f"{what} {path} is read-only; make it writable, remove it, or choose another name.")
    check_writable_dir(path.parent, f"{what} {path}: its folder")


def _is_refusal(text: str) -> bool:
    """torch's weights-only unpickler met a global outside its allow-list (not a damaged file)."""
    return "Unsupported global" in text or "add_safe_globals" in text


def describe_load_failure(exc: BaseException) -> str:
    """One line saying why torch.load(weights_only=True) failed."""
    text = str(exc)
    if _is_refusal(text):
        refused = re.search(r"GLOBAL ([\w.]+)|got <class '([\w.]+)'>", text)
        name = (refused.group(1) or refused.group(2)) if refused else "not a tensor or plain value"
        return (f"it holds a pickled Python object ({name}) besides tensors and plain values, "
                "and loading it could run code embedded in the file; refused")
    detail = text.split("WeightsUnpickler error:")[-1].strip()
    return f"{type(exc).__name__}: {detail.splitlines()[0] if detail else 'unreadable'}"


def torch_load_plain(path: str | os.PathLike, allowed: list | None = None) -> Any:
    """torch.load(weights_only=True): tensors and plain values only, never code from the file.
    `allowed`: extra globals (torch.serialization.safe_globals). A refused global raises
    UnsafeFileError; anything else (truncated, not a torch file) re-raises torch's error."""
    import torch
    ctx = getattr(torch.serialization, "safe_globals", None)
    with (ctx(allowed) if ctx and allowed else contextlib.nullcontext()):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            if _is_refusal(str(e)):
                raise UnsafeFileError(f"{path}: {describe_load_failure(e)}") from None
            raise


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_error(path: Path, exc: BaseException) -> WriteError:
    err = WriteError(_describe_write_failure(path, exc))
    err.errno = getattr(exc, "errno", None) or errno.EIO
    return err


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it to `path`.

    A failed write (OSError, e.g. disk full) raises WriteError naming `path`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
    finally:
        os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise _write_error(path, e) from None
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch  # lazily: command-line tools that only write JSON should not pay torch's import time
    try:
        with atomic_open(path, "wb") as f:
            torch.save(obj, f)
    except RuntimeError as e:
        # torch's zip writer reports a failed write as "... unexpected pos N vs M" (or a stream error).
        if not re.search(r"unexpected pos|PytorchStreamWriter|file write failed", str(e)):
            raise
        raise _write_error(Path(path), e) from None


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> None:
    atomic_write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", path)


def atomic_save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


# ------------------------------------------------------------------ integrity records
# Shared by the packed feature store (utils/data/features.py) and the music index (utils/ground/grounding.py):
# both record, when built, a content digest and the stat of each of their files, and a digest
# of their manifest; opening compares the stat every time and the content when the stat moved.
def file_digest(path: str | os.PathLike) -> str:
    """blake2b-128 of a file's bytes (no dependency; ~1 GB/s)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def stat_record(path: str | os.PathLike) -> list[int]:
    """[size, mtime, ctime, inode]: ctime and inode are in it because nobody can set them back, so
    an in-place edit that keeps the size and restores the mtime still changes the record."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def manifest_digest(manifest: dict[str, Any]) -> str:
    """Digest of a manifest's content, less its own "manifest_digest" entry."""
    body = {k: v for k, v in manifest.items() if k != "manifest_digest"}
    return hashlib.blake2b(json.dumps(body, sort_keys=True).encode(), digest_size=16).hexdigest()


def npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from an .npy header; reads no data and unpickles nothing."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(f)
        if fortran:
            raise ValueError("Fortran-ordered array")
        return shape, dtype, f.tell()
