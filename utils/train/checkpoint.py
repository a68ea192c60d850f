"""Checkpoints: what is saved, how it is written, how it is read back.

File names follow the original (`pytorch_model.bin.best_r1`, `.best_iou`,
`.best_r1iou05`, `.best_r1iou07`) plus `pytorch_model.bin.last`, which also
carries everything needed to resume (optimizer, scheduler, RNG states, best
trackers). Only the MaDe weights are stored (no frozen CLIP/AST encoders) and
the configuration travels inside the file, so a checkpoint explains itself.

Files are written atomically (utils/io.py): a crash mid-write leaves the
previous checkpoint intact under the final name.

Reading never runs code from the file: torch.load(weights_only=True) rebuilds only
tensors and plain Python values. Our resume state also holds numpy's RNG state; files
written before it was stored as plain lists carry it as a numpy array, so exactly the
numpy globals that rebuild an array or a scalar are allowed as well (NUMPY_SAFE_NAMES).
A file that needs any other global is refused (CheckpointError), whatever it contains.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from utils.io import UnsafeFileError, atomic_torch_save, describe_load_failure, torch_load_plain

FORMAT = "mgsv-made/1"
BEST_NAMES = {
    "R1": "pytorch_model.bin.best_r1",
    "mIoU": "pytorch_model.bin.best_iou",
    "R1_iou0.5": "pytorch_model.bin.best_r1iou05",
    "R1_iou0.7": "pytorch_model.bin.best_r1iou07",
}
LAST_NAME = "pytorch_model.bin.last"
# The order in which `test.py --test_best 1` evaluates them (the original's order).
TEST_BEST_ORDER = ("pytorch_model.bin.best_r1iou07", "pytorch_model.bin.best_r1iou05",
                   "pytorch_model.bin.best_r1", "pytorch_model.bin.best_iou")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: truncated, foreign, or from another configuration."""


def jsonable_config(args: Any) -> dict:
    cfg = vars(args) if not isinstance(args, dict) else args
    out = {}
    for k, v in cfg.items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(isinstance(x, (str, int, float, bool)) for x in v):
            out[k] = list(v)
        else:
            out[k] = str(v)
    return out


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare MaDe behind DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(path: str | os.PathLike, model: torch.nn.Module, args: Any, epoch: int,
                    metrics: dict | None = None, loss: float | None = None,
                    resume_state: dict | None = None) -> None:
    state = {
        "format": FORMAT,
        "epoch": int(epoch),
        "loss": None if loss is None else float(loss),
        "metrics": dict(metrics or {}),
        "config": jsonable_config(args),
        "model_state_dict": {k: v.detach().cpu() for k, v in unwrap(model).state_dict().items()},
        # The authors' files carry the string "None" here; kept for tools that read it.
        "optimizer_state_dict": "None",
    }
    if resume_state is not None:
        state["resume"] = resume_state
    atomic_torch_save(state, path)


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read a checkpoint file (ours or the authors') with a clear error when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): the write was interrupted; "
                              "use another checkpoint of the run (e.g. a .best_* file).")
    state = _safe_load(path)
    if isinstance(state, dict) and "model_state_dict" in state and isinstance(state["model_state_dict"], dict):
        _check_finite_weights(path, state["model_state_dict"])
        return state
    if isinstance(state, dict) and state and all(torch.is_tensor(v) for v in state.values()):
        _check_finite_weights(path, state)
        return {"format": "bare-state-dict", "model_state_dict": state, "epoch": None, "config": {}}
    raise CheckpointError(f"{path} is not a MaDe checkpoint: expected a dict with 'model_state_dict' "
                          f"(found {type(state).__name__}"
                          f"{' with keys ' + ', '.join(map(str, list(state)[:8])) if isinstance(state, dict) else ''}).")


# Module paths under which numpy pickles an ndarray (np.random.get_state()'s key array) and a
# scalar (np.float64 in a metric): numpy 1.x wrote numpy.core, numpy 2.x writes numpy._core.
NUMPY_SAFE_NAMES = ("numpy.core.multiarray._reconstruct", "numpy._core.multiarray._reconstruct",
                    "numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")


def _numpy_safe_globals() -> list:
    """(object, pickled name) pairs of the numpy globals a checkpoint may reference (see module doc)."""
    import numpy as np
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed: list = [np.ndarray, np.dtype]
    # numpy >= 1.25 rebuilds a dtype as an instance of its own class (numpy.dtypes.Float64DType, ...):
    # those of the values our checkpoints held (RNG keys uint32, metrics float64/float32, counters).
    allowed += [type(np.dtype(code)) for code in ("u4", "f8", "f4", "i8", "i4", "?")
                if type(np.dtype(code)) is not np.dtype]
    for name in NUMPY_SAFE_NAMES:
        allowed.append((getattr(multiarray, name.rsplit(".", 1)[1]), name))
    return allowed


