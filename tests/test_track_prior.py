"""Canonical clips and the track prior: the rule that picks a track's canonical start, the
seen/unseen/canonical breakdown, the statistics tool and the track_prior baseline on the real
CSVs (skipped without them), and the synthetic generator against the real statistics."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import REPO_ROOT, load_script
from utils.data.annotations import load_annotations
from utils.evaluate.metrics import METRIC_KEYS
from utils.evaluate.offline import baseline_predictions, evaluate_predictions
from utils.evaluate.track_prior import (SUBSET_METRICS, canonical_clips, dataset_stats, subset_masks, subset_metrics,
                                        track_prior_starts)


def _prior(rows: list[tuple[str, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["music_id", "music_start"])


def test_canonical_start_rule() -> None:
    clips = canonical_clips(_prior([
        # a: three uses of one cut (23.2, trimmed 0.3 s earlier once, repeated exactly once) beat two at 0
        ("a", 0.0), ("a", 0.0), ("a", 22.9), ("a", 23.2), ("a", 23.2),
        # b: a tie of supports (one use each) goes to the earliest start
        ("b", 40.0), ("b", 12.5),
        # c: one use
        ("c", 7.0)]))
    assert clips["a"].start == 23.2 and clips["a"].uses == 5 and clips["a"].support == 3
    assert clips["b"].start == 12.5 and clips["b"].uses == 2 and clips["b"].support == 1
    assert clips["c"].start == 7.0
    np.testing.assert_array_equal(track_prior_starts(["a", "zzz", "c"], clips), [23.2, 0.0, 7.0])


def test_subsets_partition_the_videos() -> None:
    clips = canonical_clips(_prior([("a", 10.0), ("b", 0.0)]))
    masks = subset_masks(["a", "a", "b", "new"], [10.5, 30.0, 0.0, 0.0], clips)
    assert masks["seen"].tolist() == [True, True, True, False]
    assert masks["unseen"].tolist() == [False, False, False, True]
    assert masks["canonical"].tolist() == [True, False, True, False]      # within 1 s of the canonical start
    assert masks["off_canonical"].tolist() == [False, True, False, False]  # seen tracks only
    out = subset_metrics(np.array([0, 3, 0, 1]), np.array([0.9, 0.1, 1.0, 0.4]), masks)
    assert out["seen/n"] == 3 and out["unseen/n"] == 1
    assert out["seen/mIoU"] == pytest.approx((0.9 + 0.1 + 1.0) / 3)
    assert out["canonical/R1"] == 100.0 and out["off_canonical/R1"] == 0.0
    assert out["unseen/R1_iou0.5"] == 0.0 and out["canonical/R1_iou0.5"] == 100.0
    assert set(out) == {f"{s}/{k}" for s in masks for k in ("n", *SUBSET_METRICS)}
    empty = subset_metrics(np.array([0]), np.array([1.0]), {"unseen": np.array([False])})
    assert empty == {"unseen/n": 0.0}   # an empty subset has a count and no metric


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.evaluate", *args], cwd=REPO_ROOT,
                          capture_output=True, text=True)


def test_cli_breakdown_keys_and_track_prior(demo_data: Path, tmp_path: Path) -> None:
    root = demo_data / "dataset" / "MGSV-EC"
    out = tmp_path / "m.json"
    res = _evaluate("--gt_csv", str(root / "test_data.csv"), "--baseline", "track_prior",
                    "--prior_csv", str(root / "train_data.csv"), "--metrics_json", str(out))
    assert res.returncode == 0, res.stderr
    assert "seen (" in res.stdout and "off_canonical (" in res.stdout
    metrics = json.loads(out.read_text())
    assert list(metrics)[:len(METRIC_KEYS)] == METRIC_KEYS          # the 23 flat keys first, unchanged
    assert {"seen/mIoU", "unseen/mIoU", "canonical/mIoU", "off_canonical/mIoU"} <= set(metrics)
    assert metrics["seen/n"] + metrics["unseen/n"] == 40
    # On unseen tracks the track prior is start0.
    test_df, train_df = load_annotations(root / "test_data.csv"), load_annotations(root / "train_data.csv")
    clips = canonical_clips(train_df)
    unseen = ~test_df["music_id"].isin(clips).to_numpy()
    assert unseen.any()
    start0 = baseline_predictions(test_df, "start0")
    prior = baseline_predictions(test_df, "track_prior", clips=clips)
    for a, b, u in zip(start0, prior, unseen):
        assert (a["pred_st"] == b["pred_st"]) == bool(u) or b["pred_st"] == 0.0
    # Without --prior_csv: a one-line usage error, exit 2.
    res = _evaluate("--gt_csv", str(root / "test_data.csv"), "--baseline", "track_prior")
    assert res.returncode == 2 and "needs --prior_csv" in res.stderr and "Traceback" not in res.stderr


def test_stats_cli(demo_data: Path) -> None:
    root = demo_data / "dataset" / "MGSV-EC"
    res = _evaluate("--gt_csv", str(root / "val_data.csv"), "--stats", "--prior_csv", str(root / "train_data.csv"))
    assert res.returncode == 0, res.stderr
    assert "within 1 s" in res.stdout and "tracks seen in the prior split" in res.stdout


# ------------------------------------------------------------------------------------------------
# real CSVs (the numbers the README quotes)


def test_real_statistics_and_track_prior(real_data_dir: Path) -> None:
    val, test = load_annotations(real_data_dir / "val_data.csv"), load_annotations(real_data_dir / "test_data.csv")
    s = dataset_stats(test, val)
    assert s["videos_of_seen_tracks"] == 1893
    assert s["within_0.01s_of_canonical"] == pytest.approx(0.668, abs=5e-4)
    assert s["within_1s_of_canonical"] == pytest.approx(0.807, abs=5e-4)
    assert s["within_2s_of_canonical"] == pytest.approx(0.836, abs=5e-4)
    assert s["canonical_in_first_second"] == pytest.approx(0.42, abs=5e-3)
    assert s["later_canonical_over_track_quartiles"] == pytest.approx([0.093, 0.239, 0.322], abs=1e-3)
    assert s["off_canonical_in_first_second"] == pytest.approx(0.205, abs=1e-3)
    assert s["moment_length_equals_video_length"] == pytest.approx(0.987, abs=1e-3)
    m = evaluate_predictions(test, baseline_predictions(test, "track_prior", clips=canonical_clips(val)))
    assert m["mIoU"] == pytest.approx(0.847, abs=0.002)
    assert m["IoU@0.5"] == pytest.approx(86.1, abs=0.1) and m["IoU@0.7"] == pytest.approx(83.2, abs=0.15)
    m = evaluate_predictions(val, baseline_predictions(val, "track_prior", clips=canonical_clips(test)))
    assert m["mIoU"] == pytest.approx(0.849, abs=0.002)


# ------------------------------------------------------------------------------------------------
# the generator


def _generated(**knobs) -> dict[str, pd.DataFrame]:
    """CSV rows of the generator at a size where its statistics are stable (no features: fast)."""
    mdd = load_script("make_demo_data")
    cfg = mdd.DemoConfig(num_music=600, num_videos=4000, val_size=600, test_size=600, seed=3, **knobs)
    rng = np.random.default_rng(cfg.seed)
    tracks = mdd.make_tracks(rng, cfg)
    mdd.make_projections(rng, cfg)
    return mdd.make_rows(rng, tracks, cfg)


def test_generator_statistics_follow_the_real_csvs(real_data_dir: Path) -> None:
    real = dataset_stats(load_annotations(real_data_dir / "test_data.csv"),
                         load_annotations(real_data_dir / "val_data.csv"))
    splits = _generated()
    ours = dataset_stats(splits["test"], splits["train"])
    # (statistic, tolerance): shares in fractions. The synthetic prior is the training split, the
    # real one the val split; both hold most of the tracks.
    for key, tol in [("start_in_first_second", 0.06), ("start_at_0", 0.06),
                     ("within_0.01s_of_canonical", 0.08), ("within_1s_of_canonical", 0.06),
                     ("within_2s_of_canonical", 0.06), ("canonical_in_first_second", 0.07),
                     ("off_canonical_in_first_second", 0.08)]:
        assert ours[key] == pytest.approx(real[key], abs=tol), key
    assert ours["later_canonical_over_track_quartiles"] == pytest.approx(
        real["later_canonical_over_track_quartiles"], abs=0.05)
    assert ours["later_start_over_track_quartiles"] == pytest.approx(real["later_start_over_track_quartiles"], abs=0.06)
    assert ours["moment_length_equals_video_length"] > 0.98
    # About a quarter of the val/test tracks have no training video.
    assert 1 - ours["tracks_seen_in_prior"] == pytest.approx(0.25, abs=0.05)


def test_no_canonical_clips_with_share_zero() -> None:
    splits = _generated(canonical_share=0.0)
    s = dataset_stats(splits["test"], splits["train"])
    # Only chance agreement is left: moments at the start of the track coincide with each other.
    assert s["within_0.01s_of_canonical"] < 0.3 and s["within_1s_of_canonical"] < 0.45
    canonical = dataset_stats(*(lambda d: (d["test"], d["train"]))(_generated()))
    assert canonical["within_1s_of_canonical"] > s["within_1s_of_canonical"] + 0.3
    assert s["start_in_first_second"] == pytest.approx(0.374, abs=0.06)   # the overall share is kept
