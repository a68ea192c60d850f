"""Bad inputs through `python train.py` / `python test.py`, as a user meets them.

Every case must end with exit status 2, a message that says what is wrong, where (file,
line, flag) and what to do, and no Python traceback. The loaders' own unit tests
(test_annotations.py, test_features.py) cover the rules in detail; these check that the
errors reach the user intact from the command line. A failed start must also leave no
run folder behind.

The module prepares every case, runs them a few at a time (`all_runs`; each is its own
process, see tests/cli_helpers.py), and each test checks one outcome.
Run-folder, resume and NaN-loss cases need a trained run: they are in test_train_resume.py.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import pytest
import torch
from cli_helpers import (CPU, TINY_MODEL, assert_clean_failure, demo_paths, linked_feature_root, read_csv_text,
                         replace_file, run_many, subset_csv, tiny_checkpoint, train_args)

TRAIN_ROWS, VAL_ROWS = 48, 20
PARALLEL = 3  # processes at once


@dataclass
class Case:
    """One command line and what it must print."""
    script: str
    args: list
    phrases: list[str]
    status: int = 2
    no_output_dir: Path | None = None  # must not exist afterwards (nothing written on failure)
    extra_check: Callable[[str], None] | None = field(default=None, repr=False)  # given the process's stderr


def one_error_line(stderr: str) -> None:
    """The refusal is one line, the last on stderr (argparse's usage lines above it are not part of it)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert lines and "error:" in lines[-1] and not any("error:" in line for line in lines[:-1]), stderr[-2000:]


def _tensor_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _train(base: dict, tmp: Path, phrases: list[str], *extra: str, train_csv: Path | None = None,
           features: Path | None = None, **kw) -> Case:
    out = tmp / "runs"
    args = train_args(train_csv or base["train"], base["val"], features or base["demo_features"], out, 1, *extra)
    return Case("train.py", args, phrases, no_output_dir=out, **kw)


def _test_py(base: dict, checkpoint: Path, phrases: list[str]) -> Case:
    args = ["--load_uni_model_path", checkpoint, "--test_csv", base["val"], "--frozen_feature_path",
            base["demo_features"], *CPU]
    return Case("test.py", args, phrases)


# ------------------------------------------------------------------ annotation CSVs
def _set(row: int, **values):
    def edit(df: pd.DataFrame) -> pd.DataFrame:
        for column, value in values.items():
            df.loc[row, column] = value
        return df
    return edit


CSV_CASES = {
    # name: (edit of the training CSV, extra flags, phrases the message must contain besides the file)
    "missing column": (lambda df: df.drop(columns=["music_start"]), [],
                       ["missing required column(s) ['music_start']", "header"]),
    "non-numeric time": (_set(1, music_end="abc"), [], ["line 3: music_end is not a number ('abc')",
                                                        "--skip_bad_rows"]),
    "NaN time": (_set(4, music_start="nan"), [], ["line 6: music_start is not finite ('nan')"]),
    "start >= end": (_set(2, music_start="30", music_end="20"), [],
                     ["line 4: music_start 30 >= music_end 20", "Fix or remove these rows"]),
    "end past the track": (_set(0, music_end="500"), [], ["line 2: music_end 500 > music_total_duration"]),
    "track past --max_m_duration": (lambda df: df, ["--max_m_duration", "60"],
                                    ["> max_m_duration 60 (raise --max_m_duration or drop the row)"]),
    "duplicate video ids": (lambda df: pd.concat([df, df.iloc[[0]]], ignore_index=True), [],
                            ["1 duplicate video_id(s)", f"on lines 2, {TRAIN_ROWS + 2}",
                             "Remove the duplicated rows"]),
    "header only": (lambda df: df.iloc[:0], [], ["the file has a header but no data rows"]),
}


def _csv_case(name: str) -> Callable[[dict, Path], Case]:
    def build(base: dict, tmp: Path) -> Case:
        edit, extra, phrases = CSV_CASES[name]
        csv = tmp / "train_data.csv"
        csv.write_text(edit(read_csv_text(base["train"])).to_csv(index=False, lineterminator="\n"))
        return _train(base, tmp, ["error:", str(csv), *phrases], *extra, train_csv=csv)
    return build


def _empty_csv(base: dict, tmp: Path) -> Case:
    csv = tmp / "train_data.csv"
    csv.write_bytes(b"")
    return _train(base, tmp, [str(csv), "the file is empty (no header, no rows)"], train_csv=csv)


def _missing_csv(base: dict, tmp: Path) -> Case:
    return _train(base, tmp, ["nowhere.csv: annotation file not found", "dataset/MGSV-EC/README.md"],
                  train_csv=tmp / "nowhere.csv")


# ------------------------------------------------------------------ feature files
FEATURE_CASES = ["missing file", "truncated file", "wrong shape", "wrong dtype", "NaN values", "inf in music",
                 "all-zero mask", "mask disagrees with rows"]


def _corrupt(case: str, root: Path, video: str, music: str) -> list[str]:
    """Corrupt one file of `root` for `case`; return the phrases the message must contain."""
    feat = root / "vit_feature1" / "vit_feature" / f"{video}.pt"
    mask = root / "vit_feature1" / "vit_mask" / f"{video}.pt"
    if case == "missing file":
        feat.unlink()
        return ["1 of 48 video id(s) have no feature files", str(feat), "features/README.md"]
    if case == "truncated file":
        replace_file(feat, feat.read_bytes()[:1000])
        return [str(feat), "cannot be read as a torch tensor", "truncated or corrupt", "re-extract it"]
    if case == "wrong shape":
        replace_file(feat, _tensor_bytes(torch.zeros(50, 256)))
        return [str(feat), "shape [50, 256], expected [50, 512]", "Re-extract"]
    if case == "wrong dtype":
        replace_file(feat, _tensor_bytes(torch.zeros(50, 512, dtype=torch.int64)))
        return [str(feat), "dtype torch.int64, expected a floating-point video feature", "Re-extract"]
    if case == "NaN values":
        bad = torch.load(feat, weights_only=True).clone()
        bad[0, 3] = float("nan")
        replace_file(feat, _tensor_bytes(bad))
        return [str(feat), "contains NaN or inf values in valid rows", "Re-extract"]
    if case == "inf in music":
        music_feat = root / "ast_feature2p5" / "ast_feature" / f"{music}.pt"
        bad = torch.load(music_feat, weights_only=True).clone()
        bad[1, 0] = float("inf")
        replace_file(music_feat, _tensor_bytes(bad))
        return [str(music_feat), "contains NaN or inf values in valid rows", "Re-extract"]
    if case == "all-zero mask":
        replace_file(mask, _tensor_bytes(torch.zeros(50)))
        return [str(mask), "mask is all zeros (no valid frame)", "Re-extract"]
    if case == "mask disagrees with rows":
        replace_file(mask, _tensor_bytes(torch.ones(40)))
        return [str(mask), "mask length 40 disagrees with the 50 feature rows of", "Re-extract"]
    raise AssertionError(case)


def _feature_case(name: str) -> Callable[[dict, Path], Case]:
    def build(base: dict, tmp: Path) -> Case:
        root = linked_feature_root(base["demo_features"], tmp / "features", [base["train"], base["val"]])
        # The store checks the content of the first ids of a split before training, so a bad file
        # there fails at start-up (any other one on first use, with the same message).
        first = read_csv_text(base["train"]).iloc[0]
        phrases = _corrupt(name, root, first["video_id"], first["music_id"])
        return _train(base, tmp, ["error:", *phrases], features=root)
    return build


def _bad_file_found_by_a_worker(base: dict, tmp: Path) -> Case:
    """A corrupt file that the start-up check does not sample: found in the middle of epoch 1, in a
    DataLoader worker process. torch re-raises the error in the main process with the worker's
    traceback inside its message; the user sees only the message."""
    root = linked_feature_root(base["demo_features"], tmp / "features", [base["train"], base["val"]])
    video = read_csv_text(base["train"])["video_id"].iloc[30]
    phrases = _corrupt("NaN values", root, video, "")
    case = _train(base, tmp, ["error:", *phrases], "--num_workers", "1", features=root)
    case.no_output_dir = None  # training had started: its folder and log exist, without checkpoints
    return case


def _missing_feature_root(base: dict, tmp: Path) -> Case:
    return _train(base, tmp, ["feature root", "no_features does not exist", "--frozen_feature_path"],
                  features=tmp / "no_features")


# ------------------------------------------------------------------ flags
FLAG_CASES = {
    "stride not supported": (["--stride", "3"], ["--stride 3.0: must be one of 2.5, 5, 7.5, 10"]),
    "no epochs": (["--epochs", "0"], ["argument --epochs: expected a positive integer, got '0'"]),
    "dropout out of range": (["--detr_dropout", "1.5"], ["argument --detr_dropout: expected a rate in [0, 1)"]),
    "width not divisible by heads": (["--dim_input", "36"],
                                     ["--dim_input 36 must be divisible by --SA_temporal_heads 8"]),
    "batch larger than the training set": (["--batch_size_train", "64"],
                                           [f"--batch_size_train 64 is larger than the training set ({TRAIN_ROWS} rows",
                                            "Lower --batch_size_train"]),
    "frames disagree with the features": (["--max_v_frames", "40"], ["50 rows, expected 40", "--max_v_frames"]),
    "stride without features": (["--stride", "7.5"], ["ast_feature7p5 not found", "--stride"]),
    # numpy takes seeds in [0, 2**32): anything else failed with a traceback in np.random.seed.
    "negative seed": (["--seed", "-1"], ["argument --seed: expected a seed in [0, 2**32), got '-1'"]),
    "seed of 2**32": (["--seed", "4294967296"], ["argument --seed: expected a seed in [0, 2**32), got '4294967296'"]),
    # inf passes "> 0" and broke later (int(inf) windows, an infinite learning rate).
    "infinite duration": (["--max_m_duration", "inf"], ["argument --max_m_duration: expected a positive number, "
                                                        "got 'inf'"]),
    "infinite learning rate": (["--matching_lr", "inf"], ["argument --matching_lr: expected a positive number"]),
    "infinite loss weight": (["--loc_loss_weight", "inf"], ["argument --loc_loss_weight: expected a number >= 0"]),
}
ONE_LINE_FLAGS = {"negative seed", "seed of 2**32", "infinite duration", "infinite learning rate",
                  "infinite loss weight"}


def _flag_case(name: str) -> Callable[[dict, Path], Case]:
    def build(base: dict, tmp: Path) -> Case:
        extra, phrases = FLAG_CASES[name]
        return _train(base, tmp, phrases, *extra, extra_check=one_error_line if name in ONE_LINE_FLAGS else None)
    return build


def _test_py_seed_out_of_range(base: dict, tmp: Path) -> Case:
    case = _test_py(base, tmp / "unused.bin", ["argument --seed: expected a seed in [0, 2**32), got '99999999999'"])
    case.args += ["--seed", "99999999999"]
    case.extra_check = one_error_line
    return case


def _cuda_without_cuda(base: dict, tmp: Path) -> Case:
    return _train(base, tmp, ["--device cuda", "CUDA is not available", "--device cpu"], "--device", "cuda")


def _fp16_on_the_cpu(base: dict, tmp: Path) -> Case:
    """Before CPU autocast, --amp on the CPU silently trained in float32; bf16 now autocasts there, and
    fp16 (which CPUs cannot train in) is refused before anything is written."""
    return _train(base, tmp, ["--amp fp16 needs CUDA", "--amp bf16 or none"], "--amp", "fp16",
                  extra_check=one_error_line)


def _compile_bf16_on_the_cpu(base: dict, tmp: Path) -> Case:
    """torch's inductor turns the CPU bf16 attention-dropout backward into NaN: refused, not trained on."""
    return _train(base, tmp, ["--compile with --amp bf16 on the CPU"], "--amp", "bf16", "--compile",
                  extra_check=one_error_line)


# ------------------------------------------------------------------ checkpoints given to test.py
def _other_configuration(base: dict, tmp: Path) -> Case:
    """A weights-only file (like the authors') of a 32-wide model, evaluated with the default 256 width."""
    from model.made import build_model
    from utils.train.options import parse_args
    path = tmp / "small_model.bin"
    path.write_bytes(_tensor_bytes(build_model(parse_args(TINY_MODEL, mode="test")).state_dict()))
    return _test_py(base, path, [f"checkpoint {path} does not fit this model configuration", "shape mismatch",
                                 "video_encoder.proj.weight: checkpoint [32, 512] vs model [256, 512]"])


def _truncated_checkpoint(base: dict, tmp: Path) -> Case:
    path = tmp / "pytorch_model.bin.best_r1"
    path.write_bytes(_tensor_bytes({"model_state_dict": {"w": torch.zeros(1000)}})[:500])
    return _test_py(base, path, [str(path), "the file is truncated", "Use another checkpoint"])


def _foreign_checkpoint(base: dict, tmp: Path) -> Case:
    path = tmp / "pytorch_model.bin.best_r1"
    path.write_bytes(_tensor_bytes({"weights": [1, 2, 3], "step": 10}))
    return _test_py(base, path, [str(path), "is not a MaDe checkpoint", "found dict with keys weights, step"])


def _nan_weights_checkpoint(base: dict, tmp: Path) -> Case:
    """A checkpoint saved after the run diverged: refused by name instead of evaluated to NaN scores."""
    path = tiny_checkpoint(tmp / "pytorch_model.bin.best_r1", epoch=3)
    state = torch.load(path, weights_only=True)
    state["model_state_dict"]["video_encoder.proj.weight"][0, 0] = float("nan")
    torch.save(state, path)
    case = _test_py(base, path, [f"checkpoint {path}: weights hold NaN/inf values (video_encoder.proj.weight)",
                                 "Use a checkpoint of an earlier epoch"])
    case.extra_check = one_error_line
    return case


def _no_checkpoint_in_folder(base: dict, tmp: Path) -> Case:
    return _test_py(base, tmp, ["no checkpoint named", str(tmp)])


def _test_py_bad_csv(base: dict, tmp: Path) -> Case:
    """test.py validates its CSV like train.py (here before reading the checkpoint, which is garbage)."""
    csv = tmp / "test_data.csv"
    csv.write_text(read_csv_text(base["val"]).drop(columns=["video_id"]).to_csv(index=False))
    checkpoint = tmp / "pytorch_model.bin.best_r1"
    checkpoint.write_bytes(b"not used")
    case = _test_py(base, checkpoint, [str(csv), "missing required column(s) ['video_id']"])
    case.args[case.args.index(base["val"])] = csv
    return case


CASES: dict[str, Callable[[dict, Path], Case]] = {
    **{f"csv: {name}": _csv_case(name) for name in CSV_CASES},
    "csv: empty file": _empty_csv,
    "csv: missing file": _missing_csv,
    **{f"features: {name}": _feature_case(name) for name in FEATURE_CASES},
    "features: bad file found during training": _bad_file_found_by_a_worker,
    "features: missing folder": _missing_feature_root,
    **{f"flags: {name}": _flag_case(name) for name in FLAG_CASES},
    "checkpoint: another configuration": _other_configuration,
    "checkpoint: truncated": _truncated_checkpoint,
    "checkpoint: NaN weights": _nan_weights_checkpoint,
    "test.py: seed out of range": _test_py_seed_out_of_range,
    "checkpoint: foreign": _foreign_checkpoint,
    "checkpoint: none in the folder": _no_checkpoint_in_folder,
    "test.py: bad CSV": _test_py_bad_csv,
    "flags: fp16 on the CPU": _fp16_on_the_cpu,
    "flags: --compile with bf16 on the CPU": _compile_bf16_on_the_cpu,
}
if not torch.cuda.is_available():
    CASES["flags: cuda without cuda"] = _cuda_without_cuda


@pytest.fixture(scope="module")
def all_runs(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every case prepared in its own folder, then run PARALLEL at a time: {name: (case, process)}."""
    root = tmp_path_factory.mktemp("hostile")
    demo = demo_paths(demo_data)
    base = {"train": subset_csv(demo["train"], root / "train_data.csv", TRAIN_ROWS),
            "val": subset_csv(demo["val"], root / "val_data.csv", VAL_ROWS), "demo_features": demo["features"]}
    cases = {}
    for name, build in CASES.items():
        folder = root / re.sub(r"[^a-z0-9]+", "_", name.lower())
        folder.mkdir()
        cases[name] = build(base, folder)
    procs = run_many([(c.script, c.args) for c in cases.values()], parallel=PARALLEL)
    return {name: (case, proc) for (name, case), proc in zip(cases.items(), procs)}


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_input(all_runs: dict, name: str) -> None:
    case, proc = all_runs[name]
    assert_clean_failure(proc, case.status, *case.phrases)
    if case.extra_check is not None:
        case.extra_check(proc.stderr)
    if case.no_output_dir is not None:
        assert not case.no_output_dir.exists(), "a run that could not start left a folder behind"


def test_only_project_errors_are_reported_without_traceback() -> None:
    """train.py/test.py print the project's own errors as one message; anything else is a bug."""
    from utils.data.annotations import AnnotationError
    from utils.data.features import FeatureError
    from utils.train.preflight import ConfigError, is_user_error, user_error_message
    assert is_user_error(AnnotationError("x")) and is_user_error(ConfigError("y")) and is_user_error(FeatureError("z"))
    assert not is_user_error(ValueError("a bare ValueError from torch or numpy is a bug"))
    assert not is_user_error(RuntimeError("shape mismatch"))
    wrapped = FeatureError("Caught FeatureError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"x.py\", line 1\nutils.data.features.FeatureError: a.pt: bad\n")
    assert user_error_message(wrapped) == "a.pt: bad"
