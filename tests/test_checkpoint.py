"""Checkpoint files: atomic writes under crashes, clear errors for unusable files, resume look-up,
the settings a checkpoint carries, and the run-folder rules."""
from __future__ import annotations

import io
import pickle
import signal
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY_MODEL, start_cli

from model.made import build_model
from utils.train.checkpoint import (LAST_NAME, CheckpointError, adopt_checkpoint_config, load_checkpoint,
                                    load_model_weights, load_resume_checkpoint, resume_checkpoint_path,
                                    save_checkpoint)
from utils.train.options import parse_args
from utils.train.preflight import (ConfigError, RunDirError, check_new_run_dir, given_flags, resume_settings,
                                   set_aside_previous_run)


@pytest.fixture(scope="module")
def tiny():
    args = parse_args(TINY_MODEL)
    torch.manual_seed(0)
    return args, build_model(args)


def _resume_state() -> dict:
    return {"optimizer": {}, "scheduler": {}, "global_step": 3, "bests": {}, "best_epochs": {}, "history": [],
            "rng": {}}


def _tensors_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip(tiny, tmp_path: Path) -> None:
    args, model = tiny
    path = tmp_path / LAST_NAME
    save_checkpoint(path, model, args, epoch=2, metrics={"R1": 1.5}, resume_state=_resume_state())
    state = load_resume_checkpoint(path)
    assert state["epoch"] == 2 and state["metrics"] == {"R1": 1.5} and state["config"]["dim_input"] == 32
    assert _tensors_equal(state["model_state_dict"], model.state_dict())
    fresh = build_model(args)
    load_model_weights(fresh, state, path)
    assert _tensors_equal(fresh.state_dict(), model.state_dict())
    assert [p.name for p in tmp_path.iterdir()] == [LAST_NAME]  # no temporary file left behind


