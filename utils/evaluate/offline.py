"""Standalone evaluation of MGSV predictions, and trivial baselines.

    python -m utils.evaluate --gt_csv dataset/MGSV-EC/test_data.csv --pred_json preds.json [--metrics_json m.json]
    python -m utils.evaluate --gt_csv dataset/MGSV-EC/val_data.csv --baseline start0|center|random [--seed 0]
    python -m utils.evaluate --gt_csv test_data.csv --baseline track_prior --prior_csv train_data.csv
    python -m utils.evaluate --gt_csv test_data.csv --stats [--prior_csv train_data.csv]

With --prior_csv (a split whose usage of each track counts as known, normally the training CSV) the metrics are
also reported on the videos whose track is seen / unseen there and on the moments on / off their track's
canonical start (utils/evaluate/track_prior.py); --metrics_json then gets them as "seen/mIoU", "unseen/n", ...
beside the 23 flat keys. --stats prints how the split's moments are placed (and, with --prior_csv, how strongly its
tracks keep their canonical clip) instead of evaluating anything.

preds.json is a list with one object per video of the CSV:
    {"video_id": "112712471153",                  # str (an integer is accepted and converted)
     "ranked_music_ids": ["4+5xx...", ...],       # candidate tracks, best first; may be a top-k prefix
     "pred_st": 23.1, "pred_ed": 48.9}            # moment (s) predicted on the video's GROUND-TRUTH track

Candidates are the distinct music ids of the CSV rows (the original ranks a video against every row of its split).
A ranked list may stop early: the GT id missing from it ranks after every other candidate (pessimistic, so a
truncated list never scores better than the full one). Moments are clipped to [0, min(240, track length)] here,
so raw detector outputs can be written as they are.

The metric code path is shared with test.py: test.py builds the same records (predictions_from_scores) and calls
evaluate_predictions, so `python -m utils.evaluate` on its JSON reproduces its numbers by construction.
Bad input is reported as one clear message (file, entry, video id, problem) with exit status 2.
"""
from __future__ import annotations

import argparse
import json
import math
import numbers
import os
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from utils.data.annotations import AnnotationError, load_annotations
from utils.data.constants import MAX_M_DURATION
from utils.evaluate.metrics import (compute_all, format_table, metrics_from_ranks, ranked_music_ids,
                                    ranks_from_ranked_lists, smg_ious)
from utils.evaluate.track_prior import (CanonicalClip, canonical_clips, dataset_stats, format_stats, subset_masks,
                                        subset_metrics, subset_table, track_prior_starts)
from utils.io import OutputError, atomic_write_json, check_writable_file  # numpy only; torch stays unimported

BASELINES: tuple[str, ...] = ("start0", "center", "random", "track_prior")
PRED_KEYS: tuple[str, ...] = ("video_id", "ranked_music_ids", "pred_st", "pred_ed")
MAX_LISTED = 5  # problems quoted in one error message before "... and N more"


class EvaluationError(ValueError):
    """Predictions that cannot be evaluated against the annotation CSV (missing/unknown/duplicate ids, bad values)."""


# ----------------------------------------------------------------------------------------------------------------
# shared with test.py
# ----------------------------------------------------------------------------------------------------------------
def candidate_music_ids(gt_df: pd.DataFrame) -> list[str]:
    """Distinct music ids of the split's rows, in order of first appearance: the MsG candidate set."""
    return list(dict.fromkeys(str(m) for m in gt_df["music_id"]))


def metrics_from_scores(scores: Any, column_music_ids: Sequence[str], gt_music_ids: Sequence[str], pred_se_sec: Any,
                        gt_se_sec: Any, m_duration: Any, max_m_duration: float = MAX_M_DURATION) -> dict[str, float]:
    """Same as utils.evaluate.metrics.compute_all (kept under this name so test.py and the CLI import from one
    module)."""
    return compute_all(scores, column_music_ids, gt_music_ids, pred_se_sec, gt_se_sec, m_duration, max_m_duration)


def predictions_from_scores(video_ids: Sequence[str], scores: Any, column_music_ids: Sequence[str],
                            gt_music_ids: Sequence[str], pred_se_sec: Any, top_k: int | None = None) -> list[dict]:
    """Prediction records (the JSON format above) from a score matrix and UNclipped moments in seconds.

    The ranked lists put the GT id after any id it ties with, so evaluate_predictions on these records gives
    exactly metrics_from_scores on the matrix (with top_k=None; with a top_k prefix, R@k for k <= top_k
    agree and MedianR/MeanR/MRR become pessimistic bounds).
    """
    lists = ranked_music_ids(scores, column_music_ids, gt_music_ids, top_k=top_k)
    se = np.asarray(pred_se_sec, dtype=np.float64).reshape(-1, 2)
    if not (len(video_ids) == len(lists) == se.shape[0]):
        raise ValueError(f"{len(video_ids)} video ids, {len(lists)} score rows and {se.shape[0]} moments differ")
    return [{"video_id": str(v), "ranked_music_ids": r, "pred_st": float(s), "pred_ed": float(e)}
            for v, r, (s, e) in zip(video_ids, lists, se.tolist())]


