"""Which command-line flag sets each MaDeConfig field: the one table between the two vocabularies.

MaDeConfig (model/made.py) names its fields after what they are (d_model, enc_layers, ...);
the flags keep the names of the authors' train-MaDe.py (--dim_input, --detr_enc_layers, ...).
MaDeConfig.from_args reads the flags through this table, and the checkpoint code stores and
adopts the same flags (utils/train/options.MODEL_KEYS is built from model_flags()). No torch
here: the parser imports it.
"""
from __future__ import annotations

from typing import Any, Callable

# MaDeConfig field -> the flag whose value it takes (converted to the field's type).
CONFIG_FLAGS = {
    "d_model": "dim_input",
    "video_pe_len": "video_attention_seqlen",
    "agg_module": "agg_module",
    "video_depth": "video_transformer_depth",
    "music_depth": "audio_transformer_depth",
    "temporal_heads": "SA_temporal_heads",
    "temporal_dropout": "temporal_dropout",
    "residual_from_input": "residual_from_input",
    "with_cls_token": "with_cls_token",
    "act_after_proj": "with_act_after_proj",
    "share_temporal": "transformer_is_share",
    "vmr_fusion": "vmr_fusion",
    "vmr_loss": "vmr_loss",
    "fusion_mask": "fusion_mask",
    "temperature_init": "temperature_init_value",
    "mml_localization": "mml_localization",
    "moment_query_type": "moment_query_type",
    "num_queries": "num_moment_queries",
    "predict_center": "predict_center",
    "max_m_duration": "max_m_duration",
    "detr_nheads": "detr_nheads",
    "detr_ffn": "detr_dim_feedforward",
    "detr_dropout": "detr_dropout",
    "enc_layers": "detr_enc_layers",
    "dec_layers": "detr_dec_layers",
    "pre_norm": "detr_pre_norm",
    "aux_loss": "aux_loss",
    "contrastive_align": "contrastive_align_loss",
    "contrastive_dim": "contrastive_dim",
    "separate_positions": "separate_positions",
    "moment_head": "moment_head",
    "stride": "stride",
}

# --fb_label -> the class index of "foreground" in pred_logits ("01": class 0, the original's default).
FOREGROUND = {"01": 0, "10": 1}


def _decoder_self_attn(decoder_SA_fix: int, decoder_SA: int) -> bool:
    # The original never passes --decoder_SA to its decoder layers: self-attention always runs,
    # unless the fidelity fix --decoder_SA_fix 1 makes --decoder_SA 0 switch it off.
    return not (decoder_SA_fix and not decoder_SA)


# MaDeConfig field -> (the flags it is computed from, how).
DERIVED_FIELDS: dict[str, tuple[tuple[str, ...], Callable[..., Any]]] = {
    "decoder_self_attn": (("decoder_SA_fix", "decoder_SA"), _decoder_self_attn),
    "foreground": (("fb_label",), FOREGROUND.__getitem__),
}
# The other fields (video_dim, music_dim: the feature sizes; music_pe_len: fixed in the original)
# are not flags.


def model_flags() -> tuple[str, ...]:
    """Every flag that sets a MaDeConfig field, in table order."""
    derived = [flag for flags, _ in DERIVED_FIELDS.values() for flag in flags]
    return tuple(dict.fromkeys([*CONFIG_FLAGS.values(), *derived]))


def config_values(args: Any) -> dict[str, Any]:
    """MaDeConfig field -> value for parsed flags (unconverted for the table's fields)."""
    values = {field: getattr(args, flag) for field, flag in CONFIG_FLAGS.items()}
    for field, (flags, compute) in DERIVED_FIELDS.items():
        values[field] = compute(*(getattr(args, flag) for flag in flags))
    return values
