"""Train MaDe on MGSV-EC (or on the synthetic demo data in the same layout).

    python train.py --do_train --do_eval [flags]                  # one device
    torchrun --nproc_per_node N train.py --do_train --do_eval ...  # data parallel
    python train.py --resume RUN_DIR                              # continue a stopped run

Defaults reproduce the authors' training script (scripts/train_kuai_all_feature.sh):
Adam with three parameter groups, warmup-cosine schedule stepped per iteration,
per-group gradient clipping, validation every epoch, four "best" checkpoints
and the original early-stopping rule. See model/DIFFERENCES.md
for what we changed and why.

Reliability:
  * Bad flags, CSVs, feature files and run folders are reported (exit status 2) before
    anything is written; the run folder is created only once the inputs are known to be good.
  * A folder that holds a run is never trained into again without --overwrite, which moves
    the old run's files into a `replaced-<time>` subfolder (nothing is ever deleted).
  * One process writes a run folder at a time: it holds an exclusive lock on <run>/.run.lock
    (utils/train/runlock.py) for the whole run; a second train.py on that folder (fresh, --resume or
    --overwrite) exits with status 2 naming the holder. The kernel drops the lock when the
    holder dies, so a killed run never blocks the next one.
  * pytorch_model.bin.last is written (atomically) at the end of every epoch with everything
    needed to continue: optimizer, schedule, step, best trackers (hence early stopping),
    history and RNG states. `--resume RUN_DIR` takes every training setting from it, so a run
    killed at any point (SIGKILL included) and resumed ends with the same checkpoints and
    metrics as an uninterrupted one: bit for bit on CPU with the same number of threads.
    Not bit for bit: CUDA (non-deterministic kernels, e.g. atomics in index_add/scatter
    backward), --compile, a resumed run with another number of processes, and --epochs
    raised on resume (the schedule is recomputed for the new length).
  * A NaN/inf loss (or parameters) stops the run with exit status 1; the checkpoints of the
    last completed epoch are kept as they were.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from utils.io import check_writable_dir, check_writable_file
from utils.logger import get_logger, setup_logger
from utils.train import runlock
from utils.train.options import parse_args
from utils.train.preflight import (RunDirError, check_batch_size, check_new_run_dir, given_flags, load_split,
                                   new_run_dir, resume_settings, run_cli, set_aside_previous_run)

if TYPE_CHECKING:
    import pandas as pd

# Early stopping (original): stop once epoch >= max(60, latest best epoch of these metrics + 20).
EARLY_STOP_METRICS = ("R1", "R5", "mIoU", "R1_iou0.5", "R1_iou0.7")
EARLY_STOP_MIN_EPOCHS, EARLY_STOP_PATIENCE = 60, 20
STATE_FILE = "train_state.json"


def improved(name: str, value: float, best: float) -> bool:
    # The original saves best_r1iou05 on a strict improvement and the others on ties too.
    return value > best if name == "R1_iou0.5" else value >= best


def early_stop(epoch: int, best_epochs: dict[str, int]) -> bool:
    return epoch >= max(EARLY_STOP_MIN_EPOCHS, max(best_epochs[k] for k in EARLY_STOP_METRICS) + EARLY_STOP_PATIENCE)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, mode="train")
    log = setup_logger()  # console only: the run folder is created once the inputs are known to be good
    resume = None
    if args.resume:
        given = Path(args.resume)
        runlock.check_free(given if given.is_dir() else given.parent)  # "in use" before "nothing to resume"
        resume = load_resume(args, argv)
        run_dir = resume["path"].parent
        if finished(resume, args):
            log.info(f"{run_dir}: the run already finished (epoch {resume['epoch']} of {args.epochs}); nothing "
                     "to do. Pass a larger --epochs to train it further.")
            if os.environ.get("RANK", "0") == "0":
                lock = runlock.acquire(run_dir)
                mark_finished(run_dir, resume)
                lock.release()
            return 0
        check_writable_dir(run_dir, "--resume run folder")
    else:
        run_dir = new_run_dir(args)
        runlock.check_free(run_dir)  # a run in its first epoch has no checkpoint yet, but holds the lock
        check_new_run_dir(run_dir, args.overwrite)
        check_writable_dir(run_dir, "run folder (--output_dir/--name)")
    if args.metrics_json:
        check_writable_file(args.metrics_json, "--metrics_json")
    # The annotations before anything heavy: pandas only, so a bad CSV or batch size is
    # reported before torch is imported or the feature store is opened.
    train_df, val_df = load_splits(args)
    return train(args, run_dir, train_df, val_df, resume)


def load_splits(args: Any) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The training and (with --do_eval) validation annotations, validated, and a batch size that fits them."""
    train_df = load_split(args.train_csv, args)
    val_df = load_split(args.val_csv, args) if args.do_eval else None
    check_batch_size(len(train_df), args.batch_size_train, int(os.environ.get("WORLD_SIZE", "1")), args.train_csv)
    return train_df, val_df


