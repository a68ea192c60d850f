"""Authors' checkpoint layout <-> ours: key names, lossless round trip, identical outputs, clear errors."""
import re

import pytest
import torch

from model.checkpoint_compat import (CheckpointMismatchError, from_authors_layout, is_authors_layout,
                                     load_state_dict_any, to_authors_layout)
from model.made import build_model
from utils.train.options import parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# The trainable keys (plus buffers) of the authors' checkpoints (their Uni_model's state_dict).
AUTHORS_KEY_PATTERNS = [
    r"vit_proj\.(weight|bias)", r"ast_proj\.(weight|bias)",
    r"(video|audio)_transformer\.layers\.0\.[02]\.(weight|bias)",
    r"(video|audio)_transformer\.layers\.0\.1\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
    r"(video|audio)_transformer\.layers\.0\.3\.[03]\.(weight|bias)",
    r"(video|audio)_transformer\.final_linear\.(weight|bias)",
    r"(video|audio)_position_embedding\.pe",
    r"video_guided_to_music_pooling_cross_transformer\.cross_attn\.[qkv]_proj\.(weight|bias)",
    r"video_guided_to_music_pooling_cross_transformer\.cross_attn\.out_proj\.(weight|bias)",
    r"video_guided_to_music_pooling_cross_transformer\.(linear_proj|layer_norm[123])\.(weight|bias)",
    r"logit_scale", r"decoder_query_embed\.weight",
    r"detr_transformer\.encoder\.layers\.[01]\.(self_attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)"
    r"|(linear1|linear2|norm1|norm2)\.(weight|bias))",
    r"detr_transformer\.decoder\.layers\.[0-5]\.((self_attn|multihead_attn)\.(in_proj_weight|in_proj_bias|"
    r"out_proj\.weight|out_proj\.bias)|(linear1|linear2|norm1|norm2|norm3)\.(weight|bias))",
    r"detr_transformer\.decoder\.norm\.(weight|bias)",
    r"span_embed\.layers\.[012]\.(weight|bias)", r"class_embed\.(weight|bias)",
    r"contrastive_align_projection_(query|vid)\.(weight|bias)", r"criterion\.empty_weight",
]

SMALL = ["--dim_input", "32", "--SA_temporal_heads", "4", "--detr_nheads", "4", "--detr_dim_feedforward", "64",
         "--contrastive_dim", "16", "--detr_enc_layers", "1", "--detr_dec_layers", "2"]


def model_for(argv, seed=0):
    torch.manual_seed(seed)
    return build_model(parse_args(argv)).eval()


def outputs(model):
    gen = torch.Generator().manual_seed(0)
    fm = (torch.arange(8)[None] < torch.tensor([[5], [8], [3]])).float()
    mm = (torch.arange(12)[None] < torch.tensor([[12], [4], [9]])).float()
    batch = {"frame_feats": torch.randn(3, 8, 512, generator=gen), "frame_mask": fm,
             "music_feats": torch.randn(3, 12, 768, generator=gen), "music_mask": mm}
    with torch.no_grad():
        out = model(batch)
        index = model.index_music(out["music_emb"], out["snippet_tokens"], mm)
        scores = model.score_videos(out["video_emb"], index)
    det = out["detection"]
    return [out["similarities"]["dual"], out["similarities"]["single"], det["pred_spans"], det["pred_logits"], scores]


def test_default_model_has_the_authors_key_layout():
    state = to_authors_layout(model_for([]).state_dict())
    pattern = re.compile("|".join(f"(?:{p})" for p in AUTHORS_KEY_PATTERNS))
    assert [k for k in state if not pattern.fullmatch(k)] == []
    for required in ("vit_proj.weight", "video_transformer.layers.0.3.3.weight", "audio_transformer.final_linear.bias",
                     "video_guided_to_music_pooling_cross_transformer.cross_attn.out_proj.weight",
                     "detr_transformer.decoder.layers.5.multihead_attn.in_proj_weight",
                     "detr_transformer.encoder.layers.1.norm2.bias", "span_embed.layers.2.weight",
                     "decoder_query_embed.weight", "logit_scale", "video_position_embedding.pe"):
        assert required in state
    assert state["video_position_embedding.pe"].shape == (1, 250, 256)
    assert state["audio_position_embedding.pe"].shape == (1, 300, 256)
    assert state["criterion.empty_weight"].tolist() == pytest.approx([1.0, 0.1])
    assert is_authors_layout(state) and not is_authors_layout(model_for(SMALL).state_dict())


def test_round_trip_is_lossless_and_outputs_identical():
    source = model_for(SMALL, seed=1)
    ours = source.state_dict()
    back = from_authors_layout(to_authors_layout(ours))
    assert set(back) == set(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    expected = outputs(source)

    # An authors' file: DDP prefix, frozen CLIP/AST weights, full Uni_model state.
    authors = {f"module.{k}": v for k, v in to_authors_layout(ours).items()}
    authors["module.ast_model.module.v.cls_token"] = torch.zeros(1, 1, 768)
    authors["module.vit_model.visual.proj"] = torch.zeros(768, 512)
    for state in (authors, ours):
        target = model_for(SMALL, seed=2)
        load_state_dict_any(target, state)
        for a, b in zip(outputs(target), expected):
            assert torch.equal(a, b)


def test_other_configuration_lists_shape_mismatches():
    state = model_for(SMALL).state_dict()
    wider = model_for(["--dim_input", "48", "--SA_temporal_heads", "4", "--detr_nheads", "4",
                       "--detr_dim_feedforward", "64", "--contrastive_dim", "16", "--detr_enc_layers", "1",
                       "--detr_dec_layers", "3"])
    with pytest.raises(CheckpointMismatchError) as exc:
        load_state_dict_any(wider, to_authors_layout(state))
    message = str(exc.value)
    assert "another model configuration" in message
    assert "shape mismatch" in message and "video_encoder.proj.weight: checkpoint [32, 512] vs model [48, 512]" in message
    assert "missing key(s)" in message and "transformer.decoder.layers.2." in message


def test_unexpected_keys_are_listed():
    state = dict(model_for(SMALL).state_dict())
    state["some_new_head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointMismatchError, match="unexpected key.*some_new_head.weight"):
        load_state_dict_any(model_for(SMALL), state)


def test_foreign_positional_table_is_refused():
    state = to_authors_layout(model_for(SMALL).state_dict())
    state["video_position_embedding.pe"] = state["video_position_embedding.pe"] + 0.1
    with pytest.raises(CheckpointMismatchError, match="positional table"):
        load_state_dict_any(model_for(SMALL), state)
