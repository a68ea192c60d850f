"""Train MaDe on MGSV-EC (or on the synthetic demo data in the same layout).

    python train.py --do_train --do_eval [flags]                  # one device
    torchrun --nproc_per_node N train.py --do_train --do_eval ...  # data parallel

Defaults reproduce the authors' training script (scripts/train_kuai_all_feature.sh):
Adam with three parameter groups, warmup-cosine schedule stepped per iteration,
per-group gradient clipping, validation every epoch, four "best" checkpoints
and the original early-stopping rule. See README, "Differences from the
original code", for what we changed and why.
"""
from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from utils import distributed as D
from utils.checkpoint import (BEST_NAMES, LAST_NAME, CheckpointError, load_checkpoint, load_model_weights,
                              save_checkpoint, unwrap)
from utils.engine import NonFiniteLossError, evaluate, train_one_epoch
from utils.io import atomic_write_json
from utils.logger import Scalars, get_logger, setup_logger
from utils.metrics import format_table
from utils.options import parse_args
from utils.runtime import (build_loaders, build_training, capture_rng, describe_run, resolve_device, restore_rng,
                           run_dir_for, seed_everything)

# Early stopping (original): stop once epoch >= max(60, latest best epoch of these metrics + 20).
EARLY_STOP_METRICS = ("R1", "R5", "mIoU", "R1_iou0.5", "R1_iou0.7")
EARLY_STOP_MIN_EPOCHS, EARLY_STOP_PATIENCE = 60, 20


def improved(name: str, value: float, best: float) -> bool:
    # The original saves best_r1iou05 on a strict improvement and the others on ties too.
    return value > best if name == "R1_iou0.5" else value >= best


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv, mode="train")
    device = resolve_device(args.device)
    dist_info = D.init_distributed(device.type)
    if dist_info.enabled and device.type == "cuda":
        device = torch.device("cuda", dist_info.local_rank)
    # Rank 0 decides the folder (its date, its existing-run check) and tells the others.
    run_dir = Path(D.broadcast_object(str(run_dir_for(args, dist_info)) if dist_info.is_main else None))
    log = setup_logger(run_dir / f"{time.strftime('%Y%m%d-%H%M%S')}-{args.name}-{args.train_data}_train.log",
                       is_main=dist_info.is_main)
    log.info(describe_run(args, device, dist_info, run_dir))
    seed_everything(args.seed)

    train_loader, val_loader, train_sampler = build_loaders(args, dist_info, device, need_train=True)
    model, criterion, optimizer, scheduler, ddp_model = build_training(args, device, dist_info,
                                                                      steps_per_epoch=len(train_loader))
    n_params = sum(p.numel() for p in unwrap(model).parameters() if p.requires_grad)
    log.info(f"MaDe trainable parameters: {n_params:,}")

    bests = {k: 0.0 for k in (*BEST_NAMES, "R5")}
    best_epochs = {k: 0 for k in bests}
    start_epoch, global_step, history = args.start_epoch + 1, 0, []
    if args.resume:
        start_epoch, global_step, bests, best_epochs, history = resume_from(
            args, model, optimizer, scheduler, device, dist_info)
        log.info(f"resumed from epoch {start_epoch - 1} (step {global_step})")

    scalars = Scalars(run_dir, enabled=bool(args.tb_writer) and dist_info.is_main)
    status = 0
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            train_sampler.set_epoch(epoch)
            t0 = time.time()
            train_stats, global_step = train_one_epoch(
                ddp_model, criterion, train_loader, optimizer, scheduler, device, epoch, args, scalars,
                global_step, show_progress=dist_info.is_main)
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
            rng_per_rank = D.all_gather_objects(capture_rng()) if args.save_model else None
            if args.save_model and dist_info.is_main:
                save_checkpoint(run_dir / LAST_NAME, model, args, epoch, metrics,
                                resume_state={
                                    "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                    "global_step": global_step, "bests": bests, "best_epochs": best_epochs,
                                    "history": history, "rng": rng_per_rank[0], "rng_per_rank": rng_per_rank})
                atomic_write_json({"finished": False, "epoch": epoch, "bests": bests,
                                   "best_epochs": best_epochs, "history": history}, run_dir / "train_state.json")
            scalars.flush()
            log.info(epoch_summary(epoch, args.epochs, train_stats, metrics, record["seconds"]))
            if args.do_eval and epoch >= max(EARLY_STOP_MIN_EPOCHS,
                                             max(best_epochs[k] for k in EARLY_STOP_METRICS) + EARLY_STOP_PATIENCE):
                log.info(f"early stop after epoch {epoch} (no improvement for {EARLY_STOP_PATIENCE} epochs)")
                break
        if dist_info.is_main:
            log.info("Best: " + ", ".join(f"{k} {v:.4f} (epoch {best_epochs[k]})" for k, v in bests.items()))
            if history and history[-1].get("val"):
                log.info("last validation:\n" + format_table({"val": history[-1]["val"]}))
            if args.save_model:
                atomic_write_json({"finished": True, "epoch": history[-1]["epoch"] if history else start_epoch - 1,
                                   "bests": bests, "best_epochs": best_epochs, "history": history},
                                  run_dir / "train_state.json")
    except NonFiniteLossError as e:
        log.error(f"{e}\nStopped. The checkpoints in {run_dir} are from the last completed epoch and were "
                  "not overwritten.")
        status = 1
    finally:
        scalars.close()
        D.cleanup()
    return status


def resume_from(args, model, optimizer, scheduler, device, dist_info=D.DistInfo()):
    """Every rank reads the same file, so all start from identical weights and optimizer state."""
    path = Path(args.resume)
    if path.is_dir():
        path = path / LAST_NAME
    state = load_checkpoint(path)
    if "resume" not in state:
        raise CheckpointError(f"{path} holds no resume state (only {LAST_NAME} files written by train.py do)")
    load_model_weights(model, state, path)
    r = state["resume"]
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
            torch.manual_seed(args.seed + 1000 * state["epoch"] + dist_info.rank)
    return state["epoch"] + 1, r["global_step"], r["bests"], r["best_epochs"], r["history"]


def epoch_summary(epoch: int, epochs: int, train_stats: dict, metrics: dict, seconds: float) -> str:
    line = (f"epoch {epoch}/{epochs} | train loss {train_stats.get('loss', float('nan')):.4f} "
            f"mIoU {train_stats.get('train_mIoU', float('nan')):.4f}")
    if metrics:
        line += (f" | val R1 {metrics['R1']:.2f} R10 {metrics['R10']:.2f} MdR {metrics['MedianR']:.1f} "
                 f"mIoU {metrics['mIoU']:.4f} R1_iou0.5 {metrics['R1_iou0.5']:.2f} "
                 f"R1_iou0.7 {metrics['R1_iou0.7']:.2f}")
    return line + f" | {seconds:.1f}s"


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        # Our own input errors carry their explanation: print it, not a traceback.
        get_logger().error(str(e)) if get_logger().handlers else print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