def ranks_and_ious(gt_df: pd.DataFrame, preds: Sequence[Mapping[str, Any]], max_m_duration: float = MAX_M_DURATION,
                   source: str = "predictions") -> tuple[np.ndarray, np.ndarray]:
    """Validate `preds` against `gt_df`; return per-video (rank0 int64, IoU float64) in the CSV's row order.

    Raises EvaluationError naming `source` (e.g. the JSON path), the entry and the video id for every kind of
    bad input, so the CLI can print it and exit 2 instead of failing deep inside numpy.
    """
    by_video = _index_predictions(gt_df, preds, source)
    records = [by_video[v] for v in gt_df["video_id"].astype(str)]
    rank0 = ranks_from_ranked_lists([r["ranked_music_ids"] for r in records], gt_df["music_id"].astype(str).tolist(),
                                    len(candidate_music_ids(gt_df)))
    pred_se = np.array([[r["pred_st"], r["pred_ed"]] for r in records], dtype=np.float64)
    gt_se = gt_df[["music_start", "music_end"]].to_numpy(dtype=np.float64)
    ious = smg_ious(pred_se, gt_se, gt_df["music_total_duration"].to_numpy(dtype=np.float64), max_m_duration)
    return rank0, ious


def evaluate_predictions(gt_df: pd.DataFrame, preds: Sequence[Mapping[str, Any]],
                         max_m_duration: float = MAX_M_DURATION, source: str = "predictions") -> dict[str, float]:
    """All METRIC_KEYS for prediction records (see module docstring) against an annotation DataFrame."""
    rank0, ious = ranks_and_ious(gt_df, preds, max_m_duration, source)
    return metrics_from_ranks(rank0, ious)


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------
def _raise_if(problems: list[str], header: str) -> None:
    if not problems:
        return
    lines = [f"  {p}" for p in problems[:MAX_LISTED]]
    if len(problems) > MAX_LISTED:
        lines.append(f"  ... and {len(problems) - MAX_LISTED} more")
    raise EvaluationError(f"{header} ({len(problems)} problem(s)):\n" + "\n".join(lines))


def _is_number(x: Any) -> bool:
    # numbers.Real also admits numpy scalars (np.float32 from test.py); bool is excluded on purpose
    return isinstance(x, numbers.Real) and not isinstance(x, (bool, np.bool_))


def _finite(x: numbers.Real) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # a JSON integer beyond the float range (1e400 written out)
        return False


def _check_record(i: int, rec: Any, candidates: set[str]) -> tuple[str | None, list[str]]:
    """Return (video_id or None, problems) for entry i of the predictions."""
    if not isinstance(rec, Mapping):
        return None, [f"entry #{i}: expected an object with keys {list(PRED_KEYS)}, got {type(rec).__name__}"]
    vid = rec.get("video_id")
    if isinstance(vid, numbers.Integral) and not isinstance(vid, (bool, np.bool_)):
        vid = str(vid)  # video ids are integers in the CSV; an unquoted id is unambiguous
    where = f"entry #{i} (video_id {vid!r})"
    missing = [k for k in PRED_KEYS if k not in rec]
    if missing:
        return (vid if isinstance(vid, str) else None), [f"{where}: missing key(s) {missing}"]
    if not isinstance(vid, str):
        return None, [f"{where}: video_id must be a string"]
    problems = []
    for key in ("pred_st", "pred_ed"):
        if not _is_number(rec[key]):
            problems.append(f"{where}: {key} must be a number, got {rec[key]!r}")
        elif not _finite(rec[key]):
            problems.append(f"{where}: {key} is {rec[key]!r:.40} (NaN/inf, or too large for a float)")
    if not problems and rec["pred_st"] > rec["pred_ed"]:
        problems.append(f"{where}: pred_st {rec['pred_st']} > pred_ed {rec['pred_ed']}")
    problems += _check_ranking(where, rec["ranked_music_ids"], candidates)
    return vid, problems


def _check_ranking(where: str, ranked: Any, candidates: set[str]) -> list[str]:
    """A ranking must be a list of candidate music ids (strings)."""
    if not isinstance(ranked, (list, tuple)):
        return [f"{where}: ranked_music_ids must be a list of music id strings, got {type(ranked).__name__}"]
    try:
        # fast path (2000 x 2000 ids on a real split): the candidates are all str, so a superset
        # also proves every element is a string, without a per-element isinstance loop
        if candidates.issuperset(ranked):
            return []
    except TypeError:  # unhashable element, reported below
        pass
    non_str = [m for m in ranked if not isinstance(m, str)]
    if non_str:
        return [f"{where}: ranked_music_ids must be a list of music id strings, found {non_str[0]!r}"]
    unknown = list(dict.fromkeys(m for m in ranked if m not in candidates))
    shown = ", ".join(repr(m) for m in unknown[:3]) + (" ..." if len(unknown) > 3 else "")
    return [f"{where}: ranked_music_ids has {len(unknown)} unknown music id(s) (not a music_id of the CSV): {shown}"]


