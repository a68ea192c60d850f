"""Write a small synthetic MGSV-EC-like dataset (CSVs + per-id features) for demos and tests.

    python scripts/make_demo_data.py --out demo [--num_music 200 --num_videos 2000
        --val_size 200 --test_size 200 --seed 0 --stride 2.5]

Layout written (same as the real data, so every code path is exercised):

    OUT/dataset/MGSV-EC/{train,val,test}_data.csv            16 columns, 3-decimal times
    OUT/features/Kuai_feature/vit_feature1/{vit_feature,vit_mask}/<video_id>.pt
    OUT/features/Kuai_feature/ast_feature2p5/{ast_feature,ast_mask}/<music_id>.pt
    OUT/demo_data.json                                       the generation settings

How the signal is built (so that a model has to use both modalities):
  * Each track j has a latent trajectory z_j(t) in R^D (D = 32): a constant track
    identity c_j plus a time-varying part s_j(t), z_j(t) = 0.6 c_j + 0.8 s_j(t), unit
    variance per dimension. s_j(t) is mostly (80 % of its variance, --section_share)
    piecewise constant: the track is cut into sections of 8-24 s, each with its own random
    vector, as songs are made of intros, verses and choruses that sound different; the
    rest is smooth (a sum of random sinusoids with periods of 8-60 s). A moment therefore
    sounds like the sections it covers and not like the rest of its track, which is what
    lets a model find it (and what X-Pool's video-guided pooling is for).
  * Music snippet k (window centre 2.5k s, 10 s window, clipped to the track) is an
    "AST-like" 768-d vector: a shared mean + the window average of z_j mapped by a fixed
    random matrix W_m (D -> 768) + noise. mask_k = 1 iff centre <= duration (as the
    authors' features). Padded windows hold a constant "silence" vector, as real files hold the AST
    output for zero audio; the loader zeroes them.
  * A video of duration d, paired with moment [s, s + d] of track j, has one frame per
    second (floor(video_end) + 1 frames, at most 50). Frame i is "CLIP-like": a shared
    mean + 0.45 W_v z_j(s + t_i) (W_v: fixed random D -> 512) + a per-video nuisance
    vector (std 1) + per-frame noise (std 1.5), scaled to norm ~10 like CLIP image
    embeddings. Padded frames hold a constant "black frame" vector.
  Retrieval therefore needs the video content (the nuisance and noise hide the track
  identity from any single frame, averaging helps), and localisation needs temporal
  alignment: another moment of the same track has a different s_j(t). Difficulty, with
  the defaults: a ridge-regression probe (mean frame -> mean snippet) gets R1 ~64 % over
  the 200 test tracks (chance 0.5 %); a small cross-correlation model (two linear maps,
  frame i scored against the snippet at music time start + i; see
  tests/test_demo_data.py) trained for 4 epochs localises the val moments with mIoU 0.85,
  versus 0.51 for the "start at 0, video length" prior. --video_signal scales the 0.45
  (lower = harder); --section_share 0 gives the earlier, purely smooth s_j(t).

Canonical clips (as MGSV-EC has them). On the real data a track is used with one canonical
clip: most videos of a track take the same cut, trimmed to their own length (66.8 % of the
real test videos start within 0.01 s of the val moment of the same track, 80.7 % within 1 s;
`python -m utils.evaluate --stats` measures it). So each track gets a canonical start (42 %
in its first second, 28 % at 0; the others at the real deciles of start / track length), and
every video, val and test included, takes it with probability --canonical_share (0.8; most
exactly, some within 0.75 s), else a start of its own as below. The canonical clip is also
audible: from the canonical start on, for --hook_length s, the track's latent carries a "hook"
vector shared by all tracks (weight --hook_strength), as a chorus would, so that it can be
found from the music of a track never seen in training. --canonical_share 0 gives data with
no canonical clips (and no hook): every moment drawn on its own.

Splits: a quarter of the tracks (--unseen_share) gets no training video, so that val/test
hold tracks never seen in training; every other track gets training videos (num_videos in
total, >= 1 per track, several per track on average; off their canonical clip, ~30 % re-use
an earlier moment of the same track). val and test each pick val_size / test_size distinct
tracks with one new video each (one-to-one like the real splits), drawn independently from
all tracks, so they overlap each other and mostly overlap the training tracks. Videos never
repeat across splits.

Statistics follow the real val/test CSVs (tests/test_track_prior.py checks them with the
stats tool): videos 5-49.5 s (median ~20 s), tracks 30-240 s (< 240), moment length = video
length, ~37 % of moments start within the first second (~60 % of those at 0), the rest early
in the track like the real ones (relative position start / latest-possible-start ~ Beta(1,
2.2) off the canonical clips).

Deterministic: the same arguments give byte-identical files (one numpy Generator, fixed
float formatting, plain contiguous tensors saved with torch.save). CSVs and the marker are
written with utils/io's atomic helpers; the thousands of feature files go to a staging
folder that is renamed into place at the end (same guarantee, ~3x faster than fsyncing
each file). An existing dataset is only replaced with --overwrite, and only if it carries
the demo_data.json marker (so real data is never deleted).
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data.annotations import COLUMNS, format_annotations_csv  # noqa: E402
from utils.data.constants import MAX_M_DURATION, VIDEO_DIR  # noqa: E402
from utils.data.features import MUSIC_DIM, VIDEO_DIM, music_dir_for_stride, num_snippets_for  # noqa: E402
from utils.io import atomic_write_json, atomic_write_text  # noqa: E402

MARKER = "demo_data.json"
ID_ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyz0123456789"))
CATEGORIES = ["Fashion", "Games", "Home Furnishings", "Food", "Beauty", "High-tech Gadgets",
              "Agriculture", "Cars", "Lifestyle", "Health", "Pets", "Travel"]
RESOLUTIONS = [(1080, 1920), (720, 1280), (608, 1080), (1920, 1080), (540, 960)]
FRAME_RATES = [24, 25, 30, 60]


@dataclass
class DemoConfig:
    """Generation settings; the signal-strength knobs set how hard the task is."""

    num_music: int = 200
    num_videos: int = 2000          # training videos; val/test videos come on top
    val_size: int = 200
    test_size: int = 200
    seed: int = 0
    strides: list[float] = field(default_factory=lambda: [2.5])
    max_m_duration: float = MAX_M_DURATION
    num_frames: int = 50
    latent_dim: int = 32
    num_waves: int = 8              # sinusoids per track in s_j(t)
    identity_weight: float = 0.6    # weight of c_j in z_j(t)  (0.6^2 + 0.8^2 = 1)
    time_weight: float = 0.8        # weight of s_j(t)
    video_signal: float = 0.45      # per-dim std of W_v z in a frame, before scaling (difficulty)
    video_nuisance: float = 1.0     # per-video constant distractor
    video_noise: float = 1.5        # per-frame noise
    video_mean: float = 1.0         # shared offset (CLIP embeddings share a mean direction)
    music_signal: float = 1.0
    music_noise: float = 0.5
    music_mean: float = 0.5
    video_norm: float = 10.0        # typical CLIP ViT-B/32 image-embedding norm
    music_scale: float = 0.8        # per-dim std of AST-like features
    reuse_moment: float = 0.3       # fraction of training videos re-using a moment
    min_period: float = 8.0         # range of the sinusoids' periods in s_j(t), seconds
    max_period: float = 60.0
    section_share: float = 0.8      # share of s_j(t)'s variance from piecewise-constant sections
    min_section: float = 8.0        # section lengths, seconds
    max_section: float = 24.0
    canonical_share: float = 0.8    # videos that take their track's canonical clip (real: 80.7 % within 1 s)
    hook_strength: float = 1.0      # weight of the shared "hook" vector from the canonical start on
    hook_length: float = 20.0       # seconds the hook lasts
    unseen_share: float = 0.25      # tracks with no training video (val/test only)


# --------------------------------------------------------------------------------------------
# Tracks and their latent trajectories


@dataclass
class Tracks:
    ids: list[str]
    duration: np.ndarray      # [M] seconds
    identity: np.ndarray      # [M, D]
    freq: np.ndarray          # [M, K] Hz
    phase: np.ndarray         # [M, K]
    amp: np.ndarray           # [M, K, D]
    section_start: np.ndarray | None = None   # [M, S] seconds, +inf past the last section
    section_vec: np.ndarray | None = None     # [M, S, D]
    canonical: np.ndarray | None = None       # [M] canonical start (s); None: no canonical clips
    hook: np.ndarray | None = None            # [D] the hook vector shared by all tracks

    def latent(self, track: np.ndarray, t: np.ndarray, cfg: DemoConfig) -> np.ndarray:
        """z_track(t) for track indices `track` [...] and times `t` [..., P] -> [..., P, D]."""
        ang = 2 * np.pi * self.freq[track][..., None, :] * t[..., None] + self.phase[track][..., None, :]
        wave = np.einsum("...pk,...kd->...pd", np.sin(ang), self.amp[track])
        if cfg.section_share > 0:
            starts = self.section_start[track][..., None, :]                      # [..., 1, S]
            idx = np.maximum((t[..., None] >= starts).sum(-1) - 1, 0)             # [..., P]
            section = self.section_vec[track[..., None], idx]                     # [..., P, D]
            wave = np.sqrt(cfg.section_share) * section + np.sqrt(1 - cfg.section_share) * wave
        z = cfg.identity_weight * self.identity[track][..., None, :] + cfg.time_weight * wave
        if self.hook is not None and cfg.hook_strength > 0:
            since = t - self.canonical[track][..., None]                            # [..., P]
            in_hook = (since >= 0) & (since < cfg.hook_length)
            z = z + cfg.hook_strength * in_hook[..., None] * self.hook
        return z


def _music_ids(rng: np.random.Generator, n: int) -> list[str]:
    """Ids shaped like the real ones, e.g. '7+5x4mjjeiubm49fg' (prefix 4 or 7, '+5x', 13 chars)."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        prefix = "4" if rng.random() < 0.9 else "7"
        mid = f"{prefix}+5x" + "".join(rng.choice(ID_ALPHABET, 13))
        if mid not in seen:
            seen.add(mid)
            ids.append(mid)
    return ids


