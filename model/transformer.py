"""DETR encoder/decoder for moment detection (the authors' music_detr/transformer.py).

Post-norm by default (detr_pre_norm 0), ReLU FFN, built on nn.MultiheadAttention with
batch-first tensors. Submodule names follow DETR / the authors' checkpoints
(encoder.layers.<i>.{self_attn,linear1,linear2,norm1,norm2}, decoder.layers.<i>.
{self_attn,multihead_attn,linear1,linear2,norm1,norm2,norm3}, decoder.norm).

Fast paths (model/fast_ops.py, same parameters, same function): on the CPU the encoder runs
on the valid tokens only; a decoder with few queries skips projecting the memory into keys
and values, and one query's self-attention is out_proj(v_proj(tgt)).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast_ops


class EncoderLayer(nn.Module):
    def __init__(self, dim: int, nhead: int, ffn_dim: int, dropout: float, pre_norm: bool):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.pre_norm = pre_norm

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(fast_ops.dropout(F.relu(self.linear1(x)), self.dropout.p, self.training))

    def forward_packed(self, src: Tensor, pos: Tensor, packing: fast_ops.TokenPacking) -> Tensor:
        """forward() on packed valid tokens src, pos [N, d] (model/fast_ops.py)."""
        drop = lambda x, m: fast_ops.dropout(x, m.p, self.training)  # noqa: E731
        if self.pre_norm:
            h = self.norm1(src)
            src = src + drop(fast_ops.packed_self_attention(self.self_attn, h + pos, h, packing, self.training),
                             self.dropout1)
            return src + drop(self._ffn(self.norm2(src)), self.dropout2)
        attn = fast_ops.packed_self_attention(self.self_attn, src + pos, src, packing, self.training)
        src = self.norm1(src + drop(attn, self.dropout1))
        return self.norm2(src + drop(self._ffn(src), self.dropout2))

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        if self.pre_norm:
            h = self.norm1(src)
            src = src + self.dropout1(self.self_attn(h + pos, h + pos, h, key_padding_mask=key_padding_mask,
                                                     need_weights=False)[0])
            return src + self.dropout2(self._ffn(self.norm2(src)))
        q = src + pos
        src = self.norm1(src + self.dropout1(self.self_attn(q, q, src, key_padding_mask=key_padding_mask,
                                                            need_weights=False)[0]))
        return self.norm2(src + self.dropout2(self._ffn(src)))


class DecoderLayer(nn.Module):
    """use_self_attn=False skips query self-attention (the original's --decoder_SA 0 intent)."""

    def __init__(self, dim: int, nhead: int, ffn_dim: int, dropout: float, pre_norm: bool,
                 use_self_attn: bool = True):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(dim, nhead, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.pre_norm = pre_norm
        self.use_self_attn = use_self_attn

    def _ffn(self, x: Tensor) -> Tensor:
        return self.linear2(fast_ops.dropout(F.relu(self.linear1(x)), self.dropout.p, self.training))

    def _self_attn(self, q: Tensor, v: Tensor) -> Tensor:
        if fast_ops.FAST_PATHS and q.shape[1] == 1:  # softmax over one key is 1
            return fast_ops.single_query_self_attention(self.self_attn, v, self.training)
        return self.self_attn(q, q, v, need_weights=False)[0]

    def _cross_attn(self, q: Tensor, memory: Tensor, memory_pos: Tensor, kpm: Tensor) -> Tensor:
        # Folding the key/value projections into the queries pays while Q * heads << d.
        if fast_ops.FAST_PATHS and q.shape[1] * self.multihead_attn.num_heads * 4 <= q.shape[2]:
            return fast_ops.single_query_cross_attention(self.multihead_attn, q, memory_pos, memory, ~kpm,
                                                         self.training)
        return self.multihead_attn(q, memory_pos, memory, key_padding_mask=kpm, need_weights=False)[0]

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor,
                pos: Tensor, query_pos: Tensor, memory_pos: Tensor | None = None) -> Tensor:
        """memory_pos = memory + pos (computed here when not given: the Decoder passes it once)."""
        kpm = memory_key_padding_mask
        memory_pos = memory + pos if memory_pos is None else memory_pos
        drop = lambda x, m: fast_ops.dropout(x, m.p, self.training)  # noqa: E731
        if self.pre_norm:
            if self.use_self_attn:
                h = self.norm1(tgt)
                tgt = tgt + drop(self._self_attn(h + query_pos, h), self.dropout1)
            h = self.norm2(tgt)
            tgt = tgt + drop(self._cross_attn(h + query_pos, memory, memory_pos, kpm), self.dropout2)
            return tgt + drop(self._ffn(self.norm3(tgt)), self.dropout3)
        if self.use_self_attn:
            tgt = self.norm1(tgt + drop(self._self_attn(tgt + query_pos, tgt), self.dropout1))
        tgt = self.norm2(tgt + drop(self._cross_attn(tgt + query_pos, memory, memory_pos, kpm), self.dropout2))
        return self.norm3(tgt + drop(self._ffn(tgt), self.dropout3))


class Encoder(nn.Module):
    def __init__(self, layer: EncoderLayer, num_layers: int, norm: nn.LayerNorm | None):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = norm

    def forward(self, src: Tensor, key_padding_mask: Tensor, pos: Tensor) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return self.norm(src) if self.norm is not None else src

    def forward_packed(self, src: Tensor, pos: Tensor, packing: fast_ops.TokenPacking) -> Tensor:
        for layer in self.layers:
            src = layer.forward_packed(src, pos, packing)
        return self.norm(src) if self.norm is not None else src


class Decoder(nn.Module):
    """Returns the normalised output of every layer: [num_layers, B, Q, d]."""

    def __init__(self, layer: DecoderLayer, num_layers: int, norm: nn.LayerNorm):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(layer) for _ in range(num_layers)])
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Tensor,
                pos: Tensor, query_pos: Tensor) -> Tensor:
        outputs = []
        memory_pos = memory + pos  # once, not per layer
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, memory_pos)
            outputs.append(self.norm(tgt))
        return torch.stack(outputs)


