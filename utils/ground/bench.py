"""Benchmark of the grounding tools on synthetic music libraries (building blocks for scripts/benchmark.py).

    rows = benchmark_grounding(gm, sizes=(2000, 20000, 100000), shortlist_ks=(100, 1000))

For each library size it reports: index build time (the X-Pool indexing + writing; the music
encoder's throughput is measured separately, so a build from features takes about
tracks / encode_rate longer), index size on disk, single-query retrieval latency (p50/p95) of the
exhaustive and the two-stage paths, the detector's latency for the top-k pairs of one query
(independent of library size and mode), and the fraction of queries whose exhaustive top-1 /
top-10 the two-stage result keeps (top-1: same track first; top-10: same set of ten tracks).

Synthetic libraries are made directly in MaDe space (no feature files, no music encoder), in
chunks, so 100k tracks never sit in memory at once. Track j has n_j valid snippets (durations
uniform in 30-240 s as MGSV-EC, stride 2.5 s) with tokens
    S_jl = a c_j + b s_j(l) + e eps_jl
(c_j: track identity, s_j: smooth random trajectory over time, eps: noise) and m_j = the
normalised masked mean, as the music encoder produces. A query is a random window of a random
track: frame tokens = that track's tokens at the frame times + a per-video nuisance vector +
per-frame noise, v = normalised mean -- so each query has a true track, like a real video, and
the nuisance keeps retrieval from being trivial. Numbers therefore describe this synthetic
distribution and the given weights; with a trained checkpoint and real tracks the shortlist
recall (how often the dual tower keeps the exhaustive winner) may differ.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from utils.data.constants import MAX_M_DURATION
from utils.ground.index import write_index
from utils.ground.library import MusicLibrary, open_index
from utils.ground.model import GroundingModel, weights_fingerprint
from utils.ground.search import detect_pairs, exhaustive_scores, top_by_score, two_stage_scores


@dataclass
class SyntheticSpec:
    """Knobs of the synthetic MaDe-space library and queries."""

    dim: int = 256
    num_snippets: int = 96
    num_frames: int = 50
    stride: float = 2.5
    identity: float = 0.6        # weight of the track identity c_j
    trajectory: float = 0.8      # weight of the time-varying part s_j(l)
    token_noise: float = 0.5
    num_waves: int = 4
    # Query difficulty, calibrated so that the exhaustive top-1 is the true track for ~18 % of the
    # queries at 20k tracks (untrained MaDe): the shortlist must also keep wrong winners.
    frame_noise: float = 2.0     # per-frame noise of a query
    nuisance: float = 3.0        # per-video constant distractor


def random_model(seed: int = 0, device: str | torch.device = "cpu") -> GroundingModel:
    """An untrained MaDe (paper configuration) when no checkpoint is given."""
    import argparse

    from model.made import MaDe, MaDeConfig
    torch.manual_seed(seed)
    model = MaDe(MaDeConfig()).to(device).eval()
    args = argparse.Namespace(stride=2.5, max_m_duration=MAX_M_DURATION, max_v_frames=50, fb_label="01")
    return GroundingModel(model, args, f"<random init, seed {seed}>", weights_fingerprint(model),
                          torch.device(device))


def synthetic_tracks(num_tracks: int, spec: SyntheticSpec, seed: int = 0, chunk: int = 1024
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Chunks of (m [n, d] normalised, Sm [n, L, d] padded rows 0, mask [n, L]) in MaDe space."""
    rng = np.random.default_rng(seed)
    pos = np.arange(spec.num_snippets) * spec.stride                                # window centres (s)
    for lo in range(0, num_tracks, chunk):
        n = min(chunk, num_tracks - lo)
        duration = rng.uniform(30.0, 239.9, n)
        mask = (pos[None, :] <= duration[:, None]).astype(np.float32)
        freq = 1.0 / np.exp(rng.uniform(np.log(8.0), np.log(60.0), (n, spec.num_waves)))
        phase = rng.uniform(0, 2 * np.pi, (n, spec.num_waves))
        amp = rng.normal(0, np.sqrt(2.0 / spec.num_waves), (n, spec.num_waves, spec.dim)).astype(np.float32)
        waves = np.sin(2 * np.pi * freq[:, None, :] * pos[None, :, None] + phase[:, None, :]).astype(np.float32)
        tokens = (spec.identity * rng.standard_normal((n, 1, spec.dim), dtype=np.float32)
                  + spec.trajectory * np.einsum("nlk,nkd->nld", waves, amp)
                  + spec.token_noise * rng.standard_normal((n, spec.num_snippets, spec.dim), dtype=np.float32))
        tokens *= mask[..., None]
        sm, mk = torch.from_numpy(tokens), torch.from_numpy(mask)
        m = torch.nn.functional.normalize(sm.sum(1) / mk.sum(1, keepdim=True), dim=-1)
        yield m, sm, mk