def _video_ids(rng: np.random.Generator, n: int) -> list[str]:
    """Unique 12-digit integer ids like the real '113722188340'."""
    ids: list[str] = []
    seen: set[int] = set()
    while len(ids) < n:
        for v in rng.integers(100_000_000_000, 120_000_000_000, size=n - len(ids)):
            if int(v) not in seen:
                seen.add(int(v))
                ids.append(str(int(v)))
    return ids


def make_tracks(rng: np.random.Generator, cfg: DemoConfig) -> Tracks:
    m, k, d = cfg.num_music, cfg.num_waves, cfg.latent_dim
    duration = np.round(rng.uniform(30.0, cfg.max_m_duration - 0.1, m), 3)
    period = np.exp(rng.uniform(np.log(cfg.min_period), np.log(cfg.max_period), (m, k)))
    # sin has variance 1/2: amplitudes N(0, 2/K) give s_j(t) unit variance per dimension.
    amp = rng.normal(0.0, np.sqrt(2.0 / k), (m, k, d))
    tracks = Tracks(ids=_music_ids(rng, m), duration=duration, identity=rng.normal(size=(m, d)),
                    freq=1.0 / period, phase=rng.uniform(0, 2 * np.pi, (m, k)), amp=amp)
    if cfg.section_share > 0:
        # Own stream, so --section_share 0 reproduces the earlier generator byte for byte.
        srng = np.random.default_rng([cfg.seed, 1])
        n_max = int(np.ceil(cfg.max_m_duration / cfg.min_section)) + 1
        lengths = srng.uniform(cfg.min_section, cfg.max_section, (m, n_max))
        starts = np.concatenate([np.zeros((m, 1)), np.cumsum(lengths, 1)[:, :-1]], 1)
        tracks.section_start = np.where(starts < duration[:, None], starts, np.inf)
        tracks.section_vec = srng.normal(size=(m, n_max, d))
    if cfg.canonical_share > 0:
        crng = _canonical_rng(cfg)
        tracks.canonical = _canonical_starts(crng, duration)
        tracks.hook = crng.normal(size=d)
    return tracks


