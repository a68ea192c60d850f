"""FeatureStore: frozen video/music features by id, as the datasets, test.py and the grounding
tools read them: from the packed store (utils/data/packed.py) when it is usable, else from the
per-id files (utils/data/features.py)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

from utils.data.constants import MAX_M_DURATION
from utils.data.features import (README_HINT, FeatureError, Modality, PerIdSource, UnavailableSource, listed,
                                 music_modality, num_snippets_for, unique_in_order, video_modality)
from utils.data.packed import PackedSource, open_packed

# --------------------------------------------------------------------------------------------
# The store used by datasets


class FeatureStore:
    """Frozen video/music features by id, from the packed store when usable else per-id files.

    All returned tensors are float32 with padded rows zeroed; the packed and per-id paths
    give identical tensors (fp16 packing, opt-in, gives close ones).
    """

    def __init__(self, root: str | os.PathLike, stride: float = 2.5, max_m_duration: float = MAX_M_DURATION,
                 num_frames: int = 50, use_packed: bool = True, music_cache_size: int | None = None):
        self.root = Path(root)
        self.stride = float(stride)
        self.num_frames = int(num_frames)
        self.num_snippets = num_snippets_for(self.stride, max_m_duration)
        if not self.root.is_dir():
            raise FeatureError(f"feature root {self.root} does not exist. Download and unzip "
                               "MGSV_feature.zip into features/Kuai_feature, pass --frozen_feature_path, "
                               f"or make synthetic data with scripts/make_demo_data.py. {README_HINT}")
        self.video_modality = video_modality(self.root, self.num_frames)
        self.music_modality = music_modality(self.root, self.stride, max_m_duration)
        # Music is read once per track (tracks repeat across rows), videos once per row.
        self._video = self._source(self.video_modality, use_packed, cache_size=0)
        self._music = self._source(self.music_modality, use_packed, cache_size=music_cache_size)

    def _source(self, modality: Modality, use_packed: bool,
                cache_size: int | None) -> PerIdSource | PackedSource | UnavailableSource:
        packed = open_packed(modality) if use_packed else None
        if packed is not None:
            return packed
        if not modality.base.is_dir():
            # Not an error yet: a music-only root (e.g. a library to index) never asks for videos.
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            return UnavailableSource(modality, (
                f"{modality.base} not found (needed for {modality.name} features at stride "
                f"{self.stride:g}); {self.root} contains {present}. Check --frozen_feature_path "
                f"and --stride. {README_HINT}"))
        return PerIdSource(modality, cache_size=cache_size)

    @property
    def is_packed(self) -> bool:
        """Both modalities come from the packed (memory-mapped) store."""
        return self._video.kind == "packed" and self._music.kind == "packed"

    @property
    def backends(self) -> dict[str, str]:
        """Where each modality is read from (for logs)."""
        return {"video": self._video.describe(), "music": self._music.describe()}

    def video(self, video_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(feat [num_frames, 512], mask [num_frames]) float32."""
        return self._video.get(str(video_id))

    def music(self, music_id: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(feat [num_snippets, 768], mask [num_snippets]) float32."""
        return self._music.get(str(music_id))

    def videos(self, video_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched video(): ([B, num_frames, 512], [B, num_frames])."""
        return self._video.get_many([str(i) for i in video_ids])

    def musics(self, music_ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batched music(): ([B, num_snippets, 768], [B, num_snippets])."""
        return self._music.get_many([str(i) for i in music_ids])

    def check(self, video_ids: Iterable[str], music_ids: Iterable[str], content_sample: int = 4) -> None:
        """Fail before training if any id lacks its files; validate a few files' content.

        Existence is checked for every id (directory listings, fast); content is
        validated for the first `content_sample` ids of each modality here (wrong
        stride, dtype or shape shows up at once) and for every other id when it is
        first loaded. `content_sample=-1` loads everything (slow on the full dataset).
        """
        problems = []
        checks = ((self._video, unique_in_order(video_ids)), (self._music, unique_in_order(music_ids)))
        for source, ids in checks:
            missing = source.missing(ids)
            if missing:
                paths = [p for group in missing.values() for p in group]
                problems.append(f"{len(missing)} of {len(ids)} {source.modality.name} id(s) have no "
                                f"feature files ({source.describe()}); first missing: {listed(paths)}")
        if problems:
            raise FeatureError(
                "\n".join(problems) + "\nDownload/unzip the features (features/README.md), fix "
                "--frozen_feature_path / --stride, or drop those rows from the CSV.")
        for source, ids in checks:
            sample = ids if content_sample < 0 else ids[:content_sample]
            for item_id in sample:
                source.get(item_id)
