"""MaDe: music grounding by short video (the authors' Uni_model, xxayt/MGSV model/model_Uni.py), top to bottom.

    frames  --video_encoder-->  v [B, d] (global), Fv [B, 50, d] (frame tokens)
    snippets --music_encoder--> m [B, d] (global), Sm [B, 96, d] (snippet tokens)
    retrieval: dual cos(v_i, m_j) and single cos(v_i, XPool(v_i, Sm_j)) for all pairs
    detection: DETR over [Fv ; Sm] with one query whose content is v -> (center, width)
               (or, opt-in, --moment_head boundary: start logits over the snippets; boundary_head.py)

Module names follow the authors' checkpoints where that reads fine (see
checkpoint_compat.py for the few renamed prefixes).
"""
from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


from .boundary_head import BoundaryHead
from .config_flags import config_values
from .transformer import MLP, Transformer
from .encoders import TemporalEncoder
from .losses import build_criterion  # noqa: F401  (the model's API: build_model and build_criterion)
from .position import sine_positions_1d
from .xpool import MusicIndex, XPool, build_music_index, score_against_index, single_similarity

# vmr_loss -> how the test-time retrieval score is formed (as in the authors' model/model_Uni.py).
SCORE_MODES = {
    "dual": "dual",
    "single": "single",
    "dual_single_loss_fuse": "dual+single",
    "dual_single_sim_fuse": "dual+single",
    "dual_single_feature_fuse": "feature_fuse",
}


@dataclass
class MaDeConfig:
    """Model hyper-parameters; defaults = the authors' training script (paper configuration)."""
    video_dim: int = 512                 # CLIP ViT-B/32 image embedding
    music_dim: int = 768                 # AST embedding
    d_model: int = 256                   # --dim_input
    video_pe_len: int = 250              # --video_attention_seqlen
    music_pe_len: int = 300              # hard-coded in the original
    agg_module: str = "transf"
    video_depth: int = 1
    music_depth: int = 1
    temporal_heads: int = 8
    temporal_dropout: float = 0.8        # the original's r_enc (fix flag --temporal_dropout)
    residual_from_input: bool = False    # fix flag
    with_cls_token: bool = False
    act_after_proj: bool = False
    share_temporal: bool = False         # --transformer_is_share
    vmr_fusion: str = "XA-music"         # "XA-music" (X-Pool) or "NO"
    vmr_loss: str = "dual_single_loss_fuse"
    fusion_mask: bool = True
    temperature_init: float = 0.03
    mml_localization: str = "detr"       # "detr" or "regression"
    moment_query_type: str = "video"
    num_queries: int = 1
    predict_center: bool = False
    max_m_duration: float = 240.0
    detr_nheads: int = 8
    detr_ffn: int = 1024
    detr_dropout: float = 0.1
    enc_layers: int = 2
    dec_layers: int = 6
    pre_norm: bool = False
    decoder_self_attn: bool = True       # always on in the original (fix flag --decoder_SA_fix)
    aux_loss: bool = True
    contrastive_align: bool = True
    contrastive_dim: int = 256
    separate_positions: bool = False     # fix flag
    moment_head: str = "detr"            # "detr" (paper) or "boundary" (opt-in, model/boundary_head.py)
    stride: float = 2.5                  # seconds between music snippets (the boundary head's grid)
    foreground: int = 0                  # class index of "foreground" in pred_logits (--fb_label)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "MaDeConfig":
        """The configuration of parsed flags, through model/config_flags.py's table."""
        defaults = cls()
        # Converted to each field's type: the 0/1 flags become bools, --stride a float.
        return cls(**{name: type(getattr(defaults, name))(value) for name, value in config_values(args).items()})

    def replace(self, **changes) -> "MaDeConfig":
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(changes)
        return MaDeConfig(**values)