def _canonical_rng(cfg: DemoConfig) -> np.random.Generator:
    """The canonical clips' own stream: the rest of the data does not shift when their knobs change."""
    return np.random.default_rng([cfg.seed, 2])


# Real val/test CSVs, videos that take their track's canonical clip: 42 % of those clips start
# within the first second (28 % at 0); the others start at these deciles of the track length.
CANONICAL_AT_ZERO, CANONICAL_IN_FIRST_SECOND = 0.28, 0.42
CANONICAL_DECILES = np.array([0.005, 0.035, 0.075, 0.122, 0.2, 0.239, 0.266, 0.297, 0.343, 0.464, 0.802])
# Real: 37.4 % of all moments start within the first second, 60 % of those at 0 exactly.
FIRST_SECOND, AT_ZERO_OF_FIRST_SECOND = 0.374, 0.6


def _canonical_starts(rng: np.random.Generator, duration: np.ndarray) -> np.ndarray:
    """Each track's canonical start (s), distributed as in the real annotations."""
    u = rng.random(duration.size)
    later = duration * np.interp(rng.random(duration.size), np.linspace(0, 1, 11), CANONICAL_DECILES)
    start = np.where(u < CANONICAL_AT_ZERO, 0.0,
                     np.where(u < CANONICAL_IN_FIRST_SECOND, rng.random(duration.size), np.maximum(later, 1.0)))
    return np.round(start, 3)