class Transformer(nn.Module):
    def __init__(self, dim: int = 256, nhead: int = 8, num_encoder_layers: int = 2,
                 num_decoder_layers: int = 6, ffn_dim: int = 1024, dropout: float = 0.1,
                 pre_norm: bool = False, decoder_self_attn: bool = True):
        super().__init__()
        self.encoder = Encoder(EncoderLayer(dim, nhead, ffn_dim, dropout, pre_norm), num_encoder_layers,
                               nn.LayerNorm(dim) if pre_norm else None)
        self.decoder = Decoder(DecoderLayer(dim, nhead, ffn_dim, dropout, pre_norm, decoder_self_attn),
                               num_decoder_layers, nn.LayerNorm(dim))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src: Tensor, mask: Tensor, query_content: Tensor, query_pos: Tensor,
                pos: Tensor) -> tuple[Tensor, Tensor]:
        """src [B, L, d], mask [B, L] (1 valid), query_content/query_pos [B, Q, d], pos [B, L, d]
        -> (hs [num_decoder_layers, B, Q, d], memory [B, L, d]).

        With token packing (CPU) the encoder skips the padded tokens and their memory rows are
        0: they are masked keys for the decoder, so nothing depends on them.
        """
        key_padding_mask = mask == 0
        if fast_ops.use_packing(src):
            packing = fast_ops.TokenPacking(mask)
            memory = packing.unpack(self.encoder.forward_packed(packing.pack(src), packing.pack(pos), packing))
        else:
            memory = self.encoder(src, key_padding_mask, pos)
        hs = self.decoder(query_content, memory, key_padding_mask, pos, query_pos)
        return hs, memory


class MLP(nn.Module):
    """Linear layers with ReLU in between (DETR's MLP; keys layers.<i>)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims, dims[1:] + [out_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x
