"""Evaluate MaDe checkpoints on a split: SmG, MsG and MoR metrics of the paper.

    python test.py --load_uni_model_path RUN_DIR --test_best 1 --test_csv dataset/MGSV-EC/test_data.csv
    python test.py --load_uni_model_path RUN_DIR/pytorch_model.bin.best_r1 --metrics_json out.json

--load_uni_model_path takes a checkpoint file (ours or the authors') or a training
folder: with --test_best 1 the four best checkpoints found there are evaluated
(in the original's order), otherwise its last checkpoint.

Besides the paper's metrics it prints them on the videos whose track is seen / unseen in the
training CSV (--prior_csv; default: the checkpoint's --train_csv) and on the moments on / off
their track's canonical start: whether the model localises or remembers how a track is used.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from utils.device import check_amp, resolve_device
from utils.evaluate.engine import evaluate, per_video_predictions
from utils.evaluate.metrics import METRIC_KEYS, format_table
from utils.io import atomic_write_json, check_writable_file
from utils.logger import setup_logger
from utils.stopwatch import Stopwatch, process_seconds
from utils.train import distributed as D
from utils.train.checkpoint import (LAST_NAME, TEST_BEST_ORDER, CheckpointError, adopt_checkpoint_config,
                                    load_checkpoint, load_model_weights)
from utils.train.options import MODEL_KEYS, parse_args
from utils.train.preflight import evaluation_dir, prediction_identity, run_cli
from utils.train.setup import make_eval_loader, seed_everything, setup_process


def checkpoints_to_test(path: Path, test_best: int) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"--load_uni_model_path {path}: no such checkpoint file or training folder")
    names = TEST_BEST_ORDER if test_best else (LAST_NAME,)
    found = [path / n for n in names if (path / n).is_file()]
    if not found:
        raise CheckpointError(f"no checkpoint named {', '.join(names)} in {path}")
    return found


def prediction_rows(collected, details: dict, ranking: int) -> list[dict]:
    """The --save_json rows: utils.evaluate.engine.per_video_predictions plus, per video,
      ranked_music_ids  the best `ranking` tracks (0 = all), the ground truth placed after any
                        track with the same score, as the metrics rank it;
      pred_raw          [start, end] of the detector in seconds, before clipping, full precision.
    {video_id, ranked_music_ids, pred_st: pred_raw[0], pred_ed: pred_raw[1]} is the input of
    `python -m utils.evaluate`, which then gives this script's metrics (all of them with the
    full ranking; R@k, MoR@k for k <= ranking and SmG otherwise)."""
    from utils.evaluate.offline import predictions_from_scores
    records = predictions_from_scores(collected.video_ids, details["scores"], collected.unique_music_ids,
                                      collected.music_ids, collected.pred_se, top_k=ranking or None)
    rows = per_video_predictions(collected, details)
    for row, rec in zip(rows, records):
        row["ranked_music_ids"] = rec["ranked_music_ids"]
        row["pred_raw"] = [rec["pred_st"], rec["pred_ed"]]
    return rows


def usage_prior(args, state: dict, log, loaded: dict):
    """(prior CSV, its annotations) for the breakdown: --prior_csv, else the checkpoint's --train_csv
    when that file exists here; (None, None) when there is none or --prior_csv none. `loaded`
    caches the CSVs read (the checkpoints of one run share theirs)."""
    from utils.data.annotations import load_annotations
    if args.prior_csv.lower() == "none":
        return None, None
    path = args.prior_csv or (state.get("config") or {}).get("train_csv") or ""
    if not args.prior_csv and not Path(path).is_file():
        log.info("no training CSV known for this checkpoint: seen/unseen breakdown skipped (pass --prior_csv)")
        return None, None
    if path not in loaded:
        loaded[path] = load_annotations(path, args.max_m_duration, args.skip_bad_rows)
    return path, loaded[path]


def with_prior_name(target: Path) -> Path:
    """metrics.json -> metrics_with_prior.json: the boundary head decoded with the usage prior."""
    return target.with_name(f"{target.stem}_with_prior{target.suffix or '.json'}")


def metrics_json_paths(metrics_json: str | None, paths: list[Path]) -> list[Path]:
    """--metrics_json's file per checkpoint: the name itself for one, <stem>_<suffix>.json for several."""
    if not metrics_json:
        return []
    target = Path(metrics_json)
    if len(paths) == 1:
        return [target]
    return [target.with_name(f"{target.stem}_{p.name.split('.')[-1]}{target.suffix or '.json'}") for p in paths]


def split_name(csv_path: str) -> str:
    name = Path(csv_path).name
    return "test" if "test" in name else ("val" if "val" in name else Path(csv_path).stem)