# --------------------------------------------------------------------------------------------
# Videos (CSV rows)


def _sample_moment(rng: np.random.Generator, track_dur: float,
                   first_second: float = FIRST_SECOND) -> tuple[float, float]:
    """(music_start, duration) with the real data's statistics; moment inside the track.

    `first_second` is the share of starts within the first second (60 % of them at 0). The
    others sit early in the track: in the real val/test CSVs the relative position
    start/latest has quantiles 0.04/0.11/0.27/0.38/0.59 at 10/25/50/75/90 % (the same for
    the videos off their track's canonical clip), which Beta(1, 2.2) follows (0.05/0.12/0.27/0.47/0.65).
    """
    dur = float(np.clip(rng.lognormal(np.log(20.0), 0.45), 5.0, 49.5))
    dur = round(min(dur, track_dur - 0.5), 3)
    latest = track_dur - dur - 0.01
    u = rng.random()
    zero = AT_ZERO_OF_FIRST_SECOND * first_second
    start = (0.0 if u < zero else rng.uniform(0.0, min(1.0, latest)) if u < first_second
             else latest * rng.beta(1.0, 2.2))
    return round(start, 3), dur


def _canonical_moment(rng: np.random.Generator, crng: np.random.Generator, canonical: float,
                      track_dur: float) -> tuple[float, float]:
    """A video cut from its track's canonical clip, trimmed to its own length: the canonical start
    itself for 83 % of them (real: 66.8 % of 80.7 % within 0.01 s), otherwise within 0.75 s of it."""
    _, dur = _sample_moment(rng, track_dur)
    start = canonical if crng.random() < 0.83 else max(0.0, canonical + crng.uniform(-0.75, 0.75))
    return round(min(start, track_dur - dur - 0.01), 3), dur


def _off_canonical_first_second(cfg: DemoConfig) -> float:
    """Share of first-second starts among the videos off their canonical clip, chosen so that all
    moments together keep the real 37.4 % (real: 20.5 % of the off-canonical videos; here 19 %
    with the default canonical_share 0.8; 37.4 % with canonical_share 0, as before canonical clips)."""
    rest = FIRST_SECOND - cfg.canonical_share * CANONICAL_IN_FIRST_SECOND
    return float(np.clip(rest / max(1.0 - cfg.canonical_share, 1e-9), 0.0, 1.0))


def _unseen_tracks(cfg: DemoConfig) -> np.ndarray:
    """Tracks that get no training video (always leaving at least one track for training)."""
    n = min(int(round(cfg.unseen_share * cfg.num_music)), cfg.num_music - 1)
    return np.sort(np.random.default_rng([cfg.seed, 3]).choice(cfg.num_music, n, replace=False))


