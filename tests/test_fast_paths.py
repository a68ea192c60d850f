"""Every fast path of model/fast_ops.py computes what the straightforward code computes (to 1e-5).

The straightforward code is nn.MultiheadAttention over padded sequences, scipy's
assignment and the per-layer criterion loop; model.fast_ops.reference_paths() switches the
model back to it. No timings here: speed claims come from scripts/benchmark.py.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import nn

from model import fast_ops
from model.losses import SetCriterion
from model.made import MaDe, MaDeConfig, build_criterion
from model.matcher import HungarianMatcher
from utils.train.options import parse_args

TOL = 1e-5
# Gradients through the whole network (8 attention layers, ReLUs) accumulate more rounding:
# compared by relative norm per parameter.
GRAD_RTOL = 1e-4


def _mask(batch: int, length: int, gen: torch.Generator, min_valid: int = 1) -> torch.Tensor:
    n = torch.randint(min_valid, length + 1, (batch, 1), generator=gen)
    return (torch.arange(length)[None, :] < n).float()


def _mha(dim: int = 64, heads: int = 4, dropout: float = 0.1, seed: int = 0) -> nn.MultiheadAttention:
    torch.manual_seed(seed)
    mha = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
    with torch.no_grad():  # non-zero biases so that the bias algebra is exercised
        mha.in_proj_bias.normal_(0, 0.5)
        mha.out_proj.bias.normal_(0, 0.5)
    return mha


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> None:
    """|a - b| <= tol * max(1, |b|_max)."""
    a, b = a.detach(), b.detach()
    scale = max(1.0, float(b.abs().max()))
    assert float((a - b).abs().max()) <= tol * scale, float((a - b).abs().max())


class _FixedDropout:
    """Stands in for fast_ops.dropout: multiplies by pre-drawn masks, in call order."""

    def __init__(self, p: float, seed: int = 0):
        self.p, self.gen, self.masks = p, torch.Generator().manual_seed(seed), []

    def __call__(self, x, p, training):
        if not training or p == 0:
            return x
        mask = (torch.rand(x.shape, generator=self.gen) >= p).float() / (1 - p)
        self.masks.append(mask)
        return x * mask


# ------------------------------------------------------------------ decoder attention, one query

@pytest.mark.parametrize("nq", [1, 2])
def test_single_query_cross_attention_equals_mha(nq):
    gen = torch.Generator().manual_seed(1)
    mha = _mha().eval()
    batch, length, dim = 5, 23, 64
    query = torch.randn(batch, nq, dim, generator=gen, requires_grad=True)
    key_in = torch.randn(batch, length, dim, generator=gen, requires_grad=True)
    value_in = torch.randn(batch, length, dim, generator=gen, requires_grad=True)
    valid = _mask(batch, length, gen) > 0
    fast = fast_ops.single_query_cross_attention(mha, query, key_in, value_in, valid, training=False)
    ref = mha(query, key_in, value_in, key_padding_mask=~valid, need_weights=False)[0]
    _close(fast, ref)
    grads_fast = torch.autograd.grad(fast.square().sum(), [query, key_in, value_in, mha.in_proj_weight,
                                                           mha.in_proj_bias, mha.out_proj.weight])
    grads_ref = torch.autograd.grad(ref.square().sum(), [query, key_in, value_in, mha.in_proj_weight,
                                                         mha.in_proj_bias, mha.out_proj.weight])
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        _close(g_fast, g_ref)


def test_single_query_cross_attention_dropout_semantics(monkeypatch):
    """Training: dropout on the attention weights, so the value bias is weighted by their sum."""
    gen = torch.Generator().manual_seed(2)
    mha = _mha(dropout=0.5)
    batch, length, dim, heads = 4, 11, 64, 4
    query, key_in, value_in = (torch.randn(batch, n, dim, generator=gen) for n in (1, length, length))
    valid = _mask(batch, length, gen) > 0
    drop = _FixedDropout(0.5)
    monkeypatch.setattr(fast_ops, "dropout", drop)
    fast = fast_ops.single_query_cross_attention(mha, query, key_in, value_in, valid, training=True)
    (mask,) = drop.masks                                                    # [B, heads, L]
    # Straightforward multi-head attention with that mask on the softmax weights.
    wq, wk, wv = mha.in_proj_weight.split(dim)
    bq, bk, bv = mha.in_proj_bias.split(dim)
    dh = dim // heads
    q = (query @ wq.T + bq).view(batch, 1, heads, dh).transpose(1, 2)
    k = (key_in @ wk.T + bk).view(batch, length, heads, dh).transpose(1, 2)
    v = (value_in @ wv.T + bv).view(batch, length, heads, dh).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh) + torch.where(valid, 0.0, float("-inf"))[:, None, None]
    attn = scores.softmax(-1) * mask[:, :, None, :]
    ref = mha.out_proj((attn @ v).transpose(1, 2).reshape(batch, 1, dim))
    _close(fast, ref)


def test_single_query_self_attention_equals_mha(monkeypatch):
    gen = torch.Generator().manual_seed(3)
    mha = _mha().eval()
    tgt = torch.randn(6, 1, 64, generator=gen)
    q = tgt + torch.randn(6, 1, 64, generator=gen)
    _close(fast_ops.single_query_self_attention(mha, tgt, training=False), mha(q, q, tgt, need_weights=False)[0])
    # Training: dropout on the single attention weight (1 -> 0 or 1 / (1 - p)) per sample and head.
    drop = _FixedDropout(0.5)
    monkeypatch.setattr(fast_ops, "dropout", drop)
    out = fast_ops.single_query_self_attention(mha, tgt, training=True)
    (weight,) = drop.masks                                                  # [B, 1, heads, 1]
    v = (tgt @ mha.in_proj_weight[128:].T + mha.in_proj_bias[128:]).view(6, 1, 4, 16) * weight
    _close(out, mha.out_proj(v.reshape(6, 1, 64)))


# ------------------------------------------------------------------ token packing

@pytest.mark.parametrize("num_buckets", [1, 3])
def test_packed_self_attention_equals_mha(num_buckets, monkeypatch):
    gen = torch.Generator().manual_seed(4)
    mha = _mha().eval()
    batch, length, dim = 9, 17, 64
    mask = _mask(batch, length, gen)
    x = torch.randn(batch, length, dim, generator=gen)
    pos = torch.randn(batch, length, dim, generator=gen)
    packing = fast_ops.TokenPacking(mask, num_buckets=num_buckets)
    assert len(packing.buckets) == num_buckets
    assert packing.num_tokens == int(mask.sum())
    ref = mha(x + pos, x + pos, x, key_padding_mask=mask == 0, need_weights=False)[0] * mask[..., None]
    fast = fast_ops.packed_self_attention(mha, packing.pack(x + pos), packing.pack(x), packing, training=False)
    _close(packing.unpack(fast), ref)
    # The training kernel (explicit softmax, dropout hook) gives the same with dropout off.
    monkeypatch.setattr(fast_ops, "dropout", lambda t, p, training: t)
    fast_train = fast_ops.packed_self_attention(mha, packing.pack(x + pos), packing.pack(x), packing, training=True)
    _close(packing.unpack(fast_train), ref)


def test_packing_round_trip_and_order():
    gen = torch.Generator().manual_seed(5)
    mask = _mask(20, 13, gen)
    x = torch.randn(20, 13, 3, generator=gen)
    packing = fast_ops.TokenPacking(mask)
    _close(packing.unpack(packing.pack(x)), x * mask[..., None], 0.0)
    assert torch.equal(packing.positions, packing.flat_index % 13)
    with pytest.raises(ValueError, match="at least one valid token"):
        fast_ops.TokenPacking(torch.zeros(2, 4))
    spare = fast_ops.TokenPacking(mask, row_multiple=64)   # as under bf16 autocast on the CPU
    assert spare.num_rows % 64 == 0 and spare.num_rows > spare.num_tokens == packing.num_tokens
    _close(spare.unpack(spare.pack(x)), x * mask[..., None], 0.0)
    assert fast_ops.packed_row_multiple(torch.device("cpu")) == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_ops.packed_row_multiple(torch.device("cpu")) == fast_ops.BF16_CPU_ROW_MULTIPLE


# The paper's architecture at a quarter of the width (8 heads still; fast enough for CI).
SMALL = dict(video_dim=48, music_dim=64, d_model=64, detr_ffn=128, contrastive_dim=32)


def _no_dropout_model(**changes) -> MaDe:
    torch.manual_seed(0)
    model = MaDe(MaDeConfig(**SMALL, **changes))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        if isinstance(module, nn.MultiheadAttention):
            module.dropout = 0.0
    return model


def _batch(batch: int = 6, seed: int = 6) -> dict:
    gen = torch.Generator().manual_seed(seed)
    spans = torch.rand(batch, 1, 2, generator=gen) * 0.5 + 0.05
    return {"frame_feats": torch.randn(batch, 50, SMALL["video_dim"], generator=gen),
            "frame_mask": _mask(batch, 50, gen),
            "music_feats": torch.randn(batch, 96, SMALL["music_dim"], generator=gen),
            "music_mask": _mask(batch, 96, gen),
            "spans_target": spans, "music_id": [f"m{i}" for i in range(batch)]}


@pytest.mark.parametrize("pre_norm,residual,spare_rows", [(False, False, False), (True, True, False),
                                                         (False, False, True)])
def test_model_loss_and_gradients_equal_reference(pre_norm, residual, spare_rows, monkeypatch):
    """Whole training step with dropout off: packed encoders, one-query decoder paths and the
    batched criterion give the reference loss and gradients; so do packings padded with spare
    rows (as under bf16 autocast on the CPU: fast_ops.packed_row_multiple)."""
    if spare_rows:
        monkeypatch.setattr(fast_ops, "packed_row_multiple", lambda device: 64)
    model = _no_dropout_model(pre_norm=pre_norm, residual_from_input=residual).train()
    criterion = build_criterion(parse_args(["--name", "x"]))
    batch = _batch(10)
    results = []
    for reference in (False, True):
        model.zero_grad()
        with fast_ops.reference_paths() if reference else fast_ops.packing_mode("always"):
            loss, parts = criterion(model(batch), batch)
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in parts.items()},
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_f, parts_f, grads_f), (loss_r, parts_r, grads_r) = results
    _close(loss_f, loss_r)
    assert parts_f.keys() == parts_r.keys()
    for key in parts_r:
        _close(parts_f[key], parts_r[key])
    assert grads_f.keys() == grads_r.keys()
    for name in grads_r:
        # (+ an absolute floor: some gradients are 0 in exact arithmetic, e.g. X-Pool's key bias)
        err, size = float((grads_f[name] - grads_r[name]).norm()), float(grads_r[name].norm())
        assert err <= GRAD_RTOL * size + 1e-6, (name, err, size)


def test_eval_outputs_equal_reference():
    torch.manual_seed(0)
    model = MaDe(MaDeConfig(**SMALL)).eval()
    batch = _batch(32, seed=7)  # 32 sequences: two length buckets
    with torch.no_grad():
        fast = model(batch)
        with fast_ops.reference_paths():
            ref = model(batch)
    for key in ("video_emb", "music_emb", "frame_tokens", "snippet_tokens"):
        _close(fast[key], ref[key])
    for key in ("pred_logits", "pred_spans", "proj_queries"):
        _close(fast["detection"][key], ref["detection"][key])


def test_xpool_out_proj_folded_into_values_equals_reference():
    """More videos than snippets: Wo applied to the L values before pooling, not to the Nv outputs."""
    from model.xpool import XPool
    gen = torch.Generator().manual_seed(12)
    torch.manual_seed(12)
    xpool = XPool(32).eval()
    with torch.no_grad():
        for p in xpool.parameters():
            p.add_(0.3 * torch.randn_like(p))
    videos = torch.randn(20, 32, generator=gen, requires_grad=True)
    mask = _mask(7, 9, gen)
    snippets = (torch.randn(7, 9, 32, generator=gen) * mask[..., None]).requires_grad_()
    params = [videos, snippets] + list(xpool.parameters())
    fast = xpool(videos, snippets, mask)
    with fast_ops.reference_paths():
        ref = xpool(videos, snippets, mask)
    _close(fast, ref)
    for a, b in zip(torch.autograd.grad(fast.square().sum(), params, allow_unused=True),
                    torch.autograd.grad(ref.square().sum(), params, allow_unused=True)):
        if b is not None:
            _close(a, b, 1e-4)


# ------------------------------------------------------------------ matcher and criterion

def test_matcher_single_query_fast_path_equals_scipy():
    gen = torch.Generator().manual_seed(8)
    matcher = HungarianMatcher()
    outputs = {"pred_logits": torch.randn(7, 1, 2, generator=gen), "pred_spans": torch.rand(7, 1, 2, generator=gen)}
    targets = torch.rand(7, 1, 2, generator=gen) * 0.5 + 0.01
    fast = matcher(outputs, targets)
    costs = matcher.cost_matrices(outputs["pred_logits"], outputs["pred_spans"], list(targets))
    for (src, tgt), cost in zip(fast, costs):
        rows, cols = linear_sum_assignment(cost.numpy())
        assert src.tolist() == rows.tolist() and tgt.tolist() == cols.tolist()


def _detection(batch: int, layers: int, gen: torch.Generator) -> dict:
    def layer() -> dict:
        return {"pred_logits": torch.randn(batch, 1, 2, generator=gen, requires_grad=True),
                "pred_spans": torch.rand(batch, 1, 2, generator=gen).requires_grad_(),
                "proj_queries": F.normalize(torch.randn(batch, 1, 8, generator=gen), dim=-1).requires_grad_()}
    out = [layer() for _ in range(layers)]
    vid = F.normalize(torch.randn(batch, 5, 8, generator=gen), dim=-1).requires_grad_()
    for o in out:
        o["proj_vid_mem"] = vid
    final = out[-1]
    final["aux_outputs"] = out[:-1]
    return final


@pytest.mark.parametrize("zero_width", [0, 2, 9])
def test_batched_criterion_equals_per_layer_loop(zero_width):
    """Stacked single-query losses == matcher + per-layer loop, values and gradients, also with
    zero-width targets (dropped by the matcher) and with none matched at all."""
    gen = torch.Generator().manual_seed(9)
    criterion = SetCriterion(HungarianMatcher())
    detection = _detection(9, 6, gen)
    targets = torch.rand(9, 1, 2, generator=gen) * 0.5 + 0.01
    targets[:zero_width, 0, 1] = 0.0
    leaves = [t for o in [detection, *detection["aux_outputs"]] for t in (o["pred_logits"], o["pred_spans"],
                                                                          o["proj_queries"])]
    leaves.append(detection["proj_vid_mem"])
    fast = criterion(detection, targets)
    with fast_ops.reference_paths():
        ref = criterion(detection, targets)
    assert fast.keys() == ref.keys()
    for key in ref:
        _close(fast[key], ref[key])
    g_fast = torch.autograd.grad(fast["localization_loss"], leaves, allow_unused=True)
    g_ref = torch.autograd.grad(ref["localization_loss"], leaves, allow_unused=True)
    for a, b in zip(g_fast, g_ref):
        if b is None:
            assert a is None or float(a.abs().max()) == 0.0
        else:
            _close(a, b)


# ------------------------------------------------------------------ dropout masks

def test_fast_dropout_distribution():
    torch.manual_seed(10)
    x = torch.ones(200_000)
    for p in (0.1, 0.3, 0.8):
        y = fast_ops.dropout(x, p, training=True)
        kept = y != 0
        # kept values are scaled by the inverse of the quantised keep probability: unbiased
        levels = round((1 - p) * 65536)
        assert torch.equal(y[kept], torch.full_like(y[kept], 65536 / levels))
        assert abs(65536 / levels - 1 / (1 - p)) < 1e-4
        # keep fraction within 5 standard deviations of 1 - p
        sd = math.sqrt(p * (1 - p) / x.numel())
        assert abs(float(kept.float().mean()) - (1 - p)) < 5 * sd
    assert fast_ops.dropout(x, 0.8, training=False) is x
    assert float(fast_ops.dropout(x, 1.0, training=True).abs().max()) == 0.0
    # odd sizes and shapes (the 64-bit draws are cut to the tensor's size)
    z = fast_ops.dropout(torch.ones(3, 5, 7), 0.5, training=True)
    assert z.shape == (3, 5, 7) and set(z.unique().tolist()) <= {0.0, 2.0}


def test_uniform_int16_is_uniform_and_seeded():
    torch.manual_seed(3)
    a = fast_ops.uniform_int16((1000, 101))
    torch.manual_seed(3)
    assert torch.equal(a, fast_ops.uniform_int16((1000, 101)))       # resume-safe: default generator
    counts = torch.bincount((a.to(torch.int32) + 32768).flatten() // 4096, minlength=16).float()
    expected = a.numel() / 16
    assert float(((counts - expected) ** 2 / expected).sum()) < 50   # chi-square, 15 dof
    assert a.dtype == torch.int16 and int(a.min()) < -30000 and int(a.max()) > 30000


def test_fast_dropout_runs_under_torch_compile():
    # --compile: the numpy mask stays out of the compiled graph. Traced into it, the second shape
    # (dynamic) made aot_autograd rebuild the int16 mask as a view of the uint64 words and crash.
    def drop(x):
        return fast_ops.dropout(x, 0.1, True)

    compiled = torch.compile(drop, backend="aot_eager")
    for shape in [(4, 6, 8), (4, 9, 8), (5, 3, 8)]:
        x = torch.randn(*shape, requires_grad=True)
        torch.manual_seed(0)
        out = compiled(x)
        torch.manual_seed(0)
        assert torch.equal(out, drop(x))
        out.sum().backward()


def test_fused_adam_matches_default():
    """utils.train.setup builds Adam with fused=True (one kernel instead of ~10 ops per tensor)."""
    torch.manual_seed(11)
    params = [torch.randn(17, 5), torch.randn(3)]
    copies = [p.clone() for p in params]
    opt_a = torch.optim.Adam([nn.Parameter(p) for p in params], lr=3e-4)
    opt_b = torch.optim.Adam([nn.Parameter(p) for p in copies], lr=3e-4, fused=True)
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for opt in (opt_a, opt_b):
            for p, g in zip(opt.param_groups[0]["params"], grads):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(opt_a.param_groups[0]["params"], opt_b.param_groups[0]["params"]):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=1e-7)


# ------------------------------------------------------------------ data path

def test_batched_fetch_items_equal_per_item_path(demo_data):
    """MGSVDataset.__getitems__ (one store call per modality, item dicts made on access) gives
    the per-item __getitem__ results, and torch's default_collate of them gives collate_fn's batch."""
    from torch.utils.data import default_collate

    from utils.data.dataset import build_dataset, collate_fn
    ds = build_dataset(demo_data / "dataset/MGSV-EC/val_data.csv", demo_data / "features/Kuai_feature")
    idx = [3, 0, 7, 7, 1]
    items = ds.__getitems__(idx)
    assert len(items) == 5 and len(items[1:3]) == 2
    for got, i in zip(items, idx):
        want = ds[i]
        for key, value in want.items():
            assert torch.equal(got[key], value) if torch.is_tensor(value) else got[key] == value
    batch = collate_fn(items)
    generic = default_collate(list(items))
    for key in ("frame_feats", "music_feats", "music_mask", "spans_target"):
        assert torch.equal(batch[key], generic[key])
    assert batch["video_id"] == [ds.video_ids[i] for i in idx]