def log_dir_name(args) -> str:
    """The folder of the log and --save_json files (beside the checkpoint, or under --output_dir)."""
    return f"{args.test_data}-{split_name(args.test_csv)}"


def log_file_name(args, stamp: str) -> str:
    """The log file's name, as the original names it (stamp: the start time)."""
    return f"{stamp}-uni-{args.name}-{args.test_data}_test.log"


def eval_loader(args, dist_info: D.DistInfo, device: torch.device):
    """The --test_csv split's loader for the settings in `args` (the checkpoint's, once adopted).
    Under torchrun every rank evaluates one shard; the metrics are over the whole split."""
    from utils.data.dataset import build_dataset
    dataset = build_dataset(args.test_csv, frozen_feature_path=args.frozen_feature_path,
                            stride=args.stride, max_m_duration=args.max_m_duration,
                            skip_bad_rows=args.skip_bad_rows, use_packed=bool(args.use_packed),
                            num_frames=args.max_v_frames, music_cache_size=EVAL_MUSIC_CACHE)
    return make_eval_loader(dataset, args.batch_size_val, dist_info, device, args)


def plan(argv: list[str]) -> dict:
    """What `python test.py argv` would evaluate and write, as plain values (utils/train/plan.py), without
    evaluating or writing anything: the checkpoints, the model configuration of the first one (its own
    settings adopted, as main() does), the split's loader, the output files and the runtime settings
    the evaluation reads. tests/test_flags.py compares the plans of two command lines."""
    from dataclasses import asdict

    from model.made import MaDeConfig
    from utils.logger import get_logger
    from utils.train.plan import loader_plan
    from utils.train.preflight import evaluation_dirs
    args = parse_args(argv, mode="test")
    device = resolve_device(args.device)
    check_amp(args.amp, device)
    ckpt_root = Path(args.load_uni_model_path)
    paths = checkpoints_to_test(ckpt_root, args.test_best)
    log_dir = evaluation_dir(ckpt_root, args.output_dir, log_dir_name(args))
    state = load_checkpoint(paths[0])
    adopt_checkpoint_config(args, state)
    loader = eval_loader(args, D.DistInfo(), device)
    prior_csv, prior = usage_prior(args, state, get_logger(), {})
    return {
        "checkpoints": [str(p) for p in paths],
        "model": {"config": asdict(MaDeConfig.from_args(args))},
        "data": loader_plan(loader),
        "outputs": {"log_dir": str(log_dir),
                    "fallback_log_dir": str(evaluation_dirs(ckpt_root, args.output_dir, log_dir_name(args))[1]),
                    "log_file": log_file_name(args, "<time>"),
                    "metrics_json": [str(p) for p in metrics_json_paths(args.metrics_json, paths)],
                    "prior": None if prior is None else {"csv": prior_csv, "rows": len(prior)},
                    "save_json": bool(args.save_json), "save_json_ranking": args.save_json_ranking},
        "runtime": {"device": args.device, "resolved_device": str(device), "amp": args.amp,
                    "eval_chunk": args.eval_chunk},
    }


# One pass over the split: an unbounded music cache would keep every track read from per-id files
# (~0.3 MB each, 0.6 GB for a 2,000-track split) to the end; a track that has left this bounded
# one is read from its file again (~0.2 ms).
EVAL_MUSIC_CACHE = 256
TIME_PHASES = ("setup", "load", "encode", "score", "metrics")


