"""Pin the benchmark metric definitions (utils/evaluate/metrics.py) on hand-computed cases and against a brute-force
re-statement of the original's de-duplicating rank walk."""
from __future__ import annotations

import time
import warnings

import numpy as np
import pytest

from utils.evaluate.metrics import (METRIC_KEYS, clip_moments, compute_all, extra_metrics, format_table, gt_ranks,
                                    metrics_from_ranks, moment_iou, moments_to_seconds, mor_metrics, msg_metrics,
                                    ranked_music_ids, ranks_from_ranked_lists, smg_ious, smg_metrics)


# ------------------------------------------------------------------------------------------------ SmG
def test_moments_to_seconds_uses_global_240():
    out = moments_to_seconds(np.array([[0.5, 0.25], [0.1, 0.2]]))
    np.testing.assert_allclose(out, [[90.0, 150.0], [0.0, 48.0]])


def test_clip_moments_rules():
    pred = np.array([[-5.0, 300.0],   # both sides out -> [0, track]
                     [10.0, 250.0],   # track longer than 240 -> capped at 240
                     [150.0, 200.0],  # entirely past the track end: start kept, end clipped below start
                     [20.0, 30.0]])   # inside: unchanged
    out = clip_moments(pred, [100.0, 245.0, 120.0, 60.0])
    np.testing.assert_allclose(out, [[0, 100], [10, 240], [150, 120], [20, 30]])
    assert pred[0, 0] == -5.0  # input not modified


def test_moment_iou_hand_cases():
    pred = np.array([[0, 10], [5, 15], [0, 10], [0, 10], [150, 120], [150, 120], [5, 5], [30, 40]], float)
    gt = np.array([[5, 15], [5, 15], [20, 30], [5, 5], [100, 130], [100, 140], [0, 10], [35, 36]], float)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # union <= 0 must not divide by zero
        iou = moment_iou(pred, gt)
    # partial 5/15; exact 1; disjoint 0; zero-length GT 0; past-the-end prediction with union exactly 0 -> 0;
    # past-the-end with positive union -> 0; zero-length prediction -> 0; prediction containing the GT -> 1/10
    np.testing.assert_allclose(iou, [1 / 3, 1, 0, 0, 0, 0, 0, 0.1])


def test_zero_length_gt_is_zero_even_for_identical_prediction():
    assert moment_iou([[5.0, 5.0]], [[5.0, 5.0]])[0] == 0.0
    assert moment_iou([[6.0, 5.0]], [[6.0, 5.0]])[0] == 0.0


def test_smg_ious_clip_then_iou():
    # prediction past the track end is clipped to [80, 100] (track 100 s); GT [90, 100]: IoU = 10 / 20
    iou = smg_ious([[80.0, 130.0]], [[90.0, 100.0]], [100.0])
    np.testing.assert_allclose(iou, [10 / 20])
    # prediction entirely past the track end scores 0
    assert smg_ious([[110.0, 130.0]], [[90.0, 100.0]], [100.0])[0] == 0.0


def test_smg_metrics_strict_thresholds():
    m = smg_metrics([0.3, 0.5, 0.7, 0.71])
    assert m["mIoU"] == pytest.approx((0.3 + 0.5 + 0.7 + 0.71) / 4)
    assert m["IoU@0.3"] == 75.0 and m["IoU@0.5"] == 50.0 and m["IoU@0.7"] == 25.0


def test_nonfinite_moments_rejected():
    with pytest.raises(ValueError, match="NaN/inf"):
        clip_moments([[np.nan, 1.0]], [10.0])
    with pytest.raises(ValueError, match="shape"):
        moment_iou([[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]])


