"""Exact fast paths for the training step and inference.

Each function here computes what the straightforward code computes (nn.MultiheadAttention
over padded sequences, the per-layer criterion loop), up to float rounding; the
straightforward code stays in place and is used when the fast paths are switched off
(`reference_paths()`), which tests/test_fast_paths.py compares against.

1. Token packing (TokenPacking). A padded frame/snippet never influences a valid one: it
   is masked as an attention key, and its own output is zeroed (temporal encoders) or only
   ever used as a masked key (DETR encoder memory). So the row-wise layers (LayerNorm,
   projections, FFN) run on the valid tokens only -- 44 % of the 50 frame slots, 61 % of
   the 96 snippet slots and 55 % of the 146 DETR slots on MGSV-EC -- and attention runs per
   length bucket: the sequences are sorted by valid length and cut into a few buckets, each
   padded only to its own longest sequence, so the quadratic part (and its dropout mask)
   costs ~sum_b L_b^2 instead of B * L_max^2. Under bf16 autocast on the CPU the packed rows
   are padded to a multiple of 64 with spare rows that influence nothing (packed_row_multiple).
2. Single-query cross-attention (single_query_cross_attention). With one decoder query the
   keys/values of all memory tokens need not be projected: per head
       q_h . (Wk_h m + bk_h) = (Wk_h^T q_h) . m + const   (the constant cancels in softmax)
       sum_l a_l (Wv_h m_l + bv_h) = Wv_h (sum_l a_l m_l) + (sum_l a_l) bv_h
   which replaces the [B, L, d] x [d, 2d] projection (~2.5 GFLOP per decoder layer at
   batch 64) by two thin batched products. Query self-attention over one query is
   out_proj(v_proj(tgt)), with attention dropout acting on the single weight 1.
3. Dropout masks (dropout): uniform 16-bit integers compared with a threshold instead of
   bernoulli_. A generator's cost is per draw, and one 64-bit draw gives four 16-bit
   values, so a mask costs ~40 % of torch.rand's (and ~25 % of bernoulli_'s); the words
   come from numpy's PCG64, seeded from torch's generator (uniform_int16), at about half
   the cost of torch's CPU generator. The keep probability is quantised to 1/65536
   (|error| <= 7.7e-6) and the kept values are scaled by the inverse of the quantised
   probability, so E[dropout(x)] = x exactly; the random stream differs from the reference
   path's.

Token packing changes the number of dropout draws, so a training run is not bitwise the
one of the reference path (same distribution, different random numbers); with dropout off
(eval, or p = 0) the outputs are equal to float rounding.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Switches (module-level so that tests, benchmarks and users can compare against the
# straightforward code without rebuilding the model).
FAST_PATHS = True
# Token packing: "auto" packs on the CPU only. On CUDA the fused SDPA kernels over padded
# batches are fast, static shapes suit torch.compile/CUDA graphs, and the bucket sizes
# would cost a host sync per batch.
PACK_TOKENS = "auto"   # "auto" | "always" | "never"
# Packed rows are padded to a multiple of this under bf16 autocast on the CPU (packed_row_multiple).
BF16_CPU_ROW_MULTIPLE = 64


@contextlib.contextmanager
def reference_paths() -> Iterator[None]:
    """Run the straightforward implementation (no fast path) inside this block."""
    global FAST_PATHS
    saved, FAST_PATHS = FAST_PATHS, False
    try:
        yield
    finally:
        FAST_PATHS = saved


@contextlib.contextmanager
def packing_mode(mode: str) -> Iterator[None]:
    """Force token packing on ("always") or off ("never") inside this block."""
    global PACK_TOKENS
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"packing mode {mode!r}: expected auto, always or never")
    saved, PACK_TOKENS = PACK_TOKENS, mode
    try:
        yield
    finally:
        PACK_TOKENS = saved


def use_packing(x: Tensor) -> bool:
    if not FAST_PATHS or PACK_TOKENS == "never":
        return False
    return PACK_TOKENS == "always" or x.device.type == "cpu"


# ------------------------------------------------------------------------------------ dropout

_LEVELS = 1 << 16


@torch.compiler.disable  # numpy inside a compiled graph is traced into wrong storage (--compile crashed)
def uniform_int16(shape: torch.Size | tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """Independent uniform int16 values, four per 64-bit word of a PCG64 stream (numpy) seeded by
    one draw of torch's default generator, so torch.manual_seed and saved RNG states determine them.
    PCG64 makes a word in ~half the time of torch's CPU generator (3.8 vs 7.1 ms for a batch-64
    DETR FFN mask of 5.2 M values), ~45 ms of a ~1 s batch-64 CPU training step."""
    n = math.prod(shape)
    seed = int(torch.randint(0, 2**63 - 1, (1,), dtype=torch.int64))
    words = np.random.PCG64(seed).random_raw((n + 3) // 4)
    return torch.from_numpy(words.view(np.int16)[:n]).view(shape).to(device)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout with a 16-bit integer mask (see the module docstring, item 3)."""
    if not training or p == 0.0:
        return x
    if not FAST_PATHS or x.device.type != "cpu":  # CUDA's fused dropout is already fast
        return F.dropout(x, p, True)
    if p >= 1.0:
        return x * 0.0
    keep_levels = round((1.0 - p) * _LEVELS)
    if not 0 < keep_levels < _LEVELS:  # p within 2^-17 of 0 or 1: no 16-bit threshold for it
        return F.dropout(x, p, True)
    mask = uniform_int16(x.shape, x.device) < keep_levels - _LEVELS // 2   # P = keep_levels / 2^16
    return x * mask.to(x.dtype).mul_(_LEVELS / keep_levels)