def main(argv: list[str] | None = None) -> int:
    # Where the wall time goes, logged last: "setup" is the interpreter's start, the imports, the flags, the
    # checkpoints and the models; "load" / "encode" / "score" / "metrics" as in utils.evaluate.engine.evaluate
    # (load includes reading the CSV and listing the feature folders); "other" the rest.
    watch = Stopwatch()
    from model.made import build_model
    from utils.data.annotations import load_annotations
    from utils.evaluate.engine import ious_with_usage_prior
    from utils.evaluate.metrics import metrics_from_ranks
    from utils.evaluate.track_prior import canonical_clips, subset_masks, subset_metrics, subset_table, track_starts

    args = parse_args(argv, mode="test")
    device, dist_info = setup_process(args)
    # The evaluation draws no random numbers (every weight comes from the checkpoint, the split is read
    # in order); the seed keeps the original's deterministic cuDNN settings.
    seed_everything(args.seed)
    ckpt_root = Path(args.load_uni_model_path)
    paths = checkpoints_to_test(ckpt_root, args.test_best)  # before the log folder is made beside them
    # Outputs are checked before the evaluation, not found unwritable after it.
    log_dir = evaluation_dir(ckpt_root, args.output_dir, log_dir_name(args))
    for out in metrics_json_paths(args.metrics_json, paths):
        check_writable_file(out, "--metrics_json")
    log = setup_logger(log_dir / log_file_name(args, time.strftime('%Y%m%d-%H%M%S')), is_main=dist_info.is_main)

    # The dataset depends on settings a checkpoint may carry (stride, max_m_duration, max_v_frames),
    # so it is built after each checkpoint's settings are adopted, and rebuilt only when they change.
    data_key, loader = None, None
    load_annotations(args.test_csv, args.max_m_duration, args.skip_bad_rows)  # a bad CSV fails before any loading
    priors: dict = {}
    if args.prior_csv and args.prior_csv.lower() != "none":  # a bad --prior_csv too
        usage_prior(args, {}, log, priors)
    watch.seconds["setup"] += process_seconds()

    def loader_for(args):
        nonlocal data_key, loader
        key = (args.stride, args.max_m_duration, args.max_v_frames)
        if key != data_key:
            loader = eval_loader(args, dist_info, device)
            data_key = key
            log.info(f"{args.test_csv}: {len(loader.dataset)} videos (stride {args.stride}); device {device}")
        return loader

    results, results_prior = {}, {}
    for path in paths:
        with watch.phase("setup"):
            state = load_checkpoint(path)
            changed = adopt_checkpoint_config(args, state)
            if changed:
                log.info(f"{path.name}: using the checkpoint's settings " + "; ".join(changed))
            model = build_model(args).to(device)
            load_model_weights(model, state, path)
        with watch.phase("load"):
            loader = loader_for(args)
        # No criterion: the evaluation losses are train.py's (its validation log), not reported here.
        metrics, collected, details = evaluate(model, None, loader, device, args,
                                               show_progress=dist_info.is_main, watch=watch)
        log.info(f"{path} (epoch {state.get('epoch')}):\n" + format_table({path.name: metrics}))
        prior_csv, prior = usage_prior(args, state, log, priors)
        if prior is not None:
            masks = subset_masks(collected.music_ids, collected.gt_se[:, 0], canonical_clips(prior))
            breakdown = subset_metrics(details["rank0"], details["ious"], masks)
            log.info(f"by track usage in {prior_csv} (seen/unseen track; on/off its canonical start "
                     f"within 1 s):\n" + format_table(subset_table(breakdown)))
            metrics = {**metrics, **breakdown}
            if collected.start_logits is not None:  # boundary head: also decoded with each track's history
                ious = ious_with_usage_prior(model, collected, track_starts(prior), args)
                combined = {**metrics_from_ranks(details["rank0"], ious),
                            **subset_metrics(details["rank0"], ious, masks)}
                results_prior[path.name] = combined
                log.info(f"boundary head decoded with the usage prior of {prior_csv} (its own row; retrieval "
                         f"unchanged):\n" + format_table({f"{path.name}+prior": combined}, columns=METRIC_KEYS)
                         + "\n" + format_table(subset_table(combined)))
        results[path.name] = metrics
        if args.save_json and dist_info.is_main:
            identity = prediction_identity(path, args.test_csv, {k: getattr(args, k) for k in (
                *MODEL_KEYS, "max_v_frames", "skip_bad_rows", "frozen_feature_path", "save_json_ranking")})
            out = log_dir / (f"uni_{split_name(args.test_csv)}_{state.get('epoch')}_{path.name.split('.')[-1]}_"
                             f"Mo-R1={metrics['R1_iou0.7']:.2f}_{identity}.json")
            atomic_write_json(prediction_rows(collected, details, args.save_json_ranking), out)
            log.info(f"per-video predictions: {out}")
    if args.metrics_json and dist_info.is_main:
        # A flat object with METRIC_KEYS (+ the "seen/mIoU"-style breakdown keys); several checkpoints
        # give one file each, named after the checkpoint's suffix (metrics_best_r1.json, ...).
        for path, out in zip(paths, metrics_json_paths(args.metrics_json, paths)):
            atomic_write_json(results[path.name], out)
            log.info(f"metrics written to {out}")
            if path.name in results_prior:
                atomic_write_json(results_prior[path.name], with_prior_name(out))
                log.info(f"metrics with the usage prior written to {with_prior_name(out)}")
    if len(results) > 1:
        log.info("summary:\n" + format_table({k: {m: v[m] for m in METRIC_KEYS} for k, v in results.items()}))
    log.info(f"time since the process started: {watch.line(TIME_PHASES, total=process_seconds())}")
    return 0   # run_cli tears the process group down


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
