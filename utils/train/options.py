"""The one command-line definition shared by train.py and test.py.

Flag names are those of the authors' train-MaDe.py (xxayt/MGSV, parse_option), so their
scripts run unchanged. Defaults are the values of the authors' shell scripts
(scripts/{train,test}_kuai_all_feature.sh), i.e. the paper configuration, not the original
argparse defaults (which differ materially: e.g. --max_v_frames 30, --mml_fusion CA,
--detr_enc_layers 0, --ret_loss_weight 3.0, --loc_loss_weight 0.2 there). Derived fields are
filled in like the original's parse_option, and every choice that crashes in the original or
is not reproduced here is rejected by the parser with a message that says why.

Flags that change nothing (in train.py, test.py or both) are listed together in --help under
COMPAT_TITLE. Fidelity-fix flags (default = the original's behaviour) are listed in
model/DIFFERENCES.md.
"""
from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

from model.config_flags import model_flags
from utils.data.constants import MAX_M_DURATION, MUSIC_DIRS, VIDEO_DIR

MODES = ("train", "test")
MUSIC_PE_LEN = 300  # length of the music sinusoid table, hard-coded in the original

# Settings a checkpoint carries and the inference tools take from it rather than from the command
# line (utils/train/checkpoint.adopt_checkpoint_config): the model's, as named in
# model/config_flags.py, then the losses' and the optimiser's that shape the trained weights, and
# the original's flags that accept only their one working value (recorded with the run).
MODEL_KEYS = (
    *model_flags(),
    "ret_loss_weight", "loc_loss_weight", "dual_single_loss_weight", "mask_same_music", "train_query_pos",
    "video_encoder_type", "audio_encoder_type", "mml_fusion", "span_loss_type", "l1_loss", "moment_loss",
    "audio_short_cut", "position_embedding",
)


