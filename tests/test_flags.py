"""Every flag of train.py and test.py reaches something; the compatibility group reaches nothing.

train.plan(argv) and test.plan(argv) build a run with the functions the run itself uses and
describe it as plain values (utils/train/plan.py): the model configuration and initial weights,
the criterion's settings, the optimiser's groups, the learning rate at every step, the loaders
(rows, batches, workers, feature store, first batch), the run folder, the log and the output
files. For every flag outside the compatibility group (utils.train.options.COMPAT_TITLE), the
plan of the tiny base command line plus a non-default value must differ from the base's at the
place listed here:
  * a model flag: its MaDeConfig field (model/config_flags.py maps flags to fields);
  * any other flag: the plan entry given in TRAIN_FLAGS / TEST_FLAGS;
  * a flag the run only reads while it runs (RUNTIME_*): the plan copies its value, and the
    table says where the run reads it.
Some flags act only together with another: their entry's context is added to both command lines.
A new flag outside the compatibility group fails test_every_flag_is_listed until it has an
entry, and then test_flag_reaches_its_place until its value changes that entry. Every flag in
the compatibility group must leave the plan exactly as it is, for every value the parser accepts.
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO_ROOT, TINY_MODEL, demo_paths, linked_feature_root, subset_csv, tiny_checkpoint

from model.config_flags import CONFIG_FLAGS, DERIVED_FIELDS, model_flags
from utils.train.options import COMPAT_TITLE, MODES, compat_flags, get_parser, parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Model flags: (non-default value, context). Checked at ("model", "config", <their MaDeConfig fields>).
MODEL_FLAGS = {
    "dim_input": (["--dim_input", "64"], []),
    "video_attention_seqlen": (["--video_attention_seqlen", "100"], []),
    "agg_module": (["--agg_module", "None"], []),
    "video_transformer_depth": (["--video_transformer_depth", "2"], []),
    "audio_transformer_depth": (["--audio_transformer_depth", "2"], []),
    "SA_temporal_heads": (["--SA_temporal_heads", "4"], []),
    "temporal_dropout": (["--temporal_dropout", "0.5"], []),
    "residual_from_input": (["--residual_from_input", "1"], []),
    "with_cls_token": (["--with_cls_token", "1"], []),
    "with_act_after_proj": (["--with_act_after_proj", "1"], []),
    "transformer_is_share": (["--transformer_is_share", "1"], []),
    "vmr_fusion": (["--vmr_fusion", "NO", "--vmr_loss", "dual"], []),  # NO works with "dual" only, XA-music not with it
    "vmr_loss": (["--vmr_loss", "dual_single_sim_fuse"], []),
    "fusion_mask": (["--fusion_mask", "0"], []),
    "temperature_init_value": (["--temperature_init_value", "0.07"], []),
    "mml_localization": (["--mml_localization", "regression"], []),
    "moment_query_type": (["--moment_query_type", "music"], []),
    "num_moment_queries": (["--num_moment_queries", "2"], ["--decoder_SA", "1"]),
    "predict_center": (["--predict_center", "1"], []),
    "max_m_duration": (["--max_m_duration", "241"], []),  # still 96 snippets of 2.5 s: the demo features fit
    "detr_nheads": (["--detr_nheads", "4"], []),
    "detr_dim_feedforward": (["--detr_dim_feedforward", "128"], []),
    "detr_dropout": (["--detr_dropout", "0.2"], []),
    "detr_enc_layers": (["--detr_enc_layers", "2"], []),
    "detr_dec_layers": (["--detr_dec_layers", "3"], []),
    "detr_pre_norm": (["--detr_pre_norm", "1"], []),
    "aux_loss": (["--aux_loss", "0"], []),
    "contrastive_align_loss": (["--contrastive_align_loss", "0"], []),
    "contrastive_dim": (["--contrastive_dim", "16"], []),
    "separate_positions": (["--separate_positions", "1"], []),
    "moment_head": (["--moment_head", "boundary"], []),
    "stride": (["--stride", "5"], []),
    "decoder_SA_fix": (["--decoder_SA_fix", "1"], []),
    # With --decoder_SA_fix 0 (the original), --decoder_SA only allows --num_moment_queries > 1.
    "decoder_SA": (["--decoder_SA", "1"], ["--decoder_SA_fix", "1"]),
    "fb_label": (["--fb_label", "10"], []),
}

# train.py's other flags: (plan entry, non-default value, context). "{name}" = a file of the `setting` fixture.
TRAIN_FLAGS = {
    "name": (("run", "folder"), ["--name", "other"], []),
    "output_dir": (("run", "folder"), ["--output_dir", "{out2}"], []),
    "train_data": (("run", "folder"), ["--train_data", "other"], []),
    "train_csv": (("data", "train", "ids"), ["--train_csv", "{other_train}"], []),
    "val_csv": (("data", "val", "ids"), ["--val_csv", "{other_val}"], []),
    "max_v_frames": (("data", "train", "store", "num_frames"), ["--max_v_frames", "40"],
                     ["--frozen_feature_path", "{frames40}", "--train_csv", "{frames40_train}",
                      "--val_csv", "{frames40_val}"]),
    "skip_bad_rows": (("data", "train", "rows"), ["--skip_bad_rows"], ["--train_csv", "{bad_train}"]),
    "use_packed": (("data", "train", "store", "backends"), ["--use_packed", "0"],
                   ["--frozen_feature_path", "{packed}"]),
    "frozen_feature_path": (("data", "train", "store", "root"), ["--frozen_feature_path", "{features_link}"], []),
    "dual_single_loss_weight": (("criterion", "retrieval", "weight"), ["--dual_single_loss_weight", "0.5"],
                                ["--vmr_loss", "dual_single_sim_fuse"]),  # loss_fuse ignores it, as the original
    "ret_loss_weight": (("criterion", "criterion", "ret_loss_weight"), ["--ret_loss_weight", "2"], []),
    "loc_loss_weight": (("criterion", "criterion", "loc_loss_weight"), ["--loc_loss_weight", "2"], []),
    "mask_same_music": (("criterion", "retrieval", "mask_same_music"), ["--mask_same_music", "1"], []),
    "train_query_pos": (("optimizer", "groups"), ["--train_query_pos", "1"], []),
    "matching_lr": (("optimizer", "groups"), ["--matching_lr", "1e-3"], []),
    "detection_lr": (("optimizer", "groups"), ["--detection_lr", "1e-3"], []),
    "scheduler": (("schedule", "lr"), ["--scheduler", "constant"], []),
    "warmup_rate": (("schedule", "lr"), ["--warmup_rate", "0.5"], []),
    "decay_rate": (("schedule", "lr"), ["--decay_rate", "0.5"], ["--scheduler", "exponential", "--lr_update_rate", "2"]),
    "lr_update_rate": (("schedule", "lr"), ["--lr_update_rate", "2"], ["--scheduler", "exponential"]),
    "epochs": (("schedule", "lr"), ["--epochs", "4"], []),
    "batch_size_train": (("data", "train", "batch_size"), ["--batch_size_train", "16"], []),
    "batch_size_val": (("data", "val", "batch_size"), ["--batch_size_val", "4"], []),
    "num_workers": (("data", "train", "workers"), ["--num_workers", "1"], []),
    "feature_device": (("data", "train", "features_on"), ["--feature_device", "cpu"], []),
    "do_eval": (("data", "val"), ["--no-do_eval"], []),
    "seed": (("model", "initial_weights"), ["--seed", "8"], []),
    "start_epoch": (("run", "epochs"), ["--start_epoch", "1"], []),
    "num_display": (("run", "log_every_steps"), ["--num_display", "1"], []),
    "resume": (("run", "folder"), ["--resume", "{resume_run}"], []),
}
# Read as the run goes: (plan entry, non-default value, where the run reads it).
RUNTIME_TRAIN = {
    "device": (("runtime", "device"), ["--device", "auto"], "train.train: resolve_device"),
    "amp": (("runtime", "amp"), ["--amp", "bf16"], "utils/train/loop.autocast_context and grad_scaler"),
    "compile": (("runtime", "compile"), ["--compile"], "utils/train/setup.build_training"),
    "eval_chunk": (("runtime", "eval_chunk"), ["--eval_chunk", "5"], "utils/evaluate/engine.evaluate_collected"),
    "local_negatives": (("runtime", "local_negatives"), ["--local_negatives", "1"],
                        "utils/train/setup.build_training, under torchrun only (tests/test_distributed.py)"),
    "max_grad_norm": (("optimizer", "clip_grad_norm_per_group"), ["--max_grad_norm", "0.5"],
                      "utils/train/loop.optimization_step"),
    "overwrite": (("outputs", "set_aside_previous_run"), ["--overwrite"],
                  "train.main (check_new_run_dir) and train.train (set_aside_previous_run)"),
    "save_model": (("outputs", "checkpoints"), ["--save_model", "0"], "train.train"),
    "tb_writer": (("outputs", "tensorboard"), ["--tb_writer", "0"], "train.train (Scalars)"),
    "metrics_json": (("outputs", "metrics_json"), ["--metrics_json", "{out2}/m.json"], "train.train, at the end"),
}

TEST_FLAGS = {
    "name": (("outputs", "log_file"), ["--name", "other"], []),
    "output_dir": (("outputs", "fallback_log_dir"), ["--output_dir", "{out2}"], []),
    "load_uni_model_path": (("checkpoints",), ["--load_uni_model_path", "{weights2}"], []),
    "test_best": (("checkpoints",), ["--test_best", "0"], ["--load_uni_model_path", "{test_run}"]),
    "test_data": (("outputs", "log_dir"), ["--test_data", "other"], []),
    "test_csv": (("data", "ids"), ["--test_csv", "{other_val}"], []),
    "max_v_frames": (("data", "store", "num_frames"), ["--max_v_frames", "40"],
                     ["--frozen_feature_path", "{frames40}", "--test_csv", "{frames40_val}"]),
    "skip_bad_rows": (("data", "rows"), ["--skip_bad_rows"], ["--test_csv", "{bad_val}"]),
    "use_packed": (("data", "store", "backends"), ["--use_packed", "0"], ["--frozen_feature_path", "{packed}"]),
    "frozen_feature_path": (("data", "store", "root"), ["--frozen_feature_path", "{features_link}"], []),
    "batch_size_val": (("data", "batch_size"), ["--batch_size_val", "4"], []),
    "num_workers": (("data", "workers"), ["--num_workers", "1"], []),
    "metrics_json": (("outputs", "metrics_json"), ["--metrics_json", "{out2}/m.json"], []),
    "prior_csv": (("outputs", "prior"), ["--prior_csv", "{train}"], []),
}
RUNTIME_TEST = {
    "device": (("runtime", "device"), ["--device", "auto"], "test.main: resolve_device"),
    "amp": (("runtime", "amp"), ["--amp", "bf16"], "utils/evaluate/engine.collect (autocast_context)"),
    "eval_chunk": (("runtime", "eval_chunk"), ["--eval_chunk", "5"], "utils/evaluate/engine.evaluate_collected"),
    "save_json": (("outputs", "save_json"), ["--save_json", "1"], "test.main"),
    "save_json_ranking": (("outputs", "save_json_ranking"), ["--save_json_ranking", "5"], "test.prediction_rows"),
}
TABLES = {"train": (TRAIN_FLAGS, RUNTIME_TRAIN), "test": (TEST_FLAGS, RUNTIME_TEST)}
# In their context (a CSV with a bad row, videos of 40 frames) the base command line fails, and this
# flag's value makes it work: (the base's error, a phrase of it).
FAILS_WITHOUT = {"skip_bad_rows": ("AnnotationError", "bad row"), "max_v_frames": ("FeatureError", "expected 50")}


# ------------------------------------------------------------------ set-up
@pytest.fixture(scope="module")
def setting(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Small CSVs, feature roots (linked, packed), a run to resume and checkpoints to test."""
    from conftest import load_script

    from model.made import build_model
    from utils.train.checkpoint import LAST_NAME, save_checkpoint
    root = tmp_path_factory.mktemp("flags")
    demo = demo_paths(demo_data)
    s = {"features": demo["features"], "out": root / "out", "out2": root / "out2",
         "train": subset_csv(demo["train"], root / "train_data.csv", 32),
         "other_train": subset_csv(demo["train"], root / "other" / "train_data.csv", 40),
         "val": subset_csv(demo["val"], root / "val_data.csv", 16),
         "other_val": subset_csv(demo["val"], root / "other" / "val_data.csv", 12)}
    for name, src in (("bad_train", s["other_train"]), ("bad_val", s["val"])):
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        fields = lines[-1].split(",")
        fields[4] = "not-a-time"  # music_start
        s[name] = root / "bad" / src.name
        s[name].parent.mkdir(exist_ok=True)
        s[name].write_text("".join(lines[:-1]) + ",".join(fields), encoding="utf-8")
    # Videos of 40 frames (the base expects 50).
    frames40 = load_script("make_demo_data").make_demo_data(root / "frames40", num_music=8, num_videos=24,
                                                             val_size=4, test_size=4, seed=1, num_frames=40)
    s["frames40"] = demo_paths(frames40)["features"]
    s["frames40_train"], s["frames40_val"] = demo_paths(frames40)["train"], demo_paths(frames40)["val"]
    s["features_link"] = root / "features_link"
    s["features_link"].symlink_to(demo["features"], target_is_directory=True)
    s["packed"] = linked_feature_root(demo["features"], root / "packed", [s["train"], s["val"]])
    load_script("pack_features").pack(s["packed"], progress=False)
    # A run to --resume, written with the base command line's settings.
    args = parse_args(_fill(_base("train"), s), mode="train")
    s["resume_run"] = root / "resume_run"
    s["resume_run"].mkdir()
    save_checkpoint(s["resume_run"] / LAST_NAME, build_model(args), args, epoch=1, resume_state={
        "optimizer": {}, "scheduler": {}, "global_step": 4, "bests": {}, "best_epochs": {}, "history": [],
        "rng": {}})
    # Checkpoints without settings (the authors' kind: the command line's model flags apply) and a run folder.
    for name in ("weights", "weights2"):
        s[name] = root / name / "pytorch_model.bin"
        s[name].parent.mkdir()
        torch.save(build_model(parse_args(TINY_MODEL)).state_dict(), s[name])
    s["test_run"] = root / "test_run"
    for checkpoint in ("pytorch_model.bin.best_r1", LAST_NAME):
        tiny_checkpoint(s["test_run"] / checkpoint)
    return s


