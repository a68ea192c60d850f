"""Reliability of training runs: SIGKILL + --resume gives the uninterrupted run bit for
bit, the seed fixes everything, a NaN loss stops the run without touching its checkpoints,
and run folders are never overwritten or deleted unless asked.

The runs are tiny (48 training rows, 3 steps per epoch) and use one DataLoader worker, so
that the persistent worker process is part of what a resume must reproduce.
"""
from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import (assert_clean_failure, comparable_history, demo_paths, linked_feature_root, only_run_dir,
                         output, read_csv_text, read_state, replace_file, run_cli, run_many, start_cli, subset_csv,
                         train_args)

from utils.train.checkpoint import LAST_NAME
from utils.train.preflight import RunDirError
from utils.train.runlock import LOCK_NAME, check_free

EPOCHS = 3
WORKERS = ["--num_workers", "1"]


def _checkpoints(run_dir: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=False) for p in sorted(run_dir.glob("pytorch_model.bin*"))}


def _assert_tensors_equal(a, b, where: str) -> None:
    """Nested dicts/lists of tensors and numbers, compared exactly."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for k in a:
            _assert_tensors_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_tensors_equal(x, y, f"{where}[{i}]")


@pytest.fixture(scope="module")
def data(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("resume")
    demo = demo_paths(demo_data)
    return {"root": root, "features": demo["features"],
            "train": subset_csv(demo["train"], root / "train_data.csv", 48),
            "val": subset_csv(demo["val"], root / "val_data.csv", 20)}


def _args(data: dict, out: Path, *extra: str) -> list[str]:
    return train_args(data["train"], data["val"], data["features"], out, EPOCHS, *WORKERS, *extra)


@pytest.fixture(scope="module")
def runs(data: dict) -> dict:
    """The uninterrupted run, and the same run killed with SIGKILL in the middle of epoch 2 then
    resumed with --resume (the first two run side by side)."""
    killed_out, log = data["root"] / "killed", data["root"] / "killed.out"
    uninterrupted_log = data["root"] / "uninterrupted.out"
    killed = start_cli("train.py", _args(data, killed_out), log)
    uninterrupted = start_cli("train.py", _args(data, data["root"] / "uninterrupted"), uninterrupted_log)
    try:
        run_dir = _kill_in_epoch_2(killed, killed_out, log)
        uninterrupted.join(300)
    finally:
        if uninterrupted.is_alive():
            uninterrupted.kill()
    assert uninterrupted.exitcode == 0, (uninterrupted_log.read_text()[-3000:]
                                         + Path(f"{uninterrupted_log}.err").read_text())
    state_at_kill = read_state(run_dir)
    resume = run_cli("train.py", ["--resume", run_dir, "--device", "cpu", *WORKERS])
    assert resume.returncode == 0, output(resume)[-3000:]
    return {"uninterrupted": only_run_dir(data["root"] / "uninterrupted"), "resumed": run_dir,
            "state_at_kill": state_at_kill, "resume_output": output(resume)}


@pytest.fixture(scope="module")
def uninterrupted(runs: dict) -> Path:
    return runs["uninterrupted"]


def _kill_in_epoch_2(proc, out: Path, log: Path) -> Path:
    """SIGKILL the run `proc` once epoch 1 is saved and epoch 2 has begun; returns its run folder."""
    try:
        run_dir = _wait_for_epoch_2(proc, out, log)
        proc.kill()
        proc.join(60)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    return run_dir


def _wait_for_epoch_2(proc, out: Path, log: Path, timeout: float = 300) -> Path:
    """Return once epoch 1 is saved (train_state.json) and a step of epoch 2 has been logged."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.is_alive(), f"the run ended before it could be killed:\n{log.read_text()[-3000:]}"
        runs = [p for p in out.glob("*/*") if (p / "train_state.json").is_file()]
        if runs and read_state(runs[0])["epoch"] == 1:
            logs = list(runs[0].glob("*_train.log"))
            if logs and "epoch 2 step 1/" in logs[0].read_text():
                return runs[0]
        time.sleep(0.02)
    raise AssertionError(f"epoch 2 never started:\n{log.read_text()[-3000:]}")