def _safe_load(path: Path) -> Any:
    """Tensors and plain values only (utils.io.torch_load_plain); one-line CheckpointError otherwise."""
    try:
        return torch_load_plain(path, allowed=_numpy_safe_globals())
    except UnsafeFileError as e:
        raise CheckpointError(
            f"checkpoint {e}. Checkpoints written by train.py and the authors' files hold only tensors and "
            "plain values: use one of those, or re-save just the tensors of a file you trust.") from None
    except Exception as e:  # truncated zip, text file, ...: all mean "unusable file"
        raise CheckpointError(
            f"cannot read checkpoint {path} ({describe_load_failure(e)}): the file is truncated (an "
            "interrupted download or copy?) or is not a PyTorch checkpoint. Use another checkpoint of the run "
            "or copy it again.") from None


def _check_finite_weights(path: Path, weights: dict) -> None:
    """A checkpoint of a diverged run evaluates to NaN scores; say so instead."""
    bad = [k for k, v in weights.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        shown = ", ".join(map(str, bad[:3])) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise CheckpointError(f"checkpoint {path}: weights hold NaN/inf values ({shown}): the run had diverged "
                              "when it was saved. Use a checkpoint of an earlier epoch (e.g. a .best_* file).")


RESUME_KEYS = ("optimizer", "scheduler", "global_step", "bests", "best_epochs", "history", "rng")


def resume_checkpoint_path(resume: str | os.PathLike) -> Path:
    """The checkpoint `--resume` means: a run folder's pytorch_model.bin.last, or a file."""
    path = Path(resume)
    if path.is_dir():
        last = path / LAST_NAME
        if not last.is_file():
            raise CheckpointError(
                f"--resume {path}: no {LAST_NAME} in this folder. It is written at the end of every epoch, "
                "so the run stopped before finishing its first epoch (nothing to resume: start it again "
                "without --resume, adding --overwrite if the folder holds other run files).")
        return last
    if not path.is_file():
        raise CheckpointError(f"--resume {path}: no such run folder or checkpoint file.")
    return path


def load_resume_checkpoint(path: str | os.PathLike) -> dict:
    """A checkpoint with everything needed to continue training (written by train.py as .last)."""
    state = load_checkpoint(path)
    resume = state.get("resume")
    if not isinstance(resume, dict):
        raise CheckpointError(f"{path} holds no resume state: only the {LAST_NAME} files written by train.py "
                              f"do (best_* checkpoints and the authors' files hold weights only).")
    missing = [k for k in RESUME_KEYS if k not in resume]
    if missing or not isinstance(state.get("config"), dict) or not isinstance(state.get("epoch"), int):
        raise CheckpointError(f"{path}: incomplete resume state (missing {missing or 'config/epoch'}); "
                              "was it written by another version of train.py?")
    return state


def load_model_weights(model: torch.nn.Module, state: dict, path: str | os.PathLike = "<checkpoint>") -> None:
    """Load ours or the authors' layout into `model`; mismatches raise CheckpointError listing them."""
    from model.checkpoint_compat import load_state_dict_any
    try:
        load_state_dict_any(unwrap(model), state["model_state_dict"])
    except (ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this model configuration:\n{e}") from None


def adopt_checkpoint_config(args: Any, state: dict) -> list[str]:
    """Take the model-defining settings (MODEL_KEYS) from the checkpoint, so a checkpoint evaluates as it was
    trained. `args` comes from utils.train.options.parse_args.

    A setting an older checkpoint of ours lacks (its flag was added later) takes the parser's default,
    which is the behaviour from before that flag; this is the one place that fills it in. The authors'
    checkpoints carry no configuration: the command line (paper defaults) applies.
    Shared by test.py and utils/ground/grounding.py (the inference tools), so both build the same model.
    Returns one "key=value (command line: ...)" string per setting that changed.
    """
    # Local import: reading a checkpoint should not need the parser.
    from utils.train.options import MODEL_KEYS, parser_defaults
    cfg = state.get("config") or {}
    if not cfg:
        return []
    defaults = parser_defaults(args.mode)
    changed = []
    for key in MODEL_KEYS:
        value = cfg.get(key, defaults[key])
        if getattr(args, key) != value:
            origin = "" if key in cfg else ", not in the checkpoint: the default"
            changed.append(f"{key}={value!r} (command line: {getattr(args, key)!r}{origin})")
            setattr(args, key, value)
    return changed
