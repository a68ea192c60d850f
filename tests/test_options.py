"""The shared argparse definition: script defaults, derived fields, rejected combinations."""
import pytest

from utils.train.options import MODEL_KEYS, get_parser, parse_args

# Every flag of the authors' train-MaDe.py argparse, same names.
ORIGINAL_FLAGS = """name output_dir load_uni_model_path resume_path data train_data val_data test_data train_csv
val_csv test_csv image_resolution max_v_frames max_m_duration stride filter padding toph_moment gt_moment_num
backbone_type dim_input frozen_feature_path video_encoder_type audio_encoder_type temperature_init_value
video_attention_seqlen video_transformer_depth audio_transformer_depth with_cls_token with_last_token
with_act_after_proj transformer_is_share projection_is_share SA_temporal_heads agg_module downup_is_share
downup_dim vmr_fusion vmr_loss dual_single_loss_weight fusion_mask mml_fusion mml_localization hidden_dim
moment_query_type span_loss_type fb_label detr_hidden_dim detr_dropout detr_nheads detr_dim_feedforward
detr_enc_layers detr_dec_layers detr_pre_norm num_moment_queries decoder_SA predict_center reg_mlp_num_layers
l1_loss aux_loss contrastive_align_loss moment_loss audio_short_cut contrastive_dim position_embedding
input_dropout ret_loss_weight loc_loss_weight do_train do_eval start_epoch epochs seed batch_size_train
batch_size_val num_workers ignore_same_music world_size rank local_rank gradient_accumulation_steps matching_lr
detection_lr decay_rate max_grad_norm scheduler lr_update_rate warmup_rate distance_type num_display tb_writer
save_model save_json""".split()
NEW_FLAGS = """device amp compile resume overwrite skip_bad_rows eval_chunk metrics_json use_packed train_query_pos
decoder_SA_fix temporal_dropout residual_from_input separate_positions mask_same_music""".split()


def options(parser):
    return {s.lstrip("-") for a in parser._actions for s in a.option_strings}


def test_every_original_and_new_flag_exists():
    train = options(get_parser("train"))
    assert set(ORIGINAL_FLAGS + NEW_FLAGS) <= train
    test = options(get_parser("test"))
    assert {"test_best", "save_json", "eval_chunk", "metrics_json"} <= test
    assert "matching_lr" not in test and "resume" not in test  # train-only, as in the original


def test_defaults_are_the_script_values():
    a = parse_args([])
    script = dict(max_v_frames=50, filter=10.0, mml_fusion="concat", detr_enc_layers=2, detr_dec_layers=6,
                  audio_short_cut=0, ret_loss_weight=1.0, loc_loss_weight=1.0, temperature_init_value=0.03,
                  matching_lr=3e-4, detection_lr=3e-4, warmup_rate=0.02, epochs=100, batch_size_train=512,
                  batch_size_val=40, lr_update_rate=40, num_display=10, stride=2.5, max_m_duration=240.0,
                  vmr_fusion="XA-music", vmr_loss="dual_single_loss_fuse", agg_module="transf",
                  contrastive_align_loss=1, aux_loss=1, num_moment_queries=1, decoder_SA=0, detr_pre_norm=0,
                  moment_query_type="video", fusion_mask=1, save_model=1, save_json=0, name="MaDe",
                  temporal_dropout=0.8, train_query_pos=0, decoder_SA_fix=0, mask_same_music=0)
    assert {k: getattr(a, k) for k in script} == script
    assert a.do_train and a.do_eval
    t = parse_args([], mode="test")
    assert t.test_best == 1 and t.save_model == 0 and not t.do_train


def test_derived_fields():
    a = parse_args(["--stride", "5", "--dim_input", "128", "--frozen_feature_path", "feats"])
    assert a.max_snippet_num == 48
    assert a.hidden_dim == a.detr_hidden_dim == 128
    assert a.music_frozen_feature_path.replace("\\", "/") == "feats/ast_feature5"
    assert a.frame_frozen_feature_path.replace("\\", "/") == "feats/vit_feature1"
    assert (a.train_data, a.val_data, a.test_data) == ("kuai50k_uni",) * 3
    assert parse_args(["--stride", "7.5"]).max_snippet_num == 32
    none = parse_args(["--agg_module", "None"])
    assert none.video_transformer_depth == none.audio_transformer_depth == 0


@pytest.mark.parametrize("text,value", [("0", 0), ("1", 1), ("true", 1), ("False", 0), ("yes", 1)])
def test_detr_pre_norm_parses_booleans(text, value):
    assert parse_args(["--detr_pre_norm", text]).detr_pre_norm == value


REJECTED = [
    (["--stride", "3"], "--stride"),
    (["--mml_fusion", "add"], "no forward branch"),
    (["--mml_fusion", "CA"], "not supported"),
    (["--vmr_loss", "dual_single"], "ValueError"),
    (["--vmr_loss", "dual_single_oneloss"], "ValueError"),
    (["--vmr_fusion", "XA"], "pooling module"),
    (["--vmr_fusion", "XA-video", "--vmr_loss", "single"], "not supported"),
    (["--vmr_loss", "dual"], "single-tower"),
    (["--vmr_fusion", "NO"], "needs the X-Pool"),
    (["--span_loss_type", "ce"], "matcher"),
    (["--position_embedding", "learned"], "learned"),
    (["--moment_loss", "1", "--contrastive_align_loss", "0"], "proj_queries"),
    (["--num_moment_queries", "3"], "--decoder_SA 1"),
    (["--agg_module", "mlp"], "mlp"),
    (["--distance_type", "L2"], "L2"),
    (["--audio_short_cut", "1"], "audio_short_cut"),
    (["--video_encoder_type", "ViViT"], "ViT"),
    (["--dim_input", "100"], "divisible"),
    (["--dim_input", "0"], "positive"),
    (["--batch_size_train", "-4"], "positive"),
    (["--detr_dropout", "1.5"], "[0, 1)"),
    (["--detr_pre_norm", "maybe"], "0/1"),
    (["--epochs", "x"], "integer"),
    (["--max_m_duration", "1000"], "positional table"),
    (["--max_v_frames", "300"], "video positional table"),
    (["--moment_query_type", "xpool", "--vmr_fusion", "NO", "--vmr_loss", "dual"], "XA-music"),
    (["--with_cls_token", "1", "--agg_module", "None"], "cls_token"),
    (["--no-do_train"], "train.py always trains"),
    (["--metrics_json", "m.json", "--no-do_eval"], "needs --do_eval"),
]


@pytest.mark.parametrize("argv,message", REJECTED, ids=[" ".join(a) for a, _ in REJECTED])
def test_rejected_with_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [(["--do_train"], "only evaluates"), (["--no-do_eval"], "always evaluates")])
def test_test_mode_refuses_what_it_would_ignore(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv, mode="test")
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_accepted_non_default_combinations():
    parse_args(["--vmr_fusion", "NO", "--vmr_loss", "dual"])
    parse_args(["--num_moment_queries", "3", "--decoder_SA", "1"])
    parse_args(["--mml_localization", "regression"])
    parse_args(["--agg_module", "None"])
    parse_args(["--stride", "10", "--predict_center", "1", "--fb_label", "10"])


def test_model_keys_exist():
    a = parse_args([])
    assert all(hasattr(a, k) for k in MODEL_KEYS)