def _assign_train_tracks(rng: np.random.Generator, cfg: DemoConfig) -> np.ndarray:
    """Every seen track at least once (when possible), the rest by an uneven popularity."""
    m, n = cfg.num_music, cfg.num_videos
    seen = np.ones(m, dtype=bool)
    seen[_unseen_tracks(cfg)] = False
    first = rng.permutation(np.flatnonzero(seen))[: min(int(seen.sum()), n)]
    popularity = rng.gamma(1.0, size=m) * seen
    rest = rng.choice(m, size=n - len(first), p=popularity / popularity.sum())
    return np.concatenate([first, rest]).astype(np.int64)


def make_rows(rng: np.random.Generator, tracks: Tracks, cfg: DemoConfig) -> dict[str, pd.DataFrame]:
    """The three splits' rows (all 16 columns), video ids unique across splits."""
    split_tracks = {
        "train": _assign_train_tracks(rng, cfg),
        "val": rng.choice(cfg.num_music, cfg.val_size, replace=False),
        "test": rng.choice(cfg.num_music, cfg.test_size, replace=False),
    }
    video_ids = iter(_video_ids(rng, sum(len(v) for v in split_tracks.values())))
    moments: dict[int, list[tuple[float, float]]] = {}
    crng = np.random.default_rng([cfg.seed, 4])   # own stream: canonical choices do not shift the rest
    off_first_second = _off_canonical_first_second(cfg)
    out = {}
    for split, track_idx in split_tracks.items():
        rows = []
        for j in track_idx:
            j = int(j)
            track_dur = float(tracks.duration[j])
            if tracks.canonical is not None and crng.random() < cfg.canonical_share:
                start, dur = _canonical_moment(rng, crng, float(tracks.canonical[j]), track_dur)
            elif split == "train" and moments.get(j) and rng.random() < cfg.reuse_moment:
                start, dur = moments[j][int(rng.integers(len(moments[j])))]
            else:
                start, dur = _sample_moment(rng, track_dur, off_first_second)
                if split == "train":
                    moments.setdefault(j, []).append((start, dur))
            rows.append(_row(rng, next(video_ids), tracks.ids[j], j, start, dur, track_dur))
        out[split] = pd.DataFrame(rows, columns=COLUMNS)
    return out


def _row(rng: np.random.Generator, video_id: str, music_id: str, j: int, start: float, dur: float,
         track_dur: float) -> dict:
    v_start = 0.0 if rng.random() < 0.99 else round(rng.uniform(0.0, 0.47), 3)
    v_end = round(v_start + dur, 3)
    v_total = round(v_end + rng.uniform(0.0, 0.6), 3)
    width, height = RESOLUTIONS[int(rng.integers(len(RESOLUTIONS)))]
    fps = FRAME_RATES[int(rng.integers(len(FRAME_RATES)))]
    return {
        "video_id": video_id, "music_id": music_id, "video_start": v_start, "video_end": v_end,
        "music_start": start, "music_end": round(start + dur, 3), "music_total_duration": track_dur,
        "video_segment_duration": dur, "music_segment_duration": dur,
        "music_path": f"/Data/music/source_music/{j % 10}/{music_id}+synthetic_track_{j:04d}.mp3",
        "video_total_duration": v_total, "video_width": width, "video_height": height,
        "video_total_frames": int(round(v_total * fps)), "video_frame_rate": fps,
        "video_category": CATEGORIES[int(rng.integers(len(CATEGORIES)))],
    }


# --------------------------------------------------------------------------------------------
# Features


@dataclass
class Projections:
    """Fixed random maps and offsets shared by all items (the 'encoders')."""

    w_video: np.ndarray   # [D, 512]
    w_music: np.ndarray   # [D, 768]
    mean_video: np.ndarray
    mean_music: np.ndarray
    black_frame: np.ndarray
    silence: np.ndarray


def make_projections(rng: np.random.Generator, cfg: DemoConfig) -> Projections:
    d = cfg.latent_dim
    return Projections(
        w_video=rng.normal(0, 1 / np.sqrt(d), (d, VIDEO_DIM)),
        w_music=rng.normal(0, 1 / np.sqrt(d), (d, MUSIC_DIM)),
        mean_video=rng.normal(size=VIDEO_DIM), mean_music=rng.normal(size=MUSIC_DIM),
        black_frame=rng.normal(size=VIDEO_DIM), silence=rng.normal(size=MUSIC_DIM))