def load_resume(args: Any, argv: list[str]) -> dict:
    """Read --resume's checkpoint and adopt the run's settings into `args` (see utils.train.preflight)."""
    from utils.train.checkpoint import load_resume_checkpoint, resume_checkpoint_path
    path = resume_checkpoint_path(args.resume)
    state = load_resume_checkpoint(path)
    notes = resume_settings(args, state["config"], given_flags(argv, "train"), str(args.resume))
    if notes:
        get_logger().info(f"resuming {path} with the run's settings: " + ", ".join(notes))
    state["path"] = path
    return state


def first_epoch(args: Any, resume: dict | None) -> int:
    """The first epoch this process trains: after --start_epoch, or after the resumed run's last epoch."""
    return resume["epoch"] + 1 if resume is not None else args.start_epoch + 1


def log_file_name(args: Any, stamp: str) -> str:
    """The run's log file in its folder, as the original names it (stamp: the start time)."""
    return f"{stamp}-{args.name}-{args.train_data}_train.log"


def plan(argv: list[str]) -> dict:
    """What `python train.py argv` would train and write, as plain values (utils/train/plan.py), without
    training or writing anything.

    main()'s preflight (the run's own settings with --resume) and train()'s set-up (build_run) on
    one process and this machine's device, uncompiled (--compile is reported, not applied). Sections:
    model, criterion, optimizer, schedule, data, run (folder, epochs, logging), outputs, runtime
    (settings the loop reads as it runs). tests/test_flags.py compares the plans of two command lines.
    """
    from utils.train.checkpoint import BEST_NAMES, LAST_NAME
    from utils.train.distributed import DistInfo
    from utils.train.loop import log_interval
    from utils.train.plan import criterion_plan, loader_plan, model_plan, optimizer_plan, schedule_plan
    from utils.device import check_amp, resolve_device
    from utils.train.setup import build_run
    args = parse_args(argv, mode="train")
    resume = load_resume(args, argv) if args.resume else None
    run_dir = resume["path"].parent if resume is not None else new_run_dir(args)
    train_df, val_df = load_splits(args)
    device = resolve_device(args.device)
    check_amp(args.amp, device, args.compile)
    run = build_run(args, device, DistInfo(), train_df, val_df, compile_model=False)
    first = first_epoch(args, resume)
    steps = len(run.train_loader)
    return {
        "model": model_plan(run.model),
        "criterion": criterion_plan(run.criterion),
        "optimizer": {"groups": optimizer_plan(run.optimizer, run.model),
                      "clip_grad_norm_per_group": args.max_grad_norm},
        "schedule": schedule_plan(run.scheduler, steps, args.epochs),
        "data": {"train": loader_plan(run.train_loader, first_epoch=first),
                 "val": loader_plan(run.val_loader) if run.val_loader is not None else None},
        "run": {"folder": str(run_dir), "log_file": log_file_name(args, "<time>"),
                "epochs": list(range(first, args.epochs + 1)), "early_stopping": bool(args.do_eval),
                "log_every_steps": log_interval(steps, args.num_display),
                "resumed_from": str(resume["path"]) if resume is not None else None},
        "outputs": {"checkpoints": ([LAST_NAME, *(BEST_NAMES.values() if args.do_eval else ())]
                                    if args.save_model else []),
                    "tensorboard": bool(args.tb_writer), "metrics_json": args.metrics_json,
                    "set_aside_previous_run": bool(args.overwrite)},
        "runtime": {"device": args.device, "resolved_device": str(device), "amp": args.amp,
                    "compile": bool(args.compile), "eval_chunk": args.eval_chunk,
                    "local_negatives": bool(args.local_negatives)},
    }


def finished(resume: dict, args: Any) -> bool:
    r = resume["resume"]
    return resume["epoch"] >= args.epochs or (args.do_eval and early_stop(resume["epoch"], r["best_epochs"]))


def mark_finished(run_dir: Path, resume: dict) -> None:
    """A run killed between saving its last epoch and marking itself finished is finished now."""
    import json

    from utils.io import atomic_write_json
    path = run_dir / STATE_FILE
    try:
        if json.loads(path.read_text(encoding="utf-8")).get("finished"):
            return
    except (OSError, ValueError):
        pass
    r = resume["resume"]
    atomic_write_json({"finished": True, "epoch": resume["epoch"], "bests": r["bests"],
                       "best_epochs": r["best_epochs"], "history": r["history"]}, path)