def test_sigkill_then_resume_equals_uninterrupted(runs: dict) -> None:
    uninterrupted, resumed = runs["uninterrupted"], runs["resumed"]
    assert runs["state_at_kill"]["epoch"] == 1           # killed in epoch 2, before it was saved
    assert (resumed / LOCK_NAME).is_file()               # the killed run's lock file did not block --resume
    assert "resumed from epoch 1" in runs["resume_output"]
    ref, got = read_state(uninterrupted), read_state(resumed)
    assert got["finished"] and ref["finished"] and got["epoch"] == ref["epoch"] == EPOCHS
    assert got["bests"] == ref["bests"] and got["best_epochs"] == ref["best_epochs"]
    assert comparable_history(got) == comparable_history(ref)   # every loss and metric, exactly
    ref_ckpts, got_ckpts = _checkpoints(uninterrupted), _checkpoints(resumed)
    assert ref_ckpts.keys() == got_ckpts.keys() and LAST_NAME in ref_ckpts
    for name in ref_ckpts:
        assert got_ckpts[name]["epoch"] == ref_ckpts[name]["epoch"], name
        _assert_tensors_equal(ref_ckpts[name]["model_state_dict"], got_ckpts[name]["model_state_dict"], name)
    # The optimizer moments, the schedule and the RNG streams carried on too.
    for key in ("optimizer", "scheduler", "global_step", "rng"):
        _assert_tensors_equal(ref_ckpts[LAST_NAME]["resume"][key], got_ckpts[LAST_NAME]["resume"][key], key)


def test_resume_of_a_finished_run_changes_nothing(uninterrupted: Path, data: dict) -> None:
    run = data["root"] / "finished_copy"
    shutil.copytree(uninterrupted, run)
    before = {p.name: p.read_bytes() for p in run.glob("pytorch_model.bin*")}
    proc = run_cli("train.py", ["--resume", run, "--device", "cpu", "--num_workers", "0"])
    assert proc.returncode == 0, output(proc)[-3000:]
    assert "already finished" in output(proc)
    assert {p.name: p.read_bytes() for p in run.glob("pytorch_model.bin*")} == before


def test_seed_fixes_initialisation_dropout_and_data_order(data: dict) -> None:
    """In-process: the same seed gives the same weights, dropout masks and batches; another seed does not."""
    from model.made import build_model
    from utils.data.dataset import build_dataset
    from utils.train.distributed import DistInfo
    from utils.train.options import parse_args
    from utils.train.setup import make_loader, seed_everything
    args = parse_args(["--dim_input", "32", "--detr_dim_feedforward", "64", "--detr_enc_layers", "1",
                       "--detr_dec_layers", "2", "--contrastive_dim", "32", "--num_workers", "0"])
    dataset = build_dataset(data["train"], data["features"])

    def run(seed: int, epoch: int):
        seed_everything(seed)
        model = build_model(args).train()
        loader, sampler = make_loader(dataset, 16, True, True, seed, DistInfo(), torch.device("cpu"), args)
        sampler.set_epoch(epoch)
        batch = next(iter(loader))
        out = model(batch)["detection"]["pred_spans"]  # dropout active (train mode)
        return model.state_dict(), batch["video_id"], out

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a busy 2-core machine runs this tiny model faster on one thread
    try:
        w1, order1, out1 = run(7, 1)
        w2, order2, out2 = run(7, 1)
        w3, order3, _ = run(8, 1)
        _, order4, _ = run(7, 2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(w1[k], w2[k]) for k in w1) and order1 == order2 and torch.equal(out1, out2)
    assert not torch.equal(w1["video_encoder.proj.weight"], w3["video_encoder.proj.weight"]) and order1 != order3
    assert order4 != order1  # the order changes with the epoch (and only with seed and epoch)


