"""Speed and memory benchmark of the training step, data loading, MsG evaluation and grounding.

    python scripts/benchmark.py [--device cpu|cuda] [--json OUT] [--quick]
        [--sections train load msg grounding eval epoch] [--threads N] [--workdir DIR]

Everything runs on synthetic data: a demo dataset in the official layout
(scripts/make_demo_data.py, then packed with scripts/pack_features.py) for training and
loading, random MaDe-space tracks for MsG scoring and grounding. Numbers are medians of
several runs. Sections:

  train     training samples/s at batch 64 and 512 (forward, criterion and train.py's update,
            utils.train.loop.optimization_step, with Adam as utils/train/setup.py builds it; one batch of
            the demo data kept on the device, so loading is excluded), and the same step with the fast paths off
            (model.fast_ops.reference_paths(), plain Adam) at --reference_batches. Beside each fast
            row: the step's GEMM floor (its matrix-product FLOPs, counted by torch.utils.flop_counter,
            at the fp32 GEMM rate measured at the start) and the share of the step it is.
  load      samples/s of one full pass of the training DataLoader (utils/train/setup.make_loader:
            same sampler, workers, pinning as train.py) over the per-id .pt files and over the
            packed store; and the time to read one per-id file, torch.load vs the reader the
            per-id store uses (utils/data/tensorfile.py).
  msg       MsG evaluation (every video against every track, exact): model.index_music +
            model.score_videos at N = 500 ... 4,000 videos x N tracks, wall time and peak memory
            (peak RSS of a fresh subprocess per size on the CPU, max allocated on CUDA); the
            straightforward all-pairs X-Pool call of the original (--naive) where its estimated
            memory fits; and the largest difference between the two at N = 500.
  eval      test.py end to end (a fresh process, as a user runs it) on a demo split of --eval_size
            videos and as many tracks read from per-id files (no packed store), with a randomly
            initialised checkpoint: wall time, peak RSS and test.py's own time breakdown
            (setup / load / encode / score / metrics), median of --eval_repeats runs; and the GEMM
            floor of encode and score (their FLOPs counted on 200 pairs, scaled to the split).
  epoch     whole training epochs as train.py runs them: utils/train/setup.build_loaders (the training
            DataLoader or, with --feature_device, resident features) + build_training, then per epoch
            utils/train/loop.train_one_epoch and the validation (utils.evaluate.engine.evaluate), on a packed demo
            dataset of --epoch_videos training videos, --epoch_music tracks and --epoch_val val videos
            (one per track; default: the paper's scale on CUDA, 50,000 / 4,000 / 2,000, and a
            scaled-down 1,024 / 200 / 200 on the CPU, a few minutes). Two untimed warm-up steps,
            then --epochs_timed epochs (2 on CUDA, 1 on the CPU); checkpoints are not written.
            Reports samples/s of whole epochs (training rows / (training + validation time))
            beside the step-only rate of the train section at the same batch (--epoch_batch,
            512 by default), and projects the paper's 100 epochs at that batch over
            MGSV-EC's 49,194 training and 2,000 validation videos (validation scaled from the measured
            one: loading and encoding linearly, scoring and metrics quadratically in the videos).
  grounding the grounding tools (utils/ground/bench.py) on synthetic 2k/20k/100k libraries:
            index build time/size, single-query latency p50/p95 exhaustive vs two-stage, and how
            often the two-stage top-1/top-10 equals the exhaustive one.

Prints a markdown table per section (for docs/performance.md) and writes everything as JSON (--json).
The machine (CPU model, cores, torch version and threads, load average) is part of the output:
on a shared machine, compare numbers only from the same run.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The authors' code, as measured on the same 2-core CPU: for the tables' context.
AUTHORS = {"train_b64_samples_s": 22.5, "msg_2000_s_pooling": 43.0, "msg_2000_peak_gb": 17.7}
NAIVE_MEMORY_FRACTION = 0.6   # run the naive all-pairs scoring only if its estimate fits in this much RAM


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    p.add_argument("--json", default=None, help="write all results here")
    p.add_argument("--quick", action="store_true",
                   help="small sizes and few repeats (a smoke run, not numbers to quote)")
    p.add_argument("--sections", nargs="+", default=["train", "load", "msg", "grounding"],
                   choices=["train", "load", "msg", "grounding", "eval", "epoch"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder, removed)")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="training autocast: bf16 or fp16 on CUDA, bf16 on the CPU")
    p.add_argument("--compile", action="store_true",
                   help="train and epoch sections: torch.compile the model as train.py --compile does (the "
                        "padded layout, process-wide; the first steps compile and are not timed)")
    p.add_argument("--train_batches", type=int, nargs="+", default=None, help="default 64 512 (quick: 64)")
    p.add_argument("--reference_batches", type=int, nargs="*", default=None,
                   help="batch sizes also timed with the fast paths off (default 64; quick: none)")
    p.add_argument("--steps", type=int, default=None, help="timed training steps (default 5; quick: 2)")
    p.add_argument("--msg_sizes", type=int, nargs="+", default=None, help="default 500 1000 2000 4000")
    p.add_argument("--msg_repeats", type=int, default=None, help="scoring runs per size (default 3)")
    p.add_argument("--eval_chunk", type=int, default=0, help="videos per scoring chunk (0 = automatic)")
    p.add_argument("--naive", type=int, default=1, choices=[0, 1],
                   help="also time the straightforward all-pairs scoring where it fits in memory")
    p.add_argument("--load_passes", type=int, default=None, help="DataLoader passes per store (default 3)")
    p.add_argument("--num_workers", type=int, default=None,
                   help="DataLoader workers (default: train.py's default, capped at the CPU count)")
    # eval
    p.add_argument("--eval_size", type=int, default=None, help="videos (= tracks) of the eval section's split "
                                                                "(default 2000; quick: 200)")
    p.add_argument("--eval_repeats", type=int, default=None, help="test.py runs (default 3; quick: 1)")
    # epoch
    p.add_argument("--epoch_videos", type=int, default=None,
                   help="training videos of the epoch section's data (default: 50000 on CUDA, 1024 on the CPU; "
                        "quick: 256)")
    p.add_argument("--epoch_music", type=int, default=None, help="tracks (default 4000 on CUDA, 200 on the CPU)")
    p.add_argument("--epoch_val", type=int, default=None,
                   help="validation videos (default 2000 on CUDA, 200 on the CPU)")
    p.add_argument("--epoch_batch", type=int, default=None, help="training batch of the epoch section (default 512; "
                                                                 "quick: 64)")
    p.add_argument("--epochs_timed", type=int, default=None,
                   help="timed epochs after the warm-up (default 2 on CUDA, 1 on the CPU)")
    p.add_argument("--feature_devices", nargs="+", default=None, choices=["auto", "cpu", "cuda"],
                   help="--feature_device values timed in the epoch section (default: auto, and cuda on CUDA)")
    # grounding (utils/ground/bench.py)
    p.add_argument("--grounding_sizes", type=int, nargs="+", default=None, help="default 2000 20000 100000")
    p.add_argument("--shortlist_ks", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--grounding_dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--num_queries", type=int, default=200, help="queries for the top-1/top-10 fractions")
    p.add_argument("--latency_queries", type=int, default=20, help="single queries timed per mode")
    p.add_argument("--exhaustive_latency_queries", type=int, default=None,
                   help="single exhaustive queries timed (default: --latency_queries; slow at 100k on CPU)")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--grounding_workdir", default=None, help="where the synthetic indexes go (default: --workdir)")
    p.add_argument("--keep_indexes", action="store_true", help="keep the synthetic indexes")
    p.add_argument("--reuse_indexes", action="store_true", help="measure indexes kept by an earlier run")
    p.add_argument("--load_uni_model_path", default=None, help="checkpoint for grounding (default: untrained)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)   # internal: one MsG measurement
    p.add_argument("--_n", type=int, default=0, help=argparse.SUPPRESS)
    return p


# ----------------------------------------------------------------------------------- helpers

def environment(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    env = {"cpu": cpu, "cpu_count": os.cpu_count(),
           "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "torch_interop_threads": torch.get_num_interop_threads(), "python": platform.python_version(),
           "device": str(device), "load_average_start": [round(x, 2) for x in os.getloadavg()]}
    try:
        import psutil
        env["ram_gb"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    env["gemm_gflops"] = gemm_rate(device)
    return env


def gemm_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """fp32 n^3 matrix product rate (GFLOP/s), the ceiling that the training step and MsG
    scoring work against; on shared CPU machines it varies between runs, so it is
    reported beside every set of numbers."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return round(2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9, 1)