# ------------------------------------------------------------------------------ token packing

class TokenPacking:
    """The valid tokens of a [B, L] mask in a packed order, and length buckets for attention.

    Packed order: sequences sorted by valid length (ascending, stable), each one's valid
    tokens in time order. Bucket k holds a contiguous run of sorted sequences and hence a
    contiguous range of packed rows; it is padded to its own longest sequence.
    Building it needs the lengths on the host (one device sync per batch on CUDA).
    """

    def __init__(self, mask: Tensor, num_buckets: int | None = None, row_multiple: int | None = None):
        valid = mask > 0
        self.batch, self.length = valid.shape
        device = mask.device
        lengths = valid.sum(1)
        order = torch.argsort(lengths, stable=True)
        sorted_len = lengths[order]
        lens = sorted_len.tolist()                                   # the one host sync
        if min(lens) < 1:
            raise ValueError("token packing needs at least one valid token per sequence")
        rows, t = torch.nonzero(valid[order], as_tuple=True)         # row-major: sorted order, time order
        self.flat_index = order[rows] * self.length + t              # [N] into the B*L flattening
        self.num_tokens = int(self.flat_index.shape[0])
        # Spare rows after the N tokens (copies of the first), so that row counts repeat from batch
        # to batch (packed_row_multiple). They go through the row-wise layers like any row but are
        # never a key, never unpacked, and get zero attention output: they influence no token,
        # and their gradient is zero.
        multiple = packed_row_multiple(mask.device) if row_multiple is None else row_multiple
        self.num_rows = -(-self.num_tokens // multiple) * multiple
        spare = self.num_rows - self.num_tokens
        self.row_index = torch.cat([self.flat_index, self.flat_index[:1].expand(spare)]) if spare else self.flat_index
        self.positions = torch.cat([t, t[:1].expand(spare)]) if spare else t   # time index of each packed row
        if num_buckets is None:
            num_buckets = max(1, min(8, self.batch // 16))
        starts = torch.cumsum(sorted_len, 0) - sorted_len            # first packed row of each sorted seq
        self.buckets: list[tuple[Tensor, Tensor, Tensor]] = []
        n_b = self.batch
        cut = [round(k * n_b / num_buckets) for k in range(num_buckets + 1)]
        for s0, s1 in zip(cut[:-1], cut[1:]):
            if s1 <= s0:
                continue
            width = lens[s1 - 1]
            ar = torch.arange(width, device=device)
            seq_len = sorted_len[s0:s1, None]
            key_valid = ar[None, :] < seq_len                        # [nb, Lb]
            first = starts[s0:s1, None]
            # Padded slots read the bucket's first row (any valid row: masked as keys, and
            # their query outputs are dropped).
            gather = torch.where(key_valid, first + ar[None, :], starts[s0]).reshape(-1)
            keep = torch.nonzero(key_valid.reshape(-1), as_tuple=True)[0]
            self.buckets.append((gather, key_valid, keep))

    def pack(self, x: Tensor) -> Tensor:
        """[B, L, C] -> [num_rows, C] (the valid tokens, then any spare rows)."""
        return x.reshape(self.batch * self.length, -1).index_select(0, self.row_index)

    def unpack(self, y: Tensor) -> Tensor:
        """[num_rows, C] -> [B, L, C] with zeros in the padded slots."""
        out = y.new_zeros(self.batch * self.length, y.shape[-1])
        return out.index_copy(0, self.flat_index, y[:self.num_tokens]).view(self.batch, self.length, -1)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, heads: int, dropout_p: float,
                  training: bool) -> Tensor:
        """Multi-head attention within each sequence: packed q, k, v [num_rows, d] -> [num_rows, d]
        (zeros for the spare rows)."""
        d = q.shape[-1]
        dh = d // heads
        outs = []
        for gather, key_valid, keep in self.buckets:
            nb, width = key_valid.shape

            def heads_of(x: Tensor) -> Tensor:
                return x.index_select(0, gather).view(nb, width, heads, dh).transpose(1, 2)

            o = attention_core(heads_of(q), heads_of(k), heads_of(v), key_valid, dropout_p, training)
            outs.append(o.transpose(1, 2).reshape(nb * width, d).index_select(0, keep))
        if self.num_rows > self.num_tokens:
            outs.append(q.new_zeros(self.num_rows - self.num_tokens, d))
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def packed_row_multiple(device: torch.device) -> int:
    """Rows of a TokenPacking are padded to a multiple of this: BF16_CPU_ROW_MULTIPLE under bf16
    autocast on the CPU, else 1 (no spare rows).

    The CPU's bf16 matrix products (oneDNN) build a kernel for every new shape, ~8 ms each, and the
    number of valid tokens differs in every batch: unpadded, most products of a training step
    would pay it (a batch-64 step over ever-new batches 0.53 s vs 0.41 s over repeated ones).
    Float32 (MKL) and CUDA have no such cost, so they get no spare rows."""
    if device.type == "cpu" and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16:
        return BF16_CPU_ROW_MULTIPLE
    return 1


def key_bias(key_valid: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive attention mask: 0 for valid keys, -inf for padded ones ([..., L], like key_valid)."""
    return torch.zeros(key_valid.shape, dtype=dtype, device=key_valid.device).masked_fill_(~key_valid, float("-inf"))


def attention_core(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, dropout_p: float,
                   training: bool) -> Tensor:
    """softmax(q k^T / sqrt(dh) + mask) v over [n, H, L, dh] with key_valid [n, L] (True = valid)."""
    if not training or dropout_p == 0.0:
        # Fused kernel (flash on CPU and CUDA); no dropout to apply.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_valid[:, None, None, :])
    n, h, length, dh = q.shape
    bias = key_bias(key_valid, q.dtype)
    scores = torch.baddbmm(bias[:, None, None, :].expand(n, h, 1, length).reshape(n * h, 1, length),
                           q.reshape(n * h, length, dh), k.reshape(n * h, length, dh).transpose(1, 2),
                           alpha=1.0 / math.sqrt(dh))
    attn = dropout(torch.softmax(scores, dim=-1), dropout_p, True)
    return torch.bmm(attn, v.reshape(n * h, length, dh)).view(n, h, length, dh)


def _check_mha(mha: nn.MultiheadAttention) -> None:
    if not mha._qkv_same_embed_dim or mha.in_proj_bias is None or mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("fast attention paths need a plain nn.MultiheadAttention (packed in_proj with bias)")


def packed_self_attention(mha: nn.MultiheadAttention, qk_in: Tensor, v_in: Tensor, packing: TokenPacking,
                          training: bool) -> Tensor:
    """nn.MultiheadAttention(qk_in, qk_in, v_in, key_padding_mask) on packed tokens [N, d]."""
    _check_mha(mha)
    d = mha.embed_dim
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if qk_in is v_in:
        qkv = F.linear(qk_in, w, b)
        q, k, v = qkv[:, :d], qkv[:, d:2 * d], qkv[:, 2 * d:]
    else:
        qk = F.linear(qk_in, w[:2 * d], b[:2 * d])     # q and k from the same input: one GEMM
        q, k = qk[:, :d], qk[:, d:]
        v = F.linear(v_in, w[2 * d:], b[2 * d:])
    ctx = packing.attention(q, k, v, mha.num_heads, mha.dropout, training)
    return F.linear(ctx, mha.out_proj.weight, mha.out_proj.bias)


# ---------------------------------------------------------------------- single-query attention

def single_query_self_attention(mha: nn.MultiheadAttention, tgt: Tensor, training: bool) -> Tensor:
    """nn.MultiheadAttention(tgt + pos, tgt + pos, tgt) for ONE query per sample: [B, 1, d] -> [B, 1, d].

    Softmax over a single key is 1, so the output is out_proj(v_proj(tgt)); attention dropout
    acts on that single weight per (sample, head): it becomes 0 or 1 / (1 - p).
    """
    _check_mha(mha)
    d, heads = mha.embed_dim, mha.num_heads
    v = F.linear(tgt, mha.in_proj_weight[2 * d:], mha.in_proj_bias[2 * d:])
    if training and mha.dropout > 0.0:
        weight = dropout(v.new_ones(tgt.shape[0], tgt.shape[1], heads, 1), mha.dropout, True)
        v = (v.view(*tgt.shape[:2], heads, d // heads) * weight).view_as(v)
    return F.linear(v, mha.out_proj.weight, mha.out_proj.bias)


def single_query_cross_attention(mha: nn.MultiheadAttention, query: Tensor, key_in: Tensor, value_in: Tensor,
                                 key_valid: Tensor, training: bool) -> Tensor:
    """nn.MultiheadAttention(query, key_in, value_in, key_padding_mask=~key_valid) without
    projecting the keys and values: query [B, Q, d], key_in/value_in [B, L, d] -> [B, Q, d].

    Cheaper than the projection when Q * heads << d (one query: 8 head-vectors against the
    [B, L, d] memory instead of a [B*L, d] x [d, 2d] GEMM).
    """
    _check_mha(mha)
    batch, nq, d = query.shape
    heads = mha.num_heads
    dh = d // heads
    wq, wk, wv = mha.in_proj_weight.split(d)
    bq, _, bv = mha.in_proj_bias.split(d)            # bk adds the same logit to every key: cancels
    q = F.linear(query, wq, bq).view(batch, nq, heads, dh) / math.sqrt(dh)
    # (Wk_h^T q_h): one d-vector per (query, head) to dot with the raw key inputs.
    q_keys = torch.einsum("bqhe,hed->bqhd", q, wk.view(heads, dh, d)).reshape(batch, nq * heads, d)
    bias = key_bias(key_valid, q.dtype)
    scores = torch.baddbmm(bias[:, None, :], q_keys, key_in.transpose(1, 2))       # [B, Q*H, L]
    attn = torch.softmax(scores, dim=-1)
    if training and mha.dropout > 0.0:
        attn = dropout(attn, mha.dropout, True)
    pooled = torch.bmm(attn, value_in).view(batch, nq, heads, d)                   # sum_l a_l x_l
    out = torch.einsum("bqhd,hed->bqhe", pooled, wv.view(heads, dh, d))
    if training and mha.dropout > 0.0:  # dropped weights no longer sum to 1
        out = out + attn.sum(-1).view(batch, nq, heads, 1) * bv.view(heads, dh)
    else:
        out = out + bv.view(heads, dh)
    return F.linear(out.reshape(batch, nq, d), mha.out_proj.weight, mha.out_proj.bias)
