"""Hungarian matcher: cost formula, brute-force optimality, trivial fast path."""
import itertools

import pytest
import torch
from scipy.optimize import linear_sum_assignment

from model.matcher import HungarianMatcher
from model.spans import generalized_temporal_iou, span_cw_to_se

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def random_case(gen, batch, queries, targets):
    logits = torch.randn(batch, queries, 2, generator=gen)
    spans = torch.rand(batch, queries, 2, generator=gen) * 0.5 + 0.05
    tgts = [torch.rand(n, 2, generator=gen) * 0.5 + 0.05 for n in targets]
    return {"pred_logits": logits, "pred_spans": spans}, tgts


def test_cost_formula_hand_case():
    out = {"pred_logits": torch.tensor([[[0.0, 0.0], [2.0, 0.0]]]),
           "pred_spans": torch.tensor([[[0.5, 0.2], [0.4, 0.2]]])}
    tgt = [torch.tensor([[0.4, 0.2]])]
    cost = HungarianMatcher().cost_matrices(out["pred_logits"], out["pred_spans"], tgt)[0]
    # query 0: L1 0.1, gIoU 1/3, p_fg 0.5;  query 1: exact, p_fg = sigmoid(2)
    expected0 = 10 * 0.1 - 1 / 3 - 4 * 0.5
    expected1 = 0 - 1 - 4 * torch.sigmoid(torch.tensor(2.0)).item()
    assert torch.allclose(cost[:, 0], torch.tensor([expected0, expected1]), atol=1e-6)
    src, dst = HungarianMatcher()(out, tgt)[0]
    assert src.tolist() == [1] and dst.tolist() == [0]


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force(seed):
    gen = torch.Generator().manual_seed(seed)
    queries = 2 + seed % 4
    targets = [1 + (seed + b) % min(queries, 3) for b in range(3)]
    outputs, tgts = random_case(gen, 3, queries, targets)
    matcher = HungarianMatcher()
    costs = matcher.cost_matrices(outputs["pred_logits"], outputs["pred_spans"], tgts)
    for (src, dst), cost, tgt in zip(matcher(outputs, tgts), costs, tgts):
        assert len(src) == len(dst) == tgt.shape[0]
        assert src.tolist() == sorted(src.tolist())
        best = min(sum(cost[q, j].item() for j, q in enumerate(perm))
                   for perm in itertools.permutations(range(queries), tgt.shape[0]))
        assert sum(cost[s, d].item() for s, d in zip(src, dst)) == pytest.approx(best, abs=1e-6)


def test_single_query_fast_path_equals_solver():
    gen = torch.Generator().manual_seed(0)
    outputs, tgts = random_case(gen, 4, 1, [1, 1, 1, 1])
    fast = HungarianMatcher()(outputs, tgts)
    assert all(s.tolist() == [0] and d.tolist() == [0] for s, d in fast)
    costs = HungarianMatcher().cost_matrices(outputs["pred_logits"], outputs["pred_spans"], tgts)
    for cost in costs:
        rows, cols = linear_sum_assignment(cost.numpy())
        assert rows.tolist() == [0] and cols.tolist() == [0]


def test_zero_width_targets_are_ignored():
    outputs = {"pred_logits": torch.zeros(2, 3, 2), "pred_spans": torch.full((2, 3, 2), 0.3)}
    targets = torch.tensor([[[0.5, 0.0]], [[0.5, 0.2]]])
    (s0, d0), (s1, d1) = HungarianMatcher()(outputs, targets)
    assert len(s0) == len(d0) == 0
    assert len(s1) == len(d1) == 1


def test_giou_term_uses_start_end():
    spans = torch.tensor([[0.5, 0.2]])
    assert generalized_temporal_iou(span_cw_to_se(spans), span_cw_to_se(spans)).item() == pytest.approx(1.0)