def count_flops(fn: Callable[[], Any]) -> int:
    """Floating-point operations of the matrix products (mm, bmm, addmm, baddbmm, attention) that
    fn() runs, as torch.utils.flop_counter counts them. Run with autograd on: the counter's
    module tracking needs tensors with a history, and a forward computes the same either way."""
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with torch.enable_grad(), counter:
        fn()
    return int(counter.get_total_flops())


def floor_rate(env: dict, device: torch.device) -> float:
    """The GEMM rate a section's floor is computed at: the higher of the rates measured at the start
    of the run and just after the section. A shared machine's rate drifts within minutes (by 2x on
    the 2-core CPU); the higher one gives the lower floor, which stays a bound."""
    rate = max(env["gemm_gflops"], gemm_rate(device))
    env.setdefault("gemm_gflops_floor", []).append(rate)
    return rate


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def timed_back_to_back(fn: Callable[[], Any], device: torch.device, n: int) -> float:
    """Seconds per call of n calls in a row with one sync at each end: the rate a loop sustains when
    nothing in it waits for the device (timed() syncs every call, which on CUDA adds each call's
    launch latency to a launch-bound step)."""
    return timed(lambda: [fn() for _ in range(n)], device) / n


def add_cuda_peak(row: dict, device: torch.device) -> None:
    """row["cuda_max_allocated_gb"]: the CUDA memory peak since the last reset, which starts the next row's
    count; nothing on the CPU."""
    if device.type == "cuda":
        row["cuda_max_allocated_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)


def default_args(extra: list[str] | None = None):
    from utils.train.options import parse_args
    return parse_args(["--name", "benchmark"] + (extra or []), mode="train")


def table(head: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def load_script(name: str):
    """Import scripts/<name>.py (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_mgsv_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered while executing
    spec.loader.exec_module(module)
    return module


def make_data(workdir: Path, quick: bool) -> Path:
    """Demo dataset in the official layout + its packed store; returns the dataset root."""
    root = workdir / "demo"
    if not (root / "demo_data.json").is_file():
        sizes = dict(num_music=60, num_videos=300) if quick else dict(num_music=200, num_videos=2000)
        load_script("make_demo_data").make_demo_data(root, val_size=20, test_size=20, seed=0, **sizes)
        load_script("pack_features").pack(root / "features" / "Kuai_feature", progress=False)
    return root


# ----------------------------------------------------------------------------------- training

def bench_train(root: Path, device: torch.device, batches: list[int], reference_batches: list[int],
                steps: int, amp: str, log: Callable[[str], None], warmup: int = 2,
                floor_gflops: Callable[[], float] | None = None, compile_model: bool = False) -> list[dict]:
    """Per batch (and path): the median step time; for the fast path also the step's GFLOP and, with
    floor_gflops (the GEMM rate to use, asked for after the timing), its GEMM floor.
    compile_model: the model torch.compile'd as by train.py --compile (no reference path, no FLOP count)."""
    from model import fast_ops
    from utils.data.dataset import build_dataset, collate_fn
    from utils.train.distributed import DistInfo
    from utils.train.loop import autocast_context, grad_scaler, optimization_step, to_device
    from utils.train.setup import build_training
    csv = root / "dataset/MGSV-EC/train_data.csv"
    ds = build_dataset(csv, root / "features/Kuai_feature")
    rows = []
    for b in batches:
        if b > len(ds):
            log(f"[train] batch {b} skipped: the demo training set has {len(ds)} rows")
            continue
        batch = to_device(collate_fn(ds.__getitems__(list(range(b)))), device)
        for reference in ([False, True] if b in reference_batches and not compile_model else [False]):
            args = default_args(["--batch_size_train", str(b), "--amp", amp] + (["--compile"] if compile_model else []))
            torch.manual_seed(0)
            model, criterion, optimizer, _, net = build_training(args, device, DistInfo(), steps_per_epoch=100)
            if reference:  # the straightforward code: reference paths, plain Adam
                optimizer = torch.optim.Adam(model.param_groups(args))
            model.train()

            scaler = grad_scaler(amp, device)

            def step() -> None:
                with autocast_context(device, amp):
                    loss, _ = criterion(net(batch), batch)
                optimization_step(loss, optimizer, args.max_grad_norm, scaler)

            with fast_ops.reference_paths() if reference else contextlib.nullcontext():
                for _ in range(warmup):  # allocator, first-call costs
                    step()
                times = [timed(step, device) for _ in range(steps)]
                # On CUDA also the steps back to back, the step-only rate an epoch is compared with
                # (on the CPU nothing is asynchronous: the two timings measure the same thing).
                back = timed_back_to_back(step, device, steps) if device.type == "cuda" and not reference else None
            med = statistics.median(times)
            row = {"batch": b, "path": "reference" if reference else "compiled" if compile_model else "fast",
                   "step_s": round(med, 3),
                   "samples_per_s": round(b / med, 1), "steps": [round(t, 3) for t in times],
                   "load_average": [round(x, 2) for x in os.getloadavg()]}
            if back is not None:
                row["back_to_back_step_s"] = round(back, 4)
                row["back_to_back_samples_per_s"] = round(b / back, 1)
            add_cuda_peak(row, device)
            if not reference and not compile_model:  # one more step, counted (forward, backward; no GEMM in the update)
                row["gflop"] = round(count_flops(step) / 1e9, 2)
                if floor_gflops is not None:
                    row["gemm_floor_s"] = round(row["gflop"] / floor_gflops(), 3)
                    row["floor_share"] = round(row["gemm_floor_s"] / med, 2)
            log(f"[train] {row}")
            rows.append(row)
    return rows


def format_train(rows: list[dict]) -> str:
    out = [[r["batch"], r["path"], r["step_s"], r["samples_per_s"], r.get("back_to_back_samples_per_s", "–"),
            r.get("gflop", "–"), r.get("gemm_floor_s", "–"), r.get("floor_share", "–")] for r in rows]
    return table(["batch", "path", "s / step (median)", "samples / s", "samples / s, steps back to back (CUDA)",
                  "GFLOP / step", "GEMM floor s", "floor / step"], out) + (
        "\n\nGEMM floor: the step's matrix-product FLOPs (forward and backward, torch.utils.flop_counter) at "
        "the higher of the fp32 GEMM rates measured at the start and just after the timing; no step can take less. "
        f"Authors' code, same kind of CPU: ~{AUTHORS['train_b64_samples_s']} samples/s at batch 64.")


# ----------------------------------------------------------------------------------- loading

def bench_load(root: Path, device: torch.device, passes: int, num_workers: int | None,
               log: Callable[[str], None]) -> list[dict]:
    from utils.data.dataset import build_dataset
    from utils.train.distributed import DistInfo
    from utils.train.setup import loader_workers, make_loader
    args = default_args([] if num_workers is None else ["--num_workers", str(num_workers)])
    csv, features = root / "dataset/MGSV-EC/train_data.csv", root / "features/Kuai_feature"
    rows = []
    for packed in (False, True):
        ds = build_dataset(csv, features, use_packed=packed)
        loader, sampler = make_loader(ds, 64, True, True, args.seed, DistInfo(), device, args)
        times = []
        for epoch in range(passes):
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            n = sum(int(b["frame_feats"].shape[0]) for b in loader)
            times.append(time.perf_counter() - t0)
        row = {"store": "packed" if packed else "per-id", "backend": ds.store.backends,
               "workers": loader_workers(args, ds, device), "batch": 64, "samples_per_pass": n,
               "pass_s": [round(t, 3) for t in times], "samples_per_s": round(n / statistics.median(times), 1)}
        if ds.store.is_packed != packed:
            raise RuntimeError(f"expected the {row['store']} store, got {ds.store.backends}")
        log(f"[load] {row}")
        rows.append(row)
        del loader
    return rows


def bench_file_read(root: Path, log: Callable[[str], None], count: int = 500, passes: int = 3) -> dict:
    """Microseconds per per-id file: torch.load(weights_only=True) vs utils.data.tensorfile.read_tensor
    (what the per-id store reads with), over the first `count` video and music feature files."""
    from utils.data.features import music_modality, video_modality
    from utils.data.tensorfile import read_tensor
    from utils.io import torch_load_plain
    features = root / "features/Kuai_feature"
    files = []
    for modality in (video_modality(features), music_modality(features)):
        files += sorted((modality.base / modality.feat_sub).glob("*.pt"))[:count]
    out = {"files": len(files)}
    for name, read in (("torch_load_us", torch_load_plain), ("read_tensor_us", read_tensor)):
        times = []
        for _ in range(passes):
            t0 = time.perf_counter()
            for path in files:
                read(path)
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) / len(files) * 1e6, 1)
    log(f"[load] per-file read {out}")
    return out


