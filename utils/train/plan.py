"""What a run will do, as plain values, read off the objects the run itself builds.

train.plan and test.plan build a run's model, losses, optimiser, schedule and loaders with the
same functions as train.py's and test.py's main, and describe them with these helpers instead
of training or evaluating: a model's configuration and initial weights, every setting of the
losses, each optimiser group's hyper-parameters and parameter names, the learning rate at
every step, and each loader's rows, batches, workers, feature store and first batch.
tests/test_flags.py compares the plans of two command lines to check what each flag reaches.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch

PLAIN = (str, int, float, bool, type(None))


def digest(values: Any) -> str:
    """A short hash of a list of strings or of tensors (by name, shape, dtype and bytes)."""
    h = hashlib.sha256()
    if isinstance(values, dict):
        for name, t in sorted(values.items()):
            t = t.detach().cpu().contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    else:
        for v in values:
            h.update(f"{v}\n".encode())
    return h.hexdigest()[:16]


def model_plan(model: torch.nn.Module) -> dict:
    """The MaDeConfig, the initial weights' hash (the seed decides them) and the trainable parameter count."""
    return {"config": dataclasses.asdict(model.cfg), "initial_weights": digest(model.state_dict()),
            "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def _plain(value: Any) -> Any:
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, dict) and all(isinstance(v, PLAIN) for v in value.values()):
        return dict(value)
    if torch.is_tensor(value):
        return value.tolist()
    return None


def criterion_plan(criterion: torch.nn.Module) -> dict:
    """Every module of the criterion: its class and its plain settings (weights, labels, costs, buffers)."""
    out = {}
    for name, module in criterion.named_modules():
        settings = {k: _plain(v) for k, v in vars(module).items() if not k.startswith("_") and k != "training"}
        settings.update({f"buffer:{k}": v.tolist() for k, v in module.named_buffers(recurse=False)})
        out[name or "criterion"] = {"class": type(module).__name__,
                                    **{k: v for k, v in settings.items() if v is not None}}
    return out


def optimizer_plan(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[dict]:
    """Per parameter group: its hyper-parameters (the learning rate before the schedule) and its parameters' names."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in group.items()
                    if k not in ("params", "lr") and isinstance(v, (*PLAIN, tuple))}
        groups.append({**settings, "params": [names[id(p)] for p in group["params"]]})
    return groups


def schedule_plan(scheduler: torch.optim.lr_scheduler.LambdaLR, steps_per_epoch: int, epochs: int) -> dict:
    """Each group's learning rate at every optimiser step of the run (the scheduler is stepped once per step)."""
    total = steps_per_epoch * epochs
    return {"steps_per_epoch": steps_per_epoch, "total_steps": total,
            "lr": [[base * fn(step) for step in range(total)]
                   for base, fn in zip(scheduler.base_lrs, scheduler.lr_lambdas)]}


def loader_plan(loader: Any, first_epoch: int | None = None) -> dict:
    """Rows, batching, workers and feature store of a DataLoader or ResidentLoader; with first_epoch,
    the video ids of that epoch's first batch (the data order)."""
    dataset = loader.dataset
    batches = loader.batch_sampler
    store = dataset.store
    out = {
        "loader": type(loader).__name__,
        "features_on": str(loader.features.device) if hasattr(loader, "features") else None,
        "rows": len(dataset), "ids": digest([*dataset.video_ids, *dataset.music_ids]),
        "max_m_duration": dataset.max_m_duration,
        "batch_size": batches.batch_size, "drop_last": batches.drop_last, "batches": len(loader),
        "workers": getattr(loader, "num_workers", 0),
        "store": {"root": str(store.root), "stride": store.stride, "num_frames": store.num_frames,
                  "num_snippets": store.num_snippets, "backends": store.backends},
    }
    if first_epoch is not None:
        batches.sampler.set_epoch(first_epoch)
        out["first_batch"] = [dataset.video_ids[i] for i in next(iter(batches))]
    return out