class MaDe(nn.Module):
    def __init__(self, cfg: MaDeConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or MaDeConfig()
        # Set by the training setup under torchrun (unless --local_negatives 1): the differentiable
        # all-gather (utils/train/distributed.gather_with_grad) and this process's rank. The
        # training forward then computes the retrieval similarities over the global batch.
        self.gather_negatives: Callable[[Tensor], Tensor] | None = None
        self.negatives_rank = 0
        d = cfg.d_model
        temporal = dict(agg_module=cfg.agg_module, heads=cfg.temporal_heads, dropout=cfg.temporal_dropout,
                        residual_from_input=cfg.residual_from_input, act_after_proj=cfg.act_after_proj,
                        with_cls_token=cfg.with_cls_token)
        self.video_encoder = TemporalEncoder(cfg.video_dim, d, cfg.video_pe_len, depth=cfg.video_depth, **temporal)
        shared = self.video_encoder.transformer if cfg.share_temporal else None
        self.music_encoder = TemporalEncoder(cfg.music_dim, d, cfg.music_pe_len, depth=cfg.music_depth,
                                             shared_transformer=shared, **temporal)

        # Retrieval: X-Pool ("XA-music") and the shared learnable temperature.
        self.xpool = XPool(d, use_mask=cfg.fusion_mask) if cfg.vmr_fusion == "XA-music" else None
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / cfg.temperature_init)))

        # Detection.
        if cfg.moment_head == "boundary":   # replaces the whole DETR detector
            self.boundary_head = BoundaryHead(cfg.video_dim, cfg.music_dim, cfg.stride, cfg.max_m_duration,
                                              foreground=cfg.foreground)
            return
        self.transformer = Transformer(d, cfg.detr_nheads, cfg.enc_layers, cfg.dec_layers, cfg.detr_ffn,
                                       cfg.detr_dropout, cfg.pre_norm, cfg.decoder_self_attn)
        # Positional query; N(0, 1) and, in the original, in no optimiser group (frozen).
        self.decoder_query_embed = nn.Embedding(cfg.num_queries, d)
        span_out = 1 if cfg.predict_center else 2
        if cfg.mml_localization == "detr":
            self.class_embed = nn.Linear(d, 2)  # foreground / background
            self.span_embed = MLP(d, d, span_out, 3)
            if cfg.contrastive_align:
                self.contrastive_align_projection_query = nn.Linear(d, cfg.contrastive_dim)
                self.contrastive_align_projection_vid = nn.Linear(d, cfg.contrastive_dim)
        else:  # "regression": pooled encoder memory -> MLP (unused by the paper)
            self.moment_embed = MLP(d, d, span_out, 3)

    # ------------------------------------------------------------------ encoders
    def encode_video(self, frame_feats: Tensor, frame_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[B, Lv, 512], [B, Lv] -> (v [B, d] L2-normalised, Fv [B, Lv, d] padded rows 0)."""
        return self.video_encoder(frame_feats, frame_mask)

    def encode_music(self, music_feats: Tensor, music_mask: Tensor) -> tuple[Tensor, Tensor]:
        """[B, Lm, 768], [B, Lm] -> (m [B, d] L2-normalised, Sm [B, Lm, d] padded rows 0)."""
        return self.music_encoder(music_feats, music_mask)

    # ------------------------------------------------------------------ retrieval
    def retrieval_similarities(self, v: Tensor, m: Tensor, Sm: Tensor, music_mask: Tensor) -> dict:
        """All pairs of v [Nv, d] and tracks (m [Nm, d], Sm [Nm, L, d]) -> {"dual", "single"} [Nv, Nm]."""
        pooled = self.xpool(v, Sm, music_mask) if self.xpool is not None else None
        return self._similarities(v, m, pooled)

    def _similarities(self, v: Tensor, m: Tensor, pooled: Tensor | None) -> dict:
        dual = F.normalize(v, dim=-1) @ F.normalize(m, dim=-1).T
        single = None
        if pooled is not None:
            if self.cfg.vmr_loss == "dual_single_feature_fuse":
                pooled = 0.5 * (pooled + m[:, None, :])  # the test-time P + m has the same cosine
            single = single_similarity(v, pooled)
        return {"dual": dual, "single": single}

    def retrieval_score(self, sims: dict) -> Tensor:
        """Test-time score from retrieval_similarities' output, per --vmr_loss (see SCORE_MODES)."""
        mode = SCORE_MODES[self.cfg.vmr_loss]
        if mode == "dual":
            return sims["dual"]
        if mode == "dual+single":
            return sims["dual"] + sims["single"]
        return sims["single"]

    @torch.no_grad()
    def index_music(self, m: Tensor, Sm: Tensor, music_mask: Tensor, block_size: int = 64) -> MusicIndex:
        """Prepare every track once for score_videos (exact, eval-mode X-Pool)."""
        return build_music_index(self.xpool, m, Sm, music_mask, block_size)

    @torch.no_grad()
    def score_videos(self, v: Tensor, index: MusicIndex, chunk_size: int = 0) -> Tensor:
        """Test-time retrieval score [Nv, Nm] of v [Nv, d] against all indexed tracks,
        chunk_size videos at a time (0 = automatic, ~256 MB of buffers); equals
        retrieval_score(retrieval_similarities(...)) in eval mode."""
        return score_against_index(self.xpool, v, index, SCORE_MODES[self.cfg.vmr_loss], chunk_size)

    # ------------------------------------------------------------------ detection
    def detect(self, Fv: Tensor, frame_mask: Tensor, Sm: Tensor, music_mask: Tensor, v: Tensor, m: Tensor,
               query_content: Tensor | None = None, v_duration: Tensor | None = None,
               frame_feats: Tensor | None = None, music_feats: Tensor | None = None,
               loss_heads: bool = True) -> dict:
        """Moment detection on (video, its music) pairs.

        Returns pred_logits [B, Q, 2], pred_spans [B, Q, 2] (center, width) in (0, 1) of
        max_m_duration, aux_outputs (one dict per earlier decoder layer), and, with the
        contrastive heads, proj_queries [B, Q, c] and proj_vid_mem [B, Lv, c].
        query_content [B, d] is needed for --moment_query_type xpool; v_duration [B] (seconds)
        for --predict_center 1. The boundary head reads the input features instead of the tokens
        (frame_feats [B, Lv, 512], music_feats [B, Lm, 768]) and needs v_duration.
        loss_heads=False leaves out the contrastive projections (read by the losses only).
        """
        cfg = self.cfg
        if cfg.moment_head == "boundary":
            if v_duration is None or frame_feats is None or music_feats is None:
                raise ValueError("--moment_head boundary needs v_duration (the moment lasts as long as the "
                                 "video) and the input features (it reads them directly)")
            return self.boundary_head(frame_feats, frame_mask, music_feats, music_mask, v_duration)
        src = torch.cat([Fv, Sm], dim=1)
        mask = torch.cat([frame_mask, music_mask], dim=1).to(src.dtype)
        if cfg.separate_positions:
            pos = torch.cat([sine_positions_1d(frame_mask, cfg.d_model),
                             sine_positions_1d(music_mask, cfg.d_model)], dim=1)
        else:  # original: one position axis over the concatenated mask (model_Uni.py)
            pos = sine_positions_1d(mask, cfg.d_model)
        pos = pos.to(src.dtype)
        batch = src.shape[0]

        if cfg.mml_localization == "regression":
            memory = self.transformer.encoder(src, mask == 0, pos)
            # As the original: the sum includes padded tokens, divided by the valid count.
            pooled = memory.sum(1) / mask.sum(1, keepdim=True)
            spans = self._spans(self.moment_embed(pooled)[:, None, :], v_duration)
            return {"pred_logits": torch.zeros(batch, 1, 2, dtype=src.dtype, device=src.device),
                    "pred_spans": spans, "aux_outputs": []}

        content = self._query_content(v, m, query_content).to(src.dtype)
        query_pos = self.decoder_query_embed.weight.unsqueeze(0).expand(batch, -1, -1)
        hs, _ = self.transformer(src, mask, content, query_pos, pos)         # [layers, B, Q, d]
        logits = self.class_embed(hs)
        spans = self._spans(self.span_embed(hs), v_duration)
        per_layer = [{"pred_logits": logits[i], "pred_spans": spans[i]} for i in range(hs.shape[0])]
        if cfg.contrastive_align and loss_heads:
            proj_queries = F.normalize(self.contrastive_align_projection_query(hs), dim=-1)
            # Over all frame tokens, padding included (as the original; padded rows are 0).
            proj_vid_mem = F.normalize(self.contrastive_align_projection_vid(Fv), dim=-1)
            for i, out in enumerate(per_layer):
                out.update(proj_queries=proj_queries[i], proj_vid_mem=proj_vid_mem)
        final = per_layer[-1]
        final["aux_outputs"] = per_layer[:-1] if cfg.aux_loss else []
        return final

    def _query_content(self, v: Tensor, m: Tensor, query_content: Tensor | None) -> Tensor:
        kind = self.cfg.moment_query_type
        if kind == "video":
            content = v
        elif kind == "music":
            content = m
        elif kind == "xpool":
            if query_content is None:
                raise ValueError("moment_query_type 'xpool' needs query_content (mean X-Pool embedding)")
            content = query_content
        else:  # "zero" and "random" are both zeros in the original
            content = torch.zeros_like(v)
        return content[:, None, :].expand(-1, self.cfg.num_queries, -1)

    def _spans(self, raw: Tensor, v_duration: Tensor | None) -> Tensor:
        if not self.cfg.predict_center:
            return raw.sigmoid()
        if v_duration is None:
            raise ValueError("--predict_center 1 needs v_duration (the width is the video length)")
        center = raw[..., 0].sigmoid()
        width = (v_duration.to(raw.dtype) / self.cfg.max_m_duration)[:, None].expand_as(center)
        return torch.stack([center, width], dim=-1)

    # ------------------------------------------------------------------ full forward
    def forward(self, batch: dict, losses: bool = True) -> dict:
        """batch from utils.data.dataset.collate_fn -> embeddings, in-batch similarities, detection.

        losses=False (an evaluation without a criterion) skips what only the losses read: the
        in-batch similarities (X-Pool over all B x B pairs; "similarities" is None) and the
        contrastive-alignment projections. Everything else is computed exactly as with losses."""
        v, Fv = self.encode_video(batch["frame_feats"], batch["frame_mask"])
        m, Sm = self.encode_music(batch["music_feats"], batch["music_mask"])
        # Training under torchrun: the retrieval loss sees the global batch (see _global_similarities).
        global_batch = self.gather_negatives is not None and torch.is_grad_enabled()
        pooled = None
        if self.xpool is not None and ((losses and not global_batch) or self.cfg.moment_query_type == "xpool"):
            pooled = self.xpool(v, Sm, batch["music_mask"])
        # (--moment_query_type xpool: the mean over the LOCAL batch's videos, also under torchrun.)
        query_content = pooled.mean(dim=1) if self.cfg.moment_query_type == "xpool" else None
        detection = self.detect(Fv, batch["frame_mask"], Sm, batch["music_mask"], v, m,
                                query_content=query_content, v_duration=batch.get("v_duration"),
                                frame_feats=batch["frame_feats"], music_feats=batch["music_feats"],
                                loss_heads=losses)
        sims = None
        if losses:
            sims = (self._global_similarities(v, m, Sm, batch["music_mask"]) if global_batch
                    else self._similarities(v, m, pooled))
        return {"video_emb": v, "music_emb": m, "frame_tokens": Fv, "snippet_tokens": Sm,
                "similarities": sims, "detection": detection, "logit_scale": self.logit_scale}

    def _global_similarities(self, v: Tensor, m: Tensor, Sm: Tensor, music_mask: Tensor) -> dict:
        """This rank's blocks of the global in-batch similarity matrices (B = world x b pairs).

        Rows: local videos x all tracks [b, B]; columns: all videos x local tracks [B, b]. The
        embeddings, snippet tokens and masks of the other ranks are all-gathered with gradients,
        so the mean over ranks of the per-rank losses, with DDP's gradient averaging, has the
        gradient of the one-process loss over the global batch (model/losses.clip_loss).
        Cost per rank: X-Pool on 2*b*B pairs instead of b*b (the diagonal block twice), and
        the gathered snippet tokens [B, L, d] with their LN/K/V activations.
        """
        gathered = [self.gather_negatives(x) for x in (v, m, Sm, music_mask)]
        return self.block_similarities((v, m, Sm, music_mask), gathered, self.negatives_rank * v.shape[0])

    def block_similarities(self, local: tuple[Tensor, ...], gathered: list[Tensor] | tuple[Tensor, ...],
                           offset: int) -> dict:
        """Row and column blocks from local (v, m, Sm, mask) and the global batch's; offset = the
        position of the local pairs in the global batch (a pure function: tests simulate ranks)."""
        v, m, Sm, mask = local
        v_all, m_all, Sm_all, mask_all = gathered
        pooled_rows = self.xpool(v, Sm_all, mask_all) if self.xpool is not None else None  # [B, b, d]
        pooled_cols = self.xpool(v_all, Sm, mask) if self.xpool is not None else None      # [b, B, d]
        rows, cols = self._similarities(v, m_all, pooled_rows), self._similarities(v_all, m, pooled_cols)
        return {"dual": rows["dual"], "single": rows["single"], "dual_cols": cols["dual"],
                "single_cols": cols["single"], "offset": offset}

    # ------------------------------------------------------------------ optimisation
    def param_groups(self, args: argparse.Namespace) -> list[dict]:
        """The original's three Adam groups (train-MaDe.py, prep_optimizer): temporal, matching, detection.

        decoder_query_embed is in no group (never updated) unless --train_query_pos 1.
        """
        temporal = _unique(list(self.video_encoder.parameters()) + list(self.music_encoder.parameters()))
        matching = (list(self.xpool.parameters()) if self.xpool is not None else []) + [self.logit_scale]
        detection = [p for name, p in self.named_parameters()
                     if not name.startswith(("video_encoder.", "music_encoder.", "xpool.", "logit_scale",
                                             "decoder_query_embed."))]
        if args.train_query_pos and hasattr(self, "decoder_query_embed"):
            detection.append(self.decoder_query_embed.weight)
        return [{"name": "temporal", "params": temporal, "lr": args.matching_lr},
                {"name": "matching", "params": matching, "lr": args.matching_lr},
                {"name": "detection", "params": detection, "lr": args.detection_lr}]


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


def count_trainable_parameters(model: nn.Module) -> int:
    """Trainable parameters, shared tensors counted once (default MaDe: 10,534,917)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build_model(args: argparse.Namespace) -> MaDe:
    """MaDe for a parsed namespace (utils.train.options.parse_args)."""
    return MaDe(MaDeConfig.from_args(args))