def format_load(rows: list[dict]) -> str:
    out = [[r["store"], r["workers"], r["samples_per_pass"], r["samples_per_s"]] for r in rows if "store" in r]
    text = table(["store", "workers", "samples / pass", "samples / s (median pass)"], out)
    by = {r["store"]: r["samples_per_s"] for r in rows if "store" in r}
    if "packed" in by and by.get("per-id"):
        text += f"\n\npacked / per-id: {by['packed'] / by['per-id']:.1f}x"
    reads = [r for r in rows if "read_tensor_us" in r]
    if reads:
        r = reads[0]
        text += (f"\n\nOne per-id feature file ({r['files']} video and music files, median of 3 passes): "
                 f"torch.load {r['torch_load_us']} us, utils.data.tensorfile.read_tensor {r['read_tensor_us']} us.")
    return text


# ----------------------------------------------------------------------------------- MsG scoring

def msg_inputs(n: int, device: torch.device, seed: int = 0):
    """Random MaDe-space inputs: v [n, d], and n tracks (m, Sm [n, 96, d], mask) with MGSV-EC-like
    valid snippet counts (13..96)."""
    gen = torch.Generator().manual_seed(seed)
    d, length = 256, 96
    valid = torch.randint(13, length + 1, (n, 1), generator=gen)
    mask = (torch.arange(length)[None, :] < valid).float()
    sm = torch.randn(n, length, d, generator=gen) * mask[..., None]
    m = torch.nn.functional.normalize(sm.sum(1) / mask.sum(1, keepdim=True), dim=-1)
    v = torch.nn.functional.normalize(torch.randn(n, d, generator=gen), dim=-1)
    return v.to(device), m.to(device), sm.to(device), mask.to(device)


