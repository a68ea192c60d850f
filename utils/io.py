"""Atomic file writes.

Everything the project writes (checkpoints, metrics, predictions, packed feature
stores, indexes) goes through these helpers: the data is written to a temporary
file in the destination folder, flushed to disk, then renamed over the final
name. A crash mid-write leaves the previous file (or nothing) under the final
name, never a truncated one.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

import numpy as np


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


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", **kwargs: Any) -> Iterator[IO]:
    """Open a temporary file beside `path`; on success rename it to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        with open(tmp, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch  # lazily: command-line tools that only write JSON should not pay torch's import time
    with atomic_open(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        f.write(text)


def atomic_write_json(obj: Any, path: str | os.PathLike, indent: int | None = 2) -> None:
    atomic_write_text(json.dumps(obj, indent=indent, ensure_ascii=False) + "\n", path)


def atomic_save_npy(array: np.ndarray, path: str | os.PathLike) -> None:
    with atomic_open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)