def _base(mode: str) -> list[str]:
    common = [*TINY_MODEL, "--frozen_feature_path", "{features}", "--output_dir", "{out}", "--batch_size_val", "8",
              "--device", "cpu", "--num_workers", "0"]
    if mode == "train":
        return [*common, "--train_csv", "{train}", "--val_csv", "{val}", "--epochs", "3", "--batch_size_train", "8",
                "--seed", "7"]
    return [*common, "--load_uni_model_path", "{weights}", "--test_csv", "{val}"]


def _fill(argv: list[str], s: dict) -> list[str]:
    return [a.format(**{k: str(v) for k, v in s.items()}) for a in argv]


def _script(mode: str):
    name = f"_mgsv_flags_{mode}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{mode}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@functools.lru_cache(maxsize=None)
def _outcome(mode: str, argv: tuple[str, ...]):
    """The plan of `mode`.py argv, or ("refused" | the error's class name, message)."""
    try:
        return _script(mode).plan(list(argv))
    except SystemExit:
        return ("refused", "")
    except Exception as e:  # noqa: BLE001 (the test reports what failed)
        return (type(e).__name__, str(e))


def _plan(mode: str, argv: list[str], s: dict):
    return _outcome(mode, tuple(_fill(_base(mode) + argv, s)))


def _at(plan, path: tuple[str, ...]):
    assert isinstance(plan, dict), f"no plan: {plan}"
    for key in path:
        plan = plan[key]
    return plan


