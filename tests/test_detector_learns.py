"""The moment detector's predictions depend on the input and can fit a small batch.

A wiring bug (a detached memory, a mask that hides the music, a span head fed a constant)
would leave every video with the same predicted moment, close to the data's prior; the
demo's short run cannot tell that apart from slow learning, so this test does: 16 videos
whose moments start well inside their tracks, a narrow MaDe (same structure, d = 64),
150 steps on that one batch.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from model.spans import spans_to_seconds, top_moment
from utils.data.dataset import build_dataset, collate_fn
from utils.evaluate.metrics import moment_iou
from utils.train.distributed import DistInfo
from utils.train.loop import optimization_step
from utils.train.options import parse_args
from utils.train.setup import build_training


def fit_small_batch(demo_data: Path, flags: list[str], steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train a narrow MaDe (d = 64, `flags` on top) for `steps` steps on one batch of 16 training
    videos whose moments start well inside their tracks, with train.py's update. Returns the
    predicted moments (seconds) before and after, and the ground truth."""
    ds = build_dataset(demo_data / "dataset/MGSV-EC/train_data.csv", demo_data / "features/Kuai_feature")
    rows = [i for i in range(len(ds)) if float(ds.gt_moments[i, 0]) > 20.0][:16]
    assert len(rows) == 16
    batch = collate_fn(ds.__getitems__(rows))
    args = parse_args(["--name", "t", "--dim_input", "64", "--batch_size_train", "16", "--scheduler", "constant",
                       "--matching_lr", "1e-3", "--detection_lr", "1e-3", "--epochs", "1", *flags], mode="train")
    torch.manual_seed(0)
    model, criterion, optimizer, scheduler, _ = build_training(args, torch.device("cpu"), DistInfo(),
                                                               steps_per_epoch=steps)

    def predict() -> torch.Tensor:
        model.eval()
        with torch.no_grad():
            span, _ = top_moment(model(batch)["detection"], 0)
        model.train()
        return spans_to_seconds(span, args.max_m_duration)

    before = predict()
    for _ in range(steps):
        loss, _ = criterion(model(batch), batch)
        optimization_step(loss, optimizer, args.max_grad_norm)   # train.py's update
        scheduler.step()
    return before, predict(), batch["gt_moment"][:, 0]


@pytest.mark.usefixtures("one_torch_thread")
def test_detector_fits_a_small_batch(demo_data: Path) -> None:
    before, pred, gt = fit_small_batch(demo_data, ["--detr_dim_feedforward", "128"], steps=150)
    iou = moment_iou(pred, gt)
    # per-video moments, not one shared guess: the predicted starts follow the true ones
    assert torch.corrcoef(torch.stack([pred[:, 0], gt[:, 0]]))[0, 1] > 0.8
    assert float(iou.mean()) > 0.5 > float(moment_iou(before, gt).mean())
