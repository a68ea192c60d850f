"""Files from elsewhere never run code: a checkpoint, feature file, packed store or music index that
carries a pickle payload is refused (exit status 2, one line naming the file) by every entry point
that reads it, and the payload -- which would create a marker file -- never runs. Checkpoints in
the authors' layout and our own from before numpy's RNG state was stored as plain values still load.
"""
from __future__ import annotations

import random
import shutil
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import (CPU, TINY_MODEL, assert_clean_failure, demo_paths, linked_feature_root, read_csv_text,
                         replace_file, run_many, subset_csv)
from conftest import load_script

from utils.train.checkpoint import LAST_NAME, CheckpointError, load_checkpoint, load_resume_checkpoint, save_checkpoint
from utils.train.options import parse_args


class Payload:
    """Unpickling this calls open(marker, "w"): the marker file exists iff code from the file ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _tiny_model():
    from model.made import build_model
    args = parse_args([*TINY_MODEL, "--device", "cpu"], mode="train")
    torch.manual_seed(0)
    return args, build_model(args)


def _payload_checkpoint(path: Path, marker: Path) -> Path:
    _, model = _tiny_model()
    torch.save({"model_state_dict": model.state_dict(), "epoch": 1, "config": {}, "extra": Payload(marker)}, path)
    return path


def _payload_npy(path: Path, marker: Path) -> None:
    path.unlink()
    np.save(path, np.array([Payload(marker)], dtype=object), allow_pickle=True)


# ------------------------------------------------------------------ in-process
def test_checkpoint_with_payload_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = _payload_checkpoint(tmp_path / "model.bin", marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    text = str(info.value)
    assert str(path) in text and "pickled Python object (io.open)" in text and "refused" in text and "\n" not in text
    assert not marker.exists()


def test_new_checkpoints_need_no_extra_globals(tmp_path: Path) -> None:
    """Resume state (with every RNG state) loads with torch's default weights-only allow-list."""
    from utils.train.setup import capture_rng, restore_rng
    args, model = _tiny_model()
    path = tmp_path / LAST_NAME
    rng = capture_rng()
    save_checkpoint(path, model, args, epoch=1, resume_state={
        "optimizer": {}, "scheduler": {}, "global_step": 3, "bests": {}, "best_epochs": {}, "history": [],
        "rng": rng, "rng_per_rank": [rng]})
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(path)) == []
    expected = (random.random(), np.random.rand(), torch.rand(1))
    restore_rng(load_resume_checkpoint(path)["resume"]["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected


def test_checkpoints_written_before_still_load(tmp_path: Path) -> None:
    """Our .last files used to carry numpy's RNG state as an ndarray (and metrics could be numpy
    scalars); the authors' files are bare (DDP-prefixed) state dicts."""
    from utils.train.setup import restore_rng
    args, model = _tiny_model()
    np.random.seed(3)
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = np.random.rand()
    old = {"format": "mgsv-made/1", "epoch": 2, "loss": 0.5, "metrics": {"R1": np.float64(12.5)},
           "config": {"dim_input": 32}, "model_state_dict": model.state_dict(), "optimizer_state_dict": "None",
           "resume": {"optimizer": {}, "scheduler": {}, "global_step": 6, "bests": {}, "best_epochs": {},
                      "history": [{"epoch": 1, "train": {"loss": np.float64(0.7)}}], "rng": old_rng}}
    torch.save(old, tmp_path / LAST_NAME)
    state = load_resume_checkpoint(tmp_path / LAST_NAME)
    assert state["metrics"]["R1"] == 12.5 and state["epoch"] == 2
    np.random.seed(0)
    restore_rng(state["resume"]["rng"])
    assert np.random.rand() == expected
    authors = OrderedDict((f"module.{k}", v) for k, v in model.state_dict().items())
    torch.save(authors, tmp_path / "authors.bin")
    assert load_checkpoint(tmp_path / "authors.bin")["format"] == "bare-state-dict"


def test_checkpoint_with_nan_weights_is_refused(tmp_path: Path) -> None:
    args, model = _tiny_model()
    state = model.state_dict()
    state["video_encoder.proj.weight"][0, 0] = float("nan")
    torch.save({"model_state_dict": state, "epoch": 4}, tmp_path / "diverged.bin")
    with pytest.raises(CheckpointError, match=r"diverged.bin: weights hold NaN/inf values \(video_encoder.proj"):
        load_checkpoint(tmp_path / "diverged.bin")


# ------------------------------------------------------------------ every entry point
@pytest.fixture(scope="module")
def entry_point_runs(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One hostile file per (entry point, file kind), all run as subprocesses: {name: (process, marker, file)}."""
    root = tmp_path_factory.mktemp("untrusted")
    demo = demo_paths(demo_data)
    train_csv = subset_csv(demo["train"], root / "train_data.csv", 16)
    val_csv = subset_csv(demo["val"], root / "val_data.csv", 8)
    args, model = _tiny_model()
    good_ckpt = root / "good.bin"
    save_checkpoint(good_ckpt, model, args, epoch=1)
    index = root / "music.index"
    assert load_script("build_music_index").run(
        ["--load_uni_model_path", str(good_ckpt), "--frozen_feature_path", str(demo["features"]),
         "--music_ids", str(val_csv), "--out", str(index), "--quiet", "--device", "cpu"]) == 0
    video = read_csv_text(train_csv)["video_id"].iloc[0]
    good_video = demo["features"] / "vit_feature1" / "vit_feature" / f"{video}.pt"
    train = ["--do_train", "--train_csv", train_csv, "--val_csv", val_csv, "--epochs", "1", "--batch_size_train", "8",
             *TINY_MODEL, *CPU]
    cases: dict[str, tuple] = {}

    def case(name: str, script: str, argv: list, hostile: Path, marker: Path) -> None:
        cases[name] = (script, [str(a) for a in argv], marker, hostile)

    def folder(name: str) -> Path:
        path = root / name.replace(" ", "_").replace(".", "_")
        path.mkdir()
        return path

    for name, script, argv in (
            ("test.py checkpoint", "test.py", ["--test_csv", val_csv, "--frozen_feature_path", demo["features"],
                                               *CPU, "--load_uni_model_path"]),
            ("build_music_index.py checkpoint", "scripts/build_music_index.py",
             ["--frozen_feature_path", demo["features"], "--music_ids", val_csv, "--device", "cpu", "--quiet",
              "--load_uni_model_path"]),
            ("ground.py checkpoint", "scripts/ground.py", ["--index", index, "--video_feature", good_video,
                                                           "--device", "cpu", "--load_uni_model_path"])):
        tmp = folder(name)
        ckpt = _payload_checkpoint(tmp / "pytorch_model.bin.best_r1", tmp / "ran")
        extra = ["--out", tmp / "out.index"] if "index" in name else []
        case(name, script, [*argv, ckpt, *extra], ckpt, tmp / "ran")

    tmp = folder("train.py --resume")
    ckpt = _payload_checkpoint(tmp / LAST_NAME, tmp / "ran")
    case("train.py --resume", "train.py", ["--resume", tmp, *CPU], ckpt, tmp / "ran")

    tmp = folder("ground.py video feature")
    feature = tmp / "clip.pt"
    torch.save({"feat": torch.zeros(50, 512), "x": Payload(tmp / "ran")}, feature)
    case("ground.py video feature", "scripts/ground.py", ["--load_uni_model_path", good_ckpt, "--index", index,
                                                          "--video_feature", feature, "--device", "cpu"],
         feature, tmp / "ran")

    tmp = folder("train.py feature file")
    features = linked_feature_root(demo["features"], tmp / "features", [train_csv])
    feature = features / "vit_feature1" / "vit_feature" / f"{video}.pt"
    buffer = tmp / "payload.pt"
    torch.save([torch.zeros(50, 512), Payload(tmp / "ran")], buffer)
    replace_file(feature, buffer.read_bytes())
    case("train.py feature file", "train.py", [*train, "--frozen_feature_path", features, "--output_dir",
                                               tmp / "runs"], feature, tmp / "ran")
    case("pack_features.py feature file", "scripts/pack_features.py",
         ["--frozen_feature_path", features, "--modality", "video", "--no_progress"], feature, tmp / "ran")

    tmp = folder("train.py packed store")
    features = linked_feature_root(demo["features"], tmp / "features", [train_csv])
    load_script("pack_features").pack(features, progress=False)
    for sub in ("vit_feature1", "ast_feature2p5"):
        shutil.rmtree(features / sub)  # the packed copy is then the only source
    feats = features / "packed" / "vit_feature1" / "feats.npy"
    _payload_npy(feats, tmp / "ran")
    case("train.py packed store", "train.py", [*train, "--frozen_feature_path", features, "--output_dir",
                                               tmp / "runs"], feats.parent, tmp / "ran")

    tmp = folder("ground.py index")
    bad_index = tmp / "music.index"
    shutil.copytree(index, bad_index)
    _payload_npy(bad_index / "m.npy", tmp / "ran")
    case("ground.py index", "scripts/ground.py", ["--load_uni_model_path", good_ckpt, "--index", bad_index,
                                                  "--video_feature", good_video, "--device", "cpu"],
         bad_index, tmp / "ran")

    procs = run_many([(script, argv) for script, argv, _, _ in cases.values()], parallel=2)
    return {name: (proc, marker, hostile) for (name, (_, _, marker, hostile)), proc in zip(cases.items(), procs)}


ENTRY_POINT_CASES = ["test.py checkpoint", "build_music_index.py checkpoint", "ground.py checkpoint",
                     "train.py --resume", "ground.py video feature", "train.py feature file",
                     "pack_features.py feature file", "train.py packed store", "ground.py index"]


@pytest.mark.parametrize("name", ENTRY_POINT_CASES)
def test_entry_point_never_runs_a_payload(entry_point_runs: dict, name: str) -> None:
    proc, marker, hostile = entry_point_runs[name]
    text = assert_clean_failure(proc, 2, str(hostile))
    error_lines = [line for line in text.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, text[-2000:]
    assert not marker.exists(), "code embedded in the file ran"


def test_index_with_non_finite_rows_is_refused(entry_point_runs: dict, tmp_path: Path) -> None:
    """A NaN in a track's embedding would make its score NaN and drop it from every ranking. Written
    into an index afterwards, it fails the content digest; written by the builder itself (the
    manifest's records made afresh), the finite check still refuses it."""
    import json

    from utils.ground.library import MANIFEST, file_records, open_index
    from utils.ground.model import GroundingError
    from utils.io import manifest_digest
    proc, _, bad_index = entry_point_runs["ground.py index"]
    index = tmp_path / "music.index"
    shutil.copytree(bad_index.parent.parent / "music.index", index)
    m = np.load(index / "m.npy")
    m[2, 5] = np.nan
    np.save(index / "m.npy", m)
    with pytest.raises(GroundingError, match=r"m.npy changed since the index was built"):
        open_index(index)
    manifest = json.loads((index / MANIFEST).read_text())
    manifest["files"] = file_records(index)
    manifest["manifest_digest"] = manifest_digest(manifest)
    (index / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(GroundingError, match=r"m.npy: NaN/inf values for track\(s\) .*rebuild it with `python"):
        open_index(index)
