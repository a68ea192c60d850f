"""Running train.py / test.py as a user would, on small slices of the demo data.

Shared by the end-to-end tests (test_train_test, test_train_resume, test_hostile_inputs).

`run_cli` runs `python <script> <args>` in a new process and returns its exit status and
output. Importing torch costs several seconds of CPU per process on a small machine, and
these tests start dozens, so by default the process is forked from a multiprocessing
"forkserver" that imported torch, numpy, pandas, ... once: the child then runs the script
exactly as the interpreter would (`runpy.run_path(script, run_name="__main__")` with
sys.argv set, the repository as working folder and first sys.path entry, its own stdout
and stderr), and an uncaught exception prints its traceback and exits with status 1 as
usual. `fresh=True` uses a plain `python script` subprocess instead.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]

# A model small enough that an epoch over a few dozen rows takes about a second on a CPU.
TINY_MODEL = ["--dim_input", "32", "--detr_dim_feedforward", "64", "--detr_enc_layers", "1",
              "--detr_dec_layers", "2", "--contrastive_dim", "32"]
CPU = ["--device", "cpu", "--num_workers", "0"]


def tiny_checkpoint(path: Path, seed: int = 0, epoch: int = 1) -> Path:
    """A checkpoint of a randomly initialised TINY_MODEL, its settings inside as train.py writes them."""
    import torch

    from model.made import build_model
    from utils.train.checkpoint import save_checkpoint
    from utils.train.options import parse_args
    args = parse_args([*TINY_MODEL, "--device", "cpu"], mode="train")
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(path, build_model(args), args, epoch=epoch)
    return path


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread: on a busy 2-core machine torch's default thread pool spins and
    # runs several times slower; and the same thread count in every run keeps float
    # reductions in the same order (the resume/determinism tests compare bit for bit).
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def _run_script(script: str, argv: list[str], stdout_path: str, stderr_path: str) -> None:
    """Forkserver child: become `python script argv...` (see the module docstring)."""
    os.environ.update({k: v for k, v in cli_env().items() if os.environ.get(k) != v})
    import torch
    torch.set_num_threads(1)  # OMP_NUM_THREADS is read when the server imported torch, before it was set
    # A forkserver child inherits the forkserver start method; a fresh interpreter on Linux forks
    # (DataLoader workers would otherwise start like spawned processes, seconds each).
    multiprocessing.set_start_method("fork", force=True)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(target, fd)
        os.close(target)
    os.chdir(REPO_ROOT)
    sys.argv = [script, *argv]
    sys.path[0] = str(REPO_ROOT)
    if script == "-m":
        sys.argv = argv
        runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    else:
        runpy.run_path(str(REPO_ROOT / script), run_name="__main__")


_FORKSERVER = None


def _forkserver():
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        # Third-party modules only (the project's own are imported afresh by every child).
        # torch._dynamo: Optimizer.step imports it on its first call (several seconds).
        _FORKSERVER.set_forkserver_preload(["torch", "torch._dynamo", "torch.utils.tensorboard", "numpy",
                                            "pandas", "scipy.optimize", "tqdm"])
    return _FORKSERVER


def run_many(jobs: Sequence[tuple[str | Sequence[str], Sequence[str]]], parallel: int = 1,
             fresh: bool = False, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """Run (script, args) jobs, `parallel` at a time; results in the jobs' order."""
    results: list[subprocess.CompletedProcess | None] = [None] * len(jobs)
    running: list[tuple[int, object, Path]] = []
    scratch = Path(tempfile.mkdtemp(prefix="mgsv_cli_"))

    def start(i: int):
        script, args = jobs[i]
        argv = [str(a) for a in args]
        if fresh:
            cmd = [sys.executable, *([script] if isinstance(script, str) else script), *argv]
            return subprocess.Popen(cmd, cwd=REPO_ROOT, env=cli_env(), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        if not isinstance(script, str):  # ["-m", "module"]
            script, argv = "-m", [*script[1:], *argv]
        proc = _forkserver().Process(target=_run_script, args=(script, argv, str(scratch / f"{i}.out"),
                                                                str(scratch / f"{i}.err")))
        proc.start()
        return proc

    def finish(i: int, proc) -> None:
        script, args = jobs[i]
        if fresh:
            out, err = proc.communicate(timeout=timeout)
            code = proc.returncode
        else:
            proc.join(timeout)
            if proc.exitcode is None:
                proc.kill()
                proc.join()
            code = proc.exitcode
            out, err = ((scratch / f"{i}.{kind}").read_text(errors="replace") for kind in ("out", "err"))
            for kind in ("out", "err"):
                (scratch / f"{i}.{kind}").unlink()
        results[i] = subprocess.CompletedProcess([script, *map(str, args)], code, out, err)

    try:
        for i in range(len(jobs)):
            if len(running) >= max(1, parallel):
                finish(*running.pop(0))
            running.append((i, start(i)))
        for i, proc in running:
            finish(i, proc)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results  # type: ignore[return-value]


def run_cli(script: str | Sequence[str], args: Sequence[str], fresh: bool = False,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python <script> args...` (or `python -m module args` for ["-m", "module"]) from the
    repository root; stdout and stderr captured separately. See the module docstring."""
    return run_many([(script, args)], fresh=fresh, timeout=timeout)[0]


def start_cli(script: str, args: Sequence[str], log_path: Path):
    """Start `python script args...` in the background (forkserver child, see the module docstring),
    stdout and stderr going to `log_path`. Returns a multiprocessing.Process: .is_alive(), .kill()
    (SIGKILL), .join(), .exitcode."""
    proc = _forkserver().Process(target=_run_script, args=(script, [str(a) for a in args], str(log_path),
                                                            str(log_path) + ".err"))
    proc.start()
    return proc


def output(proc: subprocess.CompletedProcess) -> str:
    return (proc.stdout or "") + (proc.stderr or "")


def assert_clean_failure(proc: subprocess.CompletedProcess, status: int, *phrases: str) -> str:
    """Exit status `status`, every phrase in the output, and no Python traceback."""
    text = output(proc)
    assert proc.returncode == status, f"exit status {proc.returncode} (expected {status}):\n{text[-3000:]}"
    assert "Traceback (most recent call last)" not in text, f"traceback in the output:\n{text[-3000:]}"
    for phrase in phrases:
        assert phrase in text, f"{phrase!r} not in the output:\n{text[-3000:]}"
    return text


def subset_csv(src: Path, dst: Path, rows: int) -> Path:
    """The first `rows` rows of an annotation CSV, byte for byte (header included)."""
    lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(lines[: rows + 1]), encoding="utf-8")
    return dst


def demo_paths(demo_data: Path) -> dict[str, Path]:
    csv_dir = demo_data / "dataset" / "MGSV-EC"
    return {"train": csv_dir / "train_data.csv", "val": csv_dir / "val_data.csv",
            "test": csv_dir / "test_data.csv", "features": demo_data / "features" / "Kuai_feature"}


def train_args(train_csv: Path, val_csv: Path, features: Path, output_dir: Path, epochs: int,
               *extra: str) -> list[str]:
    return ["--do_train", "--do_eval", "--train_csv", train_csv, "--val_csv", val_csv,
            "--frozen_feature_path", features, "--output_dir", output_dir, "--epochs", str(epochs),
            "--batch_size_train", "16", "--batch_size_val", "20", "--seed", "7", *TINY_MODEL, *CPU, *extra]


def only_run_dir(output_dir: Path) -> Path:
    """The single run folder train.py made under --output_dir (<train_data>/<MMDD>+<name>)."""
    runs = [p for p in output_dir.glob("*/*") if p.is_dir()]
    assert len(runs) == 1, f"expected one run folder under {output_dir}, found {runs}"
    return runs[0]


def read_state(run_dir: Path) -> dict:
    return json.loads((run_dir / "train_state.json").read_text(encoding="utf-8"))


def comparable_history(state: dict) -> list[dict]:
    """History records without their wall-clock seconds (the only field that may differ)."""
    return [{k: v for k, v in record.items() if k != "seconds"} for record in state["history"]]


def read_csv_text(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def linked_feature_root(demo_features: Path, dst: Path, csv_paths: Sequence[Path]) -> Path:
    """A private feature root for the ids of `csv_paths`: per-file symlinks to the demo's files.

    Tests corrupt files in it with `replace_file`, which unlinks the symlink first, so the
    shared demo data is never written through.
    """
    videos, musics = set(), set()
    for csv in csv_paths:
        df = read_csv_text(csv)
        videos.update(df["video_id"])
        musics.update(df["music_id"])
    for folder, subs, ids in (("vit_feature1", ("vit_feature", "vit_mask"), videos),
                              ("ast_feature2p5", ("ast_feature", "ast_mask"), musics)):
        for sub in subs:
            (dst / folder / sub).mkdir(parents=True, exist_ok=True)
            for i in ids:
                (dst / folder / sub / f"{i}.pt").symlink_to(demo_features / folder / sub / f"{i}.pt")
    return dst


def replace_file(path: Path, data: bytes) -> None:
    """Replace a (possibly symlinked) file by new bytes without touching the link's target."""
    path.unlink()
    path.write_bytes(data)
