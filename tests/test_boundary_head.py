"""The boundary head (--moment_head boundary): its output contract (the DETR detector's, so every
tool works with either head), its targets and decoding, that it fits a small batch, and that its
checkpoints load in test.py and ground.py by themselves (the head travels in the checkpoint)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.boundary_head import BoundaryHead, start_targets
from model.spans import spans_to_seconds, top_moment
from tests.conftest import load_script
from tests.test_detector_learns import fit_small_batch
from utils.evaluate.metrics import moment_iou
from utils.train.checkpoint import save_checkpoint
from utils.train.options import parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_targets_are_two_hot_around_the_start() -> None:
    t = start_targets(torch.tensor([0.0, 3.75, 10.0, 500.0]), stride=2.5, num_snippets=8)
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert t[0, 0] == 1 and t[2, 4] == 1 and t[3, 7] == 1          # on the grid; past the end: the last snippet
    assert t[1, 1] == pytest.approx(0.5) and t[1, 2] == pytest.approx(0.5)
    # The expected grid position is the start itself (inside the grid).
    assert float((t[1] * torch.arange(8)).sum() * 2.5) == pytest.approx(3.75)


def test_output_contract_and_decoding() -> None:
    torch.manual_seed(0)
    head = BoundaryHead(video_dim=16, music_dim=24, stride=2.5, max_m_duration=240.0).eval()
    b, lv, lm = 3, 50, 96
    frame_mask = torch.zeros(b, lv)
    frame_mask[:, :21] = 1
    music_mask = torch.zeros(b, lm)
    music_mask[:, :40] = 1
    out = head(torch.randn(b, lv, 16), frame_mask, torch.randn(b, lm, 24), music_mask,
               torch.tensor([20.0, 20.0, 20.0], dtype=torch.float64))
    assert out["pred_logits"].shape == (b, 1, 2) and out["pred_spans"].shape == (b, 1, 2)
    assert out["start_logits"].shape == (b, lm) and out["aux_outputs"] == []
    assert (out["start_logits"][:, 40:] < -1e3).all()                     # padded snippets are never a start
    span, conf = top_moment(out, 0)
    se = spans_to_seconds(span, 240.0)
    assert torch.allclose(se[:, 1] - se[:, 0], torch.full((b,), 20.0), atol=1e-4)   # length = the video's
    assert torch.allclose(conf, out["start_logits"].softmax(-1).max(-1).values, atol=1e-5)
    # Decoding: the best snippet, refined by its neighbours' probabilities.
    logits = torch.full((2, 10), -30.0)
    logits[0, 4] = 5.0                                                    # one peak -> its grid point
    logits[1, 4], logits[1, 5] = 5.0, 5.0                                 # two equal peaks -> half-way
    start, p = head.decode(logits)
    assert start.tolist() == pytest.approx([10.0, 11.25]) and p[0] == pytest.approx(1.0)


def test_boundary_head_fits_a_small_batch(demo_data: Path) -> None:
    """The detector test's batch (16 moments well inside their tracks) and narrow MaDe with the
    boundary head, 100 steps: per-video starts, IoU > 0.8."""
    before, pred, gt = fit_small_batch(demo_data, ["--moment_head", "boundary"], steps=100)
    assert torch.corrcoef(torch.stack([pred[:, 0], gt[:, 0]]))[0, 1] > 0.9
    assert float(moment_iou(pred, gt).mean()) > 0.8 > float(moment_iou(before, gt).mean())


def test_checkpoint_loads_in_test_py_and_ground_py(demo_data: Path, tmp_path: Path) -> None:
    """A boundary-head checkpoint is evaluated and grounded with no extra flag: the head is part of
    the checkpoint's settings. ground.py's moment on the GT track equals test.py's SmG moment."""
    from model.made import build_model
    from test import main as test_main
    args = parse_args(["--device", "cpu", "--moment_head", "boundary"], mode="train")
    torch.manual_seed(0)
    ckpt = tmp_path / "pytorch_model.bin.best_r1"
    save_checkpoint(ckpt, build_model(args), args, epoch=1)
    root = demo_data / "dataset/MGSV-EC"
    features = demo_data / "features/Kuai_feature"
    metrics_json = tmp_path / "m.json"
    assert test_main(["--load_uni_model_path", str(ckpt), "--test_csv", str(root / "test_data.csv"),
                      "--frozen_feature_path", str(features), "--device", "cpu", "--save_json", "1",
                      "--prior_csv", str(root / "train_data.csv"), "--metrics_json", str(metrics_json)]) == 0
    metrics = json.loads(metrics_json.read_text())
    assert 0.0 <= metrics["mIoU"] <= 1.0 and "unseen/mIoU" in metrics
    (pred_file,) = tmp_path.glob("*-test/uni_test_*.json")
    by_video = {r["video_id"]: r for r in json.loads(pred_file.read_text())}
    index, out = tmp_path / "index", tmp_path / "g.json"
    assert load_script("build_music_index").run(
        ["--load_uni_model_path", str(ckpt), "--frozen_feature_path", str(features),
         "--music_ids", str(root / "test_data.csv"), "--out", str(index), "--quiet"]) == 0
    assert load_script("ground").run(
        ["--load_uni_model_path", str(ckpt), "--index", str(index), "--video_feature", str(root / "test_data.csv"),
         "--frozen_feature_path", str(features), "--topk", "3", "--out", str(out), "--quiet"]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == len(by_video)
    for row in rows[:10]:
        ref = by_video[row["video_id"]]
        assert row["tracks"][0]["music_id"] == ref["topk_music_ids"][0]
        # ground.py takes the video length from its frames (it has no CSV times), test.py from the CSV:
        # same start, ends within a second.
        assert row["ground_truth"]["pred_start"] == pytest.approx(ref["pred_st"], abs=6e-4)