# ------------------------------------------------------------------------------------------------ MsG ranks
def test_gt_ranks_simple():
    s = np.array([[0.9, 0.5, 0.1], [0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    np.testing.assert_array_equal(gt_ranks(s, ["a", "b", "c"], ["a", "c", "c"]), [0, 2, 0])


def test_gt_ranks_ties_are_pessimistic():
    s = np.array([[0.5, 0.5, 0.5], [0.7, 0.5, 0.5], [0.5, 0.5, 0.2]])
    # row 0: all tied -> both others ahead; row 1: b tied with c -> c ahead, a ahead; row 2: a tied with b
    np.testing.assert_array_equal(gt_ranks(s, ["a", "b", "c"], ["b", "b", "a"]), [2, 2, 1])


def test_constant_score_model_gets_worst_rank():
    n = 50
    ids = [f"m{i}" for i in range(n)]
    m = msg_metrics(gt_ranks(np.zeros((n, n)), ids, ids))
    assert m["R1"] == 0.0 and m["R10"] == 0.0 and m["MedianR"] == n and m["MeanR"] == n


def test_gt_ranks_duplicate_music_ids():
    ids = ["a", "b", "a", "c"]
    s = np.array([[0.1, 0.5, 0.9, 0.3]] * 3)
    # per-id best column: a=0.9, b=0.5, c=0.3 ; the low duplicate column of a is ignored
    np.testing.assert_array_equal(gt_ranks(s, ids, ["a", "b", "c"]), [0, 1, 2])
    # duplicate columns tied with each other are ONE id: gt a with b tied -> b ahead once, not twice
    np.testing.assert_array_equal(gt_ranks(np.array([[0.5, 0.5, 0.5]]), ["a", "a", "b"], ["a"]), [1])
    np.testing.assert_array_equal(gt_ranks(np.array([[0.5, 0.5, 0.5]]), ["a", "b", "b"], ["a"]), [1])


def test_gt_ranks_neg_inf_allowed_nan_rejected():
    s = np.array([[-np.inf, 0.0, -np.inf]])
    np.testing.assert_array_equal(gt_ranks(s, ["a", "b", "c"], ["a"]), [2])
    with pytest.raises(ValueError, match="NaN.*row 0, column 1"):
        gt_ranks(np.array([[0.0, np.nan]]), ["a", "b"], ["a"])


def test_gt_ranks_errors():
    with pytest.raises(ValueError, match="'zz'"):
        gt_ranks(np.zeros((2, 2)), ["a", "b"], ["a", "zz"])
    with pytest.raises(ValueError, match="3 column music ids"):
        gt_ranks(np.zeros((2, 2)), ["a", "b", "c"], ["a", "b"])
    with pytest.raises(ValueError, match="2-D"):
        gt_ranks(np.zeros(2), ["a", "b"], ["a", "b"])


def test_gt_ranks_torch_and_chunks_match_numpy():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    s = rng.integers(0, 4, size=(7, 9)).astype(np.float32)  # many ties
    ids = ["a", "b", "c", "a", "d", "e", "b", "f", "g"]
    gts = ["a", "b", "c", "d", "e", "f", "g"]
    ref = gt_ranks(s, ids, gts)
    np.testing.assert_array_equal(gt_ranks(torch.from_numpy(s), ids, gts), ref)
    np.testing.assert_array_equal(gt_ranks(torch.from_numpy(s).bfloat16(), ids, gts), ref)  # small ints exact
    np.testing.assert_array_equal(gt_ranks(s.tolist(), ids, gts), ref)
    np.testing.assert_array_equal(gt_ranks(s, ids, gts, chunk_rows=2), ref)


def brute_force_rank0(row: np.ndarray, ids: list[str], gt: str) -> int:
    """The original's walk (columns by descending score, each id counted the first time it is seen), with the
    GT's columns placed after every column tied with them (the pessimistic tie rule)."""
    order = sorted(range(len(ids)), key=lambda j: (-row[j], ids[j] == gt))
    seen: list[str] = []
    for j in order:
        if ids[j] == gt:
            return len(seen)
        if ids[j] not in seen:
            seen.append(ids[j])
    raise AssertionError("gt not found")


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("same_scores_for_duplicates", [True, False])
def test_vectorised_ranks_equal_brute_force(seed, same_scores_for_duplicates):
    rng = np.random.default_rng(seed)
    n_ids, n_cols, n_vid = rng.integers(2, 9), rng.integers(9, 20), rng.integers(1, 15)
    pool = [f"{rng.integers(1, 9)}+x{i}" for i in range(n_ids)]
    ids = pool + [pool[k] for k in rng.integers(0, n_ids, n_cols - n_ids)]  # every id present, many duplicates
    ids = [ids[j] for j in rng.permutation(len(ids))]
    s = rng.integers(0, 5, size=(n_vid, len(ids))).astype(float)  # coarse scores -> ties
    if same_scores_for_duplicates:  # as in the original: duplicate columns = same track = same score
        first = {m: j for j, m in reversed(list(enumerate(ids)))}
        s = s[:, [first[m] for m in ids]]
    gts = [pool[k] for k in rng.integers(0, n_ids, n_vid)]
    expected = [brute_force_rank0(s[i], ids, gts[i]) for i in range(n_vid)]
    np.testing.assert_array_equal(gt_ranks(s, ids, gts), expected)
    # the ranked lists carry the same ranks (full lists, and top-k prefixes when the GT is listed)
    lists = ranked_music_ids(s, ids, gts)
    np.testing.assert_array_equal(ranks_from_ranked_lists(lists, gts, n_ids), expected)
    assert all(sorted(lst) == sorted(set(ids)) for lst in lists)
    top = ranked_music_ids(s, ids, gts, top_k=2)
    prefix_ranks = ranks_from_ranked_lists(top, gts, n_ids)
    np.testing.assert_array_equal(prefix_ranks, [e if e < 2 else n_ids - 1 for e in expected])


def test_ranks_from_ranked_lists_prefix_and_repeats():
    gts = ["c", "c", "z", "a"]
    lists = [["a", "b", "c"], ["a", "a", "b", "a", "c"], ["a", "b"], []]
    # repeats count once (dedup walk); an unlisted GT ranks last among 10 candidates
    np.testing.assert_array_equal(ranks_from_ranked_lists(lists, gts, 10), [2, 2, 9, 9])


def test_gt_ranks_is_fast_for_4000():
    rng = np.random.default_rng(0)
    n = 4000
    ids = [f"7+{i:05d}" for i in range(n)]
    s = rng.standard_normal((n, n)).astype(np.float32)
    t = time.perf_counter()
    r = gt_ranks(s, ids, ids)
    assert time.perf_counter() - t < 3.0
    i = 123
    assert r[i] == int((s[i] >= s[i, i]).sum()) - 1


# ------------------------------------------------------------------------------------------------ MsG / MoR metrics
def test_msg_metrics_hand():
    r = np.array([0, 1, 4, 9, 99, 150])
    m = msg_metrics(r)
    expect_r = {1: 1, 3: 2, 5: 3, 10: 4, 20: 4, 25: 4, 50: 4, 100: 5}
    for k, c in expect_r.items():
        assert m[f"R{k}"] == pytest.approx(100 * c / 6)
    assert m["MedianR"] == pytest.approx(7.5)  # median(0,1,4,9,99,150) = 6.5, +1
    assert m["MeanR"] == pytest.approx(263 / 6 + 1)
    assert m["MRR"] == pytest.approx(np.mean([1, 1 / 2, 1 / 5, 1 / 10, 1 / 100, 1 / 151]))


def test_mor_metrics_hand():
    r = np.array([0, 5, 60, 0])
    iou = np.array([0.6, 0.8, 0.9, 0.5])
    m = mor_metrics(r, iou)
    assert m == pytest.approx({"R1_iou0.5": 25.0, "R1_iou0.7": 0.0, "R10_iou0.5": 50.0, "R10_iou0.7": 25.0,
                               "R50_iou0.5": 50.0, "R50_iou0.7": 25.0, "R100_iou0.5": 75.0, "R100_iou0.7": 50.0})


def test_extra_metrics_fixed_and_original_miou():
    r = np.array([0, 5, 60, 0])
    iou = np.array([0.6, 0.8, 0.9, 0.5])
    e = extra_metrics(r, iou)
    assert e["R1_miou"] == pytest.approx(0.55)
    assert e["R1_miou_orig"] == pytest.approx(1.1 / 4 / 2)  # the original's double normalisation
    assert e["R10_miou"] == pytest.approx(1.9 / 3)
    assert e["R100_miou"] == pytest.approx(2.8 / 4)
    assert extra_metrics(np.array([200, 300]), np.array([0.9, 0.9]))["R1_miou"] == 0.0


def test_compute_all_hand_case():
    ids = ["a", "b", "a", "c"]  # 3 distinct tracks, a duplicated
    scores = np.array([[0.9, 0.1, 0.9, 0.2],    # gt a -> rank0 0
                       [0.5, 0.5, 0.5, 0.5],    # gt b, all tied -> rank0 2
                       [0.1, 0.3, 0.1, 0.2]])   # gt c -> rank0 1
    gts = ["a", "b", "c"]
    pred = np.array([[-10.0, 20.0],   # clipped to [0, 20]; GT [0, 20] -> 1
                     [50.0, 400.0],   # clipped to [50, 60] (track 60); GT [40, 60] -> 10/20
                     [130.0, 150.0]])  # entirely past the 100 s track -> 0
    gt = np.array([[0.0, 20.0], [40.0, 60.0], [10.0, 30.0]])
    m = compute_all(scores, ids, gts, pred, gt, [200.0, 60.0, 100.0])
    assert list(m) == METRIC_KEYS and all(type(v) is float for v in m.values())
    assert m["R1"] == pytest.approx(100 / 3) and m["R3"] == 100.0
    assert m["MedianR"] == 2.0 and m["MeanR"] == pytest.approx(2.0)
    assert m["MRR"] == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    assert m["mIoU"] == pytest.approx(0.5) and m["IoU@0.5"] == pytest.approx(100 / 3)  # 0.5 is not > 0.5
    assert m["IoU@0.3"] == pytest.approx(200 / 3)
    assert m["R1_iou0.7"] == pytest.approx(100 / 3) and m["R10_iou0.5"] == pytest.approx(100 / 3)


def test_metrics_from_ranks_keys():
    m = metrics_from_ranks(np.array([0, 3]), np.array([0.2, 0.9]))
    assert list(m) == METRIC_KEYS


# ------------------------------------------------------------------------------------------------ table
def test_format_table_single_and_side_by_side():
    a = metrics_from_ranks(np.array([0, 3]), np.array([0.2, 0.9]))
    b = metrics_from_ranks(np.array([5, 3]), np.array([0.1, 0.1]))
    single = format_table(a)
    assert "R1" in single and "50.00" in single and "0.5500" in single  # mIoU with 4 decimals
    side = format_table({"MaDe": a, "baseline:start0": b}, columns=["R1", "mIoU"])
    lines = side.splitlines()
    assert "MaDe" in lines[0] and "baseline:start0" in lines[0]
    assert len(lines) == 4 and lines[2].split() == ["R1", "50.00", "0.00"]
    assert format_table({"x": {"R1": 1.0}, "y": {}}, columns=["R1"]).splitlines()[2].split() == ["R1", "1.00", "-"]
