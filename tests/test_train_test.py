"""train.py -> test.py -> utils.evaluate.offline end to end on a slice of the demo data.

One 2-epoch training run is shared by the module; test.py must reproduce the validation
metrics train.py logged for an epoch from that epoch's checkpoint, and utils.evaluate.offline must
give test.py's numbers from test.py's own per-video predictions.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from cli_helpers import CPU, demo_paths, only_run_dir, output, read_state, run_cli, subset_csv, train_args

from utils.evaluate.metrics import METRIC_KEYS
from utils.train.checkpoint import BEST_NAMES, LAST_NAME


@pytest.fixture(scope="module")
def trained(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("train_test")
    demo = demo_paths(demo_data)
    train = subset_csv(demo["train"], root / "train_data.csv", 48)
    val = subset_csv(demo["val"], root / "val_data.csv", 20)
    proc = run_cli("train.py", train_args(train, val, demo["features"], root / "runs", 2,
                                          "--metrics_json", root / "train_metrics.json"))
    assert proc.returncode == 0, output(proc)[-3000:]
    run_dir = only_run_dir(root / "runs")
    return {"root": root, "run": run_dir, "val": val, "features": demo["features"], "state": read_state(run_dir)}


def _test_py(trained: dict, checkpoint: Path, *extra: str) -> str:
    proc = run_cli("test.py", ["--load_uni_model_path", checkpoint, "--test_csv", trained["val"],
                               "--frozen_feature_path", trained["features"], "--batch_size_val", "20", *CPU, *extra])
    assert proc.returncode == 0, output(proc)[-3000:]
    return output(proc)


def _assert_same_metrics(got: dict, expected: dict, where: str, miou_tol: float = 0.0) -> None:
    # The 23 flat keys first; after them only the prefixed breakdown keys ("seen/mIoU", ...).
    assert list(got)[:len(METRIC_KEYS)] == METRIC_KEYS, f"{where}: keys {list(got)}"
    assert all("/" in k for k in list(got)[len(METRIC_KEYS):]), f"{where}: keys {list(got)}"
    for key in METRIC_KEYS:
        tol = miou_tol if key == "mIoU" else 0.0
        assert got[key] == pytest.approx(expected[key], rel=0, abs=tol), f"{where}: {key} {got[key]} != {expected[key]}"


def _evaluator_records(rows: list[dict]) -> list[dict]:
    """test.py's --save_json rows -> the records utils.evaluate.offline reads. pred_raw is the detector's
    moment before clipping (pred_st/pred_ed are clipped, rounded, and may have start > end when
    the moment lies past the end of the track; the evaluator clips by itself)."""
    return [{"video_id": r["video_id"], "ranked_music_ids": r["ranked_music_ids"],
             "pred_st": r["pred_raw"][0], "pred_ed": r["pred_raw"][1]} for r in rows]


def _run_evaluate(trained: dict, rows: list[dict], tag: str) -> dict:
    """`python -m utils.evaluate` on test.py's --save_json rows; returns its metrics JSON."""
    pred_json, evaluated = trained["root"] / f"preds_{tag}.json", trained["root"] / f"evaluated_{tag}.json"
    pred_json.write_text(json.dumps(_evaluator_records(rows)))
    proc = run_cli(["-m", "utils.evaluate"], ["--gt_csv", trained["val"], "--pred_json", pred_json,
                                              "--metrics_json", evaluated])
    assert proc.returncode == 0, output(proc)[-3000:]
    return json.loads(evaluated.read_text())


def test_run_folder_contents(trained: dict) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run, state = trained["run"], trained["state"]
    assert state["finished"] is True and state["epoch"] == 2 and len(state["history"]) == 2
    assert (run / LAST_NAME).is_file()
    bests = [name for name in BEST_NAMES.values() if (run / name).is_file()]
    # R1, mIoU and R1_iou0.7 are saved on ties, so epoch 1 always writes them; R1_iou0.5 needs a strict gain.
    assert {"pytorch_model.bin.best_r1", "pytorch_model.bin.best_iou", "pytorch_model.bin.best_r1iou07"} <= set(bests)
    for name in bests:
        assert torch.load(run / name, weights_only=False)["epoch"] in (1, 2)
    (log,) = run.glob("*_train.log")
    assert "epoch 2/2" in log.read_text()
    events = EventAccumulator(str(run))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "eval/R1_epoch", "eval/mIoU_epoch", "train/lr"} <= tags
    assert [e.step for e in events.Scalars("eval/R1_epoch")] == [1, 2]
    assert [e.value for e in events.Scalars("eval/R1_epoch")] == pytest.approx(
        [r["val"]["R1"] for r in trained["state"]["history"]])


