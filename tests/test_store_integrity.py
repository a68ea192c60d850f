"""The packed feature store proves its integrity: any edit of its ids, arrays or manifest, and any
content change of a per-id source file -- even in place, same size, mtime restored -- is found
before a feature is served; a failed rebuild leaves the previous store usable; --verify compares
every digest."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import load_script

from utils.data.features import FeatureError, video_modality
from utils.data.packed import inspect_packed, open_packed, pack_modality
from utils.data.store import FeatureStore

pack_features = load_script("pack_features")


@pytest.fixture
def root(demo_data_copy: Path) -> Path:
    root = demo_data_copy / "features" / "Kuai_feature"
    pack_modality(video_modality(root), progress=False)
    return root


def _edit_in_place(path: Path, offset: int, data: bytes) -> None:
    """Overwrite bytes at `offset` without changing the size, then restore the mtime."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


def test_sound_store_is_used_and_verifies(root: Path, capsys: pytest.CaptureFixture) -> None:
    assert open_packed(video_modality(root), verify=True) is not None
    assert pack_features.main(["--frozen_feature_path", str(root), "--modality", "video", "--verify"]) == 0
    assert "digests match" in capsys.readouterr().out


def test_per_id_file_edited_in_place_with_mtime_restored(root: Path) -> None:
    """Same size, same mtime: only the content changed. The stale store is not served."""
    modality = video_modality(root)
    video = sorted(p.stem for p in (root / "vit_feature1" / "vit_feature").glob("*.pt"))[0]
    path = modality.feat_path(video)
    feat = torch.load(path, weights_only=True)
    raw = path.read_bytes()
    needle = feat[0, :4].numpy().tobytes()
    _edit_in_place(path, raw.index(needle), (feat[0, :4] + 1).numpy().tobytes())
    with pytest.warns(UserWarning, match="out of date: the per-id files in .* changed since packing"):
        store = FeatureStore(root)
    assert "per-id" in store.backends["video"]
    assert torch.allclose(store.video(video)[0][0, :4], feat[0, :4] + 1)


@pytest.mark.parametrize("target", ["feats.npy", "masks.npy", "ids.json", "manifest.json"])
def test_store_file_edited_is_refused(root: Path, target: str) -> None:
    """With the per-id files gone, the store is the only copy: an edit of any of its files is an
    error naming the store and the rebuild command, before any feature is read."""
    directory = video_modality(root).packed_dir
    path = directory / target
    if target == "ids.json":
        ids = json.loads(path.read_text())
        ids[0], ids[1] = ids[1], ids[0]  # same bytes, other order: rows now belong to other ids
        st = path.stat()
        path.write_text(json.dumps(ids))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    elif target == "manifest.json":
        manifest = json.loads(path.read_text())
        manifest["num_items"] -= 1
        path.write_text(json.dumps(manifest))
    else:
        _edit_in_place(path, path.stat().st_size - 8, b"\x00\x00\x80\x3f" * 2)  # 1.0, 1.0: finite, plausible
    shutil.rmtree(root / "vit_feature1")
    with pytest.raises(FeatureError) as info:
        FeatureStore(root)
    text = str(info.value)
    assert f"packed store {directory}" in text and "pack_features.py" in text and "\n" not in text
    assert pack_features.main(["--frozen_feature_path", str(root), "--modality", "video", "--verify"]) == 2


def test_failed_rebuild_keeps_the_previous_store(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modality = video_modality(root)
    before = {p.name: p.read_bytes() for p in modality.packed_dir.iterdir()}
    import utils.data.packed as packed

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(packed, "atomic_save_npy", fail)
    with pytest.raises(OSError):
        pack_features.pack(root, modalities=("video",), force=True, progress=False)
    assert {p.name: p.read_bytes() for p in modality.packed_dir.iterdir()} == before
    assert inspect_packed(modality, verify=True)[1] is None
    assert not [p for p in modality.packed_dir.parent.iterdir() if p.name.startswith(".")]  # no staging left
