"""Per-modality temporal encoders (the authors' Transformer_enhancement, model/model_Base.py).

frames [B, 50, 512] (CLIP) or snippets [B, 96, 768] (AST)
  -> Linear to d -> + sinusoid table -> temporal self-attention layer(s) -> Linear(d, d)
  -> padded rows zeroed -> masked mean -> L2 norm (global embedding).

The submodules are ordered like the authors' "Transformer_enhancement" so that a
checkpoint maps onto ours by renaming prefixes only: each layer is a ModuleList
[LayerNorm, MultiheadAttention, LayerNorm, FFN] (keys layers.<i>.0 ... layers.<i>.3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast_ops
from .position import SinusoidalPositionalEncoding


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x) (CLIP's activation; used only with --with_act_after_proj 1)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * torch.sigmoid(1.702 * x)


def temporal_layer(dim: int, heads: int, ffn_dim: int, dropout: float) -> nn.ModuleList:
    """[LN1, MHA, LN2, FFN] in the authors' order (their checkpoint keys are the indices)."""
    ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout),
                        nn.Linear(ffn_dim, dim), nn.Dropout(dropout))
    attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
    return nn.ModuleList([nn.LayerNorm(dim), attn, nn.LayerNorm(dim), ffn])


class TemporalTransformer(nn.Module):
    """Self-attention over the time axis of one modality, then a final Linear(d, d).

    Original arrangement (residual_from_input=False): x <- LN1(x); x <- MHA(x) + x;
    x <- LN2(x); x <- FFN(x) + x, i.e. the residual is taken from the NORMALISED input.
    residual_from_input=True is the usual pre-norm block x <- x + MHA(LN1(x)), etc.
    """

    def __init__(self, dim: int, depth: int, heads: int, ffn_dim: int, dropout: float,
                 residual_from_input: bool = False):
        super().__init__()
        self.layers = nn.ModuleList([temporal_layer(dim, heads, ffn_dim, dropout) for _ in range(depth)])
        self.final_linear = nn.Linear(dim, dim)
        self.residual_from_input = residual_from_input

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        key_padding_mask = mask == 0
        for norm1, attn, norm2, ffn in self.layers:
            if self.residual_from_input:
                h = norm1(x)
                x = x + attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=False)[0]
                x = x + ffn(norm2(x))
            else:
                x = norm1(x)
                x = x + attn(x, x, x, key_padding_mask=key_padding_mask, need_weights=False)[0]
                x = norm2(x)
                x = x + ffn(x)
        return self.final_linear(x)

    def forward_packed(self, x: Tensor, packing: fast_ops.TokenPacking) -> Tensor:
        """forward() on the valid tokens only: x [N, d] packed -> [N, d] (see model/fast_ops.py)."""
        for norm1, attn, norm2, ffn in self.layers:
            if self.residual_from_input:
                h = norm1(x)
                x = x + fast_ops.packed_self_attention(attn, h, h, packing, self.training)
                x = x + _ffn(ffn, norm2(x), self.training)
            else:
                x = norm1(x)
                x = x + fast_ops.packed_self_attention(attn, x, x, packing, self.training)
                x = norm2(x)
                x = x + _ffn(ffn, x, self.training)
        return self.final_linear(x)


def _ffn(ffn: nn.Sequential, x: Tensor, training: bool) -> Tensor:
    """The [Linear, GELU, Dropout, Linear, Dropout] block with fast_ops' dropout masks."""
    lin1, act, drop1, lin2, drop2 = ffn
    x = fast_ops.dropout(act(lin1(x)), drop1.p, training)
    return fast_ops.dropout(lin2(x), drop2.p, training)


class TemporalEncoder(nn.Module):
    """One modality: projection, positions, temporal transformer, pooling.

    agg_module "transf" is the paper configuration. "None" skips temporal modelling
    like the original: the global embedding is the sum of ALL projected rows divided
    by the number of valid rows (padded rows equal the projection bias and are not
    re-zeroed, a small bug kept for fidelity), and the tokens are the projected rows.
    with_cls_token prepends a learnable token (after the positional table, so it has
    no position) that also takes part in attention; its output is the global embedding.
    """

    def __init__(self, in_dim: int, dim: int, max_len: int, agg_module: str = "transf",
                 depth: int = 1, heads: int = 8, dropout: float = 0.8,
                 residual_from_input: bool = False, act_after_proj: bool = False,
                 with_cls_token: bool = False, shared_transformer: TemporalTransformer | None = None):
        super().__init__()
        self.proj = nn.Linear(in_dim, dim)
        self.act = QuickGELU() if act_after_proj else nn.Identity()
        self.position: SinusoidalPositionalEncoding | None = None
        self.transformer: TemporalTransformer | None = None
        self.cls_token: nn.Parameter | None = None
        if agg_module == "transf":
            self.position = SinusoidalPositionalEncoding(dim, max_len)
            self.transformer = shared_transformer or TemporalTransformer(
                dim, depth, heads, 4 * dim, dropout, residual_from_input)
            if with_cls_token:
                self.cls_token = nn.Parameter(torch.empty(1, 1, dim))
                nn.init.trunc_normal_(self.cls_token, std=0.02)
        elif agg_module != "None":
            raise ValueError(f"unsupported agg_module {agg_module!r} (expected 'transf' or 'None')")

    def forward(self, feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """feats [B, L, in_dim], mask [B, L] -> (global [B, d] L2-normalised, tokens [B, L, d])."""
        if self.transformer is not None and self.cls_token is None and fast_ops.use_packing(feats):
            return self._forward_packed(feats, mask)
        mask = mask.to(feats.dtype)
        pad = (mask == 0)[..., None]
        n_valid = mask.sum(1, keepdim=True)
        # Zero padded input rows first: nothing downstream may depend on their content.
        x = self.act(self.proj(feats.masked_fill(pad, 0.0)))
        if self.transformer is None:
            return F.normalize(x.sum(1) / n_valid, dim=-1), x
        x = self.position(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
            y = self.transformer(x, torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1))
            return F.normalize(y[:, 0], dim=-1), y[:, 1:].masked_fill(pad, 0.0)
        y = self.transformer(x, mask).masked_fill(pad, 0.0)
        return F.normalize(y.sum(1) / n_valid, dim=-1), y

    def _forward_packed(self, feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """forward() computing on the valid rows only; padded rows of the tokens are 0 as there."""
        packing = fast_ops.TokenPacking(mask)
        x = self.act(self.proj(packing.pack(feats)))
        if packing.length > self.position.max_len:
            raise ValueError(f"sequence of {packing.length} positions exceeds the positional table "
                             f"({self.position.max_len})")
        x = x + self.position.pe.index_select(0, packing.positions).to(x.dtype)
        y = packing.unpack(self.transformer.forward_packed(x, packing))
        n_valid = mask.to(y.dtype).sum(1, keepdim=True)
        return F.normalize(y.sum(1) / n_valid, dim=-1), y
