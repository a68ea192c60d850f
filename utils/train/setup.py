"""Set-up shared by train.py and test.py: device and processes, seeds, loaders, model and optimizer.

Kept out of train.py so that the training loop there reads top to bottom. The checks that
need no torch (run folder, CSVs, batch size, resumed settings) are in utils/train/preflight.py.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

from utils.allocator import keep_freed_memory
from utils.device import check_amp, resolve_device
from utils.logger import get_logger
from utils.train.distributed import (DistInfo, ShardSampler, ddp_wrap, gather_with_grad, has_unused_parameters,
                                     init_distributed)

from utils.train.preflight import check_batch_size, load_split


def setup_process(args: Any) -> tuple[torch.device, DistInfo]:
    """The start of train.py and test.py: glibc told to keep freed memory (utils/allocator.py), --device
    resolved and --amp checked against it (utils/device.py), and the process group joined when torchrun
    launched this process (each rank then on its own GPU). Seeds are fixed where the randomness
    starts: build_run for training, test.py before its evaluation."""
    keep_freed_memory()  # fewer page faults, same results (utils/allocator.py)
    device = resolve_device(args.device)
    note = check_amp(args.amp, device, bool(getattr(args, "compile", False)))
    if note is not None:
        get_logger().warning(note)
    dist_info = init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    return device, dist_info


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
    """Every RNG state, as values a weights-only torch.load rebuilds: numpy's key array is stored
    as a list of ints (np.random.set_state takes either), so a checkpoint needs no numpy globals."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (kind, keys.tolist(), int(pos), int(has_gauss), float(cached))
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def describe_run(args: Any, device: torch.device, dist_info: DistInfo, run_dir: Path) -> str:
    lines = [f"run folder: {run_dir}", f"device: {device}"
             + (f" x {dist_info.world_size} processes" if dist_info.enabled else "")]
    lines += [f"  {k}: {v}" for k, v in sorted(vars(args).items())]
    return "\n".join(lines)


def loader_workers(args: Any, dataset=None, device: torch.device | None = None) -> int:
    """DataLoader worker processes: --num_workers capped at the CPU count, and fewer for the packed store.

    A packed batch is one memory-mapped gather (~15 ms for 64 rows); a worker adds a copy into
    shared memory and competes with the training threads for the cores. Measured on 2 CPU
    cores, one pass at batch 64: 4,400 samples/s in-process vs 900 with 2 workers (per-id
    files: 85 vs 340). So with the packed store the CPU loads in-process and CUDA keeps at
    most 2 workers (enough to overlap the gather with the GPU step); per-id files keep every
    worker they are given.
    """
    workers = max(0, min(int(args.num_workers), os.cpu_count() or 1))
    if getattr(getattr(dataset, "store", None), "is_packed", False):
        workers = 0 if device is None or device.type == "cpu" else min(workers, 2)
    return workers


def _loader_generator(seed: int) -> torch.Generator:
    """A DataLoader's own generator. Without one, every new loader iterator draws its workers'
    base seed from the GLOBAL torch RNG, which also drives dropout; with persistent workers
    that draw happens only in a process's first epoch, so a resumed process would draw once
    more than the uninterrupted run and continue with other dropout masks."""
    return torch.Generator().manual_seed(seed)


def make_sampler(dataset, shuffle: bool, seed: int, dist_info: DistInfo) -> DistributedSampler:
    """The training order: DistributedSampler with num_replicas=1 is a seeded, epoch-dependent
    shuffle; under torchrun each rank takes every world_size-th index of the same permutation."""
    return DistributedSampler(dataset, num_replicas=dist_info.world_size, rank=dist_info.rank,
                              shuffle=shuffle, seed=seed, drop_last=False)


def make_loader(dataset, batch_size: int, shuffle: bool, drop_last: bool, seed: int, dist_info: DistInfo,
                device: torch.device, args: Any):
    """A DataLoader over index batches; one code path for one process and for DDP.

    DistributedSampler with num_replicas=1 is a seeded, epoch-dependent shuffle, so data
    order is a function of (seed, epoch) alone: that is what makes resumed runs identical.
    """
    from utils.data.dataset import collate_fn
    sampler = make_sampler(dataset, shuffle, seed, dist_info)
    workers = loader_workers(args, dataset, device)
    loader = DataLoader(dataset, batch_sampler=BatchSampler(sampler, batch_size, drop_last=drop_last),
                        collate_fn=collate_fn, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, generator=_loader_generator(seed))
    return loader, sampler


def make_train_loader(dataset, batch_size: int, dist_info: DistInfo, device: torch.device, args: Any):
    """(loader, sampler) of the training split: make_loader's DataLoader, or with --feature_device
    the same batches gathered from features held on a device (utils/data/resident.py)."""
    from utils.data.resident import ResidentFeatures, ResidentLoader, choose_feature_device
    feature_device = choose_feature_device(args.feature_device, dataset, device)
    if feature_device is None:
        return make_loader(dataset, batch_size, True, True, args.seed, dist_info, device, args)
    sampler = make_sampler(dataset, True, args.seed, dist_info)
    features = ResidentFeatures(dataset, feature_device)
    get_logger().info(f"training features resident on {feature_device}: {features.nbytes / 2**30:.2f} GiB "
                      f"(--feature_device {args.feature_device})")
    return ResidentLoader(features, sampler, batch_size, drop_last=True), sampler


