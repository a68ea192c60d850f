"""The training loop shared by train.py and scripts/benchmark.py: one update
(optimization_step), one epoch (train_one_epoch), and the running loss means it logs."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from tqdm import tqdm

from model.spans import foreground_index, spans_to_seconds, top_moment
from utils.evaluate import metrics as M
from utils.logger import Scalars, get_logger
from utils.train import distributed as D

TENSOR_KEYS = ("frame_feats", "frame_mask", "music_feats", "music_mask", "spans_target", "gt_moment")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/inf loss; the run stops and keeps its last good checkpoint."""


class NonFiniteWatch:
    """Notes on the device the first step of an epoch whose loss is not finite; the host looks at
    the note only at each log interval and at the end of the epoch (check).

    Looking every step (`bool(torch.isfinite(loss))`) is a host sync: the CPU stops queuing kernels
    until the GPU has caught up. A batch-512 bf16 step on an H200 is bound by kernel launches, and
    that one sync cost ~10 ms of its ~60 ms. The updates made after a bad step are never saved:
    checkpoints are written after the epoch, and the epoch's last step is a check."""

    def __init__(self, device: torch.device):
        self.first = torch.full((), -1, dtype=torch.long, device=device)   # first bad step, or -1
        self.keys: list[str] | None = None
        self.values: torch.Tensor | None = None                           # loss and parts at that step

    def update(self, step: int, loss: torch.Tensor, parts: dict) -> None:
        if self.keys is None:
            self.keys = [k for k, v in parts.items() if torch.is_tensor(v) and v.numel() == 1]
        values = torch.stack([loss.detach().float().reshape(())]
                             + [parts[k].detach().float().reshape(()) for k in self.keys])
        new = (self.first < 0) & ~torch.isfinite(values[0])
        self.first = torch.where(new, step, self.first)
        self.values = values if self.values is None else torch.where(new, values, self.values)

    def check(self, epoch: int, step: int, device: torch.device, collective: bool = True) -> None:
        """Raise NonFiniteLossError if a loss up to `step` (0-based) was not finite, in this process
        or (collective: every rank calls this at the same step) in any process."""
        first = int(self.first)   # the host sync, once per log interval
        if (D.all_true(first < 0, device) if collective else first < 0):
            return
        advice = "Check the input features for extreme values, or lower --matching_lr/--detection_lr."
        if first < 0:
            raise NonFiniteLossError(f"non-finite training loss in another process by epoch {epoch}, "
                                     f"step {step + 1}. {advice}")
        values = self.values.tolist()
        parts = dict(zip(self.keys, values[1:]))
        raise NonFiniteLossError(f"non-finite training loss (this process: {values[0]}) at epoch {epoch}, "
                                 f"step {first + 1}; parts: {parts}. {advice}")


def to_device(batch: dict, device: torch.device) -> dict:
    non_blocking = device.type == "cuda"
    return {k: (v.to(device, non_blocking=non_blocking) if torch.is_tensor(v) else v) for k, v in batch.items()}


def autocast_context(device: torch.device, amp: str):
    """--amp as an autocast context: bf16 or fp16 on CUDA, bf16 on the CPU (utils/device.check_amp
    refuses fp16 there); float32, the paper's setting, with --amp none."""
    if amp == "none" or device.type not in ("cuda", "cpu"):
        return nullcontext()
    if device.type == "cpu" and amp != "bf16":
        raise ValueError(f"--amp {amp} on the CPU: only bf16 autocasts there")
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@dataclass
class RunningMeans:
    """Sums of detached loss parts on the device; converted to floats once per log interval."""
    sums: dict = field(default_factory=dict)
    count: int = 0

    def update(self, parts: dict[str, torch.Tensor]) -> None:
        for k, v in parts.items():
            if torch.is_tensor(v):
                v = v.detach().float()
                self.sums[k] = self.sums[k] + v if k in self.sums else v.clone()
        self.count += 1

    def means(self) -> dict[str, float]:
        """Means over the updates; under torchrun over every rank's updates (a collective: all
        ranks call it at the same point, with the same keys)."""
        if not self.sums:
            return {}
        keys = list(self.sums)
        stacked = torch.stack([self.sums[k].reshape(()) for k in keys] + [self.sums[keys[0]].new_tensor(self.count)])
        values = D.all_reduce_sum(stacked).cpu().tolist()  # one host sync
        count = values.pop()
        return {k: v / max(1.0, count) for k, v in zip(keys, values)}


def grad_scaler(amp: str, device: torch.device) -> torch.amp.GradScaler | None:
    """Loss scaling for --amp fp16 on CUDA (bf16 and float32 need none)."""
    return torch.amp.GradScaler("cuda") if (amp == "fp16" and device.type == "cuda") else None


