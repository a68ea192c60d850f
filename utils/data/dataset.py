"""MGSV-EC dataset over pre-extracted features: one item per CSV row (query video).

Item (dict), following the original loader (dataloaders/dataloader_MGSV_EC_feature.py):
    frame_feats  float32 [Lv, 512]   video frames, padded rows zeroed
    frame_mask   float32 [Lv]
    music_feats  float32 [Lm, 768]   snippets of the ground-truth track
    music_mask   float32 [Lm]
    spans_target float32 [1, 2]      (centre, width) / max_m_duration  (NOT / track duration)
    gt_moment    float32 [1, 2]      (music_start, music_end) seconds, end clamped to max_m_duration
    m_duration   float               music_total_duration (clips predictions at evaluation)
    v_duration   float               video_end - video_start
    video_id, music_id  str

`collate_fn` stacks tensors along a new batch dim, turns the two floats into float64
tensors [B] and keeps ids as lists. With a DataLoader the dataset's `__getitems__`
fetches a whole batch with one store.videos()/musics() call, which is what makes the
packed (memory-mapped) store fast.
"""
from __future__ import annotations

import os
from collections.abc import Sequence as SequenceABC
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from utils.data.annotations import load_annotations
from utils.data.constants import MAX_M_DURATION
from utils.data.store import FeatureStore

TENSOR_KEYS = ("frame_feats", "frame_mask", "music_feats", "music_mask", "spans_target", "gt_moment")
FLOAT_KEYS = ("m_duration", "v_duration")
ID_KEYS = ("video_id", "music_id")


class MGSVDataset(Dataset):
    """Rows of a validated annotation DataFrame joined with their features from `store`."""

    def __init__(self, annotations_df: pd.DataFrame, store: FeatureStore, max_m_duration: float = MAX_M_DURATION):
        self.store = store
        self.max_m_duration = float(max_m_duration)
        # Plain lists/arrays: pandas row access per item would dominate the loading time.
        self.video_ids: list[str] = [str(v) for v in annotations_df["video_id"]]
        self.music_ids: list[str] = [str(m) for m in annotations_df["music_id"]]
        start = annotations_df["music_start"].to_numpy(np.float64)
        # The original clamps the end to max_m_duration (in place, so gt_moment is clamped too).
        end = np.minimum(annotations_df["music_end"].to_numpy(np.float64), self.max_m_duration)
        self.gt_moments = torch.from_numpy(np.stack([start, end], 1).astype(np.float32))          # [N, 2]
        self.spans = torch.from_numpy(
            (np.stack([(start + end) / 2, end - start], 1) / self.max_m_duration).astype(np.float32))
        self.m_durations = annotations_df["music_total_duration"].to_numpy(np.float64)
        self.v_durations = (annotations_df["video_end"].to_numpy(np.float64)
                            - annotations_df["video_start"].to_numpy(np.float64))

    def __len__(self) -> int:
        return len(self.video_ids)

    def _item(self, i: int, frames: tuple[torch.Tensor, torch.Tensor],
              music: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
        return {
            "frame_feats": frames[0], "frame_mask": frames[1],
            "music_feats": music[0], "music_mask": music[1],
            "spans_target": self.spans[i].view(1, 2), "gt_moment": self.gt_moments[i].view(1, 2),
            "m_duration": float(self.m_durations[i]), "v_duration": float(self.v_durations[i]),
            "video_id": self.video_ids[i], "music_id": self.music_ids[i],
        }

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i)
        return self._item(i, self.store.video(self.video_ids[i]), self.store.music(self.music_ids[i]))

    def __getitems__(self, indices: Sequence[int]) -> "BatchItems":
        """Batched fetch used by DataLoader (torch >= 2.0): one store call per modality.

        Returns the item dicts (views into the batch tensors, made only when accessed)
        together with the already stacked batch, which collate_fn hands over without copying
        ~200 MB per batch again.
        """
        idx = [int(i) for i in indices]
        vf, vm = self.store.videos([self.video_ids[i] for i in idx])
        mf, mm = self.store.musics([self.music_ids[i] for i in idx])
        rows = torch.tensor(idx, dtype=torch.long)
        batch = {
            "frame_feats": vf, "frame_mask": vm, "music_feats": mf, "music_mask": mm,
            "spans_target": self.spans[rows].unsqueeze(1), "gt_moment": self.gt_moments[rows].unsqueeze(1),
            "m_duration": torch.from_numpy(self.m_durations[idx]),
            "v_duration": torch.from_numpy(self.v_durations[idx]),
            "video_id": [self.video_ids[i] for i in idx], "music_id": [self.music_ids[i] for i in idx],
        }
        return BatchItems(self, idx, batch)


class BatchItems(SequenceABC):
    """The item dicts of a batch, made on access (a custom collate_fn may want them; ours
    only needs `.batch`: building 64 dicts of tensor views cost ~20 % of a packed batch)."""

    def __init__(self, dataset: MGSVDataset, indices: list[int], batch: dict[str, Any]):
        self.dataset = dataset
        self.indices = indices
        self.batch = batch

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, n):
        if isinstance(n, slice):
            return [self[k] for k in range(*n.indices(len(self)))]
        b = self.batch
        return self.dataset._item(self.indices[n], (b["frame_feats"][n], b["frame_mask"][n]),
                                  (b["music_feats"][n], b["music_mask"][n]))


def collate_fn(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack item dicts into a batch: tensors [B, ...], m/v_duration float64 [B], ids lists."""
    if isinstance(items, BatchItems):
        return items.batch
    if not items:
        raise ValueError("collate_fn got an empty batch")
    batch: dict[str, Any] = {k: torch.stack([it[k] for it in items]) for k in TENSOR_KEYS}
    for k in FLOAT_KEYS:
        batch[k] = torch.tensor([it[k] for it in items], dtype=torch.float64)
    for k in ID_KEYS:
        batch[k] = [it[k] for it in items]
    return batch


def build_dataset(csv_path: str | os.PathLike, frozen_feature_path: str | os.PathLike,
                  stride: float = 2.5, max_m_duration: float = MAX_M_DURATION, skip_bad_rows: bool = False,
                  use_packed: bool = True, store: FeatureStore | None = None,
                  num_frames: int = 50, music_cache_size: int | None = None) -> MGSVDataset:
    """Load + validate a split's CSV, open (or reuse) the feature store and check every id.

    Pass the same `store` for several splits to share its music cache and packed arrays.
    music_cache_size: tracks read from per-id files kept in memory (None: all, for training,
    which reads every track again each epoch; a single pass wants a small number).
    Raises AnnotationError / FeatureError (both ValueError) with actionable messages.
    """
    df = load_annotations(csv_path, max_m_duration=max_m_duration, skip_bad_rows=skip_bad_rows)
    if store is None:
        store = FeatureStore(frozen_feature_path, stride=stride, max_m_duration=max_m_duration,
                             num_frames=num_frames, use_packed=use_packed, music_cache_size=music_cache_size)
    store.check(df["video_id"], df["music_id"])
    return MGSVDataset(df, store, max_m_duration=max_m_duration)