def test_failed_write_keeps_the_previous_checkpoint(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save dying half-way (disk full, exception) leaves the old file under the final name."""
    args, model = tiny
    path = tmp_path / LAST_NAME
    save_checkpoint(path, model, args, epoch=1)
    good = path.read_bytes()
    real_save = torch.save

    def half_then_fail(obj, f, *a, **k):
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, model, args, epoch=2)
    assert path.read_bytes() == good
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [LAST_NAME]  # the partial temporary file was removed


def test_sigkill_mid_write_keeps_the_previous_checkpoint(tiny, tmp_path: Path) -> None:
    """A process killed (SIGKILL) while writing: the final name still holds the previous checkpoint."""
    args, model = tiny
    path = tmp_path / LAST_NAME
    save_checkpoint(path, model, args, epoch=1)
    good = path.read_bytes()
    marker = tmp_path / "writing.flag"
    script = tmp_path / "write_and_hang.py"
    script.write_text(textwrap.dedent(f"""
        import io, pathlib, time, torch
        from model.made import build_model
        from utils.train.checkpoint import save_checkpoint
        from utils.train.options import parse_args
        real_save = torch.save
        def stalled(obj, f, *a, **k):   # write half of the file, flush it, then hang until killed
            buf = io.BytesIO(); real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2]); f.flush()
            pathlib.Path({str(marker)!r}).touch(); time.sleep(600)
        torch.save = stalled
        args = parse_args({TINY_MODEL!r})
        save_checkpoint({str(path)!r}, build_model(args), args, epoch=2)
    """))
    proc = start_cli(str(script), [], tmp_path / "out.log")
    try:
        deadline = time.time() + 120
        while not marker.exists():
            assert proc.is_alive() and time.time() < deadline, (tmp_path / "out.log.err").read_text()
            time.sleep(0.02)
        partial = [p for p in tmp_path.iterdir() if p.name.startswith(f".{LAST_NAME}.")]
        assert len(partial) == 1 and partial[0].stat().st_size > 0   # the half-written temporary file
        proc.kill()  # SIGKILL
        proc.join(30)
    finally:
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == -signal.SIGKILL
    assert path.read_bytes() == good
    assert load_checkpoint(path)["epoch"] == 1
    # The orphaned temporary file is hidden (".pytorch_model.bin.last.*.tmp") and is never read as a checkpoint.
    (orphan,) = [p for p in tmp_path.iterdir() if p.name.startswith(f".{LAST_NAME}.")]
    assert orphan.name.endswith(".tmp")
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(orphan)


@pytest.mark.parametrize("kind", ["truncated", "empty", "text", "pickled list", "tensor", "foreign dict"])
def test_unusable_checkpoint_is_named(tiny, tmp_path: Path, kind: str) -> None:
    args, model = tiny
    path = tmp_path / "model.bin"
    if kind in ("truncated", "empty"):
        save_checkpoint(path, model, args, epoch=1)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 3] if kind == "truncated" else b"")
        expected = "truncated" if kind == "truncated" else "empty"
    elif kind == "text":
        path.write_text("epoch,loss\n1,0.5\n")
        expected = "not a PyTorch checkpoint"
    elif kind == "pickled list":
        path.write_bytes(pickle.dumps([1, 2, 3]))
        expected = "not a PyTorch checkpoint"
    elif kind == "tensor":
        torch.save([torch.zeros(3)], path)
        expected = "not a MaDe checkpoint"
    else:
        torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)
        expected = "not a MaDe checkpoint"
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_checkpoint_of_another_configuration_lists_the_shapes(tiny, tmp_path: Path) -> None:
    args, model = tiny
    path = tmp_path / "model.bin"
    save_checkpoint(path, model, args, epoch=1)
    other = build_model(parse_args([*TINY_MODEL, "--dim_input", "48", "--contrastive_dim", "16"]))
    with pytest.raises(CheckpointError) as info:
        load_model_weights(other, load_checkpoint(path), path)
    text = str(info.value)
    assert str(path) in text and "shape mismatch" in text
    assert "video_encoder.proj.weight: checkpoint [32, 512] vs model [48, 512]" in text


def test_resume_lookup(tiny, tmp_path: Path) -> None:
    args, model = tiny
    with pytest.raises(CheckpointError, match="stopped before finishing its first epoch"):
        resume_checkpoint_path(tmp_path)
    with pytest.raises(CheckpointError, match="no such run folder"):
        resume_checkpoint_path(tmp_path / "nowhere")
    best = tmp_path / "pytorch_model.bin.best_r1"
    save_checkpoint(best, model, args, epoch=1)
    with pytest.raises(CheckpointError, match="holds no resume state"):
        load_resume_checkpoint(best)
    save_checkpoint(tmp_path / LAST_NAME, model, args, epoch=1, resume_state=_resume_state())
    assert resume_checkpoint_path(tmp_path) == tmp_path / LAST_NAME


def test_resume_settings_come_from_the_run(tiny) -> None:
    saved_args, _ = tiny
    saved = dict(vars(saved_args), epochs=3, seed=7, train_csv="/old/train.csv", val_csv="/old/val.csv",
                 device="cuda", num_workers=8)
    argv = ["--resume", "RUN", "--train_csv", "/new/train.csv", "--epochs", "5", "--device", "cpu"]
    args = parse_args(argv)
    notes = resume_settings(args, saved, given_flags(argv), "RUN")
    assert (args.dim_input, args.seed, args.detr_dec_layers) == (32, 7, 2)       # from the run
    assert args.val_csv == "/old/val.csv"                                        # not given: the run's
    assert args.train_csv == "/new/train.csv" and args.epochs == 5               # moved data / extension
    assert (args.device, args.num_workers) == ("cpu", 32)                        # this machine's, always
    assert any(n.startswith("dim_input") for n in notes)
    argv = ["--resume", "RUN", "--seed", "8", "--dim_input", "64"]
    with pytest.raises(ConfigError) as info:
        resume_settings(parse_args(argv), saved, given_flags(argv), "RUN")
    assert "--seed 8 (the run used 7)" in str(info.value) and "--dim_input 64 (the run used 32)" in str(info.value)


def test_adopted_settings_come_from_the_checkpoint_or_the_parser(tiny) -> None:
    """test.py / the grounding tools: a checkpoint's settings replace the command line's; one an older
    checkpoint lacks is the parser's default; the authors' files (no configuration) keep the command line."""
    args, _ = tiny
    saved = {**vars(args), "dim_input": 48, "moment_head": "detr"}
    del saved["separate_positions"]  # as in a checkpoint written before the flag existed
    cli = parse_args(["--separate_positions", "1", "--moment_head", "boundary", "--eval_chunk", "7"], mode="test")
    changed = adopt_checkpoint_config(cli, {"config": saved})
    assert (cli.dim_input, cli.moment_head, cli.separate_positions) == (48, "detr", 0)
    assert cli.eval_chunk == 7  # not a model setting: the command line's
    assert any(c.startswith("separate_positions=0") and "not in the checkpoint" in c for c in changed), changed
    authors = parse_args(["--separate_positions", "1"], mode="test")
    assert adopt_checkpoint_config(authors, {"config": {}}) == [] and authors.separate_positions == 1


def test_run_folder_rules(tmp_path: Path) -> None:
    run = tmp_path / "run"
    check_new_run_dir(run, overwrite=False)                        # nothing there yet: fine, nothing created
    assert not run.exists()
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    (run / "20260101-000000-MaDe-x_train.log").write_text("log")
    check_new_run_dir(run, overwrite=False)                        # a log alone is not a run
    (run / "pytorch_model.bin.best_r1").write_bytes(b"old")
    (run / "train_state.json").write_text("{}")
    with pytest.raises(RunDirError, match="--overwrite"):
        check_new_run_dir(run, overwrite=False)
    check_new_run_dir(run, overwrite=True)
    moved = set_aside_previous_run(run)
    assert moved is not None and moved.parent == run and moved.name.startswith("replaced-")
    assert sorted(p.name for p in moved.iterdir()) == ["20260101-000000-MaDe-x_train.log",
                                                       "pytorch_model.bin.best_r1", "train_state.json"]
    assert (run / "notes.txt").read_text() == "mine"               # user files are never touched
    assert set_aside_previous_run(run) is None
