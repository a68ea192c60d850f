"""OpenAI CLIP image tower (ViT-B/32) built with timm, loading OpenAI's own checkpoint file.

The authors used ``clip.load("ViT-B/32").encode_image`` (model_Base.py): pre-norm ViT with QuickGELU,
LayerNorm eps 1e-5, no bias in the patch convolution, ``ln_post`` on the class token and the projection
``x @ visual.proj`` to 512-d (the output is NOT L2-normalised). timm's ``vit_base_patch32_clip_quickgelu_224``
is exactly this network, with the projection as a bias-free ``head`` Linear, and timm ships the key conversion
from OpenAI's layout (``checkpoint_filter_fn`` -> ``_convert_openai_clip``), which is reused here.

The checkpoint may be OpenAI's TorchScript archive ``ViT-B-32.pt`` (fp16) or a plain state dict with the same
keys (``visual.conv1.weight``, ``visual.class_embedding``, ``visual.transformer.resblocks.N.attn.in_proj_weight``,
``visual.proj``, ...). Text-tower keys are ignored. The architecture (width, depth, patch, resolution, output
dim) is read from the tensor shapes like OpenAI's ``build_model`` does, so smaller test checkpoints go through
the same code path.
"""
from __future__ import annotations

import os
import re
from typing import Callable

import timm
import torch
from PIL import Image
from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn
from torchvision import transforms

from model.pretrained import PRETRAINED_DIR, read_state_dict, require_weights

CLIP_FILE_NAME = "ViT-B-32.pt"
DEFAULT_CLIP_WEIGHTS = PRETRAINED_DIR / CLIP_FILE_NAME
CLIP_SOURCE = ("openai/CLIP release (clip/clip.py _MODELS['ViT-B/32']): https://openaipublic.azureedge.net/clip/"
               "models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt")
_PREFIX = "visual."
_HEAD_DIM = 64  # every OpenAI CLIP ViT uses 64-d attention heads (build_model: heads = width // 64)


def infer_clip_config(state_dict: dict[str, torch.Tensor]) -> dict[str, int]:
    """Vision-tower hyper-parameters from OpenAI-layout tensor shapes (as OpenAI's build_model does)."""
    required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj", "visual.class_embedding")
    missing = [k for k in required if k not in state_dict]
    if missing:
        raise ValueError(f"not an OpenAI CLIP ViT checkpoint: missing {missing}")
    width, _, patch, _ = state_dict["visual.conv1.weight"].shape
    layers = len({m.group(1) for k in state_dict
                  if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k))})
    grid = round((state_dict["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    mlp_dim = state_dict["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return dict(embed_dim=int(width), depth=layers, num_heads=max(1, int(width) // _HEAD_DIM),
                patch_size=int(patch), img_size=int(patch) * grid, mlp_ratio=mlp_dim / width,
                num_classes=int(state_dict["visual.proj"].shape[1]))


def build_clip_vision(config: dict[str, int], init: bool = True) -> VisionTransformer:
    """timm CLIP ViT (pre-norm, QuickGELU, eps 1e-5) with the projection as a `head` Linear.

    init=False leaves the parameters uninitialised (timm's weight_init='skip'): the loader overwrites every
    tensor anyway (strict load) and random init of 88M parameters costs seconds on a CPU.
    """
    return timm.create_model("vit_base_patch32_clip_quickgelu_224", pretrained=False,
                             weight_init="" if init else "skip", **config)


def convert_openai_clip(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """OpenAI keys -> timm keys via timm's own filter; every model tensor must be covered, exactly once.

    Raises ValueError listing missing / unused / mis-shaped tensors, so a wrong or truncated file cannot
    silently leave random weights in the encoder.
    """
    visual = {k: v for k, v in state_dict.items() if k.startswith(_PREFIX)}
    converted = checkpoint_filter_fn(visual, model)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unused = sorted(set(converted) - set(expected))
    bad_shape = sorted(k for k in set(expected) & set(converted) if expected[k].shape != converted[k].shape)
    if missing or unused or bad_shape:
        raise ValueError(f"CLIP checkpoint does not fit the ViT: missing {missing[:5]}, unused {unused[:5]}, "
                         f"wrong shape {bad_shape[:5]}")
    return converted


def clip_preprocess(image_size: int = 224) -> Callable[[Image.Image], torch.Tensor]:
    """OpenAI CLIP's preprocessing: resize shorter side (bicubic), centre crop, RGB, scale to [0,1], normalise."""
    return transforms.Compose([
        transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(image_size),
        transforms.Lambda(lambda im: im.convert("RGB")),
        transforms.ToTensor(),
        transforms.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD),
    ])


class CLIPImageEncoder(nn.Module):
    """Frozen CLIP image tower: images [B,3,S,S] (preprocessed) -> embeddings [B,out_dim] (not normalised)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit
        self.image_size = int(vit.patch_embed.img_size[0])
        self.out_dim = int(vit.num_classes)
        self.preprocess = clip_preprocess(self.image_size)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # token pool -> ln_post (timm's final norm) -> head = x @ visual.proj (bias zero)
        return self.vit(images)

    @torch.inference_mode()
    def encode_images(self, images: list[Image.Image], batch_size: int = 32) -> torch.Tensor:
        """Preprocess and encode PIL images in batches -> [N, out_dim] float32 on CPU."""
        out = [torch.zeros(0, self.out_dim)]
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.preprocess(im) for im in images[start:start + batch_size]])
            out.append(self(batch.to(self.device)).float().cpu())
        return torch.cat(out)


def load_clip(weights_path: str | os.PathLike = DEFAULT_CLIP_WEIGHTS,
              device: str | torch.device = "cpu") -> CLIPImageEncoder:
    """Build the CLIP image encoder from an OpenAI checkpoint (TorchScript or plain state dict), eval, float32."""
    path = require_weights(weights_path, "CLIP ViT-B/32", CLIP_FILE_NAME, CLIP_SOURCE)
    state = read_state_dict(path)
    try:
        model = build_clip_vision(infer_clip_config(state), init=False)
        model.load_state_dict(convert_openai_clip(state, model), strict=True)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ValueError(f"{path}: {e}") from e
    return CLIPImageEncoder(model.float()).eval().requires_grad_(False).to(device)
