"""Benchmark the grounding tools on synthetic libraries of 2k / 20k / 100k tracks (issue 8).

    python scripts/bench_grounding.py [--load_uni_model_path CKPT] [--sizes 2000 20000 100000]
        [--shortlist_ks 100 1000] [--dtype float16] [--workdir /tmp/bench_idx] [--json out.json]

Reports index build time and size, single-query retrieval latency p50/p95 (exhaustive vs
two-stage), the detector's latency for one query's top-10 pairs, and how often the two-stage
result keeps the exhaustive top-1 / top-10. Without a checkpoint an untrained MaDe is used.
See utils/grounding_bench.py for what the synthetic library is. To be merged into
scripts/benchmark.py (it only calls utils.grounding_bench.benchmark_grounding).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load_uni_model_path", default=None, help="checkpoint (default: untrained MaDe)")
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    p.add_argument("--shortlist_ks", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--workdir", default="bench_indexes", help="where the synthetic indexes are written")
    p.add_argument("--num_queries", type=int, default=200, help="queries for the preservation fractions")
    p.add_argument("--latency_queries", type=int, default=20, help="single queries timed per mode")
    p.add_argument("--exhaustive_latency_queries", type=int, default=None,
                   help="single exhaustive queries timed (default: --latency_queries; slow at 100k on CPU)")
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the indexes")
    p.add_argument("--reuse", action="store_true", help="measure indexes kept by an earlier --keep run")
    p.add_argument("--json", default=None, help="write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    import torch
    from utils.grounding import load_model
    from utils.grounding_bench import benchmark_grounding, encode_rate, format_benchmark, random_model
    from utils.io import atomic_write_json
    args = get_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gm = load_model(args.load_uni_model_path, args.device) if args.load_uni_model_path \
        else random_model(args.seed, args.device)
    rate = encode_rate(gm)
    t0 = time.time()
    rows = benchmark_grounding(gm, args.sizes, args.shortlist_ks, args.workdir, args.dtype, args.num_queries,
                               args.latency_queries, args.topk, args.keep, args.seed,
                               exhaustive_latency_queries=args.exhaustive_latency_queries, reuse=args.reuse)
    env = {"device": str(gm.device), "torch_threads": torch.get_num_threads(), "cpu": platform.processor()
           or platform.machine(), "model": gm.checkpoint, "dtype": args.dtype, "encode_tracks_per_s": round(rate, 1),
           "total_s": round(time.time() - t0, 1)}
    print(format_benchmark(rows, rate))
    print(json.dumps(env))
    if args.json:
        atomic_write_json({"environment": env, "rows": rows}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