def optimization_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, max_grad_norm: float,
                      scaler: torch.amp.GradScaler | None = None) -> None:
    """backward, gradient clipping, optimizer step, zeroed gradients: one training update."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
    else:
        loss.backward()
    # The original clips each parameter group separately (temporal, matching, detection).
    for group in optimizer.param_groups:
        torch.nn.utils.clip_grad_norm_(group["params"], max_grad_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def log_interval(num_steps: int, num_display: int) -> int:
    """Steps between progress lines and TensorBoard points: about --num_display per epoch."""
    return max(1, math.ceil(num_steps / max(1, num_display)))


def train_one_epoch(model: torch.nn.Module, criterion: torch.nn.Module, loader: Iterable,
                    optimizer: torch.optim.Optimizer, scheduler, device: torch.device, epoch: int,
                    args: Any, scalars: Scalars, global_step: int, show_progress: bool = True,
                    max_steps: int | None = None) -> tuple[dict[str, float], int]:
    """One pass over the training loader; returns (epoch means incl. train mIoU, new global step)."""
    model.train()
    criterion.train()
    log = get_logger()
    fg = foreground_index(args)
    epoch_means, interval_means = RunningMeans(), RunningMeans()
    pred_se, gt_se, m_dur = [], [], []
    num_steps = len(loader) if max_steps is None else min(max_steps, len(loader))
    log_every = log_interval(num_steps, args.num_display)
    scaler = grad_scaler(args.amp, device)
    bar = tqdm(loader, total=num_steps, desc=f"train {epoch}", disable=not show_progress, leave=False,
               dynamic_ncols=True)
    watch = NonFiniteWatch(device)
    t0 = time.time()
    for step, batch in enumerate(bar):
        if step >= num_steps:
            break
        try:
            batch = to_device(batch, device)
            with autocast_context(device, args.amp):
                outputs = model(batch)
                loss, parts = criterion(outputs, batch)
            watch.update(step, loss, parts)
            optimization_step(loss, optimizer, args.max_grad_norm, scaler)
        except Exception:
            # After a non-finite loss, NaN weights can make later code fail (e.g. the Hungarian
            # matcher refuses NaN costs): report that cause instead. This process only: no collective here.
            try:
                watch.check(epoch, step, device, collective=False)
            except NonFiniteLossError as cause:
                raise cause from None
            except Exception:   # the device itself failed: the original error says more
                pass
            raise
        scheduler.step()
        global_step += 1

        parts = {"loss": loss, **parts}
        epoch_means.update(parts)
        interval_means.update(parts)
        with torch.no_grad():
            span, _ = top_moment(outputs["detection"], fg)
            pred_se.append(spans_to_seconds(span, args.max_m_duration).detach())
            gt_se.append(batch["gt_moment"][:, 0].detach())
            m_dur.append(batch["m_duration"].detach() if torch.is_tensor(batch["m_duration"])
                         else torch.as_tensor(batch["m_duration"]))
        if (step + 1) % log_every == 0 or step + 1 == num_steps:
            # Every rank checks at the same steps (one raising while the others wait in backward would hang).
            watch.check(epoch, step, device)
            means = interval_means.means()
            interval_means = RunningMeans()
            lr = optimizer.param_groups[0]["lr"]
            for key in ("loss", "retrieval_loss", "localization_loss", "loss_span", "loss_giou",
                        "loss_label", "class_error", "loss_contrastive_align"):
                if key in means:
                    scalars.add(f"train/{key}", means[key], global_step)
            scalars.add("train/lr", lr, global_step)
            rate = (step + 1) * _batch_size(batch) * D.get_world_size() / max(1e-9, time.time() - t0)
            log.info(f"epoch {epoch} step {step + 1}/{num_steps} loss {means.get('loss', float('nan')):.4f} "
                     f"ret {means.get('retrieval_loss', float('nan')):.4f} "
                     f"loc {means.get('localization_loss', float('nan')):.4f} lr {lr:.2e} {rate:.1f} samples/s")
    bar.close()
    results = epoch_means.means()
    if pred_se:
        pred = torch.cat(pred_se).cpu().double().numpy()
        gt = torch.cat(gt_se).cpu().double().numpy()
        dur = torch.cat([d.reshape(-1) for d in m_dur]).cpu().double().numpy()
        ious = M.moment_iou(M.clip_moments(pred, dur, args.max_m_duration), gt)
        if D.is_dist():  # train mIoU over every rank's videos
            ious = D.all_gather_varlen(torch.from_numpy(ious).to(device)).cpu().numpy()
        results.update({f"train_{k}": v for k, v in M.smg_metrics(ious).items()})
    return results, global_step


def _batch_size(batch: dict) -> int:
    return int(batch["frame_feats"].shape[0])