def video_features(rng: np.random.Generator, df: pd.DataFrame, tracks: Tracks, proj: Projections,
                   cfg: DemoConfig, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """CLIP-like frames [N, 50, 512] float32 and masks [N, 50] for the rows of `df`."""
    n, lv = len(df), cfg.num_frames
    row_of = {m: j for j, m in enumerate(tracks.ids)}
    track = np.array([row_of[m] for m in df["music_id"]], dtype=np.int64)
    v_start, v_end = df["video_start"].to_numpy(float), df["video_end"].to_numpy(float)
    # Frames at whole seconds floor(video_start) .. floor(video_end), as the extractor does.
    n_frames = np.minimum(np.floor(v_end) - np.floor(v_start) + 1, lv).astype(int)
    i = np.arange(lv)[None, :] + np.floor(v_start)[:, None]
    t_video = np.clip(i, v_start[:, None], v_end[:, None])
    t_music = df["music_start"].to_numpy(float)[:, None] + (t_video - v_start[:, None])
    var = cfg.video_mean**2 + cfg.video_signal**2 + cfg.video_nuisance**2 + cfg.video_noise**2
    scale = np.float32(cfg.video_norm / np.sqrt(VIDEO_DIM * var))
    mean = (cfg.video_mean * proj.mean_video).astype(np.float32)
    w = (cfg.video_signal * proj.w_video).astype(np.float32)
    mask = np.arange(lv)[None, :] < n_frames[:, None]
    x = np.empty((n, lv, VIDEO_DIM), dtype=np.float32)
    x[:] = proj.black_frame * cfg.video_norm / np.sqrt(VIDEO_DIM)  # padded slots
    for lo in range(0, n, chunk):  # float32 chunks: bounded memory for large N
        sl = slice(lo, min(n, lo + chunk))
        k, valid = sl.stop - sl.start, mask[sl]
        z = tracks.latent(track[sl], t_music[sl], cfg)[valid].astype(np.float32)  # [frames, D]
        # 2-D matmul (a stacked 3-D one is ~10x slower in numpy); noise only for valid frames.
        nuisance = cfg.video_nuisance * rng.standard_normal((k, VIDEO_DIM), dtype=np.float32)
        frames = (mean + z @ w + np.repeat(nuisance, valid.sum(1), axis=0)
                  + cfg.video_noise * rng.standard_normal((len(z), VIDEO_DIM), dtype=np.float32))
        x[sl][valid] = frames * scale
    return x, mask.astype(np.float32)


def music_features(rng: np.random.Generator, tracks: Tracks, proj: Projections, stride: float,
                   cfg: DemoConfig, window: float = 10.0, chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """AST-like snippets [M, Lm, 768] float32 and masks [M, Lm], windows as the authors' extractor."""
    lm = num_snippets_for(stride, cfg.max_m_duration)
    centre = stride * np.arange(lm)                                          # [Lm]
    offsets = np.linspace(-window / 2, window / 2, 21)                       # 0.5 s grid
    t = centre[:, None] + offsets[None, :]                                   # [Lm, P]
    dur = tracks.duration[:, None, None]
    inside = (t[None] >= 0) & (t[None] <= dur)                               # [M, Lm, P]
    all_tracks = np.arange(len(tracks.ids))
    weight = inside / np.maximum(inside.sum(-1, keepdims=True), 1)
    z_win = np.empty((len(all_tracks), lm, cfg.latent_dim))
    for lo in range(0, len(all_tracks), chunk):  # [chunk, Lm, P, D] at a time: bounded memory
        sl = slice(lo, lo + chunk)
        z = tracks.latent(all_tracks[sl, None], np.broadcast_to(t, (len(all_tracks[sl]), lm, t.shape[1])), cfg)
        z_win[sl] = np.einsum("mlp,mlpd->mld", weight[sl], z)              # window average
    signal = (z_win.reshape(-1, z_win.shape[-1]) @ proj.w_music).reshape(len(all_tracks), lm, MUSIC_DIM)
    x = (cfg.music_mean * proj.mean_music + cfg.music_signal * signal
         + cfg.music_noise * rng.standard_normal((len(all_tracks), lm, MUSIC_DIM), dtype=np.float32))
    var = cfg.music_mean**2 + cfg.music_signal**2 + cfg.music_noise**2
    x *= cfg.music_scale / np.sqrt(var)
    mask = centre[None, :] <= tracks.duration[:, None]
    x = np.where(mask[..., None], x, proj.silence * cfg.music_scale)
    return x.astype(np.float32), mask.astype(np.float32)


def _save_pairs(base: Path, feat_sub: str, mask_sub: str, ids: list[str], feats: np.ndarray,
                masks: np.ndarray) -> None:
    """torch.save one feature and one mask file per id (official per-id layout).

    Written into the staging tree without per-file fsync: atomicity comes from renaming the
    whole tree at the end (see make_demo_data), which is ~3x faster than thousands of
    atomic_torch_save calls. Saved to a file object so the archive name inside the zip is
    the same for every file (torch.save(path) embeds the file name).
    """
    for sub in (feat_sub, mask_sub):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for n, item_id in enumerate(ids):
        # .copy(): a plain tensor, not a view of the big array (torch.save would store all of it).
        for sub, arr in ((feat_sub, feats), (mask_sub, masks)):
            with open(base / sub / f"{item_id}.pt", "wb") as f:
                torch.save(torch.from_numpy(arr[n].copy()), f)


# --------------------------------------------------------------------------------------------
# Entry points


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse to mix with, or clobber, data that this script did not write."""
    targets = [out / "dataset" / "MGSV-EC", out / "features" / "Kuai_feature"]
    existing = [p for p in targets if p.exists() and any(p.iterdir())]
    if not existing:
        return
    if not overwrite:
        raise SystemExit(f"error: {', '.join(map(str, existing))} already exist(s); "
                         "pass --overwrite to replace a previous demo dataset, or choose another --out.")
    if not (out / MARKER).is_file():
        raise SystemExit(f"error: refusing to overwrite {', '.join(map(str, existing))}: no {MARKER} "
                         "marker, so this is not a dataset written by make_demo_data.py.")
    for p in targets:
        shutil.rmtree(p, ignore_errors=True)


def make_demo_data(out: str | Path, num_music: int = 200, num_videos: int = 2000, val_size: int = 200,
                   test_size: int = 200, seed: int = 0, strides: list[float] | tuple[float, ...] = (2.5,),
                   overwrite: bool = False, **knobs: float) -> Path:
    """Write the synthetic dataset under `out`; return `out` (features: out/features/Kuai_feature)."""
    cfg = DemoConfig(num_music=num_music, num_videos=num_videos, val_size=val_size, test_size=test_size,
                     seed=seed, strides=[float(s) for s in strides], **knobs)
    if cfg.num_music < 1 or cfg.num_videos < 1:
        raise ValueError("num_music and num_videos must be >= 1")
    if not (1 <= cfg.val_size <= cfg.num_music and 1 <= cfg.test_size <= cfg.num_music):
        raise ValueError("val_size and test_size must be in 1..num_music (one video per track)")
    if not (0.0 <= cfg.section_share <= 1.0 and 0.0 < cfg.min_section <= cfg.max_section):
        raise ValueError("section_share must be in [0, 1] and 0 < min_section <= max_section")
    if not (0.0 <= cfg.canonical_share <= 1.0 and 0.0 <= cfg.unseen_share < 1.0):
        raise ValueError("canonical_share must be in [0, 1] and unseen_share in [0, 1)")
    if not (cfg.hook_strength >= 0.0 and cfg.hook_length > 0.0):
        raise ValueError("hook_strength must be >= 0 and hook_length > 0")
    dirs = [music_dir_for_stride(s) for s in cfg.strides]  # validates the strides early
    out = Path(out)
    _prepare_out(out, overwrite)
    rng = np.random.default_rng(cfg.seed)
    tracks = make_tracks(rng, cfg)
    proj = make_projections(rng, cfg)
    splits = make_rows(rng, tracks, cfg)
    for split, df in splits.items():
        atomic_write_text(format_annotations_csv(df), out / "dataset" / "MGSV-EC" / f"{split}_data.csv")
    # Features go to a staging tree renamed into place at the end: a crash never leaves a
    # half-written Kuai_feature that looks complete.
    feat_root = out / "features" / "Kuai_feature"
    staging = out / "features" / ".Kuai_feature.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for df in splits.values():
        feats, masks = video_features(rng, df, tracks, proj, cfg)
        _save_pairs(staging / VIDEO_DIR, "vit_feature", "vit_mask", list(df["video_id"]), feats, masks)
    for stride, name in zip(cfg.strides, dirs):
        feats, masks = music_features(rng, tracks, proj, stride, cfg)
        _save_pairs(staging / name, "ast_feature", "ast_mask", tracks.ids, feats, masks)
    os.replace(staging, feat_root)
    atomic_write_json({"generator": "scripts/make_demo_data.py", **asdict(cfg)}, out / MARKER)
    return out


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (dataset/ and features/ go inside)")
    p.add_argument("--num_music", type=int, default=200, help="number of tracks")
    p.add_argument("--num_videos", type=int, default=2000,
                   help="number of TRAINING videos (val/test videos come on top)")
    p.add_argument("--val_size", type=int, default=200, help="val videos (= distinct val tracks)")
    p.add_argument("--test_size", type=int, default=200, help="test videos (= distinct test tracks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stride", type=float, nargs="+", default=[2.5],
                   help="music window hop(s) in seconds; one feature folder per value")
    p.add_argument("--video_signal", type=float, default=DemoConfig.video_signal,
                   help="strength of the music signal in the video frames (lower = harder; "
                        "0.45 gives a ridge-regression probe R1 ~ 64%% on 200 test tracks)")
    p.add_argument("--time_weight", type=float, default=DemoConfig.time_weight,
                   help="weight of the time-varying part s_j(t) of a track's latent (the identity part "
                        "gets sqrt(1 - w^2)); higher = localisation cues stronger, identity weaker")
    p.add_argument("--period_range", type=float, nargs=2, default=[DemoConfig.min_period, DemoConfig.max_period],
                   metavar=("MIN", "MAX"), help="periods (s) of the sinusoids in s_j(t)")
    p.add_argument("--section_share", type=float, default=DemoConfig.section_share,
                   help="share of the time-varying part's variance carried by piecewise-constant sections")
    p.add_argument("--canonical_share", type=float, default=DemoConfig.canonical_share,
                   help="share of videos cut from their track's canonical clip (real MGSV-EC: ~0.8); "
                        "0 = no canonical clips, every moment drawn on its own")
    p.add_argument("--hook_strength", type=float, default=DemoConfig.hook_strength,
                   help="how audible the canonical clip is: weight of a hook vector shared by all tracks, "
                        "present for --hook_length s from each track's canonical start (0 = silent)")
    p.add_argument("--hook_length", type=float, default=DemoConfig.hook_length, help="seconds")
    p.add_argument("--unseen_share", type=float, default=DemoConfig.unseen_share,
                   help="share of tracks with no training video (they occur in val/test only)")
    p.add_argument("--overwrite", action="store_true", help="replace a previous demo dataset in --out")
    return p


def main(argv: list[str] | None = None) -> None:
    args = get_parser().parse_args(argv)
    knobs = dict(video_signal=args.video_signal, section_share=args.section_share,
                 canonical_share=args.canonical_share, hook_strength=args.hook_strength,
                 hook_length=args.hook_length, unseen_share=args.unseen_share,
                 min_period=args.period_range[0], max_period=args.period_range[1])
    if args.time_weight != DemoConfig.time_weight:  # keep the default's exact 0.6 (byte-identical outputs)
        knobs.update(time_weight=args.time_weight, identity_weight=float(np.sqrt(max(0.0, 1 - args.time_weight**2))))
    try:
        out = make_demo_data(args.out, args.num_music, args.num_videos, args.val_size, args.test_size,
                             args.seed, args.stride, args.overwrite, **knobs)
    except ValueError as e:  # bad sizes or knobs: a one-line error, not a traceback
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {out}/dataset/MGSV-EC/{{train,val,test}}_data.csv and {out}/features/Kuai_feature "
          f"({args.num_videos}+{args.val_size}+{args.test_size} videos, {args.num_music} tracks)")


if __name__ == "__main__":
    main()
