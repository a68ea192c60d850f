"""Synthetic media and randomly initialised checkpoints in the formats users download, for the extraction tests.

Nothing here uses the code under test: the checkpoint layouts are written out from the published key names
(OpenAI CLIP ``visual.*``; AST repository ``module.v.*`` / ``module.mlp_head.*``), so the converters are
checked against the formats themselves, not against their own output.
"""
from __future__ import annotations

import math
import warnings
import wave
from pathlib import Path

import av
import numpy as np
import torch
from torch import nn


# ------------------------------------------------------------------------------------------ media files
def second_colour(second: int) -> int:
    """Grey level painted during second `second` of the synthetic video. Neighbouring seconds differ by at
    least 37 levels, far above the codec's error (a few levels), so an off-by-one frame choice is visible."""
    return 30 + (37 * second) % 200


def write_video(path: Path, seconds: float, fps: int = 10, width: int = 64, height: int = 48) -> Path:
    """MPEG-4 clip whose left half is a flat grey that changes every second and whose right half has a
    moving white bar. Frame k is shown at t = k / fps."""
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = {"qscale": "2"}
    # A key frame at every second boundary: otherwise the encoder may keep skipping the slightly changed flat
    # area for a few frames and the test would measure the codec, not the frame selection.
    stream.codec_context.gop_size = fps
    for k in range(round(seconds * fps)):
        img = np.zeros((height, width, 3), np.uint8)
        img[:, : width // 2] = second_colour(int(k // fps))
        img[:, width // 2 + (k % (width // 2)), :] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def tone(seconds: float, sample_rate: int, freq: float = 440.0, noise: float = 0.05, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(round(seconds * sample_rate)) / sample_rate
    return (0.3 * np.sin(2 * math.pi * freq * t) + noise * rng.standard_normal(t.size)).astype(np.float32)


def write_wav(path: Path, seconds: float, sample_rate: int = 22050, channels: int = 2) -> Path:
    """16-bit PCM WAV: a tone plus noise, the second channel a quieter different tone."""
    left = tone(seconds, sample_rate)
    data = np.stack([left] + [tone(seconds, sample_rate, 660.0, seed=1) * 0.5] * (channels - 1), axis=1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes((np.clip(data, -1, 1) * 32767).astype("<i2").tobytes())
    return path


# ------------------------------------------------------------------------------------ OpenAI CLIP layout
def openai_clip_state_dict(width: int = 64, layers: int = 2, patch: int = 32, resolution: int = 224,
                           out_dim: int = 512, dtype: torch.dtype = torch.float32, seed: int = 0,
                           text: bool = True) -> dict[str, torch.Tensor]:
    """Random tensors with the key names and shapes of an OpenAI CLIP ViT checkpoint (image tower + a small
    text tower and the bookkeeping entries OpenAI's archive carries)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    grid = resolution // patch
    sd = {
        "visual.class_embedding": rnd(width, scale=1.0),
        "visual.positional_embedding": rnd(grid * grid + 1, width, scale=0.5),
        "visual.proj": rnd(width, out_dim, scale=width ** -0.5),
        "visual.conv1.weight": rnd(width, 3, patch, patch, scale=0.02),
        "visual.ln_pre.weight": 1 + rnd(width), "visual.ln_pre.bias": rnd(width),
        "visual.ln_post.weight": 1 + rnd(width), "visual.ln_post.bias": rnd(width),
    }
    for i in range(layers):
        p = f"visual.transformer.resblocks.{i}."
        sd.update({
            p + "attn.in_proj_weight": rnd(3 * width, width, scale=width ** -0.5),
            p + "attn.in_proj_bias": rnd(3 * width),
            p + "attn.out_proj.weight": rnd(width, width, scale=width ** -0.5),
            p + "attn.out_proj.bias": rnd(width),
            p + "ln_1.weight": 1 + rnd(width), p + "ln_1.bias": rnd(width),
            p + "mlp.c_fc.weight": rnd(4 * width, width, scale=width ** -0.5),
            p + "mlp.c_fc.bias": rnd(4 * width),
            p + "mlp.c_proj.weight": rnd(width, 4 * width, scale=(4 * width) ** -0.5),
            p + "mlp.c_proj.bias": rnd(width),
            p + "ln_2.weight": 1 + rnd(width), p + "ln_2.bias": rnd(width),
        })
    if text:
        sd.update({
            "positional_embedding": rnd(77, 32), "text_projection": rnd(32, out_dim), "logit_scale": rnd(1)[0],
            "token_embedding.weight": rnd(100, 32), "ln_final.weight": rnd(32), "ln_final.bias": rnd(32),
            "transformer.resblocks.0.attn.in_proj_weight": rnd(96, 32),
            "input_resolution": torch.tensor(resolution), "context_length": torch.tensor(77),
            "vocab_size": torch.tensor(100),
        })
    return sd


class _Node(nn.Module):
    """Scriptable container; the archive only needs to carry the tensors under their dotted names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def save_torchscript(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    """A TorchScript archive (torch.jit.save) whose state_dict() is `state_dict`, like OpenAI's ViT-B-32.pt."""
    root = _Node()
    for key, value in state_dict.items():
        *parents, leaf = key.split(".")
        module = root
        for name in parents:
            if name not in module._modules:
                module.add_module(name, _Node())
            module = module._modules[name]
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():  # torch.jit is deprecated; OpenAI's file is nevertheless such an archive
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(root), str(path))
    return path


def openai_visual_forward(sd: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP VisionTransformer.forward written from its definition (QuickGELU, pre-LN, ln_post on the
    class token, x @ proj), with nn.MultiheadAttention as OpenAI uses. Heads = width // 64."""
    sd = {k: v.float() for k, v in sd.items() if k.startswith("visual.")}
    width, _, patch, _ = sd["visual.conv1.weight"].shape
    heads = max(1, width // 64)
    ln = lambda x, name: nn.functional.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"], 1e-5)
    x = nn.functional.conv2d(images, sd["visual.conv1.weight"], stride=patch).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, width)
    x = ln(torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"], "visual.ln_pre")
    i = 0
    while f"visual.transformer.resblocks.{i}.ln_1.weight" in sd:
        p = f"visual.transformer.resblocks.{i}."
        attn = nn.MultiheadAttention(width, heads, batch_first=True)
        attn.load_state_dict({k[len(p + "attn."):]: v for k, v in sd.items() if k.startswith(p + "attn.")})
        h = ln(x, p + "ln_1")
        x = x + attn(h, h, h, need_weights=False)[0]
        h = nn.functional.linear(ln(x, p + "ln_2"), sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
        h = h * torch.sigmoid(1.702 * h)  # QuickGELU
        x = x + nn.functional.linear(h, sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
        i += 1
    return ln(x[:, 0], "visual.ln_post") @ sd["visual.proj"]


# ------------------------------------------------------------------------------------ AST repository layout
def ast_checkpoint(width: int = 128, depth: int = 2, seed: int = 0, n_patches: int = 1212,
                   ) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped like the AST repository's audioset_0.4593.pth (DataParallel "module."
    prefix, DeiT under "v." incl. its unused ImageNet heads, AudioSet classifier "mlp_head")."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    sd = {
        "module.v.cls_token": rnd(1, 1, width, scale=1.0), "module.v.dist_token": rnd(1, 1, width, scale=1.0),
        "module.v.pos_embed": rnd(1, n_patches + 2, width, scale=0.5),
        "module.v.patch_embed.proj.weight": rnd(width, 1, 16, 16, scale=1 / 16),
        "module.v.patch_embed.proj.bias": rnd(width),
        "module.v.norm.weight": 1 + rnd(width), "module.v.norm.bias": rnd(width),
        "module.v.head.weight": rnd(1000, width), "module.v.head.bias": rnd(1000),
        "module.v.head_dist.weight": rnd(1000, width), "module.v.head_dist.bias": rnd(1000),
        "module.mlp_head.0.weight": 1 + rnd(width), "module.mlp_head.0.bias": rnd(width),
        "module.mlp_head.1.weight": rnd(527, width), "module.mlp_head.1.bias": rnd(527),
    }
    for i in range(depth):
        p = f"module.v.blocks.{i}."
        sd.update({
            p + "norm1.weight": 1 + rnd(width), p + "norm1.bias": rnd(width),
            p + "attn.qkv.weight": rnd(3 * width, width, scale=width ** -0.5), p + "attn.qkv.bias": rnd(3 * width),
            p + "attn.proj.weight": rnd(width, width, scale=width ** -0.5), p + "attn.proj.bias": rnd(width),
            p + "norm2.weight": 1 + rnd(width), p + "norm2.bias": rnd(width),
            p + "mlp.fc1.weight": rnd(4 * width, width, scale=width ** -0.5), p + "mlp.fc1.bias": rnd(4 * width),
            p + "mlp.fc2.weight": rnd(width, 4 * width, scale=(4 * width) ** -0.5), p + "mlp.fc2.bias": rnd(width),
        })
    return sd


def ast_reference_forward(sd: dict[str, torch.Tensor], fbanks: torch.Tensor) -> torch.Tensor:
    """AST forward written from the AST paper/repository: [B,1024,128] -> transpose to [B,1,128,1024],
    16x16 conv at stride 10, prepend cls+dist, add pos_embed, pre-LN blocks (GELU, eps 1e-6), final norm,
    mean of the two special tokens."""
    sd = {k.removeprefix("module.v."): v for k, v in sd.items() if k.startswith("module.v.")}
    width = sd["cls_token"].shape[-1]
    heads = max(1, width // 64)
    ln = lambda x, name: nn.functional.layer_norm(x, (width,), sd[name + ".weight"], sd[name + ".bias"], 1e-6)
    x = fbanks.unsqueeze(1).transpose(2, 3)
    x = nn.functional.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=10)
    x = x.flatten(2).transpose(1, 2)
    b = x.shape[0]
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), sd["dist_token"].expand(b, -1, -1), x], 1) + sd["pos_embed"]
    i = 0
    while f"blocks.{i}.norm1.weight" in sd:
        p = f"blocks.{i}."
        h = ln(x, p + "norm1")
        q, k, v = nn.functional.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        split = lambda t: t.reshape(b, -1, heads, width // heads).transpose(1, 2)
        att = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads), dim=-1)
        h = (att @ split(v)).transpose(1, 2).reshape(b, -1, width)
        x = x + nn.functional.linear(h, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = nn.functional.gelu(nn.functional.linear(ln(x, p + "norm2"), sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"]))
        x = x + nn.functional.linear(h, sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        i += 1
    x = ln(x, "norm")
    return (x[:, 0] + x[:, 1]) / 2
