"""Retrieval and moment losses on small hand-checked examples."""
import math

import pytest
import torch

from model.losses import (Criterion, RegressionCriterion, RetrievalLoss, SetCriterion, clip_loss,
                          same_music_mask)
from model.matcher import HungarianMatcher


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_clip_loss_hand_example():
    sim = torch.eye(2)
    # each row/column: -log(e^1 / (e^1 + e^0)) = log(1 + e^-1)
    assert clip_loss(sim, torch.tensor(0.0)).item() == pytest.approx(math.log(1 + math.exp(-1)))
    # logit scale multiplies exp(tau): tau = ln 2 doubles the logits
    assert clip_loss(sim, torch.tensor(math.log(2))).item() == pytest.approx(math.log(1 + math.exp(-2)))


def test_clip_loss_is_symmetric_mean_of_two_directions():
    sim = torch.tensor([[1.0, 0.5, 0.0], [0.2, 0.9, 0.1], [0.3, 0.0, 0.8]])
    rows = torch.nn.functional.cross_entropy(sim * 3, torch.arange(3))
    cols = torch.nn.functional.cross_entropy(sim.T * 3, torch.arange(3))
    assert clip_loss(sim, torch.tensor(math.log(3))).item() == pytest.approx(0.5 * (rows + cols).item(), rel=1e-6)


def test_same_music_masking():
    same = same_music_mask(["a", "b", "a"], torch.device("cpu"))
    assert same.tolist() == [[False, False, True], [False, False, False], [True, False, False]]
    sim = torch.tensor([[1.0, 0.0, 0.9], [0.0, 1.0, 0.0], [0.9, 0.0, 1.0]])
    masked = clip_loss(sim, torch.tensor(0.0), same)
    # rows/cols 0 and 2 see only {self, item 1}; row/col 1 sees all three
    two = -math.log(math.e / (math.e + 1))
    three = -math.log(math.e / (math.e + 2))
    assert masked.item() == pytest.approx((2 * two + three) / 3)
    assert masked < clip_loss(sim, torch.tensor(0.0))


def test_retrieval_loss_per_mode():
    gen = torch.Generator().manual_seed(0)
    sims = {"dual": torch.rand(4, 4, generator=gen), "single": torch.rand(4, 4, generator=gen)}
    tau = torch.tensor(1.2)
    d, s = clip_loss(sims["dual"], tau), clip_loss(sims["single"], tau)
    fuse = RetrievalLoss("dual_single_loss_fuse", weight=7.0)(sims, tau)
    assert fuse["retrieval_loss"].item() == pytest.approx((d + s).item())  # the weight is ignored
    assert RetrievalLoss("dual", 2.0)(sims, tau)["retrieval_loss"].item() == pytest.approx(2 * d.item())
    assert RetrievalLoss("single", 0.5)(sims, tau)["retrieval_loss"].item() == pytest.approx(0.5 * s.item())
    both = clip_loss(sims["dual"] + sims["single"], tau)
    assert RetrievalLoss("dual_single_sim_fuse")(sims, tau)["retrieval_loss"].item() == pytest.approx(both.item())
    with pytest.raises(ValueError, match="music_id"):
        RetrievalLoss("dual", mask_same_music=True)(sims, tau)


def detection(spans, logits, aux=()):
    out = {"pred_spans": torch.tensor(spans), "pred_logits": torch.tensor(logits), "aux_outputs": list(aux)}
    q, c = out["pred_spans"].shape[1], 4
    out["proj_queries"] = torch.nn.functional.normalize(torch.randn(out["pred_spans"].shape[0], q, c), dim=-1)
    out["proj_vid_mem"] = torch.nn.functional.normalize(torch.randn(out["pred_spans"].shape[0], 5, c), dim=-1)
    return out


