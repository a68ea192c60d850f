"""Scoring a query against a library, shortlists and the detector on (video, track) pairs.

Two-stage retrieval (large libraries). Exhaustive X-Pool scoring costs O(tracks x snippets x d)
per query. `shortlist=K` first ranks the whole library by the dual-tower cosine v.m (one matrix
product; faiss IndexFlatIP when installed, same exact result) and then re-scores only those K
tracks with the same score function as the exhaustive path. Default (shortlist=None):
exhaustive up to AUTO_SHORTLIST_ABOVE tracks, K = AUTO_SHORTLIST_K above; shortlist=0 forces
exhaustive. The dual cosine is a good proxy because it is one of the two summed terms and the
X-Pool term pools the same snippet tokens; `scripts/benchmark.py --sections grounding`
measures how often it keeps the exhaustive top-1/top-10.
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch

from model.spans import foreground_index, spans_to_seconds, top_moment
from utils.evaluate.metrics import clip_moments
from utils.ground.library import MusicLibrary, block_ranges, keys_from_storage, masked_offset, to_tensor
from utils.ground.model import GroundingError, GroundingModel

# Measured with `scripts/benchmark.py --sections grounding` (1 CPU thread, float16 index): one
# exhaustive query costs ~0.05 ms of CPU per track (20k: ~1 s, 100k: ~5 s); a K=1000 shortlist
# ~0.15-0.25 s at any size and kept the exhaustive top-10 of every benchmark query (K=100: top-1
# always, top-10 set 93 % at 100k).
AUTO_SHORTLIST_ABOVE = 20_000
AUTO_SHORTLIST_K = 1000
DETECT_CHUNK = 256       # (video, track) pairs per detector call


# --------------------------------------------------------------------------------------------
# Scoring


def _music_index(music_emb: torch.Tensor, blocks: list) -> Any:
    from model.xpool import MusicIndex
    return MusicIndex(music_emb, blocks)


def _assemble_block(library: MusicLibrary, pos: np.ndarray, columns: torch.Tensor, device: torch.device) -> Any:
    """The tracks at block-order positions `pos` as ONE model IndexBlock, re-padded to their longest
    stored length: padded snippets get zero Gram rows/columns and masked keys, which the scorer
    weights by exactly 0, so every track keeps its stored numbers."""
    from model.xpool import IndexBlock
    _, block_of = library._positions()
    blk_id = block_of[pos]
    blk = library.blocks[blk_id]                                   # [k, 5] BLOCK_COLUMNS
    within, lb = pos - blk[:, 0], blk[:, 2]
    length, k = int(lb.max()), len(pos)
    # keys: track t's Lb_t stored columns -> columns t*length .. t*length+Lb_t; the rest masked.
    keys = np.zeros((k * length, library.keys.shape[1]), dtype=np.float32)
    keys[:, -1] = masked_offset()
    keys[np.repeat(np.arange(k) * length, lb) + block_ranges(lb)] = \
        library.keys[np.repeat(blk[:, 3] + within * lb, lb) + block_ranges(lb)]
    keys_from_storage(torch.from_numpy(keys), library.keys.dtype)   # in place: -inf -> the mask offset
    # gram [Lb, 3*Lb+7] -> [length, 3*length+7]: Gram sub-block s column c -> s*length + c.
    gram = np.zeros((k, length, 3 * length + 7), dtype=np.float32)
    order = np.argsort(blk_id, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(blk_id[order]) != 0])
    for group in np.split(order, starts[1:]):   # one copy per stored block, not per track
        first, nb, b, _, gram_start = library.blocks[blk_id[group[0]]].tolist()
        src = library.gram[gram_start: gram_start + nb * b * (3 * b + 7)].reshape(nb, b, 3 * b + 7)
        within_block = pos[group] - first
        if not np.array_equal(within_block, np.arange(nb)):  # part of the block: gather those tracks
            src = src[within_block]
        for s_ in range(3):
            gram[group, :b, s_ * length: s_ * length + b] = src[:, :, s_ * b: (s_ + 1) * b]
        gram[group, :b, 3 * length:] = src[:, :, 3 * b:]
    consts = np.asarray(library.block_consts[pos], dtype=np.float32)
    return IndexBlock(columns.to(device), torch.from_numpy(keys).to(device).T, torch.from_numpy(gram).to(device),
                      torch.from_numpy(consts).to(device), length)


class _StoredBlocks:
    """The stored X-Pool blocks as the model's IndexBlocks, materialised one at a time while
    model.score_videos iterates over them: one call scores the whole library (its per-call set-up
    is paid once), float32 blocks are zero-copy views of the memory map, and a float16 index is
    converted a block at a time (bounded memory). Columns are library rows, so the scores come
    back in library order. (Merging stored blocks into bigger ones was measured: the re-padding
    copies cost more than the scorer's per-block overhead they save.)"""

    def __init__(self, library: MusicLibrary, device: torch.device):
        self.library, self.device = library, device

    def __len__(self) -> int:
        return len(self.library.blocks)

    def __iter__(self) -> Iterator[Any]:
        from model.xpool import IndexBlock
        lib, dev = self.library, self.device
        for first, nb, lb, key_start, gram_start in lib.blocks.tolist():
            keys = keys_from_storage(to_tensor(lib.keys[key_start: key_start + nb * lb], dev), lib.keys.dtype).T
            gram = to_tensor(lib.gram[gram_start: gram_start + nb * lb * (3 * lb + 7)], dev)
            consts = to_tensor(lib.block_consts[first: first + nb], dev)
            cols = torch.from_numpy(lib.block_rows[first: first + nb]).to(dev)
            yield IndexBlock(cols, keys, gram.view(nb, lb, 3 * lb + 7), consts, lb)


@torch.no_grad()
def exhaustive_scores(gm: GroundingModel, library: MusicLibrary, v: torch.Tensor) -> torch.Tensor:
    """[B, N] scores of every query against every track: model.score_videos on the stored index
    (the same blocks index_music builds for the whole library, so test.py's numbers)."""
    blocks = _StoredBlocks(library, gm.device) if library.has_xpool else []
    index = _music_index(library.music_emb().to(gm.device), blocks)
    return gm.model.score_videos(v, index, v.shape[0]).float()


def select_tracks(library: MusicLibrary, rows: np.ndarray, device: torch.device,
                  block_size: int = 64) -> Any:
    """The model's MusicIndex of just `rows` (columns in that order), gathered from the stored
    blocks: no re-encoding, the same numbers as the exhaustive path. The selected tracks are
    sorted by stored length and cut into blocks of block_size, so re-padding stays small."""
    rows = np.asarray(rows, dtype=np.int64)
    emb = library.music_emb()[torch.from_numpy(rows)].to(device)
    if not library.has_xpool:
        return _music_index(emb, [])
    position, block_of = library._positions()
    pos = position[rows]
    by_length = np.argsort(library.blocks[block_of[pos], 2], kind="stable")
    blocks = [_assemble_block(library, pos[part], torch.from_numpy(part), device)
              for part in np.split(by_length, range(block_size, len(rows), block_size))]
    return _music_index(emb, blocks)


def _faiss():
    try:
        import faiss  # optional: exact inner-product search over the global embeddings
        return faiss
    except ImportError:
        return None


@torch.no_grad()
def shortlist(library: MusicLibrary, v: torch.Tensor, k: int) -> np.ndarray:
    """[B, k] rows with the highest dual-tower cosine v.m (both L2-normalised)."""
    k = min(k, len(library))
    emb = library.music_emb()
    vv = torch.nn.functional.normalize(v.float().cpu(), dim=-1)
    faiss = _faiss()
    if faiss is not None:
        if library._faiss_index is None:
            library._faiss_index = faiss.IndexFlatIP(emb.shape[1])
            library._faiss_index.add(np.ascontiguousarray(emb.numpy()))
        return library._faiss_index.search(np.ascontiguousarray(vv.numpy()), k)[1].astype(np.int64)
    return (vv @ emb.T).topk(k, dim=1).indices.numpy()


@torch.no_grad()
def two_stage_scores(gm: GroundingModel, library: MusicLibrary, v: torch.Tensor,
                     k: int) -> tuple[np.ndarray, torch.Tensor]:
    """(rows [B, K] ascending, scores [B, K]): each query's shortlist re-scored by
    model.score_videos on that query's own K tracks (the exhaustive score function)."""
    rows = np.sort(shortlist(library, v, k), axis=1)  # ascending rows: ties resolve as in exhaustive
    scores = torch.stack([gm.model.score_videos(v[b: b + 1], select_tracks(library, rows[b], gm.device), 1)[0]
                          for b in range(v.shape[0])])
    return rows, scores.float()


def top_by_score(scores: torch.Tensor, rows: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, the k best (row, score), ties broken by the lower row (= test.py's column order)."""
    s = scores.double().cpu().numpy()
    if not np.isfinite(s).all():  # a NaN score never ranks: its track would vanish silently
        raise GroundingError("the index gives NaN/inf scores for some tracks: its token, key or Gram arrays are "
                             "damaged; rebuild it with scripts/build_music_index.py")
    cols = np.broadcast_to(np.arange(s.shape[1]), s.shape) if rows is None else rows
    k = min(k, s.shape[1])
    top_rows = np.empty((s.shape[0], k), dtype=np.int64)
    top_scores = np.empty((s.shape[0], k), dtype=np.float64)
    for b in range(s.shape[0]):
        cand = np.argpartition(-s[b], k - 1)[:k] if k < s.shape[1] else np.arange(s.shape[1])
        cand = np.nonzero(s[b] >= s[b, cand].min())[0]   # everything tied with the k-th too
        order = np.lexsort((cols[b, cand], -s[b, cand]))[:k]
        top_rows[b], top_scores[b] = cols[b, cand[order]], s[b, cand[order]]
    return top_rows, top_scores


# --------------------------------------------------------------------------------------------
# Detection


@torch.no_grad()
def detect_pairs(gm: GroundingModel, library: MusicLibrary, Fv: torch.Tensor, frame_mask: torch.Tensor,
                 v: torch.Tensor, query: np.ndarray, rows: np.ndarray,
                 frame_feats: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Moments (seconds, clipped to each track) and foreground probabilities of (query, row) pairs.
    frame_feats (the queries' CLIP frames) is needed by a --moment_head boundary model."""
    head = getattr(gm.model, "boundary_head", None)
    if head is not None and (library.tracks.head_keys is None or frame_feats is None):
        raise GroundingError(f"{library.path}: a --moment_head boundary model needs an index with its music "
                             "keys and the query's frames: rebuild the index with scripts/build_music_index.py")
    if gm.model.cfg.moment_query_type == "xpool":
        raise GroundingError("--moment_query_type xpool depends on the other videos of a batch; "
                             "the grounding tools support the paper's 'video' (and music/zero) queries")
    fg = foreground_index(gm.args)
    se_all, conf_all = [], []
    for lo in range(0, len(rows), DETECT_CHUNK):
        q = torch.from_numpy(query[lo: lo + DETECT_CHUNK]).to(gm.device)
        # --predict_center 1 and the boundary head need the video length: 1 frame per second.
        if head is not None:
            keys, mask = library.tracks.get_head_keys(rows[lo: lo + DETECT_CHUNK], gm.device)
            det = head.from_keys(head.video_keys(frame_feats[q]), frame_mask[q], keys, mask,
                                 v_duration=frame_mask[q].sum(1))
        else:
            m, sm, mask = library.tracks.get(rows[lo: lo + DETECT_CHUNK], gm.device)
            det = gm.model.detect(Fv[q], frame_mask[q], sm, mask, v[q], m, v_duration=frame_mask[q].sum(1))
        span, prob = top_moment(det, fg)
        se_all.append(spans_to_seconds(span, gm.max_m_duration).double().cpu().numpy())
        conf_all.append(prob.double().cpu().numpy())
    se = np.concatenate(se_all) if se_all else np.zeros((0, 2))
    conf = np.concatenate(conf_all) if conf_all else np.zeros(0)
    return clip_moments(se, library.durations[rows], gm.max_m_duration), conf