def train(args: Any, run_dir: Path, train_df: pd.DataFrame, val_df: pd.DataFrame | None,
          resume: dict | None) -> int:
    """Build everything, then the epoch loop; returns the exit status (1: stopped by a NaN/inf)."""
    # Imported here, after main's cheap checks: torch alone takes seconds to import.
    import torch

    from utils.evaluate.engine import evaluate
    from utils.evaluate.metrics import format_table
    from utils.io import WriteError, atomic_write_json
    from utils.logger import Scalars
    from utils.train import distributed as D
    from utils.train.checkpoint import BEST_NAMES, LAST_NAME, load_model_weights, save_checkpoint, unwrap
    from utils.train.loop import NonFiniteLossError, train_one_epoch
    from utils.train.setup import build_run, capture_rng, describe_run, restore_rng, setup_process

    device, dist_info = setup_process(args)
    # Rank 0 decides the folder (its date) and tells the others.
    run_dir = Path(D.broadcast_object(str(run_dir) if dist_info.is_main else None))
    run = build_run(args, device, dist_info, train_df, val_df)
    train_loader, val_loader, train_sampler = run.train_loader, run.val_loader, run.train_sampler
    model, criterion, optimizer, scheduler, ddp_model = (run.model, run.criterion, run.optimizer, run.scheduler,
                                                         run.ddp_model)
    # Every input is good: only now is anything written, and only by the holder of the folder's lock.
    set_aside, lock = None, None
    if dist_info.is_main:
        lock, refusal = claim_run_dir(run_dir, fresh=resume is None, overwrite=args.overwrite)
    else:
        refusal = None
    refusal = D.broadcast_object(refusal)  # every rank stops when rank 0 could not claim the folder
    if refusal is not None:
        raise RunDirError(refusal)  # run_cli tears the process group down
    if dist_info.is_main and resume is None and args.overwrite:
        set_aside = set_aside_previous_run(run_dir)
    log = setup_logger(run_dir / log_file_name(args, time.strftime('%Y%m%d-%H%M%S')), is_main=dist_info.is_main)
    log.info(describe_run(args, device, dist_info, run_dir))
    if set_aside is not None:
        log.info(f"--overwrite: the previous run's files were moved to {set_aside}")
    n_params = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
    log.info(f"MaDe trainable parameters: {n_params:,}")

    bests = {k: 0.0 for k in (*BEST_NAMES, "R5")}
    best_epochs = {k: 0 for k in bests}
    start_epoch, global_step, history = first_epoch(args, None), 0, []
    if resume is not None:
        # Every rank reads the same file, so all start from identical weights and optimizer state.
        load_model_weights(model, resume, resume["path"])
        r = resume["resume"]
        optimizer.load_state_dict(r["optimizer"])
        scheduler.load_state_dict(r["scheduler"])
        per_rank = r.get("rng_per_rank") or []
        if len(per_rank) == dist_info.world_size:
            restore_rng(per_rank[dist_info.rank])
        else:
            # Saved with another number of processes: rank 0's state everywhere, other ranks reseeded
            # so their dropout masks stay independent (the run continues, not bit for bit).
            restore_rng(r["rng"])
            if dist_info.rank:
                torch.manual_seed(args.seed + 1000 * resume["epoch"] + dist_info.rank)
        start_epoch, global_step = first_epoch(args, resume), r["global_step"]
        bests, best_epochs, history = r["bests"], r["best_epochs"], r["history"]
        log.info(f"resumed from epoch {resume['epoch']} (step {global_step}) of {resume['path']}")

    def write_state(is_finished: bool, epoch: int) -> None:
        atomic_write_json({"finished": is_finished, "epoch": epoch, "bests": bests, "best_epochs": best_epochs,
                           "history": history}, run_dir / STATE_FILE)

    # purge_step: TensorBoard hides what a killed run logged after its last saved step.
    scalars = Scalars(run_dir, enabled=bool(args.tb_writer) and dist_info.is_main,
                      purge_step=global_step + 1 if resume is not None else None)
    last_saved = start_epoch - 1
    status = 0
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            train_sampler.set_epoch(epoch)
            t0 = time.time()
            train_stats, global_step = train_one_epoch(
                ddp_model, criterion, train_loader, optimizer, scheduler, device, epoch, args, scalars,
                global_step, show_progress=dist_info.is_main)
            # The losses are checked up to the last step; weights can still turn NaN in its update.
            if not bool(torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()):
                raise NonFiniteLossError(f"the model's parameters became NaN/inf during epoch {epoch}. Check the "
                                         "input features for extreme values, or lower --matching_lr/--detection_lr.")
            scalars.add("train/loss_epoch", train_stats.get("loss", float("nan")), epoch)
            scalars.add("train/mIoU_epoch", train_stats.get("train_mIoU", float("nan")), epoch)
            record = {"epoch": epoch, "train": train_stats, "seconds": round(time.time() - t0, 2)}
            metrics = {}
            if args.do_eval:
                metrics, collected, _ = evaluate(model, criterion, val_loader, device, args,
                                                 show_progress=dist_info.is_main)
                record["val"] = metrics
                record["val_loss"] = collected.losses.get("loss", float("nan"))
                for tag, key in (("R1", "R1"), ("R5", "R5"), ("MdR", "MedianR"), ("mIoU", "mIoU"),
                                 ("R1_iou0.5", "R1_iou0.5"), ("R1_iou0.7", "R1_iou0.7")):
                    scalars.add(f"eval/{tag}_epoch", metrics[key], epoch)
                scalars.add("eval/loss_epoch", record["val_loss"], epoch)
                for name in bests:
                    if improved(name, metrics[name], bests[name]):
                        bests[name], best_epochs[name] = metrics[name], epoch
                        if name in BEST_NAMES and args.save_model and dist_info.is_main:
                            save_checkpoint(run_dir / BEST_NAMES[name], model, args, epoch, metrics,
                                            loss=record["val_loss"])
            history.append(record)
            # Every rank's RNG state (dropout streams differ per rank); a collective, so outside is_main.
            # Captured after evaluation, so a resumed run continues the very same streams.
            rng_per_rank = D.all_gather_objects(capture_rng()) if args.save_model else None
            if args.save_model and dist_info.is_main:
                # .last before train_state.json: a kill in between leaves a state file one epoch
                # behind, never ahead of the checkpoint that --resume reads.
                save_checkpoint(run_dir / LAST_NAME, model, args, epoch, metrics,
                                resume_state={
                                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "global_step": global_step, "bests": bests, "best_epochs": best_epochs,
                                    "history": history, "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank})
                write_state(False, epoch)
                last_saved = epoch
            scalars.flush()
            log.info(epoch_summary(epoch, args.epochs, train_stats, metrics, record["seconds"]))
            if args.do_eval and early_stop(epoch, best_epochs):
                log.info(f"early stop after epoch {epoch} (no improvement for {EARLY_STOP_PATIENCE} epochs)")
                break
        if dist_info.is_main:
            log.info("Best: " + ", ".join(f"{k} {v:.4f} (epoch {best_epochs[k]})" for k, v in bests.items()))
            if history and history[-1].get("val"):
                log.info("last validation:\n" + format_table({"val": history[-1]["val"]}))
            if args.save_model:
                write_state(True, history[-1]["epoch"] if history else start_epoch - 1)
            if args.metrics_json and history and history[-1].get("val"):
                # The flat object test.py writes for one checkpoint (utils.evaluate.metrics.METRIC_KEYS).
                atomic_write_json(history[-1]["val"], Path(args.metrics_json))
                log.info(f"last validation's metrics written to {args.metrics_json}")
    except (NonFiniteLossError, WriteError) as e:
        # WriteError: a checkpoint or state write failed part-way (disk full); atomic writes kept the old files.
        saved = (f"The checkpoints in {run_dir} are those of epoch {last_saved} and were not overwritten"
                 if last_saved > 0 and args.save_model else "No checkpoint was written")
        log.error(f"{e}\nTraining stopped. {saved}.")
        status = 1
    finally:  # the process group is torn down by run_cli, however this ends
        scalars.close()
        if lock is not None:
            lock.release()
    return status


def claim_run_dir(run_dir: Path, fresh: bool, overwrite: bool) -> tuple[runlock.RunLock | None, str | None]:
    """Create the run folder and take its lock: (lock, None), or (None, why not) for the other ranks.

    A fresh run checks the folder again under the lock: a run that finished since main()'s
    check must not be trained into without --overwrite."""
    try:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunDirError(f"cannot create the run folder {run_dir} ({e.strerror}); choose another "
                              "--output_dir.") from None
        lock = runlock.acquire(run_dir)
        if fresh:
            try:
                check_new_run_dir(run_dir, overwrite)
            except RunDirError:
                lock.release()
                raise
        return lock, None
    except ValueError as e:  # RunDirError, OutputError: one line for the user
        return None, str(e)


def epoch_summary(epoch: int, epochs: int, train_stats: dict, metrics: dict, seconds: float) -> str:
    line = (f"epoch {epoch}/{epochs} | train loss {train_stats.get('loss', float('nan')):.4f} "
            f"mIoU {train_stats.get('train_mIoU', float('nan')):.4f}")
    if metrics:
        line += (f" | val R1 {metrics['R1']:.2f} R10 {metrics['R10']:.2f} MdR {metrics['MedianR']:.1f} "
                 f"mIoU {metrics['mIoU']:.4f} R1_iou0.5 {metrics['R1_iou0.5']:.2f} "
                 f"R1_iou0.7 {metrics['R1_iou0.7']:.2f}")
    return line + f" | {seconds:.1f}s"


def cli() -> int:
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
