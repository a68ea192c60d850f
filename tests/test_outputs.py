"""Where results go: unwritable locations are found before the work (exit 2, one line naming the
location), a disk that fills up mid-run fails the run with one line (exit 1) and keeps the previous
files, a checkpoint in a read-only folder can still be evaluated, outputs are never replaced by
those of another evaluation, and files get the umask's mode.

Read-only folders are made with chmod and, for root (whom chmod does not stop), `chattr +i`; the
tests skip where neither makes a folder unwritable.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import (CPU, TINY_MODEL, assert_clean_failure, demo_paths, output, run_many, subset_csv,
                         tiny_checkpoint, train_args)

from utils.io import WriteError, atomic_write_json
from utils.train.checkpoint import LAST_NAME, save_checkpoint
from utils.train.options import parse_args

EARLY_STOP = ("R1", "R5", "mIoU", "R1_iou0.5", "R1_iou0.7")


def _try_unwritable(path: Path) -> bool:
    path.chmod(stat.S_IRUSR | stat.S_IXUSR | stat.S_IRGRP | stat.S_IXGRP)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    try:
        (path / ".probe").touch()
    except OSError:
        return True
    (path / ".probe").unlink()
    return False


def _writable_again(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    path.chmod(0o755)


@pytest.fixture(scope="module")
def setting(demo_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """A read-only folder holding a checkpoint and a finished-epoch run, small CSVs; all outcomes."""
    root = tmp_path_factory.mktemp("outputs")
    demo = demo_paths(demo_data)
    train_csv = subset_csv(demo["train"], root / "train_data.csv", 16)
    val_csv = subset_csv(demo["val"], root / "a" / "val_data.csv", 8)
    other_val = subset_csv(demo["val"], root / "b" / "val_data.csv", 6)  # same file name, other content
    readonly = root / "readonly"
    run_dir = readonly / "run"
    run_dir.mkdir(parents=True)
    from model.made import build_model
    args = parse_args([str(a) for a in train_args(train_csv, val_csv, demo["features"], root / "runs", 2)],
                      mode="train")
    torch.manual_seed(0)
    model = build_model(args)
    save_checkpoint(run_dir / "pytorch_model.bin.best_r1", model, args, epoch=1)
    save_checkpoint(run_dir / LAST_NAME, model, args, epoch=1, resume_state={
        "optimizer": {}, "scheduler": {}, "global_step": 1, "bests": dict.fromkeys(EARLY_STOP, 0.0),
        "best_epochs": dict.fromkeys(EARLY_STOP, 1), "history": [], "rng": {}})
    (root / "pack").mkdir()
    shutil.copytree(demo["features"] / "vit_feature1", root / "pack" / "vit_feature1", symlinks=True)
    unwritable = (run_dir, readonly, root / "pack")
    if not all([_try_unwritable(folder) for folder in unwritable]):
        for folder in unwritable:
            _writable_again(folder)
        pytest.skip("cannot make a folder read-only here")
    ckpt = run_dir / "pytorch_model.bin.best_r1"
    test_py = ["--load_uni_model_path", ckpt, "--frozen_feature_path", demo["features"], *CPU]
    jobs = {
        "fresh run": ("train.py", train_args(train_csv, val_csv, demo["features"], readonly / "runs", 1)),
        "resume": ("train.py", ["--resume", run_dir, *CPU]),
        "test.py metrics_json": ("test.py", [*test_py, "--test_csv", val_csv, "--metrics_json",
                                             readonly / "m.json", "--output_dir", root / "eval"]),
        "evaluate metrics_json": (["-m", "utils.evaluate"], ["--gt_csv", val_csv, "--baseline", "start0",
                                                             "--metrics_json", readonly / "m.json"]),
        "index out": ("scripts/build_music_index.py", ["--load_uni_model_path", ckpt, "--frozen_feature_path",
                                                      demo["features"], "--music_ids", val_csv, "--out",
                                                      readonly / "music.index", "--device", "cpu", "--quiet"]),
        "pack root": ("scripts/pack_features.py", ["--frozen_feature_path", root / "pack", "--modality", "video",
                                                   "--no_progress"]),
        "test.py in a read-only folder a": ("test.py", [*test_py, "--test_csv", val_csv, "--save_json", "1",
                                                        "--output_dir", root / "eval"]),
        "test.py in a read-only folder b": ("test.py", [*test_py, "--test_csv", other_val, "--save_json", "1",
                                                        "--output_dir", root / "eval"]),
    }
    try:
        procs = run_many([(script, [str(a) for a in argv]) for script, argv in jobs.values()], parallel=2)
        before = sorted(p.relative_to(readonly) for p in readonly.rglob("*"))
    finally:
        for folder in unwritable:
            _writable_again(folder)
    return {"root": root, "readonly": readonly, "run_dir": run_dir, "before": before,
            "procs": dict(zip(jobs, procs))}


UNWRITABLE = {
    "fresh run": "run folder (--output_dir/--name)",
    "resume": "--resume run folder",
    "test.py metrics_json": "--metrics_json",
    "evaluate metrics_json": "--metrics_json",
    "index out": "--out",
    "pack root": "packed store folder",
}


@pytest.mark.parametrize("name", list(UNWRITABLE))
def test_unwritable_location_is_refused_before_any_work(setting: dict, name: str) -> None:
    proc = setting["procs"][name]
    text = assert_clean_failure(proc, 2, UNWRITABLE[name], "cannot create files in")
    assert len([line for line in text.splitlines() if line.startswith("error:")]) == 1
    if name == "test.py metrics_json":
        assert "metrics written" not in text and "R1" not in text  # refused before evaluating
    # Nothing was created in the read-only folder.
    assert sorted(p.relative_to(setting["readonly"]) for p in setting["readonly"].rglob("*")) == setting["before"]


def test_checkpoint_in_a_read_only_folder_is_evaluated(setting: dict) -> None:
    """The log and predictions go to --output_dir; two CSVs named alike keep one prediction file each."""
    for name in ("test.py in a read-only folder a", "test.py in a read-only folder b"):
        proc = setting["procs"][name]
        assert proc.returncode == 0, output(proc)[-3000:]
        assert "per-video predictions: " + str(setting["root"] / "eval") in output(proc)
    logs = list((setting["root"] / "eval").glob("*-val/*_test.log"))
    predictions = sorted((setting["root"] / "eval").glob("*-val/uni_val_1_best_r1_*.json"))
    assert len(logs) >= 1 and len(predictions) == 2


# ------------------------------------------------------------------ a disk that fills up
def _limited_file_size(limit: int):
    """RLIMIT_FSIZE makes writes past `limit` bytes fail with EFBIG, as a full disk fails them."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))

    def restore() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
    return restore


