"""Set-up shared by train.py and test.py: device, seeds, run folder, loaders, model and optimizer.

Kept out of train.py so that the training loop there reads top to bottom.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from utils.distributed import DistInfo, ShardSampler, ddp_wrap, has_unused_parameters
from utils.logger import get_logger


class RunDirError(ValueError):
    """The output folder holds a finished run (or is unusable) and --overwrite was not given."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} was asked for but CUDA is not available on this machine "
                         "(use --device cpu or auto)")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Fix initialisation, dropout and data order (data order also depends on the epoch)."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    # The original sets these; they make cuDNN choose deterministic kernels.
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def capture_rng() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def run_dir_for(args: Any, dist_info: DistInfo) -> Path:
    """<output_dir>/<train_data>/<MMDD>+<name>, as the original; --resume reuses the run's own folder.

    A folder that already holds checkpoints is never written into unless --resume or --overwrite
    says so, and nothing in it is ever deleted.
    """
    if args.resume:
        resume = Path(args.resume)
        run_dir = resume if resume.is_dir() else resume.parent
        if not run_dir.is_dir():
            raise RunDirError(f"--resume {args.resume}: no such run folder or checkpoint")
        return run_dir
    run_dir = Path(args.output_dir) / args.train_data / f"{time.strftime('%m%d')}+{args.name}"
    existing = sorted(p.name for p in run_dir.glob("pytorch_model.bin*")) if run_dir.is_dir() else []
    if existing and not args.overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run ({', '.join(existing[:4])}{'...' if len(existing) > 4 else ''}). "
            "Pass --resume " + str(run_dir) + " to continue it, --overwrite to train again into it "
            "(its checkpoints will be replaced), or choose another --name.")
    if dist_info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def describe_run(args: Any, device: torch.device, dist_info: DistInfo, run_dir: Path) -> str:
    lines = [f"run folder: {run_dir}", f"device: {device}"
             + (f" x {dist_info.world_size} processes" if dist_info.enabled else "")]
    lines += [f"  {k}: {v}" for k, v in sorted(vars(args).items())]
    return "\n".join(lines)


def _num_workers(args: Any) -> int:
    return max(0, min(int(args.num_workers), os.cpu_count() or 1))


def make_loader(dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int, dist_info: DistInfo,
                device: torch.device, args: Any):
    """A DataLoader over index batches; one code path for one process and for DDP.

    DistributedSampler with num_replicas=1 is a seeded, epoch-dependent shuffle, so data
    order is a function of (seed, epoch) alone: that is what makes resumed runs identical.
    """
    from utils.dataset import collate_fn
    sampler = DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                                 shuffle=shuffle, seed=seed, drop_last=False)
    workers = _num_workers(args)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, batch_size, drop_last=drop_last),
                        collate_fn=collate_fn, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0)
    return loader, sampler


def make_eval_loader(dataset, batch_size: int, dist_info: DistInfo, device: torch.device, args: Any):
    """Evaluation loader: the split in its own order; under torchrun each rank gets one contiguous
    shard of equal length (utils.distributed.ShardSampler), which utils/engine.collect gathers
    back into the whole split without the padding."""
    from utils.dataset import collate_fn
    sampler = ShardSampler(len(dataset), dist_info.rank, dist_info.world_size)
    workers = _num_workers(args)
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      collate_fn=collate_fn, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0)


def build_loaders(args: Any, dist_info: DistInfo, device: torch.device, need_train: bool):
    """(train_loader, val_loader, train_sampler) for train.py."""
    from utils.dataset import build_dataset
    log = get_logger()
    common = dict(frozen_feature_path=args.frozen_feature_path, stride=args.stride,
                  max_m_duration=args.max_m_duration, skip_bad_rows=args.skip_bad_rows,
                  use_packed=bool(args.use_packed))
    train_ds = build_dataset(args.train_csv, **common)
    per_rank_batch = args.batch_size_train // dist_info.world_size
    if per_rank_batch < 1 or per_rank_batch * dist_info.world_size != args.batch_size_train:
        raise ValueError(f"--batch_size_train {args.batch_size_train} must be a positive multiple of the "
                         f"number of processes ({dist_info.world_size})")
    if len(train_ds) // dist_info.world_size < per_rank_batch:
        raise ValueError(f"--batch_size_train {args.batch_size_train} is larger than the training set "
                         f"({len(train_ds)} rows in {args.train_csv}); with drop_last no step would run. "
                         "Lower --batch_size_train.")
    train_loader, train_sampler = make_loader(train_ds, per_rank_batch, True, True, args.seed, dist_info,
                                              device, args)
    val_loader = None
    if args.do_eval:
        val_ds = build_dataset(args.val_csv, **common)
        val_loader = make_eval_loader(val_ds, args.batch_size_val, dist_info, device, args)
        log.info(f"train: {len(train_ds)} rows, {len(train_loader)} steps/epoch; val: {len(val_ds)} rows")
    else:
        log.info(f"train: {len(train_ds)} rows, {len(train_loader)} steps/epoch")
    return train_loader, val_loader, train_sampler


def build_training(args: Any, device: torch.device, dist_info: DistInfo, steps_per_epoch: int):
    """Model, criterion, Adam over the original's three parameter groups, per-step schedule."""
    from model.made import build_criterion, build_model
    from utils.schedules import build_scheduler
    model = build_model(args).to(device)
    criterion = build_criterion(args).to(device)
    optimizer = torch.optim.Adam(model.param_groups(args))
    scheduler = build_scheduler(optimizer, args.scheduler, total_steps=steps_per_epoch * args.epochs,
                                warmup_rate=args.warmup_rate, decay_rate=args.decay_rate,
                                lr_update_rate=args.lr_update_rate)
    ddp_model = model
    if dist_info.enabled:
        # Retrieval negatives from the whole global batch (as on one GPU) unless --local_negatives 1.
        model.global_negatives = not getattr(args, "local_negatives", 0)
        # DDP copies rank 0's initial weights to every rank; gradients are averaged over ranks.
        ddp_model = ddp_wrap(model, device, dist_info.local_rank, has_unused_parameters(args))
        # Independent dropout masks per rank (the same seed everywhere would correlate them);
        # rank 0 keeps the one-process stream. Data order comes from the samplers' own seed.
        if dist_info.rank:
            torch.manual_seed(args.seed + dist_info.rank)
    if getattr(args, "compile", False):
        ddp_model = torch.compile(ddp_model)
    return model, criterion, optimizer, scheduler, ddp_model
