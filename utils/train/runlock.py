"""One writer per run folder.

Two train.py processes writing into one run folder overwrite each other's checkpoints,
state file and event files, and each ends believing it succeeded. A folder counts as
holding a run only once it has a checkpoint or train_state.json, so during a first epoch
that rule alone does not keep a second process out. So the process that writes a run
folder holds an exclusive lock on `<run folder>/.run.lock` from before its first write
until it exits, fresh runs, --resume and --overwrite alike.

The lock is a POSIX record lock (fcntl.lockf): the kernel releases it when the process
ends, however it ends (SIGKILL included), so a killed run never blocks a later one and
nobody has to delete a stale pid file. Not flock(): a flock belongs to the open file,
which DataLoader worker processes inherit when they are forked, so a worker outliving a
killed trainer for a few seconds would still hold the folder; record locks belong to
the process and are not inherited. (They also work over NFS, through its lock manager.)
The file's content (pid, host, start time, command) only names the holder in the error
a second process gets; it is never what decides.

Torch-free, like utils.train.preflight: train.py probes the lock before importing torch.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from utils.io import OutputError
from utils.train.preflight import RunDirError

LOCK_NAME = ".run.lock"


class RunLock:
    """An acquired run-folder lock; held until release() or the end of the process."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = -1


def _holder(fd: int) -> str:
    """Who holds the lock, from the note the holder wrote into the file."""
    try:
        note = json.loads(os.pread(fd, 4096, 0).decode("utf-8") or "{}")
    except (OSError, ValueError):
        note = {}
    if not note:
        return "a process that has not written its name yet"
    return (f"pid {note.get('pid')} on {note.get('host')}, started {note.get('started')}: "
            f"{note.get('command', '')}").rstrip(": ")


def _open(run_dir: Path) -> int:
    try:
        return os.open(run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except OSError as e:
        raise OutputError(f"run folder {run_dir}: cannot create its lock file {LOCK_NAME} ({e.strerror}); the "
                          "folder must be writable: fix its permissions or choose another --output_dir.") from None


def _busy(run_dir: Path, fd: int) -> RunDirError:
    return RunDirError(f"{run_dir} is in use by another training process ({_holder(fd)}). Two runs in one folder "
                       "would overwrite each other's checkpoints: wait for it to finish, stop it, or choose "
                       "another --name or --output_dir.")


def acquire(run_dir: str | os.PathLike) -> RunLock:
    """Take the run folder's lock (the folder must exist) or raise RunDirError naming the holder."""
    run_dir = Path(run_dir)
    fd = _open(run_dir)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # EAGAIN/EACCES: another process holds it
        error = _busy(run_dir, fd)
        os.close(fd)
        raise error from None
    note = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(["python", *sys.argv])[:1000]}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(note).encode("utf-8"), 0)
    return RunLock(fd, run_dir / LOCK_NAME)


def check_free(run_dir: str | os.PathLike) -> None:
    """RunDirError when another process holds the folder's lock; takes nothing, creates nothing.

    A cheap early probe (before torch is imported); the lock itself is taken by acquire(). Never
    call it in the process that holds the lock: closing any descriptor of the file drops a
    process's record locks."""
    path = Path(run_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return  # no lock file (or unreadable): nobody can hold it, or acquire() will say why
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        raise _busy(Path(run_dir), fd) from None
    finally:
        os.close(fd)