def test_train_metrics_json_is_the_last_validation(trained: dict) -> None:
    """train.py --metrics_json: the last epoch's validation metrics, as test.py writes them for one checkpoint."""
    got = json.loads((trained["root"] / "train_metrics.json").read_text())
    assert list(got)[:len(METRIC_KEYS)] == METRIC_KEYS
    assert got == trained["state"]["history"][-1]["val"]


def test_test_best_reproduces_the_logged_validation(trained: dict) -> None:
    """--test_best 1 on the folder: each best checkpoint gives the metrics train.py logged for its epoch."""
    out = trained["root"] / "best_metrics.json"
    _test_py(trained, trained["run"], "--test_best", "1", "--metrics_json", out)
    history = {r["epoch"]: r["val"] for r in trained["state"]["history"]}
    checked = 0
    for name in BEST_NAMES.values():
        path = trained["run"] / name
        if not path.is_file():
            continue
        epoch = torch.load(path, weights_only=False)["epoch"]
        got = json.loads((out.parent / f"best_metrics_{name.split('.')[-1]}.json").read_text())
        _assert_same_metrics(got, history[epoch], name)
        checked += 1
    assert checked >= 3


def test_single_checkpoint_metrics_and_predictions(trained: dict) -> None:
    """One checkpoint: --metrics_json holds METRIC_KEYS (= the logged epoch) and the breakdown by
    track usage in the checkpoint's training CSV, and its --save_json predictions give the same
    metrics through `python -m utils.evaluate`."""
    root, run = trained["root"], trained["run"]
    metrics_path = root / "last_metrics.json"
    _test_py(trained, run / LAST_NAME, "--metrics_json", metrics_path, "--save_json", "1",
             "--save_json_ranking", "0")
    metrics = json.loads(metrics_path.read_text())
    _assert_same_metrics(metrics, trained["state"]["history"][-1]["val"], LAST_NAME)

    (pred_file,) = run.glob("*-val/uni_val_2_last_*.json")
    rows = json.loads(pred_file.read_text())
    assert len(rows) == 20
    # Breakdown: seen = the videos whose track occurs in the run's training CSV.
    train_tracks = set(pd.read_csv(trained["root"] / "train_data.csv", dtype=str)["music_id"])
    seen = [r["iou"] for r in rows if r["music_id"] in train_tracks]
    assert metrics["seen/n"] == len(seen) and metrics["seen/n"] + metrics["unseen/n"] == 20
    assert metrics["seen/mIoU"] == pytest.approx(np.mean(seen), abs=1e-4)
    num_tracks = len({r["music_id"] for r in rows})
    for row in rows:
        assert len(row["ranked_music_ids"]) == num_tracks           # the full ranking (--save_json_ranking 0)
        assert row["ranked_music_ids"][0] == row["topk_music_ids"][0]
        assert row["gt_rank"] == row["ranked_music_ids"].index(row["music_id"]) + 1
    evaluated = _run_evaluate(trained, rows, "full")
    # mIoU to 1e-6 only: test.py takes the annotation times from the dataset's float32 tensors,
    # utils.evaluate.offline reads them from the CSV as float64 (IoUs differ by ~1e-7). Everything else,
    # IoU thresholds included, must be equal.
    _assert_same_metrics(evaluated, metrics, "utils.evaluate", miou_tol=1e-6)


def test_top_k_predictions_agree_on_what_they_determine(trained: dict) -> None:
    """With the default top-k list, utils.evaluate.offline still agrees on SmG and on R@k for k <= the list length."""
    root, run = trained["root"], trained["run"]
    metrics_path = root / "top5_metrics.json"
    best = run / "pytorch_model.bin.best_r1"
    _test_py(trained, best, "--metrics_json", metrics_path, "--save_json", "1", "--save_json_ranking", "5")
    metrics = json.loads(metrics_path.read_text())
    epoch = torch.load(best, weights_only=False)["epoch"]
    (pred_file,) = run.glob(f"*-val/uni_val_{epoch}_best_r1_*.json")
    rows = json.loads(pred_file.read_text())
    assert all(len(r["ranked_music_ids"]) == 5 for r in rows)
    got = _run_evaluate(trained, rows, "top5")
    assert got["mIoU"] == pytest.approx(metrics["mIoU"], rel=0, abs=1e-6)  # float32 vs float64 times, see above
    for key in ("IoU@0.3", "IoU@0.5", "IoU@0.7", "R1", "R3", "R5", "R1_iou0.5", "R1_iou0.7"):
        assert got[key] == metrics[key], key
    assert got["MeanR"] >= metrics["MeanR"] and got["MRR"] <= metrics["MRR"] + 1e-12  # pessimistic bounds