def test_set_criterion_hand_example_single_query():
    crit = SetCriterion(HungarianMatcher())
    out = detection([[[0.5, 0.2]]], [[[2.0, 0.0]]])
    losses = crit(out, torch.tensor([[[0.4, 0.2]]]))
    assert losses["loss_span"].item() == pytest.approx(0.05)             # mean(|0.1|, |0|)
    assert losses["loss_giou"].item() == pytest.approx(2 / 3)            # 1 - 1/3
    assert losses["loss_label"].item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert losses["loss_contrastive_align"].item() == pytest.approx(0.0, abs=1e-6)  # inert with 1 query
    assert losses["class_error"].item() == 0
    expected = 4 * 0.05 + 2 / 3 + 0.8 * math.log(1 + math.exp(-2))
    assert losses["localization_loss"].item() == pytest.approx(expected, rel=1e-6)


def test_set_criterion_background_weight_and_aux_layers():
    crit = SetCriterion(HungarianMatcher())
    # two queries; query 1 is the exact match, query 0 becomes background (weight 0.1)
    layer = dict(spans=[[[0.8, 0.1], [0.4, 0.2]]], logits=[[[0.0, 0.0], [0.0, 0.0]]])
    aux = [detection(**layer), detection(**layer)]
    out = detection(**layer, aux=aux)
    losses = crit(out, torch.tensor([[[0.4, 0.2]]]))
    assert losses["loss_label"].item() == pytest.approx((0.1 * math.log(2) + math.log(2)) / 2)
    assert losses["loss_span"].item() == pytest.approx(0.0, abs=1e-7)
    assert {"loss_span_0", "loss_giou_1", "loss_label_1", "class_error_0", "loss_contrastive_align_1"} <= set(losses)
    per_layer = 0.8 * losses["loss_label"] + 0.2 * losses["loss_contrastive_align"]
    total = per_layer + sum(0.8 * losses[f"loss_label_{i}"] + 0.2 * losses[f"loss_contrastive_align_{i}"]
                            for i in range(2))
    assert losses["localization_loss"].item() == pytest.approx(total.item(), rel=1e-5)


def test_fb_label_10_swaps_classes():
    crit = SetCriterion(HungarianMatcher(foreground_label=1), foreground_label=1)
    assert crit.empty_weight.tolist() == pytest.approx([0.1, 1.0])
    losses = crit(detection([[[0.5, 0.2]]], [[[2.0, 0.0]]]), torch.tensor([[[0.5, 0.2]]]))
    assert losses["loss_label"].item() == pytest.approx(math.log(1 + math.exp(2)))
    assert losses["class_error"].item() == 100


def test_regression_criterion():
    out = {"pred_spans": torch.tensor([[[0.5, 0.3]]]), "pred_logits": torch.zeros(1, 1, 2), "aux_outputs": []}
    losses = RegressionCriterion()(out, torch.tensor([[[0.4, 0.2]]]))
    assert losses["localization_loss"].item() == pytest.approx(20 * 0.1)


def test_criterion_combines_weights():
    sims = {"dual": torch.eye(2), "single": torch.eye(2)}
    outputs = {"similarities": sims, "logit_scale": torch.tensor(0.0),
               "detection": detection([[[0.5, 0.2]], [[0.5, 0.2]]], [[[2.0, 0.0]], [[2.0, 0.0]]])}
    batch = {"spans_target": torch.tensor([[[0.4, 0.2]], [[0.4, 0.2]]]), "music_id": ["a", "b"]}
    crit = Criterion(RetrievalLoss(), SetCriterion(HungarianMatcher()), ret_loss_weight=3.0, loc_loss_weight=0.2)
    loss, parts = crit(outputs, batch)
    assert loss.item() == pytest.approx(3 * parts["retrieval_loss"].item() + 0.2 * parts["localization_loss"].item())
    assert {"retrieval_loss", "localization_loss", "loss_span", "loss_giou", "loss_label",
            "loss_contrastive_align", "class_error"} <= set(parts)
