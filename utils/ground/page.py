"""What scripts/app.py's page does, without the web layer: ground a query, describe the result,
cut each track's moment for a player, render a preview.

    page = GroundingPage(PageConfig(checkpoint=..., index=..., queries_csv=..., feature_root=...,
                                    music_dir=..., video_dir=..., out_dir="app_out"))
    shown = page.ground_query("113722188340")          # a query of the CSV (features from disk)
    shown = page.ground_upload("clip.mp4")             # a raw video (CLIP weights needed)
    preview = page.render(shown, shown.result.tracks[0].music_id)

Every method raises one of PAGE_ERRORS with a one-line (or, for missing weights, a few-line)
message for bad input; the page shows it instead of a traceback. The model and the index are
loaded once, in the constructor; CLIP only on the first upload. Files the page shows (plot,
moment clips, previews) are written atomically into `out_dir` under names made of the query
and track ids, so repeating a request replaces its files and never leaves half-written ones.
"""
from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd
import torch

from model.pretrained import MissingWeightsError
from utils.data.features import FeatureError
from utils.data.store import FeatureStore
from utils.extract.media import MediaError
from utils.extract.media_paths import index_source_csv, music_locator, video_locator
from utils.ground.grounding import QueryResult, TrackHit, ground
from utils.ground.library import check_index_matches, open_index
from utils.ground.model import GroundingError, load_model
from utils.ground.render import (DEFAULT_FADE, RenderError, RenderResult, check_moment, probe_video, render_preview,
                                 write_moment_clip)
from utils.ground.report import plot_result
from utils.train.checkpoint import CheckpointError

# Bad input of every kind the page can meet; anything else is a bug and is logged as such.
PAGE_ERRORS = (GroundingError, CheckpointError, FeatureError, MediaError, RenderError, MissingWeightsError,
               FileNotFoundError, ValueError)

Progress = Callable[[float, str], None]
# A browser list of tens of thousands of options is unusable (and slow to send); a longer query CSV
# contributes its first MAX_CHOICES rows.
MAX_CHOICES = 2000


def _no_progress(fraction: float, message: str) -> None:
    pass


@dataclass
class PageConfig:
    checkpoint: str
    index: str
    queries_csv: str | None = None       # CSV with video_id (+ music_id/music_start/music_end as ground truth)
    feature_root: str | None = None      # frozen CLIP features of those queries
    clip_weights: str | None = None      # for uploads; default model/pretrained_models/ViT-B-32.pt
    music_dir: str | None = None         # tracks' audio (see utils.extract.media_paths.music_locator)
    video_dir: str | None = None         # the CSV queries' own videos, for previews (see query_video)
    out_dir: str = "app_out"
    topk: int = 5
    device: str = "auto"
    fade: float = DEFAULT_FADE


@dataclass
class TrackAudio:
    hit: TrackHit
    clip: Path | None                    # the moment as WAV, when the track's audio was found
    note: str                            # why there is no clip, else ""


@dataclass
class Shown:
    """One grounded query as the page shows it."""

    result: QueryResult
    video: Path | None                   # the query's video file (upload, or found for a CSV query)
    plot: Path
    audio: list[TrackAudio] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def key(self) -> str:
        """File-name stem of this query's outputs."""
        return _safe(self.result.video_id)


def _safe(name: str) -> str:
    """A file-name-safe version of an id (ids come from CSVs and upload names)."""
    return re.sub(r"[^A-Za-z0-9._+-]", "_", name)[:80] or "query"


def canonical(hit: TrackHit) -> tuple[float, float, int] | None:
    """The track's canonical clip (start, end, uses) when the index knows its usage history."""
    start, end = getattr(hit, "canonical_start", None), getattr(hit, "canonical_end", None)
    if start is None or end is None:
        return None
    return float(start), float(end), int(getattr(hit, "uses", 0) or 0)


def format_moment(start: float, end: float) -> str:
    if start > end:
        return f"starts at {start:.1f} s, past the track end"
    return f"{start:.1f}–{end:.1f} s"


def table(shown: Shown) -> tuple[list[str], list[list]]:
    """Headers and rows of the top-k table; the canonical-clip column only when the index has usage history."""
    hits = shown.result.tracks
    with_canonical = any(canonical(h) is not None for h in hits)
    headers = ["rank", "music_id", "score", "moment", "confidence", "track length"]
    headers += ["canonical clip"] if with_canonical else []
    headers += ["audio"]
    rows = []
    for hit, audio in zip(hits, shown.audio):
        row = [hit.rank, hit.music_id, f"{hit.score:.4f}", format_moment(hit.start, hit.end),
               f"{hit.confidence:.3f}", f"{hit.duration:.1f} s"]
        if with_canonical:
            c = canonical(hit)
            row.append(f"{format_moment(c[0], c[1])} ({c[2]} use{'s' * (c[2] != 1)})" if c else "–")
        row.append("player below" if audio.clip else audio.note)
        rows.append(row)
    return headers, rows


