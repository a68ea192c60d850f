"""The standalone evaluator: hand-checked round trip through `python -m utils.evaluate`, every bad-input case
(exit status 2 with a message naming the problem), agreement with the score-matrix path, and the baselines."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from utils.data.annotations import COLUMNS, load_annotations
from utils.evaluate.metrics import METRIC_KEYS
from utils.evaluate.offline import (BASELINES, EvaluationError, baseline_predictions, candidate_music_ids,
                                    evaluate_predictions, main, metrics_from_scores, predictions_from_scores)
from utils.evaluate.track_prior import canonical_clips

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "MGSV-EC"

# video_id, music_id, video_start, video_end, music_start, music_end, music_total_duration
ROWS = [
    ("112712471153", "7+m1", 0.0, 20.0, 0.0, 20.0, 100.0),
    ("102432173428", "7+m1", 0.0, 30.0, 50.0, 80.0, 100.0),
    ("3", "4+m2", 0.2, 10.2, 40.0, 50.0, 60.0),
    ("4", "4+m3", 0.0, 15.0, 100.0, 115.0, 200.0),
    ("5", "4+m3", 0.0, 25.0, 0.0, 25.0, 200.0),
    ("6", "9+m4", 0.0, 10.0, 100.0, 110.0, 120.0),
]
M1, M2, M3, M4 = "7+m1", "4+m2", "4+m3", "9+m4"
PREDS = [
    {"video_id": 112712471153, "ranked_music_ids": [M1, M2, M3, M4], "pred_st": 0.0, "pred_ed": 20.0},  # int id ok
    {"video_id": "102432173428", "ranked_music_ids": [M2, M1], "pred_st": 60.0, "pred_ed": 90.0},
    {"video_id": "3", "ranked_music_ids": [M4, M3], "pred_st": 45.0, "pred_ed": 80.0},  # GT unlisted
    {"video_id": "4", "ranked_music_ids": [M3], "pred_st": 250.0, "pred_ed": 300.0},  # past the track end
    {"video_id": "5", "ranked_music_ids": [M1, M1, M3, M2, M4], "pred_st": 0.0, "pred_ed": 20.0},  # repeat
    {"video_id": "6", "ranked_music_ids": [M1, M2, M3, M4], "pred_st": 100.0, "pred_ed": 108.0},
]
# rank0 = [0, 1, 3 (unlisted -> last of 4), 0, 1 (repeat counted once), 3]
# IoU   = [1, 20/40, clip [45,60] vs [40,50] -> 5/20, 0, 20/25, 8/10]
EXPECTED = {
    "R1": 100 * 2 / 6, "R3": 100 * 4 / 6, "R5": 100.0, "R10": 100.0, "R20": 100.0, "R25": 100.0, "R50": 100.0,
    "R100": 100.0, "MedianR": 2.0, "MeanR": 8 / 6 + 1, "MRR": 3.5 / 6,
    "mIoU": 3.35 / 6, "IoU@0.3": 100 * 4 / 6, "IoU@0.5": 50.0, "IoU@0.7": 50.0,
    "R1_iou0.5": 100 / 6, "R1_iou0.7": 100 / 6, "R10_iou0.5": 50.0, "R10_iou0.7": 50.0,
    "R50_iou0.5": 50.0, "R50_iou0.7": 50.0, "R100_iou0.5": 50.0, "R100_iou0.7": 50.0,
}


def write_csv(path: Path, rows=ROWS) -> Path:
    df = pd.DataFrame(rows, columns=COLUMNS[:7])
    for c in COLUMNS[7:]:
        df[c] = 0
    df["music_path"] = "/Data/music/x.mp3"
    df["video_category"] = "Beauty"
    df[COLUMNS].to_csv(path, index=False)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "utils.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture()
def csv_path(tmp_path: Path) -> Path:
    return write_csv(tmp_path / "val_data.csv")


def test_round_trip_hand_computed(tmp_path, csv_path):
    pred_json = tmp_path / "preds.json"
    pred_json.write_text(json.dumps(PREDS))
    out = tmp_path / "out" / "metrics.json"
    res = run_cli("--gt_csv", str(csv_path), "--pred_json", str(pred_json), "--metrics_json", str(out))
    assert res.returncode == 0, res.stderr
    written = json.loads(out.read_text())
    assert list(written) == METRIC_KEYS
    assert written == pytest.approx(EXPECTED)
    assert "MedianR" in res.stdout and "preds.json" in res.stdout
    # the in-process function the test script uses gives the same numbers
    assert evaluate_predictions(load_annotations(csv_path), PREDS) == pytest.approx(written)


def _bad(tmp_path: Path, csv_path: Path, capsys, preds=None, text: str | None = None) -> tuple[int, str]:
    """Run the CLI's main() in-process (a subprocess per case would cost ~1 s each; the exit-status plumbing
    `sys.exit(main())` is covered by the subprocess tests) -> (exit status, stderr)."""
    p = tmp_path / "bad_preds.json"
    p.write_text(text if text is not None else json.dumps(preds))
    capsys.readouterr()
    rc = main(["--gt_csv", str(csv_path), "--pred_json", str(p)])
    return rc, capsys.readouterr().err


def _with(i: int, **changes) -> list[dict]:
    preds = [dict(r) for r in PREDS]
    preds[i].update(changes)
    return preds


@pytest.mark.parametrize("case, expected", [
    ("missing", ["1 of the 6 videos", "'6' has no prediction"]),
    ("unknown_video", ["unknown video_id '999'", "entry #6"]),
    ("unknown_music", ["video_id '102432173428'", "unknown music id", "'nope'"]),
    ("duplicate", ["duplicate video_id '3'", "entry #2"]),
    ("nan", ["video_id '5'", "pred_st is nan"]),
    ("inf", ["video_id '4'", "pred_ed is inf"]),
    ("reversed", ["video_id '6'", "pred_st 108.0 > pred_ed 100.0"]),
    ("string_time", ["video_id '3'", "pred_ed must be a number"]),
    ("missing_key", ["video_id '3'", "missing key(s) ['ranked_music_ids']"]),
    ("not_list", ["expected a JSON list"]),
    ("malformed", ["malformed JSON", "line 1"]),
])
def test_bad_predictions_exit_2(tmp_path, csv_path, capsys, case, expected):
    preds = [dict(r) for r in PREDS]
    text = None
    if case == "missing":
        preds = preds[:-1]
    elif case == "unknown_video":
        preds.append({**PREDS[0], "video_id": "999"})
    elif case == "unknown_music":
        preds = _with(1, ranked_music_ids=[M1, "nope"])
    elif case == "duplicate":
        preds.append(dict(PREDS[2]))
    elif case == "nan":
        text = json.dumps(_with(4, pred_st=float("nan")))  # json writes the NaN literal Python accepts
    elif case == "inf":
        text = json.dumps(_with(3, pred_ed=float("inf")))
    elif case == "reversed":
        preds = _with(5, pred_st=108.0, pred_ed=100.0)
    elif case == "string_time":
        preds = _with(2, pred_ed="80")
    elif case == "missing_key":
        del preds[2]["ranked_music_ids"]
    elif case == "not_list":
        preds = {"video_id": "3"}
    elif case == "malformed":
        text = '[{"video_id": "3",'
    rc, err = _bad(tmp_path, csv_path, capsys, preds, text)
    assert rc == 2, err
    assert err.startswith("error: ") and "bad_preds.json" in err
    for e in expected:
        assert e in err, err


@pytest.mark.parametrize("case", ["missing", "malformed"])
def test_bad_predictions_subprocess_exit_status(tmp_path, csv_path, case):
    p = tmp_path / "bad_preds.json"
    p.write_text(json.dumps(PREDS[:-1]) if case == "missing" else "[{")
    res = run_cli("--gt_csv", str(csv_path), "--pred_json", str(p))
    assert res.returncode == 2 and "bad_preds.json" in res.stderr and "Traceback" not in res.stderr
    assert ("'6' has no prediction" if case == "missing" else "malformed JSON") in res.stderr


def test_missing_files_and_bad_csv_exit_2(tmp_path, csv_path):
    res = run_cli("--gt_csv", str(csv_path), "--pred_json", str(tmp_path / "absent.json"))
    assert res.returncode == 2 and "absent.json: predictions file not found" in res.stderr
    bad_csv = write_csv(tmp_path / "bad.csv", ROWS + [("7", M1, 0.0, 10.0, 30.0, 20.0, 100.0)])  # start > end
    assert main(["--gt_csv", str(bad_csv), "--baseline", "start0"]) == 2
    with pytest.raises(SystemExit) as exc:  # neither --pred_json nor --baseline: argparse's own exit 2
        main(["--gt_csv", str(csv_path)])
    assert exc.value.code == 2


def test_evaluate_predictions_in_process_errors(csv_path):
    df = load_annotations(csv_path)
    with pytest.raises(EvaluationError, match="preds.json: 1 of the 6 videos"):
        evaluate_predictions(df, PREDS[1:], source="preds.json")


# ------------------------------------------------------------------------------------------------ score path
@pytest.mark.parametrize("seed", range(3))
def test_predictions_from_scores_agree_with_metrics_from_scores(csv_path, seed):
    """test.py writes records with predictions_from_scores and evaluates them: same numbers as the matrix."""
    df = load_annotations(csv_path)
    rng = np.random.default_rng(seed)
    cols = df["music_id"].tolist()  # columns = rows of the split: duplicate ids
    scores = rng.integers(0, 3, size=(len(df), len(cols))).astype(np.float32)  # ties everywhere
    pred = rng.uniform(-20, 260, size=(len(df), 2))
    pred.sort(axis=1)
    gt_se = df[["music_start", "music_end"]].to_numpy()
    m_dur = df["music_total_duration"].to_numpy()
    ref = metrics_from_scores(scores, cols, df["music_id"].tolist(), pred, gt_se, m_dur)
    recs = predictions_from_scores(df["video_id"].tolist(), scores, cols, df["music_id"].tolist(), pred)
    assert json.loads(json.dumps(recs)) == recs
    assert evaluate_predictions(df, recs) == pytest.approx(ref)


# ------------------------------------------------------------------------------------------------ baselines
def test_baseline_moments_and_rankings(csv_path):
    df = load_annotations(csv_path)
    vlen = (df["video_end"] - df["video_start"]).to_numpy()
    track = df["music_total_duration"].to_numpy()
    cands = sorted(candidate_music_ids(df))
    s0 = baseline_predictions(df, "start0", seed=0)
    np.testing.assert_allclose([[r["pred_st"], r["pred_ed"]] for r in s0], np.stack([0 * vlen, vlen], 1))
    c = baseline_predictions(df, "center", seed=0)
    np.testing.assert_allclose([(r["pred_st"] + r["pred_ed"]) / 2 for r in c], track / 2)
    rnd = baseline_predictions(df, "random", seed=0)
    st = np.array([r["pred_st"] for r in rnd])
    assert np.all(st >= 0) and np.all(st + vlen <= track + 1e-9)
    np.testing.assert_allclose([r["pred_ed"] - r["pred_st"] for r in rnd], vlen)
    for recs in (s0, c, rnd):
        assert all(sorted(r["ranked_music_ids"]) == cands for r in recs)
        assert [r["video_id"] for r in recs] == df["video_id"].tolist()
    assert [r["ranked_music_ids"] for r in s0] == [r["ranked_music_ids"] for r in rnd]  # same seeded ranking
    assert baseline_predictions(df, "random", seed=0) == rnd
    assert baseline_predictions(df, "random", seed=1) != rnd
    with pytest.raises(ValueError, match="unknown baseline"):
        baseline_predictions(df, "oracle", seed=0)


def test_baseline_cli(csv_path):
    res = run_cli("--gt_csv", str(csv_path), "--baseline", "start0", "--seed", "3")
    assert res.returncode == 0, res.stderr
    table = dict(line.split() for line in res.stdout.splitlines()[3:])
    assert list(table) == METRIC_KEYS and "baseline:start0" in res.stdout
    # start0 grounds v1 and v5 (both GT moments start at 0): IoU 1 and 1, others 0
    assert table["mIoU"] == f"{2 / 6:.4f}"


@pytest.mark.skipif(not (REAL_DATA / "val_data.csv").is_file(), reason="real MGSV-EC val CSV not available")
def test_baselines_on_real_val_are_plausible():
    df = load_annotations(REAL_DATA / "val_data.csv")
    clips = canonical_clips(load_annotations(REAL_DATA / "test_data.csv"))
    res = {k: evaluate_predictions(df, baseline_predictions(df, k, seed=0, clips=clips)) for k in BASELINES}
    assert res["start0"]["mIoU"] > 0.2  # many GT moments start at 0 s with the video's length
    assert res["start0"]["mIoU"] > res["random"]["mIoU"] > 0.05
    assert res["track_prior"]["mIoU"] > res["start0"]["mIoU"] + 0.3  # tracks keep their canonical clip
    for m in res.values():  # random ranking over 2000 tracks
        assert m["R1"] < 1.0 and 900 < m["MeanR"] < 1100 and m["R100"] < 10.0
