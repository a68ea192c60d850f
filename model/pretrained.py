"""Locating and reading the third-party checkpoints used by the feature extractors (CLIP, AST).

Nothing is ever downloaded: the files must be placed by the user, and a missing file produces an error that
says which file, where to put it, and where it is published.
"""
from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
PRETRAINED_DIR = REPO_ROOT / "model" / "pretrained_models"


class MissingWeightsError(FileNotFoundError):
    """A required pretrained checkpoint is not on disk."""


def require_weights(path: str | os.PathLike, what: str, file_name: str, source: str) -> Path:
    """Return `path` as a Path if it is a file, else raise MissingWeightsError with instructions."""
    path = Path(path)
    if path.is_file():
        return path
    raise MissingWeightsError(
        f"{what} weights not found: {path}\n"
        f"  Put the file {file_name} in {PRETRAINED_DIR}/ (or pass its location explicitly).\n"
        f"  It is published at: {source}\n"
        f"  This project never downloads weights itself."
    )


def _is_torchscript_archive(path: Path) -> bool:
    """TorchScript archives are zip files with a constants.pkl record (torch.save archives have none)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(name.endswith("/constants.pkl") or name == "constants.pkl" for name in zf.namelist())


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint that is either a TorchScript archive or a torch.save'd (state) dict.

    TorchScript archives (OpenAI's ViT-B-32.pt) are loaded with torch.jit.load and their state_dict taken;
    plain files are loaded with weights_only=True (no arbitrary code from a weights file). A dict wrapped under
    "state_dict" or "model" is unwrapped. Non-tensor entries are dropped. Tensors are returned as stored
    (OpenAI's archive is fp16; callers cast to float32).
    """
    path = Path(path)
    try:
        if _is_torchscript_archive(path):
            with warnings.catch_warnings():  # TorchScript is deprecated, but it is the format OpenAI ships
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                state = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/partial downloads show up here with very different messages
        raise ValueError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