def summary(shown: Shown) -> str:
    """Markdown lines under the table: the query, the top-1 and the ground truth when known."""
    r = shown.result
    lines = [f"**{r.video_id}**: {len(r.tracks)} tracks in {shown.seconds:.2f} s ({r.mode})."]
    if r.tracks:
        top = r.tracks[0]
        lines.append(f"Best track **{top.music_id}**, moment {format_moment(top.start, top.end)}.")
    g = r.gt
    if g is not None:
        if not g.in_library:
            lines.append(f"Ground truth {g.music_id}: not in the index.")
        else:
            rank = f"rank {g.rank}" if g.rank is not None else "outside the shortlist"
            moment = f", moment {format_moment(g.start, g.end)}" if g.start is not None else ""
            iou = f", IoU {g.iou:.2f}" if g.iou is not None else ""
            lines.append(f"Ground truth {g.music_id}: {rank}{moment}; predicted on it "
                         f"{format_moment(g.pred_start, g.pred_end)}{iou}.")
    if shown.video is None:
        lines.append("No video file for this query, so no preview (uploads and queries found in "
                     "--video_dir have one).")
    return "  \n".join(lines)


class GroundingPage:
    def __init__(self, cfg: PageConfig, say: Callable[[str], None] = print):
        if cfg.topk < 1:
            raise ValueError("--topk must be >= 1")
        self.cfg = cfg
        self.out_dir = Path(cfg.out_dir)
        # Cheap checks first, so a wrong path fails before the model loads.
        say(f"opening the index {cfg.index}")
        self.library = open_index(cfg.index)
        self.num_frames = int(self.library.manifest.get("config", {}).get("max_v_frames", 50))
        self.queries = self._read_queries(cfg.queries_csv)
        self.store = None
        if cfg.queries_csv:
            if not cfg.feature_root:
                raise ValueError("queries from a CSV need their features: pass --frozen_feature_path")
            self.store = FeatureStore(cfg.feature_root, num_frames=self.num_frames)
        t0 = time.time()
        say(f"loading the model {cfg.checkpoint}")
        self.gm = load_model(cfg.checkpoint, cfg.device)
        check_index_matches(self.library.manifest, self.gm, cfg.index)
        say(f"model and index of {len(self.library)} tracks ready in {time.time() - t0:.1f} s")
        self.music = music_locator(cfg.music_dir, [index_source_csv(self.library.manifest), cfg.queries_csv])
        # A query's video: the CSV's video_path column, else <video_dir (default: the CSV's folder)>/<id>.<ext>.
        self.videos = video_locator(cfg.video_dir, [cfg.queries_csv]) if cfg.queries_csv else None
        self._clip = None

    # -------------------------------------------------------------------------------------- queries
    @staticmethod
    def _read_queries(csv: str | None) -> pd.DataFrame:
        if not csv:
            return pd.DataFrame(columns=["video_id"])
        path = Path(csv)
        if not path.is_file():
            raise FileNotFoundError(f"--queries {path}: file not found")
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise GroundingError(f"{path}: cannot be read as CSV ({type(e).__name__}: {e})") from None
        if "video_id" not in df.columns or len(df) == 0:
            raise GroundingError(f"{path}: needs a video_id column and at least one row")
        df["video_id"] = df["video_id"].str.strip()
        return df.drop_duplicates("video_id").set_index("video_id", drop=False)

    def query_video(self, video_id: str) -> Path | None:
        """The video file of a CSV query, when there is one (only those can be previewed)."""
        return self.videos.find(video_id) if self.videos is not None else None

    def query_choices(self) -> list[tuple[str, str]]:
        """(label, video_id) for the CSV's first MAX_CHOICES queries; those with a video file (previewable)
        first."""
        with_video, without = [], []
        for vid in self.queries.index[:MAX_CHOICES]:
            if self.query_video(vid) is not None:
                with_video.append((f"{vid} (video)", vid))
            else:
                without.append((vid, vid))
        return with_video + without

    def _ground_truth(self, video_id: str) -> tuple[str | None, tuple[float, float] | None]:
        row = self.queries.loc[video_id]
        music_id = str(row.get("music_id", "")).strip() or None
        try:
            moment = (float(row["music_start"]), float(row["music_end"]))
        except (KeyError, ValueError):
            moment = None
        return music_id, moment

    # ------------------------------------------------------------------------------------- grounding
    def ground_query(self, video_id: str, progress: Progress = _no_progress) -> Shown:
        """A query of the CSV, from its stored CLIP features (what ground.py --video_feature CSV does)."""
        if self.store is None or video_id not in self.queries.index:
            raise GroundingError(f"no query {video_id!r} in the query list")
        progress(0.1, "reading the query's features")
        feat, mask = self.store.videos([video_id])
        gt_id, gt_moment = self._ground_truth(video_id)
        return self._ground(video_id, feat, mask, self.query_video(video_id), progress, gt_id, gt_moment)

    def ground_upload(self, path: str | Path, progress: Progress = _no_progress) -> Shown:
        """A raw video: checked, then CLIP features extracted as ground.py --video does."""
        from utils.extract.extract import extract_video_features
        path = Path(path)
        progress(0.05, "checking the video")
        probe_video(path)                  # an unreadable upload fails here, before CLIP is loaded
        clip = self._load_clip(progress)
        progress(0.3, "extracting CLIP features (1 frame per second)")
        feat, mask = extract_video_features(path, clip, self.gm.device, max_frames=self.num_frames)
        # The upload's name, plus a hash of where it was stored: two uploads named alike keep apart.
        digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:6]
        return self._ground(f"{path.stem}-{digest}", feat[None], mask[None], path, progress)

    def _load_clip(self, progress: Progress):
        if self._clip is None:
            from model.clip_encoder import DEFAULT_CLIP_WEIGHTS, load_clip
            progress(0.15, "loading the CLIP weights (first upload only)")
            self._clip = load_clip(self.cfg.clip_weights or DEFAULT_CLIP_WEIGHTS, self.gm.device)
        return self._clip

    def _ground(self, video_id: str, feat: torch.Tensor, mask: torch.Tensor, video: Path | None,
                progress: Progress, gt_id: str | None = None,
                gt_moment: tuple[float, float] | None = None) -> Shown:
        progress(0.6, f"scoring {len(self.library)} tracks and finding the moments")
        t0 = time.time()
        result = ground(self.gm, self.library, feat, mask, topk=self.cfg.topk, video_ids=[video_id],
                        gt_music_ids=[gt_id], gt_moments=[gt_moment])[0]
        seconds = time.time() - t0
        progress(0.8, "drawing the timeline and cutting the moments")
        plot = plot_result(result, self.out_dir / f"{_safe(video_id)}_timeline.png", self.gm.max_m_duration)
        shown = Shown(result, video, plot, seconds=seconds)
        shown.audio = [self._moment_clip(shown, hit) for hit in result.tracks]
        return shown

    def _moment_clip(self, shown: Shown, hit: TrackHit) -> TrackAudio:
        audio = self.music.find(hit.music_id)
        if audio is None:
            return TrackAudio(hit, None, "no audio file")
        try:
            check_moment(hit.start, hit.end)
            out = self.out_dir / f"{shown.key}_{_safe(hit.music_id)}_moment.wav"
            return TrackAudio(hit, write_moment_clip(audio, hit.start, hit.end, out, self.cfg.fade), "")
        except (MediaError, RenderError) as e:   # one bad audio file must not hide the other results
            return TrackAudio(hit, None, str(e))

    # ------------------------------------------------------------------------------------- preview
    def render(self, shown: Shown, music_id: str, progress: Progress = _no_progress) -> RenderResult:
        """The query's video with the moment of track `music_id` (one of the shown tracks) as its sound."""
        if shown.video is None:
            raise RenderError(f"query {shown.result.video_id} has no video file to put the music under; "
                              "upload a video, or start the page with --video_dir")
        hit = next((h for h in shown.result.tracks if h.music_id == music_id), None)
        if hit is None:
            raise RenderError(f"track {music_id} is not among this query's tracks")
        audio = self.music.find(hit.music_id)
        if audio is None:
            raise RenderError(f"no audio file found for track {hit.music_id}: start the page with --music_dir "
                              f"(a folder with {hit.music_id}.<ext>, or the tree of the CSV's music_path)")
        progress(0.3, f"muxing the video with {hit.music_id} {format_moment(hit.start, hit.end)}")
        out = self.out_dir / f"{shown.key}_{_safe(hit.music_id)}_preview.mp4"
        return render_preview(shown.video, audio, hit.start, hit.end, out, self.cfg.fade)
