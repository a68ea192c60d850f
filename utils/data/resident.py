"""Training features held on the training device (--feature_device).

The DataLoader path (utils/train/setup.make_loader) gathers every batch from the feature store
on the host (a memory-mapped fancy-index for the packed store), pins it and copies it to
the GPU: per batch of 512 that is ~200 MB (float32 features and masks) through the host,
every step. When the split's features fit on the GPU, they can be copied there once
instead; a batch is then one `index_select` per tensor on the device.

Same batches, by construction: the row order comes from the very DistributedSampler that
make_loader builds (seeded by --seed and the epoch; under torchrun each rank takes every
world_size-th index, as the DataLoader path does), cut into batches exactly like its
BatchSampler. Only the order is computed on the host (a list of ints per epoch); it is
copied to the device once per epoch, and each batch is a slice of it. The tensors are the
store's own (validated when they are copied: utils/data/features.py checks every row it
returns), so a batch holds the same ids, in the same order, with the same values as the
DataLoader's; `m_duration` and `v_duration` stay float64 as collate_fn makes them.

Every process holds the whole split (each epoch's shard is a different subset of it).
"""
from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import BatchSampler, DistributedSampler

FEATURE_DEVICES = ("auto", "cpu", "cuda")
# --feature_device auto puts the features on the GPU only if they take at most this share of
# its free memory: the rest is for the model, its activations at batch 512 and the allocator.
RESIDENT_FRACTION = 0.5
FILL_CHUNK = 1024   # rows read from the store per copy while filling the device tensors


def resident_bytes(dataset: Any) -> int:
    """Device memory of the split's features held resident (float32 features and masks)."""
    store = dataset.store
    n_video = len(dict.fromkeys(dataset.video_ids))
    n_music = len(dict.fromkeys(dataset.music_ids))
    return 4 * (n_video * store.num_frames * (store.video_modality.dim + 1)
                + n_music * store.num_snippets * (store.music_modality.dim + 1))


def check_feature_device(requested: str, device: torch.device) -> None:
    """A --feature_device the training device can hold, or a ValueError / ConfigError saying why not."""
    if requested not in FEATURE_DEVICES:
        raise ValueError(f"--feature_device must be one of {FEATURE_DEVICES}, got {requested!r}")
    if requested == "cuda" and device.type != "cuda":
        from utils.train.preflight import ConfigError
        raise ConfigError(f"--feature_device cuda needs training on CUDA (--device is {device}); "
                          "use --feature_device auto or cpu")


def choose_feature_device(requested: str, dataset: Any, device: torch.device) -> torch.device | None:
    """Where the training features live: a device for ResidentLoader, or None for the DataLoader.

    "cpu": host memory (forced); "cuda": the training GPU (needs --device cuda); "auto": the
    GPU when training on CUDA, the features come from the packed store (no per-id reading
    up front) and they fit in RESIDENT_FRACTION of the free GPU memory; the DataLoader
    otherwise."""
    check_feature_device(requested, device)
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda":
        return device
    if device.type != "cuda" or not getattr(dataset.store, "is_packed", False):
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return device if resident_bytes(dataset) <= RESIDENT_FRACTION * free else None


def _unique_rows(ids: list[str]) -> tuple[list[str], np.ndarray]:
    """(distinct ids in first-seen order, for each id its position in that list)."""
    first: dict[str, int] = {}
    rows = np.fromiter((first.setdefault(i, len(first)) for i in ids), dtype=np.int64, count=len(ids))
    return list(first), rows


class ResidentFeatures:
    """A dataset's features, annotations and durations as tensors on `device`, gathered by row."""

    def __init__(self, dataset: Any, device: torch.device):
        self.dataset = dataset
        self.device = torch.device(device)
        store = dataset.store
        video_ids, video_rows = _unique_rows(dataset.video_ids)
        music_ids, music_rows = _unique_rows(dataset.music_ids)
        self.video_feats, self.video_masks = self._fill(store.videos, video_ids)
        self.music_feats, self.music_masks = self._fill(store.musics, music_ids)
        self.video_rows = torch.from_numpy(video_rows).to(self.device)
        self.music_rows = torch.from_numpy(music_rows).to(self.device)
        self.spans = dataset.spans.to(self.device)
        self.gt_moments = dataset.gt_moments.to(self.device)
        # Copies: the dataset's arrays may be read-only views of its DataFrame.
        self.m_durations = torch.tensor(dataset.m_durations, dtype=torch.float64, device=self.device)
        self.v_durations = torch.tensor(dataset.v_durations, dtype=torch.float64, device=self.device)

    def _fill(self, read, ids: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copy the store's rows for `ids` to the device, FILL_CHUNK rows at a time (the host
        never holds more than one chunk beyond the store's own pages)."""
        feats = masks = None
        for start in range(0, len(ids), FILL_CHUNK):
            f, m = read(ids[start:start + FILL_CHUNK])
            if feats is None:
                feats = torch.empty((len(ids), *f.shape[1:]), dtype=f.dtype, device=self.device)
                masks = torch.empty((len(ids), *m.shape[1:]), dtype=m.dtype, device=self.device)
            feats[start:start + f.shape[0]] = f.to(self.device)
            masks[start:start + m.shape[0]] = m.to(self.device)
        return feats, masks

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.video_feats, self.video_masks,
                                                          self.music_feats, self.music_masks))

    def batch(self, rows: torch.Tensor, indices: list[int]) -> dict[str, Any]:
        """The collate_fn batch of dataset rows `rows` (on the device; `indices`: the same rows
        on the host, for the id lists)."""
        vid, mus = self.video_rows[rows], self.music_rows[rows]
        ds = self.dataset
        return {
            "frame_feats": self.video_feats.index_select(0, vid), "frame_mask": self.video_masks.index_select(0, vid),
            "music_feats": self.music_feats.index_select(0, mus), "music_mask": self.music_masks.index_select(0, mus),
            "spans_target": self.spans.index_select(0, rows).unsqueeze(1),
            "gt_moment": self.gt_moments.index_select(0, rows).unsqueeze(1),
            "m_duration": self.m_durations.index_select(0, rows), "v_duration": self.v_durations.index_select(0, rows),
            "video_id": [ds.video_ids[i] for i in indices], "music_id": [ds.music_ids[i] for i in indices],
        }


class ResidentLoader:
    """Drop-in for make_loader's DataLoader: the same batches, gathered from ResidentFeatures.

    `sampler` is the DistributedSampler make_loader would use (train.py calls its set_epoch);
    batches are cut from its order as BatchSampler(sampler, batch_size, drop_last) cuts them.
    """

    def __init__(self, features: ResidentFeatures, sampler: DistributedSampler, batch_size: int, drop_last: bool):
        self.features = features
        self.sampler = sampler
        self.batch_sampler = BatchSampler(sampler, batch_size, drop_last)
        self.batch_size = batch_size
        self.dataset = features.dataset

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = [int(i) for i in self.sampler]   # this epoch's (and this rank's) rows
        perm = torch.tensor(order, dtype=torch.long).to(self.features.device)
        b = self.batch_size
        for k in range(len(self)):
            yield self.features.batch(perm[k * b:(k + 1) * b], order[k * b:(k + 1) * b])