def _effective(mode: str) -> set[str]:
    parser = get_parser(mode)
    return {a.dest for a in parser._actions if a.dest != "help"} - compat_flags(parser)


def _model_fields(flag: str) -> list[str]:
    fields = [f for f, fl in CONFIG_FLAGS.items() if fl == flag]
    return fields + [f for f, (flags, _) in DERIVED_FIELDS.items() if flag in flags]


def _checks(mode: str) -> list[tuple[str, tuple, list[str], list[str]]]:
    """(flag, plan entries, value, context) for every listed flag of `mode`."""
    flags, runtime = TABLES[mode]
    out = [(f, tuple(("model", "config", field) for field in _model_fields(f)), value, context)
           for f, (value, context) in MODEL_FLAGS.items()]
    out += [(f, (path,), value, context) for f, (path, value, context) in flags.items()]
    out += [(f, (path,), value, []) for f, (path, value, _) in runtime.items()]
    return out


CHECKS = [(mode, *check) for mode in MODES for check in _checks(mode)]


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("mode", MODES)
def test_every_flag_is_listed(mode: str) -> None:
    """Every flag outside the compatibility group has one entry here, and every entry is such a flag."""
    flags, runtime = TABLES[mode]
    tables = [set(MODEL_FLAGS), set(flags), set(runtime)]
    assert sum(len(t) for t in tables) == len(set().union(*tables)), "a flag is listed twice"
    listed = set().union(*tables)
    unlisted = sorted(_effective(mode) - listed)
    assert not unlisted, (f"{mode}.py flags outside the '{COMPAT_TITLE}' group with no entry in tests/test_flags.py: "
                          f"{unlisted}. Give each the value and the plan entry it changes, or, if it changes "
                          "nothing, move it to that group.")
    assert not listed - _effective(mode), f"listed but not an effective {mode}.py flag: {sorted(listed - _effective(mode))}"
    assert set(MODEL_FLAGS) == set(model_flags()), "MODEL_FLAGS must cover model/config_flags.py"


