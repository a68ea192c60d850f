"""The training loop's guard against non-finite losses (utils/train/loop.py): the step it names,
when it stops the epoch, and a later failure caused by the NaN weights reported as the NaN loss
that caused it. (The loss is noted on the device every step and read by the host at log steps.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from utils.logger import Scalars
from utils.train.distributed import DistInfo
from utils.train.loop import NonFiniteLossError, log_interval, train_one_epoch
from utils.train.options import parse_args
from utils.train.setup import build_loaders, build_training, seed_everything

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_STEPS = 25


class Poisoned(torch.nn.Module):
    """The real criterion, whose loss turns NaN at step `bad` (0-based); optionally raising at step `fail`."""

    def __init__(self, bad: int, fail: int | None = None):
        super().__init__()
        self.criterion, self.bad, self.fail, self.calls = None, bad, fail, 0

    def forward(self, outputs, batch):
        step, self.calls = self.calls, self.calls + 1
        if step == self.fail:
            raise ValueError("cost matrix contains invalid numeric entries")
        loss, parts = self.criterion(outputs, batch)
        return (loss * float("nan") if step == self.bad else loss), parts


def train(demo_data: Path, poisoned: Poisoned) -> None:
    """One epoch (at most MAX_STEPS steps) of a small MaDe with `poisoned` as its criterion."""
    args = parse_args(["--dim_input", "32", "--detr_dim_feedforward", "64", "--detr_enc_layers", "1",
                       "--detr_dec_layers", "2", "--batch_size_train", "8", "--no-do_eval", "--device", "cpu",
                       "--num_workers", "0", "--tb_writer", "0", "--num_display", "4",
                       "--train_csv", str(demo_data / "dataset/MGSV-EC/train_data.csv"),
                       "--frozen_feature_path", str(demo_data / "features/Kuai_feature")], mode="train")
    seed_everything(args.seed)
    device = torch.device("cpu")
    loader, _, _ = build_loaders(args, DistInfo(), device)
    model, criterion, optimizer, scheduler, _ = build_training(args, device, DistInfo(), len(loader))
    poisoned.criterion = criterion
    assert len(loader) > MAX_STEPS   # so the epoch's log steps are those of MAX_STEPS steps
    train_one_epoch(model, poisoned, loader, optimizer, scheduler, device, 1, args, Scalars(None, enabled=False),
                    0, show_progress=False, max_steps=MAX_STEPS)


def test_nonfinite_loss_named_by_its_step_and_caught_at_the_next_log_step(demo_data: Path) -> None:
    poisoned = Poisoned(bad=2)
    with pytest.raises(NonFiniteLossError, match=r"^non-finite training loss \(this process: nan\) at epoch 1, "
                                                 r"step 3; parts: \{.*'retrieval_loss'.*lower --matching_lr") as e:
        train(demo_data, poisoned)
    assert "\n" not in str(e.value)
    every = log_interval(MAX_STEPS, 4)
    assert every == 7 and poisoned.calls == every   # the epoch stopped at the first log step after step 3


def test_nonfinite_loss_in_the_last_steps_is_caught_before_the_epoch_ends(demo_data: Path) -> None:
    poisoned = Poisoned(bad=MAX_STEPS - 1)
    with pytest.raises(NonFiniteLossError, match=f"at epoch 1, step {MAX_STEPS};"):
        train(demo_data, poisoned)
    assert poisoned.calls == MAX_STEPS


def test_finite_losses_pass(demo_data: Path) -> None:
    poisoned = Poisoned(bad=-1)
    train(demo_data, poisoned)
    assert poisoned.calls == MAX_STEPS


def test_failure_after_a_nonfinite_loss_reports_the_loss(demo_data: Path) -> None:
    """NaN weights can make a later step fail (the Hungarian matcher refuses NaN costs, say): the
    user learns about the NaN loss at step 2, not about the matcher."""
    with pytest.raises(NonFiniteLossError, match=r"at epoch 1, step 2;"):
        train(demo_data, Poisoned(bad=1, fail=4))
    with pytest.raises(ValueError, match="invalid numeric entries"):   # without a NaN loss: the error itself
        train(demo_data, Poisoned(bad=-1, fail=4))