def test_checkpoint_write_on_a_full_disk(tmp_path: Path) -> None:
    """torch's writer reports a failed write as 'unexpected pos'; the error names the file instead."""
    from model.made import build_model
    args = parse_args(TINY_MODEL)
    model = build_model(args)
    path = tmp_path / LAST_NAME
    save_checkpoint(path, model, args, epoch=1)
    good = path.read_bytes()
    restore = _limited_file_size(len(good) // 2)
    try:
        with pytest.raises(WriteError) as info:
            save_checkpoint(path, model, args, epoch=2)
    finally:
        restore()
    text = str(info.value)
    assert text.startswith(f"cannot write {path}: the write stopped part-way (disk full?)") and "\n" not in text
    assert "unexpected pos" not in text
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == [LAST_NAME]


def test_train_py_on_a_full_disk_fails_with_one_line(demo_data: Path, tmp_path: Path) -> None:
    demo = demo_paths(demo_data)
    train_csv = subset_csv(demo["train"], tmp_path / "train_data.csv", 16)
    val_csv = subset_csv(demo["val"], tmp_path / "val_data.csv", 8)
    wrapper = tmp_path / "limited_train.py"
    wrapper.write_text(
        "import resource, runpy, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (60_000, resource.RLIM_INFINITY))\n"
        f"sys.argv[0] = {str(Path(__file__).resolve().parents[1] / 'train.py')!r}\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    args = train_args(train_csv, val_csv, demo["features"], tmp_path / "runs", 1, "--batch_size_train", "8",
                      "--tb_writer", "0")
    (proc,) = run_many([(str(wrapper), [str(a) for a in args])])
    text = assert_clean_failure(proc, 1, "cannot write", "pytorch_model.bin.", "(disk full?)",
                                "No checkpoint was written")
    assert "unexpected pos" not in text


def test_files_get_the_umask_mode(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        atomic_write_json({"a": 1}, tmp_path / "x.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == 0o640


def test_two_csvs_of_one_name_keep_one_prediction_file_each(demo_data: Path, tmp_path: Path) -> None:
    """--save_json named its file after the split, epoch and moment R1 only, so evaluating a second
    val_data.csv (another folder, same rows written differently: the same metrics) replaced the
    first's predictions. Each evaluation now has its own file; the same one again rewrites its own."""
    demo = demo_paths(demo_data)
    first = subset_csv(demo["val"], tmp_path / "a" / "val_data.csv", 8)
    second = tmp_path / "b" / "val_data.csv"
    second.parent.mkdir()
    second.write_text("".join(line.rstrip("\n") + (",note\n" if n == 0 else ",copy\n")
                              for n, line in enumerate(first.read_text().splitlines(keepends=True))))
    ckpt = tiny_checkpoint(tmp_path / "run" / "pytorch_model.bin.best_r1")
    common = ["--load_uni_model_path", ckpt, "--frozen_feature_path", demo["features"], "--save_json", "1", *CPU]
    procs = run_many([("test.py", [str(a) for a in [*common, "--test_csv", csv]]) for csv in (first, second, first)])
    for proc in procs:
        assert proc.returncode == 0, output(proc)[-3000:]
    predictions = sorted(ckpt.parent.glob("*-val/uni_val_1_best_r1_*.json"))
    assert len(predictions) == 2 and len({p.name for p in predictions}) == 2
    written = [line.split("per-video predictions: ")[1] for proc in procs for line in output(proc).splitlines()
               if "per-video predictions: " in line]
    assert written[0] == written[2] != written[1]  # the re-run rewrote its own file
    a, b = (json.loads(p.read_text()) for p in predictions)
    assert len(a) == len(b) == 8 and a == b  # the same rows: only the names tell them apart