@pytest.mark.parametrize("mode,flag,paths,value,context", CHECKS, ids=[f"{c[0]}-{c[1]}" for c in CHECKS])
def test_flag_reaches_its_place(setting: dict, mode: str, flag: str, paths: tuple, value: list[str],
                                context: list[str]) -> None:
    before = _plan(mode, context, setting)
    after = _plan(mode, context + value, setting)
    if flag in FAILS_WITHOUT:
        error, phrase = FAILS_WITHOUT[flag]
        assert isinstance(before, tuple) and before[0] == error and phrase in before[1], before
        assert isinstance(after, dict), f"{' '.join(value)}: {after}"
        _at(after, paths[0])
        return
    assert isinstance(before, dict), f"the base command line{' + ' + ' '.join(context) if context else ''}: {before}"
    assert isinstance(after, dict), f"{' '.join(value)}: {after}"
    assert paths, f"--{flag}: no plan entry"
    for path in paths:
        assert _at(after, path) != _at(before, path), f"{mode}.py {' '.join(value)} leaves {path} unchanged"


def _other_values(action: argparse.Action) -> list[list[str]]:
    """Command-line pieces giving the flag each kind of non-default value."""
    flag = action.option_strings[0]
    if isinstance(action, argparse.BooleanOptionalAction):
        return [[f"--no-{flag[2:]}" if action.default else flag]]
    if isinstance(action, argparse._StoreTrueAction):
        return [[flag]]
    if action.choices:
        return [[flag, c] for c in action.choices if c != action.default]
    default = action.default
    if isinstance(default, bool) or action.type is not None and action.type.__name__ == "flag01":
        return [[flag, str(1 - int(default))]]
    if isinstance(default, int):
        return [[flag, str(default + 1)], [flag, "0"]]
    if isinstance(default, float):
        return [[flag, str(default * 0.5 if default else 0.5)]]
    return [[flag, "elsewhere/other"]]


