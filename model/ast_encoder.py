"""Audio Spectrogram Transformer (AST, AudioSet mAP 0.4593 checkpoint) built with timm.

AST (Gong et al., 2021) is a DeiT-base-distilled-384 backbone whose patch embedding reads a 1-channel
128-mel x 1024-frame fbank with 16x16 patches at stride 10 in both axes (overlapping patches): 12 x 101 = 1212
patches, plus the class and distillation tokens -> a learned position embedding of [1, 1214, 768]. The authors
use the mean of the two special tokens after the final LayerNorm (before AST's ``mlp_head``) as the 768-d
window embedding (their model/ast_models.py).

timm's ``deit_base_distilled_patch16_384`` provides the network; the only change is the strided patch
embedding, supplied through timm's ``embed_layer`` hook so the position embedding gets its 1214 rows from
timm itself. The checkpoint is the public AST repository's ``audioset_0.4593.pth``: a DataParallel state dict
with keys ``module.v.*`` (the timm-0.4 DeiT, same names as timm today) and ``module.mlp_head.*`` (the
AudioSet classifier, not needed for features). Depth and width are read from the tensor shapes, so small test
checkpoints go through the same code path.
"""
from __future__ import annotations

import os
import re
from functools import partial

import timm
import torch
from timm.layers import PatchEmbed
from torch import nn

from model.pretrained import PRETRAINED_DIR, read_state_dict, require_weights

AST_FILE_NAME = "audioset_0.4593.pth"
DEFAULT_AST_WEIGHTS = PRETRAINED_DIR / AST_FILE_NAME
AST_SOURCE = ("YuanGongND/ast repository, README 'Pretrained Models', item 1 'Full AudioSet, 10 tstride, "
              "10 fstride, with Weight Averaging (0.459 mAP)': https://www.dropbox.com/s/ca0b1v2nlxzyeb4/"
              "audioset_10_10_0.4593.pth?dl=1 (save it as audioset_0.4593.pth)")
AST_STRIDE = 10
# The network's input: a 128-mel fbank of 1024 frames (10.24 s at 10 ms), as utils/extract/fbank.py makes it.
NUM_MEL_BINS = 128
AST_TARGET_LENGTH = 1024
_HEAD_DIM = 64  # DeiT-base: 768 / 12 heads


class StridedPatchEmbed(PatchEmbed):
    """timm PatchEmbed with a convolution stride different from the patch size (AST's overlapping patches).

    grid_size / num_patches are recomputed for the stride so that timm sizes the position embedding right.
    """

    def __init__(self, *args, stride: int = AST_STRIDE, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.proj = nn.Conv2d(self.proj.in_channels, self.proj.out_channels, kernel_size=self.patch_size,
                              stride=stride, bias=self.proj.bias is not None)
        self.grid_size = tuple((s - p) // stride + 1 for s, p in zip(self.img_size, self.patch_size))
        self.num_patches = self.grid_size[0] * self.grid_size[1]


def build_ast(embed_dim: int = 768, depth: int = 12, num_heads: int = 12, init: bool = True) -> nn.Module:
    """timm DeiT-base-distilled with AST's input geometry ([B,1,128,1024], stride 10).

    init=False skips timm's random init (weight_init='skip') for when a checkpoint overwrites every tensor.
    """
    return timm.create_model(
        "deit_base_distilled_patch16_384", pretrained=False, num_classes=0, weight_init="" if init else "skip",
        img_size=(NUM_MEL_BINS, AST_TARGET_LENGTH), in_chans=1,
        embed_layer=partial(StridedPatchEmbed, stride=AST_STRIDE),
        embed_dim=embed_dim, depth=depth, num_heads=num_heads,
    )


def convert_ast_checkpoint(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AST repository keys -> timm keys: strip "module." and "v.", drop the classifier heads.

    Dropped: ``mlp_head.*`` (AudioSet classifier) and ``v.head*`` / ``v.head_dist*`` (DeiT's unused ImageNet
    heads, still present in the file). Anything else outside ``v.`` is an error (wrong file).
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("module.")
        if key.startswith("mlp_head."):
            continue
        if not key.startswith("v."):
            raise ValueError(f"unexpected key {key!r} (expected the AST layout module.v.* / module.mlp_head.*)")
        key = key[2:]
        if key.startswith(("head.", "head_dist.")):
            continue
        out[key] = value
    return out


def infer_ast_config(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Width and depth from tensor shapes (timm key layout)."""
    if "cls_token" not in state_dict or "dist_token" not in state_dict:
        raise ValueError("not an AST/DeiT-distilled checkpoint: cls_token/dist_token missing")
    width = int(state_dict["cls_token"].shape[-1])
    depth = len({m.group(1) for k in state_dict if (m := re.match(r"blocks\.(\d+)\.", k))})
    return dict(embed_dim=width, depth=depth, num_heads=max(1, width // _HEAD_DIM))


class ASTEncoder(nn.Module):
    """Frozen AST: normalised fbank windows [B,1024,128] -> (cls + dist)/2 after the final norm [B,768]."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit
        self.out_dim = int(vit.embed_dim)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, fbanks: torch.Tensor) -> torch.Tensor:
        # AST feeds the spectrogram as an image with mel bins as height and time as width.
        tokens = self.vit.forward_features(fbanks.unsqueeze(1).transpose(2, 3))
        return (tokens[:, 0] + tokens[:, 1]) / 2

    @torch.inference_mode()
    def encode(self, fbanks: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        """Encode [N,1024,128] windows in batches -> [N, out_dim] float32 on CPU."""
        out = [torch.zeros(0, self.out_dim)]
        for start in range(0, fbanks.shape[0], batch_size):
            out.append(self(fbanks[start:start + batch_size].to(self.device)).float().cpu())
        return torch.cat(out)


def load_ast(weights_path: str | os.PathLike = DEFAULT_AST_WEIGHTS,
             device: str | torch.device = "cpu") -> ASTEncoder:
    """Build AST from the AST repository's checkpoint (module.v.* keys), eval, float32."""
    path = require_weights(weights_path, "AST (AudioSet 0.4593)", AST_FILE_NAME, AST_SOURCE)
    try:
        state = convert_ast_checkpoint(read_state_dict(path))
        model = build_ast(**infer_ast_config(state), init=False)
        model.load_state_dict(state, strict=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from e
    return ASTEncoder(model.float()).eval().requires_grad_(False).to(device)
