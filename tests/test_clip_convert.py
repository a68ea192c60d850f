"""OpenAI CLIP checkpoint -> timm ViT: every tensor placed exactly once, numerics equal to OpenAI's forward,
both file formats (TorchScript archive, plain state dict), clear errors for missing or wrong files."""
from __future__ import annotations

import pytest
import torch
from media_helpers import openai_clip_state_dict, openai_visual_forward, save_torchscript

from model.clip_encoder import (CLIP_FILE_NAME, build_clip_vision, convert_openai_clip, infer_clip_config,
                                load_clip)
from model.pretrained import MissingWeightsError


def test_infer_config_real_vit_b32_shapes():
    sd = openai_clip_state_dict(width=768, layers=12, text=False)
    cfg = infer_clip_config(sd)
    assert cfg == dict(embed_dim=768, depth=12, num_heads=12, patch_size=32, img_size=224, mlp_ratio=4.0,
                       num_classes=512)


def test_round_trip_places_every_tensor_real_shapes():
    """A random OpenAI-layout ViT-B/32 dict converts onto timm's ViT with nothing missing or left over, and each
    tensor lands where it belongs (spot checks of every kind of rename/reshape)."""
    sd = openai_clip_state_dict(width=768, layers=12)
    model = build_clip_vision(infer_clip_config(sd), init=False)
    out = convert_openai_clip(sd, model)
    expected = model.state_dict()
    assert set(out) == set(expected)
    assert all(out[k].shape == expected[k].shape for k in out)
    # every visual tensor is used (the only synthesised entry is the zero head bias)
    visual = {k for k in sd if k.startswith("visual.")}
    assert len(out) == len(visual) + 1
    torch.testing.assert_close(out["head.weight"], sd["visual.proj"].T)
    assert torch.count_nonzero(out["head.bias"]) == 0
    torch.testing.assert_close(out["cls_token"][0, 0], sd["visual.class_embedding"])
    torch.testing.assert_close(out["pos_embed"][0], sd["visual.positional_embedding"])
    torch.testing.assert_close(out["patch_embed.proj.weight"], sd["visual.conv1.weight"])
    torch.testing.assert_close(out["norm_pre.weight"], sd["visual.ln_pre.weight"])
    torch.testing.assert_close(out["norm.bias"], sd["visual.ln_post.bias"])
    r = "visual.transformer.resblocks.11."
    torch.testing.assert_close(out["blocks.11.attn.qkv.weight"], sd[r + "attn.in_proj_weight"])
    torch.testing.assert_close(out["blocks.11.attn.proj.bias"], sd[r + "attn.out_proj.bias"])
    torch.testing.assert_close(out["blocks.11.norm1.weight"], sd[r + "ln_1.weight"])
    torch.testing.assert_close(out["blocks.11.norm2.bias"], sd[r + "ln_2.bias"])
    torch.testing.assert_close(out["blocks.11.mlp.fc1.weight"], sd[r + "mlp.c_fc.weight"])
    torch.testing.assert_close(out["blocks.11.mlp.fc2.bias"], sd[r + "mlp.c_proj.bias"])
    model.load_state_dict(out, strict=True)


def test_conversion_rejects_incomplete_checkpoint():
    sd = openai_clip_state_dict()
    model = build_clip_vision(infer_clip_config(sd))
    del sd["visual.transformer.resblocks.1.mlp.c_fc.bias"]
    with pytest.raises(ValueError, match="missing"):
        convert_openai_clip(sd, model)


@pytest.mark.parametrize("fmt", ["torchscript", "state_dict"])
def test_loaded_encoder_matches_openai_forward(tmp_path, fmt):
    """timm with the converted weights computes OpenAI's encode_image (QuickGELU, pre-norm, ln_post, @ proj),
    from both file formats; the OpenAI archive is fp16, so that case compares against fp16-rounded weights."""
    dtype = torch.float16 if fmt == "torchscript" else torch.float32
    sd = openai_clip_state_dict(width=128, layers=2, dtype=dtype)
    path = tmp_path / CLIP_FILE_NAME
    save_torchscript(sd, path) if fmt == "torchscript" else torch.save(sd, path)
    encoder = load_clip(path, "cpu")
    assert not encoder.training and encoder.out_dim == 512 and encoder.image_size == 224
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in encoder.parameters())
    images = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(encoder(images), openai_visual_forward(sd, images), rtol=1e-4, atol=1e-4)


def test_missing_weights_error_says_where(tmp_path):
    missing = tmp_path / "nowhere" / CLIP_FILE_NAME
    with pytest.raises(MissingWeightsError) as err:
        load_clip(missing)
    msg = str(err.value)
    assert str(missing) in msg and "model/pretrained_models" in msg
    assert "openaipublic.azureedge.net/clip/models" in msg and "ViT-B-32.pt" in msg


def test_corrupt_file_is_a_clear_error(tmp_path):
    bad = tmp_path / CLIP_FILE_NAME
    bad.write_bytes(b"<html>not a checkpoint</html>")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_clip(bad)
    wrong = tmp_path / "wrong.pt"
    torch.save({"foo.weight": torch.zeros(2)}, wrong)
    with pytest.raises(ValueError, match="not an OpenAI CLIP ViT checkpoint"):
        load_clip(wrong)
