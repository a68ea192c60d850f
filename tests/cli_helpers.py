"""Running train.py / test.py as a user would (subprocess), on small slices of the demo data.

Shared by the end-to-end tests (test_train_test, test_train_resume, test_hostile_inputs).
Each run pays a Python + torch start-up (a few seconds on a small machine), so the tests
share runs through module-scoped fixtures where they can.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pandas as pd

REPO_ROOT = Path(__file__).resolve().parents[1]

# A model small enough that an epoch over a few dozen rows takes about a second on a CPU.
TINY_MODEL = ["--dim_input", "32", "--detr_dim_feedforward", "64", "--detr_enc_layers", "1",
              "--detr_dec_layers", "2", "--contrastive_dim", "32"]
CPU = ["--device", "cpu", "--num_workers", "0"]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread: on a busy 2-core machine torch's default thread pool spins and
    # runs several times slower; and the same thread count in every run keeps float
    # reductions in the same order (the resume/determinism tests compare bit for bit).
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TQDM_DISABLE="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


def run_cli(script: str | Sequence[str], args: Sequence[str], timeout: float = 240) -> subprocess.CompletedProcess:
    """`python <script> args...` from the repository root; stdout and stderr captured separately."""
    cmd = [sys.executable, *([script] if isinstance(script, str) else script), *map(str, args)]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True, timeout=timeout)


def start_cli(script: str, args: Sequence[str], log_path: Path) -> subprocess.Popen:
    """Start a run in the background, its output going to `log_path`."""
    out = open(log_path, "w")
    return subprocess.Popen([sys.executable, script, *map(str, args)], cwd=REPO_ROOT, env=cli_env(),
                            stdout=out, stderr=subprocess.STDOUT)


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