def synthetic_queries(library: MusicLibrary, num_queries: int, spec: SyntheticSpec, seed: int = 1
                      ) -> tuple[np.ndarray, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(true rows [Q], v [Q, d], Fv [Q, Lv, d], frame_mask [Q, Lv]): windows of random library tracks."""
    rng = np.random.default_rng(seed)
    rows = rng.choice(len(library), size=num_queries, replace=False)
    _, sm, mask = library.tracks.get(rows, torch.device("cpu"))
    n_valid = mask.sum(1).numpy().astype(int)
    fv = torch.zeros(num_queries, spec.num_frames, spec.dim)
    fmask = torch.zeros(num_queries, spec.num_frames)
    for q in range(num_queries):
        track_len = n_valid[q] * spec.stride
        length = float(np.clip(rng.lognormal(np.log(20.0), 0.45), 5.0, min(49.5, track_len - 1)))
        start = rng.uniform(0, max(0.0, track_len - length))
        frames = int(length) + 1
        snippet = np.clip(np.rint((start + np.arange(frames)) / spec.stride).astype(int), 0, n_valid[q] - 1)
        noise = spec.frame_noise * torch.from_numpy(rng.standard_normal((frames, spec.dim), dtype=np.float32))
        nuisance = spec.nuisance * torch.from_numpy(rng.standard_normal(spec.dim, dtype=np.float32))
        fv[q, :frames] = sm[q, snippet] + noise + nuisance
        fmask[q, :frames] = 1
    v = torch.nn.functional.normalize(fv.sum(1) / fmask.sum(1, keepdim=True), dim=-1)
    return rows, v, fv, fmask


def _reusable(out: Path, gm: GroundingModel, num_tracks: int, dtype: str, seed: int) -> MusicLibrary | None:
    try:
        library = open_index(out, gm)
    except Exception:  # absent, partial, or built with other weights: build again
        return None
    m = library.manifest
    same = m.get("synthetic_seed") == seed and m["num_tracks"] == num_tracks and m["dtype"] == dtype
    return library if same else None


def build_synthetic_index(gm: GroundingModel, num_tracks: int, out: str | Path, spec: SyntheticSpec,
                          dtype: str = "float16", seed: int = 0) -> tuple[MusicLibrary, float]:
    """Write a synthetic library's index; returns (opened library, build seconds)."""
    ids = [f"synth{i:07d}" for i in range(num_tracks)]
    t0 = time.perf_counter()
    write_index(gm, ids, synthetic_tracks(num_tracks, spec, seed), out, dtype=dtype, overwrite=True,
                extra={"synthetic": True, "synthetic_seed": seed})
    return open_index(out, gm), time.perf_counter() - t0


@torch.no_grad()
def encode_rate(gm: GroundingModel, num_tracks: int = 256, batch: int = 64) -> float:
    """Tracks per second of the music encoder on random AST-shaped inputs (full 96 snippets)."""
    feats = torch.randn(batch, 96, 768, device=gm.device)
    mask = torch.ones(batch, 96, device=gm.device)
    gm.model.encode_music(feats[:2], mask[:2])  # warm-up
    t0 = time.perf_counter()
    for _ in range(max(1, num_tracks // batch)):
        gm.model.encode_music(feats, mask)
    return max(1, num_tracks // batch) * batch / (time.perf_counter() - t0)


def _two_stage_top(gm: GroundingModel, library: MusicLibrary, v: torch.Tensor, k: int, topk: int):
    cand, scores = two_stage_scores(gm, library, v, k)
    return top_by_score(scores, cand, topk)


def _percentiles(timings: Sequence[tuple[float, float]]) -> dict[str, float]:
    """Wall-clock p50/p95 and the median process CPU time (all threads), in ms. On a shared
    machine the wall time grows with other load; the CPU time much less."""
    wall = np.asarray([t[0] for t in timings]) * 1000.0
    cpu = np.asarray([t[1] for t in timings]) * 1000.0
    return {"p50_ms": round(float(np.percentile(wall, 50)), 2), "p95_ms": round(float(np.percentile(wall, 95)), 2),
            "cpu_p50_ms": round(float(np.percentile(cpu, 50)), 2)}


def _timed(fn, *args) -> tuple[float, float]:
    t0, c0 = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - t0, time.process_time() - c0


@torch.no_grad()
def measure_library(gm: GroundingModel, library: MusicLibrary, spec: SyntheticSpec,
                    shortlist_ks: Sequence[int] = (100, 1000), num_queries: int = 200,
                    latency_queries: int = 20, topk: int = 10, batch: int = 50, seed: int = 1,
                    exhaustive_latency_queries: int | None = None) -> dict:
    """Latency and shortlist preservation on one opened library.

    exhaustive_latency_queries (default latency_queries): single exhaustive queries to time; a
    100k-track library takes seconds per query on CPU, so fewer may be enough there.
    """
    true_rows, v, fv, fmask = synthetic_queries(library, num_queries, spec, seed)
    v, fv, fmask = v.to(gm.device), fv.to(gm.device), fmask.to(gm.device)
    # Reference: exhaustive top-k of every query (batched: the fast way to get them all).
    ex_rows = np.concatenate([top_by_score(exhaustive_scores(gm, library, v[lo: lo + batch]), None, topk)[0]
                              for lo in range(0, num_queries, batch)])
    row: dict = {"tracks": len(library), "queries": num_queries,
                 "exhaustive_top1_is_true_track": round(float((ex_rows[:, 0] == true_rows).mean()), 4)}
    lat_q = range(min(latency_queries, num_queries))
    n_ex = latency_queries if exhaustive_latency_queries is None else exhaustive_latency_queries
    row["exhaustive"] = _percentiles([_timed(lambda i: top_by_score(
        exhaustive_scores(gm, library, v[i: i + 1]), None, topk), i) for i in range(min(n_ex, num_queries))])
    for k in shortlist_ks:
        if k >= len(library):
            continue
        two_rows = []
        for lo in range(0, num_queries, batch):
            cand, scores = two_stage_scores(gm, library, v[lo: lo + batch], k)
            two_rows.append(top_by_score(scores, cand, topk)[0])
        two = np.concatenate(two_rows)
        lat = _percentiles([_timed(_two_stage_top, gm, library, v[i: i + 1], k, topk) for i in lat_q])
        row[f"two_stage_K{k}"] = {
            **lat,
            "top1_preserved": round(float((two[:, 0] == ex_rows[:, 0]).mean()), 4),
            "top10_preserved": round(float(np.mean([set(a) == set(b) for a, b in zip(two, ex_rows)])), 4),
            "top10_recall": round(float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(two, ex_rows)])), 4),
        }
    row["detect_topk"] = _percentiles([_timed(
        lambda i: detect_pairs(gm, library, fv, fmask, v, np.full(topk, i), ex_rows[i]), i) for i in lat_q])
    return row


def benchmark_grounding(gm: GroundingModel, sizes: Sequence[int] = (2000, 20000, 100000),
                        shortlist_ks: Sequence[int] = (100, 1000), workdir: str | Path = "bench_indexes",
                        dtype: str = "float16", num_queries: int = 200, latency_queries: int = 20,
                        topk: int = 10, keep: bool = False, seed: int = 0,
                        spec: SyntheticSpec | None = None, log=print,
                        exhaustive_latency_queries: int | None = None, reuse: bool = False) -> list[dict]:
    """One row per library size: build time/size, latency p50/p95, top-1/top-10 preservation.

    reuse: measure an index kept (keep=True) by an earlier run with the same model, size, dtype
    and seed instead of building it again (the 100k build takes minutes).
    """
    spec = spec or SyntheticSpec(dim=int(gm.model.cfg.d_model), stride=gm.stride, num_frames=gm.num_frames)
    workdir = Path(workdir)
    rows = []
    for n in sizes:
        out = workdir / f"synthetic_{n}_{dtype}"
        library = _reusable(out, gm, n, dtype, seed) if reuse else None
        if library is not None:   # built by an earlier run with these settings: its build time
            build_s = float(library.manifest["build_seconds"])
        else:
            library, build_s = build_synthetic_index(gm, n, out, spec, dtype, seed)
        m = library.manifest
        # build_s includes generating the synthetic tokens; index_music_s is the X-Pool indexing pass alone.
        row = {"build_s": round(build_s, 2), "index_music_s": round(m["build_seconds"] - m["encode_seconds"], 2),
               "index_MiB": round(library.size_bytes() / 2**20, 1), "dtype": dtype}
        log(f"[{n} tracks] index built in {build_s:.1f} s, {row['index_MiB']:.0f} MiB")
        row.update(measure_library(gm, library, spec, shortlist_ks, num_queries, latency_queries, topk,
                                   seed=seed + 1, exhaustive_latency_queries=exhaustive_latency_queries))
        log(f"[{n} tracks] {row}")
        rows.append(row)
        del library
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
    return rows


def format_benchmark(rows: Sequence[dict], encode_tracks_per_s: float | None = None) -> str:
    """Markdown table of benchmark_grounding's rows."""
    ks = sorted({int(k.split("K")[1]) for r in rows for k in r if k.startswith("two_stage_K")})
    head = ["tracks", "build s (X-Pool pass)", "index MiB", "exhaustive p50/p95 ms"]
    head += [f"K={k} p50/p95 ms" for k in ks] + [f"K={k} top1 / top10 kept" for k in ks]
    head += ["detect top-10 p50 ms", "exh. top1 = true track", "CPU ms p50: exh / K... / detect"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['tracks']:,}", f"{r['build_s']:.1f} ({r.get('index_music_s', float('nan')):.1f})",
                 f"{r['index_MiB']:.0f}",
                 f"{r['exhaustive']['p50_ms']:.0f} / {r['exhaustive']['p95_ms']:.0f}"]
        for k in ks:
            t = r.get(f"two_stage_K{k}")
            cells.append(f"{t['p50_ms']:.0f} / {t['p95_ms']:.0f}" if t else "-")
        for k in ks:
            t = r.get(f"two_stage_K{k}")
            cells.append(f"{100 * t['top1_preserved']:.1f}% / {100 * t['top10_preserved']:.1f}%" if t else "-")
        cells += [f"{r['detect_topk']['p50_ms']:.0f}", f"{100 * r['exhaustive_top1_is_true_track']:.1f}%"]
        cpu = [r["exhaustive"]["cpu_p50_ms"]] + [r[f"two_stage_K{k}"]["cpu_p50_ms"] for k in ks
                                                 if f"two_stage_K{k}" in r] + [r["detect_topk"]["cpu_p50_ms"]]
        cells.append(" / ".join(f"{c:.0f}" for c in cpu))
        lines.append("| " + " | ".join(cells) + " |")
    if encode_tracks_per_s:
        lines.append(f"\nmusic encoder: {encode_tracks_per_s:.0f} tracks/s (add tracks / rate to the build "
                     "time for a build from AST features)")
    return "\n".join(lines)
