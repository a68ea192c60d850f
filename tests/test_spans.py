"""Span conversions, IoU and generalised IoU on hand-computed cases."""
import torch

from model.spans import generalized_temporal_iou, span_cw_to_se, span_se_to_cw, temporal_iou


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_center_width_round_trip():
    cw = t([0.5, 0.2], [0.1, 0.3])
    assert torch.allclose(span_cw_to_se(cw), t([0.4, 0.6], [-0.05, 0.25]))  # no clamping
    assert torch.allclose(span_se_to_cw(span_cw_to_se(cw)), cw)
    batched = torch.rand(3, 4, 2)
    assert span_cw_to_se(batched).shape == (3, 4, 2)


def test_temporal_iou_hand_cases():
    iou, union = temporal_iou(t([0, 2], [0, 1], [0, 4]), t([1, 3], [2, 3], [0, 4]))
    assert iou.shape == (3, 3)
    assert iou[0, 0] == 1 / 3 and union[0, 0] == 3      # overlap 1 of 3
    assert iou[1, 1] == 0 and union[1, 1] == 2          # disjoint
    assert iou[2, 2] == 1                               # identical
    assert iou[2, 0] == 0.5                             # [1,3] inside [0,4]


def test_generalized_iou_hand_cases():
    giou = generalized_temporal_iou(t([0, 2], [0, 1], [0, 4]), t([1, 3], [2, 3], [1, 2]))
    assert torch.isclose(giou[0, 0], torch.tensor(1 / 3, dtype=torch.float64))   # enclosing = union
    assert torch.isclose(giou[1, 1], torch.tensor(-1 / 3, dtype=torch.float64))  # 0 - (3 - 2) / 3
    assert torch.isclose(giou[2, 2], torch.tensor(1 / 4, dtype=torch.float64))   # contained
    assert torch.allclose(torch.diag(generalized_temporal_iou(t([0, 1], [2, 5]), t([0, 1], [2, 5]))),
                          torch.ones(2, dtype=torch.float64))
    far = generalized_temporal_iou(t([0, 0.01]), t([0.99, 1.0]))
    assert -1 < far.item() < -0.9