# ------------------------------------------------------------------ run folders
def test_finished_run_is_not_overwritten(uninterrupted: Path, data: dict) -> None:
    out = data["root"] / "refuse"
    target = out / uninterrupted.parent.name / time.strftime("%m%d+MaDe")
    shutil.copytree(uninterrupted, target)
    before = {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()}
    proc = run_cli("train.py", _args(data, out))
    assert_clean_failure(proc, 2, f"{target} already holds a run", f"--resume {target}", "--overwrite")
    assert {p.name: p.read_bytes() for p in target.iterdir() if p.is_file()} == before


def test_overwrite_sets_the_old_run_aside(uninterrupted: Path, data: dict) -> None:
    """--overwrite trains again (here with another seed) and moves, never deletes, the old files."""
    out = data["root"] / "overwrite"
    target = out / uninterrupted.parent.name / time.strftime("%m%d+MaDe")
    shutil.copytree(uninterrupted, target)
    (target / "my_notes.txt").write_text("keep me")
    old = {p.name: p.read_bytes() for p in target.glob("pytorch_model.bin*")}
    args = train_args(data["train"], data["val"], data["features"], out, 1, "--overwrite", "--seed", "8")
    proc = run_cli("train.py", args)
    assert proc.returncode == 0, output(proc)[-3000:]
    (aside,) = target.glob("replaced-*")
    assert {p.name: p.read_bytes() for p in aside.glob("pytorch_model.bin*")} == old
    assert (target / "my_notes.txt").read_text() == "keep me"
    new = read_state(target)
    assert new["epoch"] == 1 and len(new["history"]) == 1
    # Another seed, another run: its first epoch differs from the uninterrupted run's.
    assert comparable_history(new)[0] != comparable_history(read_state(uninterrupted))[0]


def test_sigkill_then_a_new_run_with_overwrite(uninterrupted: Path, data: dict) -> None:
    """A run killed (SIGKILL) in epoch 2 leaves its lock file, a checkpoint and a log behind. A new run
    (not --resume) with --overwrite must start on that folder without anyone cleaning up: it is the
    uninterrupted run exactly, and the killed run's files are set aside, not mixed in or deleted."""
    out, log = data["root"] / "killed_then_new", data["root"] / "killed_then_new.out"
    run_dir = _kill_in_epoch_2(start_cli("train.py", _args(data, out), log), out, log)
    assert (run_dir / LOCK_NAME).is_file()
    killed_files = {p.name: p.read_bytes() for p in run_dir.glob("pytorch_model.bin*")}
    assert killed_files and read_state(run_dir)["epoch"] == 1
    refused = run_cli("train.py", _args(data, out))
    assert_clean_failure(refused, 2, f"{run_dir} already holds a run", "--overwrite")
    proc = run_cli("train.py", _args(data, out, "--overwrite"))
    assert proc.returncode == 0, output(proc)[-3000:]
    assert only_run_dir(out) == run_dir
    assert comparable_history(read_state(run_dir)) == comparable_history(read_state(uninterrupted))
    assert read_state(run_dir)["finished"]
    (aside,) = run_dir.glob("replaced-*")
    assert {p.name: p.read_bytes() for p in aside.glob("pytorch_model.bin*")} == killed_files
    assert read_state(aside)["epoch"] == 1 and len(list(aside.glob("*_train.log"))) == 1


def test_resume_with_conflicting_flags(uninterrupted: Path) -> None:
    proc = run_cli("train.py", ["--resume", uninterrupted, "--seed", "8", "--dim_input", "64", "--device", "cpu"])
    assert_clean_failure(proc, 2, "these flags differ from the settings the run was trained with",
                         "--seed 8 (the run used 7)", "--dim_input 64 (the run used 32)")


