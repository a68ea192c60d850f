"""A checkpoint made ready for grounding: the model in eval mode, its flags and a fingerprint of
its weights (an index records the fingerprint, so it is never used with other weights)."""
from __future__ import annotations

import argparse
import hashlib
import os
from dataclasses import dataclass

import torch

from utils.device import resolve_device
from utils.train.checkpoint import adopt_checkpoint_config, load_checkpoint, load_model_weights, unwrap


class GroundingError(ValueError):
    """Unusable input to the grounding tools: bad feature file, missing id, mismatched index."""


@dataclass
class GroundingModel:
    """A MaDe in eval mode with the configuration it was trained with and a weights fingerprint."""

    model: torch.nn.Module
    args: argparse.Namespace
    checkpoint: str
    fingerprint: str
    device: torch.device

    @property
    def num_frames(self) -> int:
        return int(self.args.max_v_frames)

    @property
    def max_m_duration(self) -> float:
        return float(self.args.max_m_duration)

    @property
    def stride(self) -> float:
        return float(self.args.stride)


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over the state dict (names, dtypes, shapes, bytes), in name order.

    Hashing the weights rather than the file means a checkpoint re-saved with other
    metadata (e.g. `.last` with a newer resume state), or the authors' layout converted
    to ours, keeps its fingerprint, while any change of a weight changes it.
    """
    h = hashlib.sha256()
    for name, t in sorted(unwrap(model).state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_model(checkpoint: str | os.PathLike, device: str | torch.device = "auto") -> GroundingModel:
    """Build MaDe with the checkpoint's own settings (as test.py does) and load its weights."""
    from model.made import build_model
    from utils.train.options import parse_args
    state = load_checkpoint(checkpoint)
    args = parse_args([], mode="test")
    adopt_checkpoint_config(args, state)
    cfg = state.get("config") or {}
    # The frame slots are a data setting (not in MODEL_KEYS) that the video input needs too.
    if "max_v_frames" in cfg:
        args.max_v_frames = int(cfg["max_v_frames"])
    dev = resolve_device(device)
    model = build_model(args)
    load_model_weights(model, state, checkpoint)
    model = model.to(dev).eval()
    return GroundingModel(model=model, args=args, checkpoint=str(checkpoint),
                          fingerprint=weights_fingerprint(model), device=dev)
