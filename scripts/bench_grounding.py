"""Grounding benchmark on synthetic libraries: now a section of scripts/benchmark.py.

    python scripts/bench_grounding.py [--sizes 2000 20000 100000] [...]
    == python scripts/benchmark.py --sections grounding [--grounding_sizes 2000 20000 100000] [...]

Kept so that existing commands keep working; every flag maps onto benchmark.py's (see
`python scripts/benchmark.py --help`, "grounding" options).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# this script's flag -> benchmark.py's flag
RENAMED = {"sizes": "grounding_sizes", "dtype": "grounding_dtype", "workdir": "grounding_workdir",
           "keep": "keep_indexes", "reuse": "reuse_indexes"}


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load_uni_model_path", default=None)
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000, 100000])
    p.add_argument("--shortlist_ks", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--dtype", choices=["float32", "float16"], default="float16")
    p.add_argument("--workdir", default="bench_indexes")
    p.add_argument("--num_queries", type=int, default=200)
    p.add_argument("--latency_queries", type=int, default=20)
    p.add_argument("--exhaustive_latency_queries", type=int, default=None)
    p.add_argument("--topk", type=int, default=10)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true")
    p.add_argument("--reuse", action="store_true")
    p.add_argument("--json", default=None)
    return p


def benchmark_argv(argv: list[str] | None = None) -> list[str]:
    args = get_parser().parse_args(argv)
    out = ["--sections", "grounding"]
    for name, value in vars(args).items():
        flag = "--" + RENAMED.get(name, name)
        if value is None or value is False:
            continue
        if value is True:
            out.append(flag)
        elif isinstance(value, list):
            out += [flag] + [str(v) for v in value]
        else:
            out += [flag, str(value)]
    return out


def main(argv: list[str] | None = None) -> int:
    import benchmark
    return benchmark.main(benchmark_argv(argv))


if __name__ == "__main__":
    sys.exit(main())