def _index_predictions(gt_df: pd.DataFrame, preds: Any, source: str) -> dict[str, Mapping[str, Any]]:
    """Check every record and the video coverage; return {video_id: record}."""
    if not isinstance(preds, list):
        raise EvaluationError(f"{source}: expected a JSON list of prediction objects, got {type(preds).__name__}")
    gt_videos = gt_df["video_id"].astype(str).tolist()
    if len(set(gt_videos)) != len(gt_videos):
        raise EvaluationError("the annotations contain duplicate video_id(s); predictions are keyed by video_id")
    known, candidates = set(gt_videos), set(candidate_music_ids(gt_df))
    problems: list[str] = []
    by_video: dict[str, Mapping[str, Any]] = {}
    first_entry: dict[str, int] = {}
    for i, rec in enumerate(preds):
        vid, rec_problems = _check_record(i, rec, candidates)
        problems += rec_problems
        if vid is None:
            continue
        if vid in first_entry:
            problems.append(f"entry #{i}: duplicate video_id {vid!r} (already given in entry #{first_entry[vid]})")
        elif vid not in known:
            problems.append(f"entry #{i}: unknown video_id {vid!r} (not a video_id of the annotation CSV)")
        else:
            first_entry[vid] = i
            by_video[vid] = rec
    _raise_if(problems, f"{source}: invalid predictions")
    absent = [v for v in gt_videos if v not in by_video]
    _raise_if([f"video_id {v!r} has no prediction" for v in absent],
              f"{source}: {len(absent)} of the {len(gt_videos)} videos of the annotation CSV have no prediction")
    return by_video


# ----------------------------------------------------------------------------------------------------------------
# baselines
# ----------------------------------------------------------------------------------------------------------------
def _random_rankings(candidates: list[str], n: int, rng: np.random.Generator, chunk: int = 512) -> list[list[str]]:
    ids = np.asarray(candidates, dtype=object)
    out: list[list[str]] = []
    for a in range(0, n, chunk):
        rows = min(chunk, n - a)
        perm = rng.permuted(np.tile(np.arange(ids.size), (rows, 1)), axis=1)
        out.extend(ids[perm].tolist())
    return out