def make_eval_loader(dataset, batch_size: int, dist_info: DistInfo, device: torch.device, args: Any):
    """Evaluation loader: the split in its own order; under torchrun each rank gets one contiguous
    shard of equal length (utils.train.distributed.ShardSampler), which utils/evaluate/engine.collect gathers
    back into the whole split without the padding."""
    from utils.data.dataset import collate_fn
    sampler = ShardSampler(len(dataset), dist_info.rank, dist_info.world_size)
    workers = loader_workers(args, dataset, device)
    return DataLoader(dataset, batch_sampler=BatchSampler(sampler, batch_size, drop_last=False),
                      collate_fn=collate_fn, num_workers=workers, pin_memory=device.type == "cuda",
                      persistent_workers=workers > 0, generator=_loader_generator(args.seed))


def build_datasets(args: Any, frames: list) -> list:
    """MGSVDatasets for validated annotation DataFrames (utils.train.preflight.load_split), sharing
    one feature store (one music cache, one set of packed arrays). Every id's files must
    exist; the first few are loaded and checked (utils.data.features explains the policy)."""
    from utils.data.dataset import MGSVDataset
    from utils.data.store import FeatureStore
    store = FeatureStore(args.frozen_feature_path, stride=args.stride, max_m_duration=args.max_m_duration,
                         num_frames=args.max_v_frames, use_packed=bool(args.use_packed))
    datasets = []
    for df in frames:
        store.check(df["video_id"], df["music_id"])
        datasets.append(MGSVDataset(df, store, max_m_duration=args.max_m_duration))
    return datasets


def build_loaders(args: Any, dist_info: DistInfo, device: torch.device, need_train: bool = True,
                  train_df=None, val_df=None):
    """(train_loader, val_loader or None, train_sampler) for train.py.

    train_df/val_df: the splits' annotations when the caller already loaded them
    (utils.train.preflight.load_split); read from --train_csv/--val_csv otherwise.
    """
    log = get_logger()
    if train_df is None:
        train_df = load_split(args.train_csv, args)
    if val_df is None and args.do_eval:
        val_df = load_split(args.val_csv, args)
    datasets = build_datasets(args, [train_df] + ([val_df] if val_df is not None else []))
    train_ds = datasets[0]
    per_rank_batch = check_batch_size(len(train_ds), args.batch_size_train, dist_info.world_size, args.train_csv)
    train_loader, train_sampler = make_train_loader(train_ds, per_rank_batch, dist_info, device, args)
    val_loader = None
    if val_df is not None:
        val_ds = datasets[1]
        val_loader = make_eval_loader(val_ds, args.batch_size_val, dist_info, device, args)
        log.info(f"train: {len(train_ds)} rows, {len(train_loader)} steps/epoch; val: {len(val_ds)} rows")
    else:
        log.info(f"train: {len(train_ds)} rows, {len(train_loader)} steps/epoch")
    return train_loader, val_loader, train_sampler


def build_training(args: Any, device: torch.device, dist_info: DistInfo, steps_per_epoch: int,
                   compile_model: bool | None = None):
    """Model, criterion, Adam over the original's three parameter groups, per-step schedule.

    compile_model: torch.compile the model (None: --compile). train.plan passes False: compiling is lazy
    and changes no setting, but it switches model/fast_ops to the padded layout process-wide."""
    from model.made import build_criterion, build_model
    from utils.train.schedules import build_scheduler
    model = build_model(args).to(device)
    criterion = build_criterion(args).to(device)
    # fused: one kernel per step instead of ~10 ops per parameter tensor (same update to float
    # rounding; 70 -> 19 ms per step on the CPU for MaDe's 200 tensors).
    optimizer = torch.optim.Adam(model.param_groups(args), fused=device.type in ("cpu", "cuda"))
    scheduler = build_scheduler(optimizer, args.scheduler, total_steps=steps_per_epoch * args.epochs,
                                warmup_rate=args.warmup_rate, decay_rate=args.decay_rate,
                                lr_update_rate=args.lr_update_rate)
    ddp_model = model
    if dist_info.enabled:
        # Retrieval negatives from the whole global batch (as on one GPU) unless --local_negatives 1.
        if not args.local_negatives:
            model.gather_negatives, model.negatives_rank = gather_with_grad, dist_info.rank
            criterion.retrieval.gather = gather_with_grad
        # DDP copies rank 0's initial weights to every rank; gradients are averaged over ranks.
        ddp_model = ddp_wrap(model, device, dist_info.local_rank, has_unused_parameters(args))
        # Independent dropout masks per rank (the same seed everywhere would correlate them);
        # rank 0 keeps the one-process stream. Data order comes from the samplers' own seed.
        if dist_info.rank:
            torch.manual_seed(args.seed + dist_info.rank)
    if args.compile if compile_model is None else compile_model:
        # Token packing (model/fast_ops.py, CPU) gives every batch new shapes and a host sync;
        # a compiled graph wants static shapes, so the compiled model runs the padded layout.
        from model import fast_ops
        fast_ops.PACK_TOKENS = "never"
        ddp_model = torch.compile(ddp_model)
    return model, criterion, optimizer, scheduler, ddp_model


@dataclass
class TrainingRun:
    """Everything train.py's epoch loop uses, as build_run makes it."""
    train_loader: Any
    val_loader: Any
    train_sampler: Any
    model: torch.nn.Module
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    ddp_model: torch.nn.Module


def build_run(args: Any, device: torch.device, dist_info: DistInfo, train_df, val_df,
              compile_model: bool | None = None) -> TrainingRun:
    """Seed, then the loaders (build_loaders) and the model, losses, optimiser and schedule (build_training):
    train.py's set-up, shared with train.plan."""
    seed_everything(args.seed)
    train_loader, val_loader, train_sampler = build_loaders(args, dist_info, device, train_df=train_df, val_df=val_df)
    model, criterion, optimizer, scheduler, ddp_model = build_training(
        args, device, dist_info, steps_per_epoch=len(train_loader), compile_model=compile_model)
    return TrainingRun(train_loader, val_loader, train_sampler, model, criterion, optimizer, scheduler, ddp_model)