def _compat_cases() -> list[tuple[str, str, list[str]]]:
    cases = []
    for mode in MODES:
        parser = get_parser(mode)
        group = compat_flags(parser)
        cases += [(mode, a.dest, value) for a in parser._actions if a.dest in group for value in _other_values(a)]
    return cases


COMPAT = _compat_cases()


@pytest.mark.parametrize("mode,flag,value", COMPAT, ids=[f"{m}-{' '.join(v)}" for m, _, v in COMPAT])
def test_compatibility_flag_changes_nothing(setting: dict, mode: str, flag: str, value: list[str]) -> None:
    """A flag of the compatibility group: the parser refuses the value (with a reason), or the plan is the same."""
    after = _plan(mode, value, setting)
    if after == ("refused", ""):
        return
    assert after == _plan(mode, [], setting), f"{mode}.py {' '.join(value)} changes the plan"


def test_compatibility_group_is_last_in_help() -> None:
    for mode in MODES:
        parser = get_parser(mode)
        assert parser._action_groups[-1].title == COMPAT_TITLE
        text = parser.format_help()
        assert text.index(COMPAT_TITLE) > max(text.index(g.title) for g in parser._action_groups[2:-1])


def test_model_config_defaults_are_the_parsers() -> None:
    """MaDeConfig's own defaults (for code that builds a model without flags) equal the parser's."""
    from model.made import MaDeConfig
    for mode in MODES:
        assert MaDeConfig.from_args(parse_args([], mode=mode)) == MaDeConfig()