def baseline_predictions(gt_df: pd.DataFrame, kind: str, seed: int = 0,
                         max_m_duration: float = MAX_M_DURATION,
                         clips: Mapping[str, CanonicalClip] | None = None) -> list[dict]:
    """Prediction records of a trivial model, to print beside a real one.

    Every kind ranks the candidates in a random order (seeded; identical for all kinds). The moment has the
    video's length L = video_end - video_start (the GT moment length ~= L in MGSV-EC), placed:
      start0: [0, L]  (many GT moments start at 0 s, so this is a strong grounding baseline);
      center: centred in the track (track length T capped at max_m_duration);
      random: uniform start in [0, max(T - L, 0)];
      track_prior: at the track's canonical start in `clips` (utils.evaluate.track_prior.canonical_clips of a prior
        split), at 0 for a track not in `clips`. It reads no feature: it only knows how the track is used.
    A moment longer than the track is left to the evaluator's clipping.
    """
    if kind not in BASELINES:
        raise ValueError(f"unknown baseline {kind!r}; choose one of {list(BASELINES)}")
    if kind == "track_prior" and clips is None:
        raise ValueError("the track_prior baseline needs the canonical clips of a prior split (--prior_csv)")
    rank_ss, moment_ss = np.random.SeedSequence(seed).spawn(2)
    rankings = _random_rankings(candidate_music_ids(gt_df), len(gt_df), np.random.default_rng(rank_ss))
    vlen = (gt_df["video_end"] - gt_df["video_start"]).to_numpy(dtype=np.float64)
    track = np.minimum(gt_df["music_total_duration"].to_numpy(dtype=np.float64), max_m_duration)
    slack = np.maximum(track - vlen, 0.0)
    if kind == "start0":
        st = np.zeros_like(vlen)
    elif kind == "center":
        st = slack / 2.0
    elif kind == "track_prior":
        st = track_prior_starts(gt_df["music_id"].astype(str).tolist(), clips)
    else:
        st = np.random.default_rng(moment_ss).uniform(0.0, 1.0, size=vlen.size) * slack
    return [{"video_id": str(v), "ranked_music_ids": r, "pred_st": float(s), "pred_ed": float(s + l)}
            for v, r, s, l in zip(gt_df["video_id"], rankings, st.tolist(), vlen.tolist())]


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def load_predictions_json(path: str | os.PathLike) -> Any:
    """Parse the predictions file; a missing or malformed file is an EvaluationError naming it."""
    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"{p}: predictions file not found")
    try:
        with open(p, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as exc:
        raise EvaluationError(f"{p}: malformed JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise EvaluationError(f"{p}: not a UTF-8 text file ({exc.reason})") from None
    except RecursionError:
        raise EvaluationError(f"{p}: JSON nested too deeply to be a prediction list") from None
    except ValueError as exc:  # e.g. an integer of more digits than Python converts
        raise EvaluationError(f"{p}: unreadable JSON ({str(exc).splitlines()[0]})") from None


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m utils.evaluate",
        description="Evaluate MGSV predictions (MsG, SmG, MoR metrics) against an annotation CSV.")
    p.add_argument("--gt_csv", required=True, help="annotation CSV of the split (e.g. dataset/MGSV-EC/test_data.csv)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pred_json", help="JSON list of {video_id, ranked_music_ids, pred_st, pred_ed}")
    src.add_argument("--baseline", choices=BASELINES, help="evaluate a trivial baseline instead of predictions "
                     "(track_prior needs --prior_csv)")
    src.add_argument("--stats", action="store_true",
                     help="print how the split's moments are placed (with --prior_csv: how they follow their "
                          "tracks' canonical clips there) and exit")
    p.add_argument("--prior_csv", help="split whose track usage counts as known (normally train_data.csv): "
                   "canonical clips for --baseline track_prior, and the seen/unseen/canonical breakdown")
    p.add_argument("--seed", type=int, default=0, help="seed of the baseline's random ranking/moment")
    p.add_argument("--metrics_json", help="also write the metrics (flat JSON object of METRIC_KEYS) here")
    p.add_argument("--max_m_duration", type=float, default=MAX_M_DURATION,
                   help="longest track in seconds; predictions are clipped to min(this, track length)")
    p.add_argument("--skip_bad_rows", action="store_true", help="drop invalid CSV rows with a warning")
    return p


def breakdown(gt_df: pd.DataFrame, rank0: Any, ious: Any, clips: Mapping[str, CanonicalClip]) -> dict[str, float]:
    """The prefixed subset metrics ("seen/mIoU", ...) of per-video ranks and IoUs in the CSV's row order."""
    masks = subset_masks(gt_df["music_id"].astype(str).tolist(), gt_df["music_start"].to_numpy(), clips)
    return subset_metrics(rank0, ious, masks)


def run(args: argparse.Namespace) -> dict[str, float]:
    if args.metrics_json:  # an unwritable target is found before the evaluation, not after it
        check_writable_file(args.metrics_json, "--metrics_json")
    gt_df = load_annotations(args.gt_csv, max_m_duration=args.max_m_duration, skip_bad_rows=args.skip_bad_rows)
    prior = None if args.prior_csv is None else load_annotations(
        args.prior_csv, max_m_duration=args.max_m_duration, skip_bad_rows=args.skip_bad_rows)
    if args.stats:
        print(f"{args.gt_csv}" + (f" (prior split: {args.prior_csv})" if prior is not None else ""))
        print(format_stats(dataset_stats(gt_df, prior)))
        return {}
    clips = None if prior is None else canonical_clips(prior)
    if args.baseline:
        name, source = f"baseline:{args.baseline}", f"baseline {args.baseline} (seed {args.seed})"
        preds = baseline_predictions(gt_df, args.baseline, args.seed, args.max_m_duration, clips)
    else:
        name, source = Path(args.pred_json).name, str(args.pred_json)
        preds = load_predictions_json(args.pred_json)
    rank0, ious = ranks_and_ious(gt_df, preds, args.max_m_duration, source)
    metrics = metrics_from_ranks(rank0, ious)
    print(f"{source}: {len(gt_df)} videos of {args.gt_csv}, {len(candidate_music_ids(gt_df))} candidate tracks")
    print(format_table({name: metrics}))
    if clips is not None:
        extra = breakdown(gt_df, rank0, ious, clips)
        print(f"\nby track usage in {args.prior_csv} (seen/unseen track; on/off its canonical start within 1 s):")
        print(format_table(subset_table(extra)))
        metrics = {**metrics, **extra}
    if args.metrics_json:
        atomic_write_json(metrics, args.metrics_json)
        print(f"wrote {args.metrics_json}")
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.baseline == "track_prior" and args.prior_csv is None:
        parser.error("--baseline track_prior needs --prior_csv (the split whose track usage is known)")
    try:
        run(args)
    except (EvaluationError, AnnotationError, OSError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0