def test_resume_of_nothing(data: dict) -> None:
    proc = run_cli("train.py", ["--resume", data["root"] / "nowhere", "--device", "cpu"])
    assert_clean_failure(proc, 2, "no such run folder or checkpoint file")


# ------------------------------------------------------------------ features that overflow the model
def test_overflowing_features_are_named_and_keep_the_checkpoints(uninterrupted: Path, data: dict) -> None:
    """A training video whose features are finite but huge (a broken extractor) would overflow the
    model to NaN and surface as a NaN loss naming no file. It is refused when read, in the epoch
    after the saved ones: exit 2, one line naming the file, and the run's files stay as they were."""
    run = data["root"] / "nan_run"
    shutil.copytree(uninterrupted, run)
    features = linked_feature_root(data["features"], data["root"] / "nan_features", [data["train"], data["val"]])
    video = read_csv_text(data["train"])["video_id"].iloc[10]
    path = features / "vit_feature1" / "vit_feature" / f"{video}.pt"
    huge = torch.load(path, weights_only=True) * 1e30
    import io
    buffer = io.BytesIO()
    torch.save(huge, buffer)
    replace_file(path, buffer.getvalue())
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name.startswith(("pytorch_model", "train_state"))}
    proc = run_cli("train.py", ["--resume", run, "--epochs", str(EPOCHS + 1), "--frozen_feature_path", features,
                                "--device", "cpu", "--num_workers", "0"])
    text = assert_clean_failure(proc, 2, f"error: {path}: values up to", "beyond +-65504", "Re-extract")
    assert len([line for line in text.splitlines() if line.startswith("error:")]) == 1
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.name.startswith(("pytorch_model", "train_state"))}
    assert after == before


# ------------------------------------------------------------------ one writer per run folder
def _wait_until_locked(proc, out: Path, log: Path, timeout: float = 300) -> Path:
    """The run folder of `proc` once it exists and its lock is held (training has started)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.is_alive(), f"the run ended early:\n{log.read_text()[-3000:]}"
        for run_dir in out.glob("*/*"):
            try:
                check_free(run_dir)
            except RunDirError:
                return run_dir
        time.sleep(0.02)
    raise AssertionError(f"the run never locked its folder:\n{log.read_text()[-3000:]}")


def test_second_run_into_the_same_folder_is_refused(uninterrupted: Path, data: dict) -> None:
    """While a run is in its first epoch (a log, no checkpoint yet), a second train.py on its folder --
    plain, --overwrite or --resume -- exits 2 within seconds naming the first, which then finishes
    with exactly the checkpoints of a run that was alone."""
    out, log = data["root"] / "contested", data["root"] / "contested.out"
    first = start_cli("train.py", _args(data, out), log)
    try:
        run_dir = _wait_until_locked(first, out, log)
        t0 = time.time()
        others = run_many([("train.py", _args(data, out)), ("train.py", _args(data, out, "--overwrite")),
                           ("train.py", ["--resume", run_dir, "--device", "cpu"])], parallel=3)
        elapsed = time.time() - t0
        first.join(300)
    finally:
        if first.is_alive():
            first.kill()
    for proc in others:
        assert_clean_failure(proc, 2, f"{run_dir} is in use by another training process", f"pid {first.pid} on")
    assert elapsed < 60
    assert first.exitcode == 0, log.read_text()[-3000:]
    assert comparable_history(read_state(run_dir)) == comparable_history(read_state(uninterrupted))
    ref_ckpts, got_ckpts = _checkpoints(uninterrupted), _checkpoints(run_dir)
    assert ref_ckpts.keys() == got_ckpts.keys()
    for name in ref_ckpts:
        _assert_tensors_equal(ref_ckpts[name]["model_state_dict"], got_ckpts[name]["model_state_dict"], name)
    assert not list(run_dir.glob("replaced-*"))  # the refused --overwrite moved nothing