# ------------------------------------------------------------------ argument types
def flag01(text: str) -> int:
    """0/1 switch; also accepts true/false/yes/no (fixes the original's type=bool pitfall)."""
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "y", "on"):
        return 1
    if value in ("0", "false", "no", "n", "off"):
        return 0
    raise argparse.ArgumentTypeError(f"expected 0/1 (or true/false), got {text!r}")


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def nonneg_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def seed_int(text: str) -> int:
    """numpy seeds are 0 <= seed < 2**32; anything else failed with a traceback in np.random.seed."""
    value = _number(text, int)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, 2**32), got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float)
    if not 0 < value < math.inf:  # inf passes "> 0" and breaks later (int(inf) windows, inf rates)
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def nonneg_float(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def probability(text: str) -> float:
    """A dropout rate in [0, 1)."""
    value = _number(text, float)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a rate in [0, 1), got {text!r}")
    return value


def unit_interval(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}")
    return value


def _number(text: str, kind: type):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
    if kind is float and value != value:  # NaN
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return value


# ------------------------------------------------------------------ parser
COMPAT_TITLE = "accepted for compatibility with the original scripts; no effect"
COMPAT_DESCRIPTION = {
    "train": ("Flags of the authors' train-MaDe.py (xxayt/MGSV) that change nothing in this code, kept so their "
              "command lines run unchanged. A value this code cannot honour is refused, with the reason."),
    "test": ("test.py also accepts these, as the authors' test script passes training flags to test-MaDe.py; "
             "they change nothing in an evaluation. A value this code cannot honour is refused, with the reason."),
}


def get_parser(mode: str = "train") -> argparse.ArgumentParser:
    """All flags of the original plus this project's; `mode` is "train" or "test".

    A flag that changes nothing in `mode` is listed in the COMPAT_TITLE group (last in --help);
    every other flag reaches the model, the losses, the optimiser, the data or the outputs
    (tests/test_flags.py checks this for every flag)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    train = mode == "train"
    p = argparse.ArgumentParser(
        description=f"MaDe {mode} (MGSV). Defaults reproduce the paper configuration.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    compat: list[tuple[tuple[str, ...], dict]] = []  # added last, as one group

    def add(group, *names: str, where: tuple[str, ...] = MODES, elsewhere: str = "", **kw) -> None:
        """A flag with an effect in the modes `where`; in the other mode a compatibility flag (help: elsewhere)."""
        if mode in where:
            group.add_argument(*names, **kw)
        else:
            compat.append((names, {**kw, "help": elsewhere or f"({where[0]}.py only)"}))

    def unused(*names: str, why: str, **kw) -> None:
        """A flag of the original with no effect in either mode."""
        compat.append((names, {**kw, "help": why}))

    g = p.add_argument_group("base")
    add(g, "--name", default="MaDe",
        help="run name: train.py's folder <output_dir>/<train_data>/<MMDD>+<name>, test.py's log file name")
    add(g, "--output_dir", default="./logs",
        help="train.py: where run folders go; test.py: where logs go when the checkpoint's folder is read-only")
    add(g, "--load_uni_model_path", where=("test",), default="",
        help="checkpoint file (ours or the authors') or training folder to evaluate")
    unused("--resume_path", default=None, why="(unused in the original too; see --resume)")

    g = p.add_argument_group("data")
    unused("--data", default="kuai50k", why="(unused in the original too)")
    add(g, "--train_data", where=("train",), default="kuai50k",
        help="dataset key: run folders go under <output_dir>/<train_data>_uni ('_uni' appended, as the original)")
    unused("--val_data", default="kuai50k", why="(unused in the original too)")
    add(g, "--test_data", where=("test",), default="kuai50k",
        help="dataset key in the log folder's name, <test_data>_uni-<split> ('_uni' appended, as the original)")
    add(g, "--train_csv", where=("train",), default="./dataset/MGSV-EC/train_data.csv")
    add(g, "--val_csv", where=("train",), default="./dataset/MGSV-EC/val_data.csv")
    add(g, "--test_csv", where=("test",), default="./dataset/MGSV-EC/test_data.csv")
    unused("--image_resolution", type=positive_int, default=224, why="(raw frames only; this code reads features)")
    add(g, "--max_v_frames", type=positive_int, default=50, help="frame slots per video")
    add(g, "--max_m_duration", type=positive_float, default=MAX_M_DURATION,
        help="seconds; spans are normalised by it and snippets = max_m_duration / stride")
    add(g, "--stride", type=float, default=2.5, help="seconds between music windows: 2.5, 5, 7.5 or 10")
    unused("--filter", type=positive_float, default=10.0,
           why="(music window length of the raw-audio path; the features are already windowed)")
    unused("--padding", type=nonneg_float, default=0.0,
           why="(music window margin of the raw-audio path; the features are already windowed)")
    unused("--toph_moment", type=positive_int, default=1, why="(one moment is predicted per video)")
    unused("--gt_moment_num", type=positive_int, default=1, why="(unused in the original too)")
    add(g, "--skip_bad_rows", action="store_true", help="skip malformed CSV rows instead of stopping")
    add(g, "--use_packed", type=flag01, default=1, help="use the packed feature store when present")

    g = p.add_argument_group("model")
    unused("--backbone_type", default="transf+detr", choices=["baseline", "transf+detr"],
           why="(unused in the original too)")
    add(g, "--dim_input", type=positive_int, default=256, help="model width d")
    add(g, "--frozen_feature_path", default="./features/Kuai_feature")
    unused("--video_encoder_type", default="ViT", choices=["ViT", "ViViT"],
           why="(only ViT features exist; other values are refused)")
    unused("--audio_encoder_type", default="AST", choices=["MERT", "AST", "DeepSim"],
           why="(only AST features exist; other values are refused)")
    add(g, "--temperature_init_value", type=positive_float, default=0.03,
        help="initial InfoNCE temperature (logit scale = ln(1/T), learnable)")

    g = p.add_argument_group("temporal encoders")
    add(g, "--video_attention_seqlen", type=positive_int, default=250, help="video positional table length")
    add(g, "--video_transformer_depth", type=nonneg_int, default=1)
    add(g, "--audio_transformer_depth", type=nonneg_int, default=1)
    add(g, "--with_cls_token", type=flag01, default=0)
    unused("--with_last_token", type=flag01, default=0, why="(no effect in the original either)")
    add(g, "--with_act_after_proj", type=flag01, default=0, help="QuickGELU after the input projection")
    add(g, "--transformer_is_share", type=flag01, default=0, help="one temporal transformer for both")
    unused("--projection_is_share", type=flag01, default=0, why="(unused in the original too)")
    add(g, "--SA_temporal_heads", type=positive_int, default=8)
    add(g, "--agg_module", default="transf", choices=["None", "transf", "mlp"])
    unused("--downup_is_share", type=flag01, default=0, why="(unused in the original too)")
    unused("--downup_dim", type=positive_int, default=64, why="(unused in the original too)")

    g = p.add_argument_group("retrieval")
    add(g, "--vmr_fusion", default="XA-music",
        choices=["NO", "XA", "XA-video", "XA-music", "XA-video-music", "XA-music-video"])
    add(g, "--vmr_loss", default="dual_single_loss_fuse",
        choices=["dual", "single", "dual_single", "dual_single_oneloss", "dual_single_sim_fuse",
                 "dual_single_loss_fuse", "dual_single_feature_fuse"])
    add(g, "--dual_single_loss_weight", where=("train",), type=nonneg_float, default=1.0,
        help="retrieval loss weight (ignored by dual_single_loss_fuse, as in the original)")
    add(g, "--fusion_mask", type=flag01, default=1, help="mask padded snippets in X-Pool")
    unused("--distance_type", default="COS", choices=["COS", "L2"],
           why="(only COS; L2 is refused: the original ranks L2 distances in the wrong order)")

    g = p.add_argument_group("moment detection")
    unused("--mml_fusion", default="concat", choices=["CA", "concat", "add"],
           why="(only concat is implemented; other values are refused)")
    add(g, "--mml_localization", default="detr", choices=["detr", "regression"])
    add(g, "--moment_head", default="detr", choices=["detr", "boundary"],
        help="moment detector: the paper's DETR, or 'boundary' (not in the paper): start logits over "
             "the music snippets from frame-snippet alignment + the music alone, trained with "
             "cross-entropy; end = start + video length (model/boundary_head.py)")
    unused("--hidden_dim", type=positive_int, default=256, why="(set to --dim_input, as in the original)")
    add(g, "--moment_query_type", default="video", choices=["video", "xpool", "music", "random", "zero"])
    unused("--span_loss_type", default="l1", choices=["l1", "ce"],
           why="(only l1; ce is refused: it crashes in the original's matcher)")
    add(g, "--fb_label", default="01", choices=["01", "10"], help="01: class 0 is foreground")
    unused("--detr_hidden_dim", type=positive_int, default=256, why="(set to --dim_input, as in the original)")
    add(g, "--detr_dropout", type=probability, default=0.1)
    add(g, "--detr_nheads", type=positive_int, default=8)
    add(g, "--detr_dim_feedforward", type=positive_int, default=1024)
    add(g, "--detr_enc_layers", type=nonneg_int, default=2)
    add(g, "--detr_dec_layers", type=positive_int, default=6)
    add(g, "--detr_pre_norm", type=flag01, default=0, help="0/1 (the original's type=bool is fixed)")
    add(g, "--num_moment_queries", type=positive_int, default=1)
    add(g, "--decoder_SA", type=flag01, default=0,
        help="decoder self-attention; with --decoder_SA_fix 0 (the original) only a parse-time check: "
             "--num_moment_queries > 1 needs it")
    add(g, "--predict_center", type=flag01, default=0, help="predict the centre only; width = video length")
    unused("--reg_mlp_num_layers", type=positive_int, default=3, why="(unused in the original too)")

    g = p.add_argument_group("losses")
    unused("--l1_loss", type=flag01, default=1,
           why="(only 1; 0 is refused: the span losses are the detector's training signal)")
    add(g, "--aux_loss", type=flag01, default=1, help="losses on every decoder layer")
    add(g, "--contrastive_align_loss", type=flag01, default=1)
    unused("--moment_loss", type=flag01, default=0, why="(only 0; 1 is refused)")
    unused("--audio_short_cut", type=flag01, default=0, why="(only 0; 1 is refused)")
    add(g, "--contrastive_dim", type=positive_int, default=256)
    unused("--position_embedding", default="sine", choices=["sine", "learned"],
           why="(only sine; learned is refused: it raises in the original)")
    unused("--input_dropout", type=probability, default=0.5, why="(unused in the original too)")
    add(g, "--ret_loss_weight", where=("train",), type=nonneg_float, default=1.0)
    add(g, "--loc_loss_weight", where=("train",), type=nonneg_float, default=1.0)
    unused("--ignore_same_music", type=flag01, default=1,
           why="(no effect in the original either; see --mask_same_music)")

    g = p.add_argument_group("fidelity fixes (default: the original's behaviour; see model/DIFFERENCES.md)")
    add(g, "--train_query_pos", where=("train",), type=flag01, default=0,
        help="1: optimise the decoder's positional query (frozen at its random init in the original)")
    add(g, "--decoder_SA_fix", type=flag01, default=0,
        help="1: honour --decoder_SA (the original always runs decoder self-attention)")
    add(g, "--temporal_dropout", type=probability, default=0.8,
        help="dropout of the temporal self-attention layers (0.8 in the original)")
    add(g, "--residual_from_input", type=flag01, default=0,
        help="1: standard pre-norm residuals in the temporal layers (original: from the normalised input)")
    add(g, "--separate_positions", type=flag01, default=0,
        help="1: DETR sine positions per modality (original: over the concatenated mask)")
    add(g, "--mask_same_music", where=("train",), type=flag01, default=0,
        help="1: other videos of the same track are not negatives in the retrieval loss")

    g = p.add_argument_group("run")
    unused("--do_train", action=argparse.BooleanOptionalAction, default=train,
           why="(train.py always trains, test.py never: the other value is refused)")
    add(g, "--do_eval", where=("train",), action=argparse.BooleanOptionalAction, default=True,
        elsewhere="(test.py always evaluates: --no-do_eval is refused)", help="validate on --val_csv every epoch (best checkpoints, early stopping)")
    add(g, "--start_epoch", where=("train",), type=nonneg_int, default=0,
        help="epochs already done: training starts at epoch start_epoch + 1")
    add(g, "--epochs", where=("train",), type=positive_int, default=100)
    add(g, "--seed", where=("train",), type=seed_int, default=42,
        help="initial weights, data order and dropout")
    add(g, "--batch_size_train", where=("train",), type=positive_int, default=512)
    add(g, "--batch_size_val", type=positive_int, default=40)
    add(g, "--num_workers", type=nonneg_int, default=32, help="data loader workers (capped at the CPU count)")
    unused("--world_size", type=nonneg_int, default=0, why="(taken from torchrun's environment)")
    unused("--rank", type=nonneg_int, default=0, why="(taken from torchrun's environment)")
    unused("--local_rank", type=nonneg_int, default=int(os.environ.get("LOCAL_RANK", 0)),
           why="(taken from torchrun's environment; torch.distributed.launch passes it)")
    add(g, "--device", default="auto", choices=["auto", "cpu", "cuda"])
    add(g, "--amp", default="none", choices=["none", "bf16", "fp16"], help="mixed precision: bf16 or fp16 on CUDA, bf16 on the CPU (fast with AMX or AVX512-BF16)")
    add(g, "--compile", where=("train",), action="store_true", help="torch.compile the model")
    add(g, "--overwrite", where=("train",), action="store_true",
        help="train into a folder that holds a run (its files are moved into a replaced-<time> subfolder)")
    add(g, "--eval_chunk", type=nonneg_int, default=0,
        help="videos per chunk of the exact all-pairs retrieval scoring (0 = automatic)")
    add(g, "--metrics_json", default=None,
        help="also write the metrics to this JSON file (train.py: the last validation's)")

    g = p.add_argument_group("display")
    add(g, "--num_display", where=("train",), type=positive_int, default=10, help="progress lines per epoch")
    add(g, "--tb_writer", where=("train",), type=flag01, default=1, help="TensorBoard events in the run folder")
    add(g, "--save_model", where=("train",), type=flag01, default=1 if train else 0,
        help="write the best and last checkpoints")
    add(g, "--save_json", where=("test",), type=flag01, default=0, help="write per-video predictions")

    if train:
        g = p.add_argument_group("optimisation")
        unused("--gradient_accumulation_steps", type=positive_int, default=1, why="(unused in the original too)")
        g.add_argument("--matching_lr", type=positive_float, default=3e-4, help="temporal + matching groups")
        g.add_argument("--detection_lr", type=positive_float, default=3e-4)
        g.add_argument("--decay_rate", type=positive_float, default=0.9, help="exponential scheduler only")
        g.add_argument("--max_grad_norm", type=positive_float, default=1.0, help="clipped per parameter group")
        g.add_argument("--scheduler", default="warmupcosine",
                       choices=["warmupcosine", "warmuplinear", "warmupconstant", "constant", "exponential"])
        g.add_argument("--lr_update_rate", type=positive_int, default=40,
                       help="steps per update of the exponential scheduler (the others update every step, "
                            "as in the original)")
        g.add_argument("--warmup_rate", type=unit_interval, default=0.02)
        g.add_argument("--resume", default=None, help="continue a run from its pytorch_model.bin.last (or run folder)")
        g.add_argument("--feature_device", default="auto", choices=["auto", "cpu", "cuda"],
                       help="where the training split's features are held: 'cuda' copies them once to the "
                            "training GPU and gathers each batch there (no host loading per step); 'cpu' holds "
                            "them as tensors in host memory; 'auto' = cuda when training on CUDA from the packed "
                            "store and they fit in half the free GPU memory, else the DataLoader. Same batches "
                            "(ids, order, values) on every path (utils/data/resident.py)")
        g.add_argument("--local_negatives", type=flag01, default=0,
                       help="under torchrun: 1 = retrieval-loss negatives from each process's own "
                            "batch_size_train/N rows only (less memory); 0 = the global batch, as on one GPU")
    else:
        g = p.add_argument_group("test")
        g.add_argument("--test_best", type=flag01, default=1,
                       help="evaluate the best checkpoints found in --load_uni_model_path")
        g.add_argument("--prior_csv", default="",
                       help="split whose track usage counts as known, for the seen/unseen/canonical breakdown "
                            "(utils/evaluate/track_prior.py); empty = the checkpoint's --train_csv when that file exists; "
                            "'none' = no breakdown")
        g.add_argument("--save_json_ranking", type=nonneg_int, default=100,
                       help="tracks in each video's ranked_music_ids in the --save_json file (0 = all: what "
                            "`python -m utils.evaluate` needs to reproduce MedianR/MeanR/MRR exactly)")

    g = p.add_argument_group(COMPAT_TITLE, COMPAT_DESCRIPTION[mode])
    for names, kw in compat:
        g.add_argument(*names, **kw)
    return p


def compat_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Destinations of the flags in the parser's COMPAT_TITLE group."""
    group = next(g for g in parser._action_groups if g.title == COMPAT_TITLE)
    return {a.dest for a in group._group_actions}


def parser_defaults(mode: str) -> dict:
    """Every flag's default in `mode` (before _derive): the one statement of the defaults."""
    return {a.dest: a.default for a in get_parser(mode)._actions if a.dest != "help"}


# ------------------------------------------------------------------ validation
def _unsupported(args: argparse.Namespace, mode: str) -> list[str]:
    """Messages for choices that crash in the original, are not reproduced here or would be ignored."""
    errors = []

    def bad(condition: bool, message: str) -> None:
        if condition:
            errors.append(message)

    bad(args.stride not in MUSIC_DIRS,
        f"--stride {args.stride}: must be one of 2.5, 5, 7.5, 10 (the feature folders that exist; "
        "the original raises KeyError)")
    # Crashes of the original.
    bad(args.mml_fusion == "add", "--mml_fusion add has no forward branch in the original (crash); use concat")
    bad(args.vmr_loss in ("dual_single", "dual_single_oneloss"),
        f"--vmr_loss {args.vmr_loss} raises ValueError in the original's forward; use dual_single_loss_fuse, "
        "dual_single_sim_fuse, dual_single_feature_fuse, dual or single")
    bad(args.vmr_fusion == "XA", "--vmr_fusion XA builds no pooling module in the original (crash); use XA-music")
    bad(args.span_loss_type == "ce", "--span_loss_type ce crashes in the original's matcher; use l1")
    bad(args.position_embedding == "learned", "--position_embedding learned raises in the original; use sine")
    bad(args.moment_loss and not args.contrastive_align_loss,
        "--moment_loss 1 with --contrastive_align_loss 0 crashes in the original (no proj_queries)")
    # The original's own parse-time checks.
    bad(args.vmr_fusion.startswith("XA") and "single" not in args.vmr_loss,
        f"--vmr_fusion {args.vmr_fusion} needs a vmr_loss with a single-tower term (not {args.vmr_loss}); "
        "use --vmr_fusion NO with --vmr_loss dual")
    bad(args.num_moment_queries > 1 and not args.decoder_SA,
        "--num_moment_queries > 1 needs --decoder_SA 1 (the original's check)")
    bad(bool(args.audio_short_cut) and not (args.moment_loss or args.contrastive_align_loss),
        "--audio_short_cut 1 needs --moment_loss 1 or --contrastive_align_loss 1 (the original's check)")
    # Working in the original but not reproduced (behaviour not specified well enough).
    bad(args.vmr_fusion in ("XA-video", "XA-video-music", "XA-music-video"),
        f"--vmr_fusion {args.vmr_fusion} (music-guided video pooling) is not supported; use XA-music or NO")
    bad(args.vmr_fusion == "NO" and "single" in args.vmr_loss,
        f"--vmr_loss {args.vmr_loss} needs the X-Pool module: use --vmr_fusion XA-music")
    bad(args.mml_fusion == "CA", "--mml_fusion CA (cross-attention fusion) is not supported; use concat")
    bad(args.agg_module == "mlp", "--agg_module mlp is not supported; use transf or None")
    bad(args.video_encoder_type != "ViT" or args.audio_encoder_type != "AST",
        "only --video_encoder_type ViT and --audio_encoder_type AST features are supported")
    bad(args.distance_type == "L2",
        "--distance_type L2 ranks distances in descending order in the original (wrong); use COS")
    bad(bool(args.moment_loss), "--moment_loss 1 is not supported")
    bad(bool(args.audio_short_cut), "--audio_short_cut 1 is not supported")
    bad(not args.l1_loss, "--l1_loss 0 is not supported (the span losses are the detector's training signal)")
    bad(args.moment_query_type == "xpool" and args.vmr_fusion != "XA-music",
        "--moment_query_type xpool needs --vmr_fusion XA-music")
    bad(args.mml_localization == "regression" and args.num_moment_queries != 1,
        "--mml_localization regression predicts one moment: use --num_moment_queries 1")
    # Sizes.
    bad(args.dim_input % 2 != 0, f"--dim_input {args.dim_input}: must be even (sine positions)")
    bad(args.dim_input % args.SA_temporal_heads != 0,
        f"--dim_input {args.dim_input} must be divisible by --SA_temporal_heads {args.SA_temporal_heads}")
    bad(args.dim_input % args.detr_nheads != 0,
        f"--dim_input {args.dim_input} must be divisible by --detr_nheads {args.detr_nheads}")
    bad(args.agg_module == "transf" and (args.video_transformer_depth < 1 or args.audio_transformer_depth < 1),
        "--agg_module transf needs --video_transformer_depth and --audio_transformer_depth >= 1")
    bad(args.agg_module == "transf" and args.max_v_frames > args.video_attention_seqlen,
        f"--max_v_frames {args.max_v_frames} exceeds the video positional table (--video_attention_seqlen "
        f"{args.video_attention_seqlen})")
    if args.stride in MUSIC_DIRS:
        snippets = int(args.max_m_duration / args.stride)
        bad(snippets < 1, f"--max_m_duration {args.max_m_duration} is shorter than one --stride")
        bad(args.agg_module == "transf" and snippets > MUSIC_PE_LEN,
            f"--max_m_duration / --stride = {snippets} snippets exceeds the music positional table ({MUSIC_PE_LEN})")
    bad(args.with_cls_token and args.agg_module != "transf", "--with_cls_token 1 needs --agg_module transf")
    bad(args.transformer_is_share and args.video_transformer_depth != args.audio_transformer_depth,
        "--transformer_is_share 1 needs equal video/audio transformer depths")
    # What the script does is not a flag here: train.py trains (and validates with --do_eval),
    # test.py evaluates.
    bad(mode == "train" and not args.do_train,
        "--no-do_train: train.py always trains; evaluate a checkpoint with test.py")
    bad(mode == "test" and args.do_train, "--do_train: test.py only evaluates; train with train.py")
    bad(mode == "test" and not args.do_eval, "--no-do_eval: test.py always evaluates")
    bad(mode == "train" and args.metrics_json is not None and not args.do_eval,
        "--metrics_json writes the last validation's metrics: it needs --do_eval")
    return errors


def _derive(args: argparse.Namespace) -> None:
    """Fields the original's parse_option fills in."""
    for name in ("train_data", "val_data", "test_data"):
        value = getattr(args, name)
        if not value.endswith("_uni"):
            setattr(args, name, value + "_uni")
    args.max_snippet_num = int(args.max_m_duration / args.stride)
    if "transf" not in args.agg_module:
        args.video_transformer_depth = args.audio_transformer_depth = 0
    args.hidden_dim = args.detr_hidden_dim = args.dim_input
    args.music_frozen_feature_path = os.path.join(args.frozen_feature_path, MUSIC_DIRS[args.stride])
    args.frame_frozen_feature_path = os.path.join(args.frozen_feature_path, VIDEO_DIR)


def parse_args(argv: Sequence[str] | None = None, mode: str = "train") -> argparse.Namespace:
    """Parse, validate (parser.error with a clear message) and derive; argv None = sys.argv."""
    parser = get_parser(mode)
    args = parser.parse_args(argv)
    args.stride = float(args.stride)
    errors = _unsupported(args, mode)
    if errors:
        parser.error("\n  ".join(["unsupported option combination:"] + errors))
    _derive(args)
    args.mode = mode
    return args
