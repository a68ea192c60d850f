"""Video-guided music pooling (X-Pool; the authors' Transformer_XA, modules/transformer.py) and exact
all-pairs scoring.

XPool turns the snippet tokens of every track j into one embedding P[j, i] per video i:
    q_i = Wq LN1(v_i) + bq,  K_jl = Wk LN1(S_jl) + bk,  U_jl = Wv LN1(S_jl) + bv
    a_ji = softmax_l(q_i . K_jl / sqrt(d))      (padded snippets masked out)
    o_ji = Wo sum_l a_jil U_jl + bo
    h = LN2(o);  P_ji = LN3(h + Dropout(Wl h + bl))
and the single-tower similarity is cos(v_i, P_ji).

The second half of the file scores N videos against M tracks without ever building
the [M, N, d] tensor P (see build_music_index / score_against_index).
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import fast_ops


class CrossAttention(nn.Module):
    """One-head attention of every video query over the snippets of every track."""

    def __init__(self, dim: int):
        super().__init__()
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, queries: Tensor, tokens: Tensor, mask: Tensor | None) -> Tensor:
        """queries [Nv, d], tokens [Nm, L, d], mask [Nm, L] or None -> [Nm, Nv, d]."""
        # [batch = track, head = 1, sequence, d]; one head of width d, so SDPA's default
        # scale 1/sqrt(d) is the original's.
        q = self.q_proj(queries).expand(tokens.shape[0], 1, -1, -1)
        k = self.k_proj(tokens).unsqueeze(1)
        attn_mask = None if mask is None else (mask > 0)[:, None, None, :]
        if fast_ops.FAST_PATHS and queries.shape[0] > tokens.shape[1]:
            # The weights sum to 1 (no attention dropout), so Wo (sum_l a_l U_l) + bo =
            # sum_l a_l (Wo U_l + bo): project the L values of a track instead of its Nv pooled
            # outputs (training at batch 512: [512*96, d] instead of [512*512, d] through Wo).
            w = self.out_proj.weight @ self.v_proj.weight
            b = self.out_proj.weight @ self.v_proj.bias + self.out_proj.bias
            out = F.scaled_dot_product_attention(q, k, F.linear(tokens, w, b).unsqueeze(1), attn_mask=attn_mask)
            return out.squeeze(1)
        v = self.v_proj(tokens).unsqueeze(1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out_proj(out.squeeze(1))


class XPool(nn.Module):
    """Transformer_XA of the original (submodule names are the authors')."""

    def __init__(self, dim: int, dropout: float = 0.3, use_mask: bool = True):
        super().__init__()
        self.cross_attn = CrossAttention(dim)
        self.linear_proj = nn.Linear(dim, dim)
        self.layer_norm1 = nn.LayerNorm(dim)
        self.layer_norm2 = nn.LayerNorm(dim)
        self.layer_norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.use_mask = use_mask  # --fusion_mask 0 attends to padded snippets too (original X-Pool)
        # X-Pool initialisation: every projection is the identity, biases zero.
        for name, param in self.named_parameters():
            if "proj" in name or "linear" in name:
                if name.endswith("weight"):
                    nn.init.eye_(param)
                else:
                    nn.init.zeros_(param)

    def forward(self, videos: Tensor, snippets: Tensor, mask: Tensor) -> Tensor:
        """videos [Nv, d], snippets [Nm, L, d], mask [Nm, L] -> P [Nm, Nv, d] (music-major)."""
        # The same LayerNorm for queries and keys, and no residual from the query (X-Pool).
        o = self.cross_attn(self.layer_norm1(videos), self.layer_norm1(snippets),
                            mask if self.use_mask else None)
        h = self.layer_norm2(o)
        return self.layer_norm3(h + fast_ops.dropout(self.linear_proj(h), self.dropout.p, self.training))

    def paired_attention(self, videos: Tensor, snippets: Tensor, mask: Tensor) -> Tensor:
        """Attention weights [B, L] of video i over the snippets of ITS track i (pairs, not all
        pairs): where X-Pool looks for the video in its own track (scripts/diagnose_localisation.py)."""
        q = self.cross_attn.q_proj(self.layer_norm1(videos))
        k = self.cross_attn.k_proj(self.layer_norm1(snippets))
        logits = torch.einsum("bd,bld->bl", q, k) / math.sqrt(q.shape[-1])
        if self.use_mask:
            logits = logits.masked_fill(mask <= 0, float("-inf"))
        return logits.softmax(-1)


def single_similarity(videos: Tensor, pooled: Tensor) -> Tensor:
    """cos(v_i, P_ji) for videos [Nv, d] and pooled [Nm, Nv, d] -> [Nv, Nm]."""
    return torch.einsum("id,jid->ij", F.normalize(videos, dim=-1), F.normalize(pooled, dim=-1))


# ---------------------------------------------------------------------------------------
# Exact, memory-bounded scoring of every video against every track (evaluation, MsG).
#
# Straightforward cost per (video, track) pair: attention 2*L*d (logits) + 2*L*d (pooling)
# + 2*d^2 (out_proj) + 2*d^2 (linear_proj) ~ 0.36 MFLOP -> 1.44 TFLOP for 2000 x 2000,
# plus a [2000, 2000, 256] tensor (4 GB) per intermediate.
#
# Reformulation (eval mode, dropout off). Everything after the softmax weights a_l is
# affine in the pooled snippet sum, and the two LayerNorms only need a few scalars of it:
#   o_c = C o = sum_l a_l u_l,  u_l = C (W' S~_l + b'),  W' = Wo Wv,  b' = Wo bv + bo
#   (C = I - 11^T/d centres a vector; sum_l a_l = 1 lets the bias move inside the sum)
#   LN2: o^ = o_c / s_o,  s_o^2 = |o_c|^2/d + eps
#   z~ = C z = A' o^ + c',  A' = C (I + Wl) diag(g2),  c' = C ((I + Wl) b2 + bl)
#   LN3: P = g3 * z~ / s_z + b3,  s_z^2 = |z~|^2/d + eps
#   cos(v, P) needs v.P and |P|^2, which are functions of
#     |o_c|^2, |x|^2, x^T G3^2 x          (x = A' o_c: three quadratic forms in a)
#     c'.x, (G3^2 c').x, (g3*b3).x        (linear forms in a, per-track coefficients)
#     (g3*v).x                            (linear form, coefficients depend on the video)
# A quadratic form y^T M y with y = sum_l a_l Y_l is a^T (Y M Y^T) a: an L x L Gram matrix
# per track, built once. The video-dependent linear form is sum_l a_l (g_v . S~_l) with
# g_v = (A' C W')^T (g3 * v): the same right-hand matrix S~ as the attention logits, so one
# GEMM produces both. To keep float32 exact, every track's vectors are centred on their
# mean over valid snippets before the Gram matrices are formed (a_l sums to one, so
# y = sum_l a_l (Y_l - Y_bar) + Y_bar), which avoids cancellation when attention is flat.
#
# Cost per pair with Lb valid snippets (tracks are sorted by length and processed in
# blocks padded to the block's longest track):
#   GEMM [2c, d+1] @ [d+1, Nb*Lb]  (logits and video linear form)   4*Lb*(d+1) FLOP
#   bmm  [Nb, c, Lb] @ [Nb, Lb, 3*Lb+7] (Gram forms)                 2*Lb*(3*Lb+7) FLOP
#   elementwise (softmax, two reductions over Lb)                    ~10*Lb
# Lb = 96: ~0.155 MFLOP/pair -> 0.62 TFLOP for 2000 x 2000; with MGSV-EC track lengths
# (mean 56 valid snippets of 96) ~0.08 MFLOP/pair -> 0.31 TFLOP. Memory: the index holds
# S~ and the Gram matrices (~0.4 GB for 2000 full-length tracks); a chunk of c videos
# needs O(c * Nb * Lb) floats. Measured at 2000 x 2000 (d = 256, Lm = 96) on a shared 2-core
# CPU: ~10 s of single-core CPU time with MGSV-EC-like lengths (index ~2 s), ~24 s with every
# snippet valid; peak RSS 1.3-1.7 GB including the inputs.
# ---------------------------------------------------------------------------------------

_MASKED = -1e30  # logit offset of padded snippets: exp() underflows to exactly 0


@dataclass
class IndexBlock:
    columns: Tensor  # [Nb] column (track) indices of this block in the caller's order
    keys: Tensor     # [d + 1, Nb * Lb]: LN1(snippets), valid ones first, + a mask-offset row
                     # (the transpose of a contiguous [Nb * Lb, d + 1] array)
    gram: Tensor     # [Nb, Lb, 3 * Lb + 7]: three Gram matrices and seven linear columns
    consts: Tensor   # [Nb, 10]: per-track constants of the quadratic/linear forms
    length: int      # Lb


@dataclass
class MusicIndex:
    """Everything score_against_index needs about the tracks; built once per track set.

    blocks may be any re-iterable collection of IndexBlock (e.g. streamed from disk); together
    they must cover every column exactly once. build_music_index sorts tracks by valid length
    and cuts them into blocks of block_size tracks (64: few, large tensor operations, which
    also keeps two OpenMP threads efficient on a busy machine; the padding this costs is
    small because neighbouring tracks in length order have nearly the same length).
    """
    music_emb: Tensor             # [Nm, d] global music embeddings (L2-normalised)
    blocks: Iterable[IndexBlock]  # empty when the model has no X-Pool (vmr_loss "dual")

    @property
    def num_music(self) -> int:
        return self.music_emb.shape[0]


@dataclass
class _PostPoolMaps:
    """The affine maps of the X-Pool tail, folded (float64 then cast)."""
    cw: Tensor        # C W',  W' = Wo Wv             [d, d]
    cb: Tensor        # C b',  b' = Wo bv + bo        [d]
    a_prime: Tensor   # A' = C (I + Wl) diag(g2)      [d, d]
    acw: Tensor       # A' C W'                       [d, d]
    acb: Tensor       # A' C b'                       [d]
    c_prime: Tensor   # c' = C ((I + Wl) b2 + bl)     [d]
    g3: Tensor
    b3: Tensor
    eps2: float
    eps3: float


def _post_pool_maps(xpool: XPool, dtype: torch.dtype) -> _PostPoolMaps:
    f64 = dict(dtype=torch.float64)
    attn = xpool.cross_attn
    wv, bv = attn.v_proj.weight.to(**f64), attn.v_proj.bias.to(**f64)
    wo, bo = attn.out_proj.weight.to(**f64), attn.out_proj.bias.to(**f64)
    wl, bl = xpool.linear_proj.weight.to(**f64), xpool.linear_proj.bias.to(**f64)
    g2, b2 = xpool.layer_norm2.weight.to(**f64), xpool.layer_norm2.bias.to(**f64)
    d = wv.shape[0]
    eye = torch.eye(d, dtype=torch.float64, device=wv.device)
    centre = eye - 1.0 / d
    i_wl = eye + wl
    cw, cb = centre @ wo @ wv, centre @ (wo @ bv + bo)
    a_prime = centre @ i_wl * g2[None, :]
    maps = _PostPoolMaps(
        cw=cw, cb=cb, a_prime=a_prime, acw=a_prime @ cw, acb=a_prime @ cb,
        c_prime=centre @ (i_wl @ b2 + bl),
        g3=xpool.layer_norm3.weight.to(**f64), b3=xpool.layer_norm3.bias.to(**f64),
        eps2=xpool.layer_norm2.eps, eps3=xpool.layer_norm3.eps)
    for name in ("cw", "cb", "a_prime", "acw", "acb", "c_prime", "g3", "b3"):
        setattr(maps, name, getattr(maps, name).to(dtype))
    return maps


@torch.no_grad()
def build_music_index(xpool: XPool | None, music_emb: Tensor, snippets: Tensor, mask: Tensor,
                      block_size: int = 64) -> MusicIndex:
    """Encode every track once: music_emb [Nm, d], snippets [Nm, L, d], mask [Nm, L]."""
    with torch.autocast(music_emb.device.type, enabled=False):  # exact float32 whatever the caller's context
        return _build_music_index(xpool, music_emb, snippets, mask, block_size)


def _build_music_index(xpool: XPool | None, music_emb: Tensor, snippets: Tensor, mask: Tensor,
                       block_size: int) -> MusicIndex:
    music_emb = F.normalize(music_emb.float(), dim=-1)
    if xpool is None:
        return MusicIndex(music_emb, [])
    snippets, mask = snippets.float(), mask.float()
    n_music, length, d = snippets.shape
    maps = _post_pool_maps(xpool, snippets.dtype)
    if xpool.use_mask:
        n_valid = mask.sum(1).long()
        if bool((n_valid == 0).any()):
            bad = torch.nonzero(n_valid == 0).flatten()[:5].tolist()
            raise ValueError(f"tracks without any valid snippet (columns {bad}): X-Pool is undefined")
        # Attention over snippets is order-free: move valid snippets first so that a block
        # only has to cover its longest track.
        within = torch.argsort((mask == 0).to(torch.uint8), dim=1, stable=True)
    else:
        n_valid = torch.full((n_music,), length, dtype=torch.long, device=snippets.device)
        within = None
    order = torch.argsort(n_valid, stable=True)
    blocks = []
    for start in range(0, n_music, block_size):
        cols = order[start:start + block_size]
        n = n_valid[cols]
        blk_len = int(n.max())
        tokens = snippets[cols]
        if within is not None:
            tokens = tokens.gather(1, within[cols, :blk_len, None].expand(-1, -1, d))
        valid = (torch.arange(blk_len, device=n.device)[None, :] < n[:, None]).to(snippets.dtype)
        s = xpool.layer_norm1(tokens) * valid[..., None]
        blocks.append(_index_block(maps, cols, s, valid, music_emb[cols]))
    return MusicIndex(music_emb, blocks)


def _index_block(maps: _PostPoolMaps, cols: Tensor, s: Tensor, valid: Tensor, m: Tensor) -> IndexBlock:
    """Gram matrices and constants of one block of tracks (s: LN1 snippets, zero-padded)."""
    nb, blk_len, d = s.shape
    g3sq = maps.g3 ** 2
    # u_l = C (W' s_l + b') is affine in s_l, so centring u on its valid mean u_bar is centring
    # s: u_l - u_bar = C W' (s_l - s_bar). One GEMM gives u~ and z~ = A' u~.
    s_bar = s.sum(1) / valid.sum(1, keepdim=True)
    both = ((s - s_bar[:, None]) * valid[..., None]) @ torch.cat([maps.cw, maps.acw]).T
    u_t, z_t = both[..., :d], both[..., d:]                         # u~, A' u~
    u_bar = s_bar @ maps.cw.T + maps.cb                             # C (W' s_bar + b')
    x_bar = u_bar @ maps.a_prime.T                                  # A' u_bar
    g3b3 = maps.g3 * maps.b3
    g3m = maps.g3 * m                                               # [Nb, d]
    per_track = torch.stack([x_bar, g3sq * x_bar, g3m], dim=-1)     # [Nb, d, 3]
    shared = torch.stack([maps.c_prime, g3sq * maps.c_prime, g3b3], dim=-1)  # [d, 3]
    z_lin = torch.bmm(z_t, per_track)                               # z~.x_bar, z~.G3^2 x_bar, z~.(g3*m)
    lin = torch.cat([2 * torch.bmm(u_t, u_bar[..., None]), 2 * z_lin[..., :2], z_t @ shared, z_lin[..., 2:]],
                    dim=-1)                                         # [Nb, Lb, 7]
    z_t_t = z_t.transpose(1, 2)
    gram = torch.cat([torch.bmm(u_t, u_t.transpose(1, 2)), torch.bmm(z_t, z_t_t), torch.bmm(z_t * g3sq, z_t_t), lin],
                     dim=-1)
    consts = torch.stack([
        (u_bar * u_bar).sum(-1), (x_bar * x_bar).sum(-1), (x_bar * x_bar * g3sq).sum(-1),
        x_bar @ maps.c_prime, x_bar @ (g3sq * maps.c_prime), x_bar @ g3b3, (x_bar * g3m).sum(-1),
        g3m @ maps.c_prime, m @ maps.b3, (m * m).sum(-1),
    ], dim=-1)
    offset = (1.0 - valid) * _MASKED
    keys = torch.cat([s, offset[..., None]], dim=-1).reshape(nb * blk_len, d + 1).T   # a view: GEMM takes it as is
    return IndexBlock(cols, keys, gram, consts, blk_len)


def auto_chunk_size(n_music: int) -> int:
    """Videos per chunk keeping the per-chunk buffers near 256 MB (float32)."""
    # ~24 floats per (video, track) for the per-pair statistics, ~7 * 64 * 96 per video for
    # the temporaries of one block of 64 full-length tracks.
    return max(16, min(1024, 2 ** 26 // (24 * n_music + 7 * 64 * 96)))


@torch.no_grad()
def score_against_index(xpool: XPool | None, videos: Tensor, index: MusicIndex, mode: str,
                        chunk_size: int = 0) -> Tensor:
    """Test-time retrieval score [Nv, Nm] of videos [Nv, d] (L2-normalised) against an index.

    mode: "dual" (cos(v, m)), "single" (cos(v, P)), "dual+single", or "feature_fuse"
    (cos(v, P + m)). Equals the straightforward XPool forward + cosine (eval mode).
    chunk_size videos are scored at a time (0 = automatic). index.blocks is iterated once per chunk.
    """
    with torch.autocast(videos.device.type, enabled=False):  # exact float32 whatever the caller's context
        return _score_against_index(xpool, videos.float(), index, mode, chunk_size)


def _score_against_index(xpool: XPool | None, videos: Tensor, index: MusicIndex, mode: str,
                         chunk_size: int) -> Tensor:
    chunk_size = chunk_size if chunk_size > 0 else auto_chunk_size(index.num_music)
    out = torch.empty(videos.shape[0], index.num_music, dtype=torch.float32, device=videos.device)
    if index.num_music == 0:
        return out
    maps = _post_pool_maps(xpool, videos.dtype) if xpool is not None else None
    for start in range(0, videos.shape[0], chunk_size):
        v = videos[start:start + chunk_size]
        dual = F.normalize(v, dim=-1) @ index.music_emb.T
        if mode == "dual":
            out[start:start + v.shape[0]] = dual
            continue
        if maps is None:
            raise ValueError(f"score mode {mode!r} needs the X-Pool module")
        single = _score_chunk(xpool, maps, v, index, fuse_music=(mode == "feature_fuse"))
        out[start:start + v.shape[0]] = single + dual if mode == "dual+single" else single
    return out


def _score_chunk(xpool: XPool, maps: _PostPoolMaps, v: Tensor, index: MusicIndex,
                 fuse_music: bool) -> Tensor:
    """Single-tower scores [c, Nm] of a chunk of videos v [c, d]."""
    c, d = v.shape
    attn = xpool.cross_attn
    # Video side. q.(Wk s + bk) = (Wk^T q).s + q.bk and the last term is the same for all
    # snippets of a track, so it cancels in the softmax: the keys are just LN1(S).
    q = attn.q_proj(xpool.layer_norm1(v)) @ attn.k_proj.weight / math.sqrt(d)
    w = maps.g3 * v                                                  # g3 * v
    g = w @ maps.acw                                                 # (A' C W')^T w
    k_v = w @ maps.acb                                               # w . A' C b'
    ones = torch.ones(c, 1, dtype=v.dtype, device=v.device)
    lhs = torch.cat([torch.cat([q, ones], 1), torch.cat([g, 0 * ones], 1)], 0)  # [2c, d+1]

    # Per pair: three quadratic forms, seven linear forms and (g3*v).x, rows in block order.
    n_music = index.num_music
    quad = torch.empty(n_music, c, 3, dtype=v.dtype, device=v.device)
    lin = torch.empty(n_music, c, 7, dtype=v.dtype, device=v.device)
    lin_v = torch.empty(n_music, c, dtype=v.dtype, device=v.device)
    consts = torch.empty(n_music, 10, dtype=v.dtype, device=v.device)
    columns, row = [], 0
    for blk in index.blocks:
        nb, blk_len = blk.gram.shape[0], blk.length
        rows = slice(row, row + nb)
        if row + nb > n_music:
            raise ValueError(f"the index blocks hold more tracks than its {n_music} music embeddings")
        prod = lhs @ blk.keys                                         # [2c, Nb*Lb]
        a = torch.softmax(prod[:c].view(c, nb, blk_len), dim=-1)
        lin_v[rows] = torch.linalg.vecdot(prod[c:].view(c, nb, blk_len), a).T
        a_t = a.transpose(0, 1).contiguous()                          # [Nb, c, Lb]
        forms = torch.bmm(a_t, blk.gram)                              # [Nb, c, 3Lb+7]: a^T G, a^T lin
        lin[rows] = forms[..., 3 * blk_len:]
        # a^T G a for the three Gram blocks: batched mat-vec products, no temporaries.
        quad[rows] = (forms[..., :3 * blk_len].view(nb, c, 3, blk_len) @ a_t.unsqueeze(-1)).squeeze(-1)
        consts[rows] = blk.consts
        columns.append(blk.columns)
        row += nb
    if row != n_music:
        raise ValueError(f"the index blocks hold {row} tracks for {n_music} music embeddings")
    columns = torch.cat(columns)

    lin += consts[:, None, :7]
    q1, q2, q3 = (quad[..., i] + lin[..., i] for i in range(3))     # |o_c|^2, |x|^2, x^T G3^2 x
    l1, l2, l3, l4 = (lin[..., i] for i in range(3, 7))              # c'.x, (G3^2 c').x, (g3*b3).x, (g3*m).x
    inv_s = torch.rsqrt(q1 / d + maps.eps2)                           # 1 / s_o
    zz = q2 * inv_s ** 2 + 2 * l1 * inv_s + maps.c_prime @ maps.c_prime                  # |z~|^2
    inv_t = torch.rsqrt(zz / d + maps.eps3)                                              # 1 / s_z
    zgz = q3 * inv_s ** 2 + 2 * l2 * inv_s + (maps.g3 ** 2 * maps.c_prime) @ maps.c_prime  # z~^T G3^2 z~
    gbz = l3 * inv_s + (maps.g3 * maps.b3) @ maps.c_prime                                # (g3*b3).z~
    pp = inv_t ** 2 * zgz + 2 * inv_t * gbz + maps.b3 @ maps.b3                          # |P|^2
    vp = inv_t * ((lin_v + k_v) * inv_s + w @ maps.c_prime) + v @ maps.b3                # v.P
    if fuse_music:                                                    # cos(v, P + m)
        pm = inv_t * (l4 * inv_s + consts[:, 7:8]) + consts[:, 8:9]   # P.m
        vp = vp + index.music_emb[columns] @ v.T
        pp = pp + 2 * pm + consts[:, 9:10]
    score = vp / (v.norm(dim=-1).clamp_min(1e-12) * pp.clamp_min(0).sqrt().clamp_min(1e-12))
    out = torch.empty(c, n_music, dtype=v.dtype, device=v.device)
    out[:, columns] = score.T
    return out
