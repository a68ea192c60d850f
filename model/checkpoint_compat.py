"""State dicts in the authors' key layout (their whole Uni_model, model/model_Uni.py) <-> ours.

Our modules reuse the authors' submodule structure, so conversion is a handful of prefix
renames plus:
  * authors -> ours: drop the frozen CLIP/AST weights (ast_model.*, vit_model.*), strip a
    DDP "module." prefix, check and drop the sinusoid tables (*.pe) and the criterion's
    class-weight buffer (criterion.empty_weight), which our model re-creates itself;
  * ours -> authors: add those two kinds of buffers back (the frozen encoders cannot be).
Round trips are lossless for every trainable tensor.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .position import sinusoid_table

# (our prefix, the authors' prefix); every other key is identical in both layouts.
PREFIXES = (
    ("video_encoder.proj.", "vit_proj."),
    ("video_encoder.transformer.", "video_transformer."),
    ("music_encoder.proj.", "ast_proj."),
    ("music_encoder.transformer.", "audio_transformer."),
    ("xpool.", "video_guided_to_music_pooling_cross_transformer."),
    ("transformer.", "detr_transformer."),
)
FROZEN_PREFIXES = ("ast_model.", "vit_model.")
PE_KEYS = {"video_position_embedding.pe": "video_encoder", "audio_position_embedding.pe": "music_encoder"}
EMPTY_WEIGHT_KEY = "criterion.empty_weight"
_AUTHORS_ONLY = tuple(a for _, a in PREFIXES) + FROZEN_PREFIXES + tuple(PE_KEYS) + (EMPTY_WEIGHT_KEY,)


class CheckpointMismatchError(ValueError):
    """A state dict that does not fit the model: lists missing/unexpected keys and shape mismatches."""


def _rename(key: str, src: int, dst: int) -> str:
    for pair in PREFIXES:
        if key.startswith(pair[src]):
            return pair[dst] + key[len(pair[src]):]
    return key


def strip_module_prefix(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Remove a DataParallel/DDP "module." (or torch.compile "_orig_mod.") prefix from every key."""
    for prefix in ("module.", "_orig_mod."):
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def is_authors_layout(state_dict: dict[str, Tensor]) -> bool:
    return any(k.startswith(_AUTHORS_ONLY) for k in strip_module_prefix(state_dict))


def to_authors_layout(state_dict: dict[str, Tensor], video_pe_len: int = 250, music_pe_len: int = 300,
                      eos_coef: float = 0.1, foreground_label: int = 0) -> dict[str, Tensor]:
    """Our state dict -> the authors' key layout (without their frozen CLIP/AST weights)."""
    state_dict = strip_module_prefix(state_dict)
    out = {_rename(k, 0, 1): v for k, v in state_dict.items()}
    for key, encoder in PE_KEYS.items():
        proj = state_dict.get(f"{encoder}.proj.weight")
        if proj is not None and any(k.startswith(f"{encoder}.transformer.") for k in state_dict):
            length = video_pe_len if encoder == "video_encoder" else music_pe_len
            out[key] = sinusoid_table(length, proj.shape[0])[None].to(proj.dtype)
    weight = torch.ones(2)
    weight[1 - foreground_label] = eos_coef
    out[EMPTY_WEIGHT_KEY] = weight
    return out


def from_authors_layout(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """The authors' state dict -> ours: frozen encoders and re-created buffers dropped."""
    out = {}
    for key, value in strip_module_prefix(state_dict).items():
        if key.startswith(FROZEN_PREFIXES) or key == EMPTY_WEIGHT_KEY:
            continue
        if key in PE_KEYS:
            _check_sinusoid(key, value)
            continue
        out[_rename(key, 1, 0)] = value
    return out


def _check_sinusoid(key: str, value: Tensor) -> None:
    """The tables are re-computed here; refuse silently different ones."""
    table = value.detach().float().reshape(-1, value.shape[-1]).cpu()
    expected = sinusoid_table(table.shape[0], table.shape[1])
    if (table - expected).abs().max() > 1e-4:
        raise CheckpointMismatchError(f"{key}: the checkpoint's positional table differs from the sinusoid "
                                      "table this model uses (PE[p,2i]=sin(p/10000^(2i/d)), PE[p,2i+1]=cos)")


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Raise CheckpointMismatchError listing missing keys, unexpected keys and shape mismatches."""
    expected = model.state_dict()
    # Model order (inputs first) reads better than alphabetical order.
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{k}: checkpoint {list(state_dict[k].shape)} vs model {list(v.shape)}"
              for k, v in expected.items() if k in state_dict and state_dict[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {_listing(shapes, 8)}")
    if problems:
        raise CheckpointMismatchError(
            "the checkpoint was made for another model configuration (keys in this model's naming):\n  "
            + "\n  ".join(problems))


def load_state_dict_any(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Load ours or the authors' layout (detected from the keys) into `model`, strictly."""
    state_dict = strip_module_prefix(dict(state_dict))
    if is_authors_layout(state_dict):
        state_dict = from_authors_layout(state_dict)
    check_state_dict(model, state_dict)
    model.load_state_dict(state_dict, strict=True)