def msg_model(device: torch.device):
    from model.made import build_model
    torch.manual_seed(0)
    model = build_model(default_args()).to(device).eval()
    with torch.no_grad():  # move X-Pool off its identity initialisation, like a trained model
        for p in model.xpool.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def rss_mb() -> float:
    with open("/proc/self/statm", encoding="utf-8") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over
    fork + exec, so a child would report the (large) parent's RSS."""
    try:
        with open("/proc/self/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def msg_worker(mode: str, n: int, device: torch.device, repeats: int, chunk: int) -> dict:
    """One measurement in a fresh process (so that the peak RSS is this size's)."""
    model = msg_model(device)
    v, m, sm, mask = msg_inputs(n, device)
    out: dict = {"mode": mode, "n": n, "rss_before_mb": round(rss_mb(), 1)}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        if mode == "fast":
            def run():
                index = model.index_music(m, sm, mask)
                return model.score_videos(v, index, chunk)
        elif mode == "naive":  # the original: X-Pool on all pairs in one call
            def run():
                return model.retrieval_score(model.retrieval_similarities(v, m, sm, mask))
        elif mode == "check":
            fast = model.score_videos(v, model.index_music(m, sm, mask), chunk)
            naive = model.retrieval_score(model.retrieval_similarities(v, m, sm, mask))
            return {**out, "max_abs_diff": float((fast - naive).abs().max())}
        else:
            raise ValueError(mode)
        times = []
        for _ in range(repeats):
            times.append(timed(run, device))
    out.update(seconds=round(statistics.median(times), 3), runs=[round(t, 3) for t in times],
               peak_rss_mb=round(peak_rss_mb(), 1))
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def run_worker(mode: str, n: int, ns: argparse.Namespace, repeats: int, log: Callable[[str], None]) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", mode, "--_n", str(n),
           "--device", ns.device, "--msg_repeats", str(repeats), "--eval_chunk", str(ns.eval_chunk),
           "--threads", str(ns.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"[msg] {mode} N={n} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}")
        return {"mode": mode, "n": n, "error": f"exit {proc.returncode}"}
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    log(f"[msg] {row}")
    return row


def naive_estimate_gb(n: int) -> float:
    """Peak of the all-pairs X-Pool call: ~5 live [n, n, 256] float32 tensors (4 GB each at 2,000)."""
    return 5 * n * n * 256 * 4 / 2**30


def bench_msg(ns: argparse.Namespace, sizes: list[int], repeats: int, log: Callable[[str], None]) -> dict:
    rows = [run_worker("fast", n, ns, repeats, log) for n in sizes]
    naive = []
    if ns.naive:
        try:
            import psutil
            available = psutil.virtual_memory().available / 2**30
        except ImportError:
            available = 8.0
        for n in sizes:
            if ns.device == "cpu" and naive_estimate_gb(n) > NAIVE_MEMORY_FRACTION * available:
                log(f"[msg] naive N={n} skipped: needs ~{naive_estimate_gb(n):.0f} GB, {available:.0f} GB available")
                naive.append({"mode": "naive", "n": n, "skipped": f"~{naive_estimate_gb(n):.0f} GB estimated"})
                continue
            naive.append(run_worker("naive", n, ns, 1, log))
    check = run_worker("check", min(sizes), ns, 1, log)
    return {"fast": rows, "naive": naive, "check": check}


def format_msg(res: dict) -> str:
    naive = {r["n"]: r for r in res["naive"]}
    out = []
    for r in res["fast"]:
        nv = naive.get(r["n"], {})
        mem = (f"{r['cuda_max_allocated_mb'] / 1024:.2f} GB GPU" if "cuda_max_allocated_mb" in r
               else f"{r.get('peak_rss_mb', float('nan')) / 1024:.2f} GB")
        if "seconds" in nv:
            nmem = (f"{nv['cuda_max_allocated_mb'] / 1024:.2f} GB GPU" if "cuda_max_allocated_mb" in nv
                    else f"{nv['peak_rss_mb'] / 1024:.2f} GB")
            naive_cell = f"{nv['seconds']:.1f} s / {nmem}"
        else:
            naive_cell = nv.get("skipped", nv.get("error", "-"))
        out.append([f"{r['n']:,} x {r['n']:,}", f"{r.get('seconds', float('nan')):.2f}", mem, naive_cell])
    text = table(["videos x tracks", "exact chunked s", "peak memory", "naive all-pairs (s / peak)"], out)
    check = res.get("check", {})
    if "max_abs_diff" in check:
        text += f"\n\nmax |chunked - all-pairs| at N = {check['n']}: {check['max_abs_diff']:.1e}"
    text += (f"\nAuthors' code at 2,000 x 2,000: {AUTHORS['msg_2000_s_pooling']:.0f} s for the pooling, "
             f"{AUTHORS['msg_2000_peak_gb']} GB peak. Peak RSS includes the interpreter, torch and the inputs "
             "(rss_before_mb in the JSON).")
    return text


# ----------------------------------------------------------------------------------- test.py end to end

# Runs test.py as `python test.py ...` would, and reports the process's peak RSS (VmHWM) from an
# atexit hook: the parent's getrusage would carry its own (larger) peak into the child's.
_EVAL_WRAPPER = """
import atexit, runpy, sys
def _peak():
    with open("/proc/self/status") as f:
        kb = next((int(l.split()[1]) for l in f if l.startswith("VmHWM:")), 0)
    sys.stderr.write(f"BENCHMARK_PEAK_RSS_KB {kb}\\n")
atexit.register(_peak)
sys.argv = sys.argv[1:]
sys.path.insert(0, ".")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def make_eval_data(workdir: Path, size: int) -> tuple[Path, Path]:
    """(demo root, checkpoint): a split of `size` videos, one per track, per-id files only, and a
    randomly initialised default model saved as train.py saves one."""
    from model.made import build_model
    from utils.train.checkpoint import save_checkpoint
    root = workdir / f"eval_{size}"
    if not (root / "demo_data.json").is_file():
        load_script("make_demo_data").make_demo_data(root, num_music=size, num_videos=100, val_size=size,
                                                     test_size=size, seed=0, overwrite=True)
    ckpt = root / "pytorch_model.bin.best_r1"
    if not ckpt.is_file():
        args = default_args(["--device", "cpu"])
        torch.manual_seed(0)
        save_checkpoint(ckpt, build_model(args), args, epoch=0)
    return root, ckpt


def bench_eval(root: Path, ckpt: Path, device: torch.device, repeats: int, threads: int,
               log: Callable[[str], None]) -> list[dict]:
    import re
    cmd = [sys.executable, "-c", _EVAL_WRAPPER, "test.py", "--load_uni_model_path", str(ckpt),
           "--test_csv", str(root / "dataset/MGSV-EC/test_data.csv"),
           "--frozen_feature_path", str(root / "features/Kuai_feature"), "--device", device.type,
           "--num_workers", "0", "--prior_csv", "none", "--metrics_json", str(root / "metrics.json")]
    env = dict(os.environ, TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    rows = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"test.py failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
        out = proc.stdout + proc.stderr
        peak = re.search(r"BENCHMARK_PEAK_RSS_KB (\d+)", out)
        line = re.search(r"time since the process started: (.*)", out)
        phases = {k: float(v) for k, v in re.findall(r"(\w+) (-?[\d.]+) s", line.group(1))} if line else {}
        row = {"wall_s": round(wall, 2), "peak_rss_gb": round(int(peak.group(1)) / 2**20, 2) if peak else None,
               "phases_s": phases, "load_average": [round(x, 2) for x in os.getloadavg()]}
        log(f"[eval] {row}")
        rows.append(row)
    return rows


def eval_flops(root: Path, ckpt: Path, size: int, sample: int = 200) -> dict[str, float]:
    """GFLOP of test.py's two computations on this split, counted on a sample and scaled: the
    forward of every (video, ground-truth track) pair (linear in the pairs) and the exact MsG
    scoring of every video against every track (quadratic)."""
    from utils.data.dataset import build_dataset, collate_fn
    from utils.ground.model import load_model
    model = load_model(ckpt, "cpu").model
    ds = build_dataset(root / "dataset/MGSV-EC/test_data.csv", root / "features/Kuai_feature")
    n = min(sample, len(ds))
    batch = collate_fn(ds.__getitems__(list(range(n))))
    encode = count_flops(lambda: model(batch, losses=False))
    with torch.no_grad():
        v, _ = model.encode_video(batch["frame_feats"], batch["frame_mask"])
        m, sm = model.encode_music(batch["music_feats"], batch["music_mask"])
    score = count_flops(lambda: model.score_videos(v, model.index_music(m, sm, batch["music_mask"])))
    return {"encode_gflop": round(encode / 1e9 * size / n, 1), "score_gflop": round(score / 1e9 * (size / n) ** 2, 1)}


def format_eval(rows: list[dict], size: int, flops: dict | None = None, gemm_gflops: float | None = None) -> str:
    med = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
    names = ["setup", "load", "encode", "score", "metrics", "other", "total"]
    cells = [f"{med([r['phases_s'].get(n, float('nan')) for r in rows]):.2f}" for n in names]
    walls = ", ".join(f"{r['wall_s']:.2f}" for r in rows)
    return table(["videos x tracks", "wall s (median; runs)", "peak RSS GB", *[f"{n} s" for n in names]],
                 [[f"{size:,} x {size:,}", f"{med([r['wall_s'] for r in rows]):.2f} ({walls})",
                   f"{max(r['peak_rss_gb'] or 0 for r in rows):.2f}", *cells]]) + (
        "\n\ntest.py --num_workers 0 --prior_csv none on per-id files; the phases are test.py's own breakdown "
        "(medians), 'total' its time since the process started, wall the parent's clock around the process."
        + (f"\n\nGEMM floor at {gemm_gflops} GFLOP/s (torch.utils.flop_counter on 200 pairs, scaled): encode "
           f"{flops['encode_gflop']:,} GFLOP = {flops['encode_gflop'] / gemm_gflops:.2f} s, score "
           f"{flops['score_gflop']:,} GFLOP = {flops['score_gflop'] / gemm_gflops:.2f} s."
           if flops and gemm_gflops else ""))


# ----------------------------------------------------------------------------------- whole epochs

PAPER_TRAIN_ROWS, PAPER_VAL_ROWS, PAPER_EPOCHS, PAPER_BATCH = 49194, 2000, 100, 512


def make_epoch_data(workdir: Path, videos: int, music: int, val: int) -> Path:
    """A packed demo dataset for the epoch section (reused when the same sizes exist in --workdir)."""
    root = workdir / f"epoch_{videos}_{music}_{val}"
    if not (root / "demo_data.json").is_file():
        load_script("make_demo_data").make_demo_data(root, num_music=music, num_videos=videos, val_size=val,
                                                     test_size=min(val, music), seed=0, overwrite=True)
        load_script("pack_features").pack(root / "features" / "Kuai_feature", progress=False)
    return root


def bench_epoch(root: Path, device: torch.device, batch: int, epochs: int, feature_devices: list[str],
                amp: str, log: Callable[[str], None], warmup_steps: int = 2, compile_model: bool = False) -> list[dict]:
    """Whole epochs (training + validation) per --feature_device value, as train.py runs them."""
    from utils.evaluate.engine import EVAL_PHASES, evaluate
    from utils.logger import Scalars
    from utils.stopwatch import Stopwatch
    from utils.train.distributed import DistInfo
    from utils.train.loop import train_one_epoch
    from utils.train.setup import build_loaders, build_training, seed_everything
    rows = []
    for feature_device in feature_devices:
        args = default_args(["--train_csv", str(root / "dataset/MGSV-EC/train_data.csv"),
                             "--val_csv", str(root / "dataset/MGSV-EC/val_data.csv"),
                             "--frozen_feature_path", str(root / "features/Kuai_feature"),
                             "--batch_size_train", str(batch), "--amp", amp, "--device", device.type,
                             "--feature_device", feature_device, "--num_display", "1"]
                            + (["--compile"] if compile_model else []))
        seed_everything(args.seed)
        t0 = time.perf_counter()
        train_loader, val_loader, sampler = build_loaders(args, DistInfo(), device)
        setup_s = time.perf_counter() - t0
        # net: what train.py trains (compiled with --compile); validation runs the bare model, as there.
        model, criterion, optimizer, scheduler, net = build_training(args, device, DistInfo(), len(train_loader))
        train_rows = len(train_loader) * batch
        epochs_out, step = [], 0
        # Warm-up (allocator, first calls, the loader's first batches): a few steps of epoch 0, not reported.
        sampler.set_epoch(0)
        _, step = train_one_epoch(net, criterion, train_loader, optimizer, scheduler, device, 0, args,
                                  Scalars(None, enabled=False), step, show_progress=False, max_steps=warmup_steps)
        for epoch in range(1, epochs + 1):
            sampler.set_epoch(epoch)
            sync(device)
            t0 = time.perf_counter()
            _, step = train_one_epoch(net, criterion, train_loader, optimizer, scheduler, device, epoch, args,
                                      Scalars(None, enabled=False), step, show_progress=False)
            sync(device)
            train_s = time.perf_counter() - t0
            watch = Stopwatch(device)
            t0 = time.perf_counter()
            evaluate(model, criterion, val_loader, device, args, show_progress=False, watch=watch)
            val_s = time.perf_counter() - t0
            epochs_out.append({"train_s": round(train_s, 2), "val_s": round(val_s, 2),
                               "val_phases": {k: round(watch.seconds.get(k, 0.0), 2) for k in EVAL_PHASES}})
        train_s = statistics.median(e["train_s"] for e in epochs_out)
        val_s = statistics.median(e["val_s"] for e in epochs_out)
        phases = {k: statistics.median(e["val_phases"][k] for e in epochs_out) for k in EVAL_PHASES}
        n_val = len(val_loader.dataset)
        val_paper = ((phases["load"] + phases["encode"]) * PAPER_VAL_ROWS / n_val
                     + (phases["score"] + phases["metrics"]) * (PAPER_VAL_ROWS / n_val) ** 2)
        train_rate = train_rows / train_s
        row = {"feature_device": feature_device, "loader": type(train_loader).__name__, "batch": batch,
               "train_rows": train_rows, "val_rows": n_val, "setup_s": round(setup_s, 2), "epochs": epochs_out,
               "train_samples_per_s": round(train_rate, 1),
               "epoch_samples_per_s": round(train_rows / (train_s + val_s), 1),
               "val_s": round(val_s, 2), "val_paper_s_projected": round(val_paper, 1),
               "paper_100_epochs_h_projected": round(PAPER_EPOCHS * (PAPER_TRAIN_ROWS / train_rate + val_paper) / 3600,
                                                     2),
               "load_average": [round(x, 2) for x in os.getloadavg()]}
        add_cuda_peak(row, device)
        log(f"[epoch] {row}")
        rows.append(row)
        del model, net, criterion, optimizer, train_loader, val_loader
    return rows


def format_epoch(rows: list[dict], step_rows: list[dict]) -> str:
    steps = {r["batch"]: r.get("back_to_back_samples_per_s", r["samples_per_s"]) for r in step_rows
             if r["path"] != "reference"}
    out = [[r["feature_device"], r["loader"], r["batch"], f"{r['train_rows']:,} + {r['val_rows']:,}",
            r["train_samples_per_s"], r["epoch_samples_per_s"], steps.get(r["batch"], "-"),
            f"{r['val_s']:.1f}", f"{r['paper_100_epochs_h_projected']:.1f}"] for r in rows]
    return table(["--feature_device", "training batches from", "batch", "train + val rows", "training samples/s",
                  "whole-epoch samples/s", "step-only samples/s", "validation s",
                  f"MGSV-EC's {PAPER_EPOCHS} epochs at this batch, h (projected)"], out) + (
        f"\n\nWhole epoch = training pass + validation (no checkpoint writes); step-only = the train section's "
        f"forward + update on one batch kept on the device (on CUDA its steps back to back). Projection: {PAPER_EPOCHS} x ({PAPER_TRAIN_ROWS:,} "
        f"rows / training samples/s + validation of {PAPER_VAL_ROWS:,} videos scaled from the measured one).")


# ----------------------------------------------------------------------------------- grounding

def bench_grounding(ns: argparse.Namespace, workdir: Path, sizes: list[int], quick: bool,
                    log: Callable[[str], None]) -> dict:
    from utils.ground.bench import benchmark_grounding, encode_rate, random_model
    from utils.ground.model import load_model
    gm = (load_model(ns.load_uni_model_path, ns.device) if ns.load_uni_model_path
          else random_model(ns.seed, ns.device))
    rate = encode_rate(gm)
    rows = benchmark_grounding(gm, sizes, ns.shortlist_ks, Path(ns.grounding_workdir or workdir / "indexes"),
                               ns.grounding_dtype, num_queries=50 if quick else ns.num_queries,
                               latency_queries=5 if quick else ns.latency_queries, topk=ns.topk,
                               keep=ns.keep_indexes, seed=ns.seed, log=log,
                               exhaustive_latency_queries=ns.exhaustive_latency_queries, reuse=ns.reuse_indexes)
    return {"model": gm.checkpoint, "dtype": ns.grounding_dtype, "encode_tracks_per_s": round(rate, 1), "rows": rows}


# ----------------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ns = get_parser().parse_args(argv)
    if ns.threads:
        torch.set_num_threads(ns.threads)
    from utils.allocator import keep_freed_memory
    malloc_kept = keep_freed_memory()  # as train.py and test.py, for the sections run in this process
    from utils.device import DeviceError, check_amp, resolve_device
    try:
        device = resolve_device(ns.device)
        note = check_amp(ns.amp, device, ns.compile)
        ns.device = device.type   # what the sections and their worker processes read ("auto" resolved)
    except DeviceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if note is not None:
        print(note, file=sys.stderr)
    from utils.data.resident import check_feature_device
    from utils.train.preflight import ConfigError
    try:  # train.py's own check, here before minutes of other sections run
        for feature_device in ns.feature_devices or []:
            check_feature_device(feature_device, device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ns._worker:
        print(json.dumps(msg_worker(ns._worker, ns._n, device, ns.msg_repeats or 1, ns.eval_chunk)))
        return 0
    q = ns.quick
    batches = ns.train_batches or ([64] if q else [64, 512])
    reference_batches = ns.reference_batches if ns.reference_batches is not None else ([] if q else [64])
    steps = ns.steps or (2 if q else 5)
    msg_sizes = ns.msg_sizes or ([500, 1000] if q else [500, 1000, 2000, 4000])
    msg_repeats = ns.msg_repeats or (1 if q else 3)
    passes = ns.load_passes or (1 if q else 3)
    g_sizes = ns.grounding_sizes or ([2000] if q else [2000, 20000, 100000])
    cuda = device.type == "cuda"
    epoch_videos = ns.epoch_videos or (256 if q else 50000 if cuda else 1024)
    epoch_music = ns.epoch_music or (60 if q else 4000 if cuda else 200)
    epoch_val = ns.epoch_val or (40 if q else 2000 if cuda else 200)
    epochs_timed = ns.epochs_timed or (2 if cuda and not q else 1)
    epoch_batch = ns.epoch_batch or (64 if q else PAPER_BATCH)
    eval_size = ns.eval_size or (200 if q else 2000)
    eval_repeats = ns.eval_repeats or (1 if q else 3)
    feature_devices = ns.feature_devices or (["auto", "cuda"] if cuda else ["auto"])

    from utils.ground.bench import format_benchmark
    from utils.io import atomic_write_json
    env = environment(device)
    env["malloc_keeps_freed_memory"] = malloc_kept
    print("machine: " + json.dumps(env))
    results: dict = {"environment": env, "quick": q, "sections": {}}
    own_workdir = ns.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="mgsv_bench_")) if own_workdir else Path(ns.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    report = [f"Machine: {env['cpu']}, {env['cpus_usable']} CPUs usable, torch {env['torch']}, "
              f"{env['torch_threads']} threads, fp32 GEMM {env['gemm_gflops']} GFLOP/s, device {env['device']}"
              + (f" ({env['gpu']})" if "gpu" in env else "") + f", load average at start {env['load_average_start']}"]
    t_start = time.time()
    try:
        if {"train", "load"} & set(ns.sections):
            root = make_data(workdir, q)
        if "train" in ns.sections:
            rows = bench_train(root, device, batches, reference_batches, steps, ns.amp, print, warmup=1 if q else 2,
                               floor_gflops=lambda: floor_rate(env, device), compile_model=ns.compile)
            results["sections"]["train"] = rows
            report += ["", "### Training step", "", format_train(rows)]
        if "eval" in ns.sections:
            eval_root, ckpt = make_eval_data(workdir, eval_size)
            rows = bench_eval(eval_root, ckpt, device, eval_repeats, ns.threads, print)
            flops = eval_flops(eval_root, ckpt, eval_size)
            results["sections"]["eval"] = {"size": eval_size, "runs": rows, "flops": flops}
            report += ["", "### test.py end to end (per-id files)", "",
                       format_eval(rows, eval_size, flops, floor_rate(env, device))]
        if "epoch" in ns.sections:
            epoch_root = make_epoch_data(workdir, epoch_videos, epoch_music, epoch_val)
            step_rows = [r for r in results["sections"].get("train", []) if r["batch"] == epoch_batch]
            if not step_rows:  # the step-only rate at the epoch section's batch, on its own data
                step_rows = bench_train(epoch_root, device, [epoch_batch], [], ns.steps or (3 if cuda else 2),
                                        ns.amp, print, warmup=1, compile_model=ns.compile)
            rows = bench_epoch(epoch_root, device, epoch_batch, epochs_timed, feature_devices, ns.amp, print,
                               warmup_steps=1 if q else 2, compile_model=ns.compile)
            results["sections"]["epoch"] = {"rows": rows, "step": step_rows}
            report += ["", f"### Whole training epochs ({epoch_videos:,} training videos, {epoch_music:,} tracks, "
                       f"{epoch_val:,} validation videos)", "", format_epoch(rows, step_rows)]
        if "load" in ns.sections:
            rows = bench_load(root, device, passes, ns.num_workers, print) + [bench_file_read(root, print)]
            results["sections"]["load"] = rows
            report += ["", "### Data loading (one pass of the training DataLoader, batch 64)", "", format_load(rows)]
        if "msg" in ns.sections:
            res = bench_msg(ns, msg_sizes, msg_repeats, print)
            results["sections"]["msg"] = res
            report += ["", "### MsG evaluation (exact, every video x every track)", "", format_msg(res)]
        if "grounding" in ns.sections:
            res = bench_grounding(ns, workdir, g_sizes, q, print)
            results["sections"]["grounding"] = res
            report += ["", f"### Grounding (synthetic libraries, {res['dtype']} index, {res['model']})", "",
                       format_benchmark(res["rows"], res["encode_tracks_per_s"])]
    finally:
        if own_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    env["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    env["total_s"] = round(time.time() - t_start, 1)
    report.append(f"\nLoad average at the end: {env['load_average_end']}; total {env['total_s']} s.")
    text = "\n".join(report)
    print("\n" + text)
    results["markdown"] = text
    if ns.json:
        atomic_write_json(results, ns.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
