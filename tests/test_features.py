"""Feature store: per-id reading, validation messages, packed store equivalence, dataset/collate."""
from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import load_script
from torch.utils.data import DataLoader

from utils.data.annotations import load_annotations
from utils.data.dataset import MGSVDataset, build_dataset, collate_fn
from utils.data.features import MUSIC_DIRS, FeatureError, music_modality, video_modality
from utils.data.packed import open_packed, pack_modality
from utils.data.store import FeatureStore

pack_features = load_script("pack_features")

VID, MID = "113722188340", "7+5x4mjjeiubm49fg"


def good_video(valid: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(50)
    mask[:valid] = 1
    return torch.randn(50, 512) * 0.5 + 1.0, mask  # padded rows non-zero, as in real files


def good_music(valid: int = 40, rows: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros(rows)
    mask[:valid] = 1
    return torch.randn(rows, 768), mask


def make_root(tmp_path: Path, video: tuple | None = None, music: tuple | None = None) -> Path:
    """A feature root with one video VID and one track MID (override either pair)."""
    root = tmp_path / "Kuai_feature"
    for base, (feat_sub, mask_sub), item_id, pair in (
            (root / "vit_feature1", ("vit_feature", "vit_mask"), VID, video or good_video()),
            (root / "ast_feature2p5", ("ast_feature", "ast_mask"), MID, music or good_music())):
        (base / feat_sub).mkdir(parents=True, exist_ok=True)
        (base / mask_sub).mkdir(parents=True, exist_ok=True)
        torch.save(pair[0], base / feat_sub / f"{item_id}.pt")
        torch.save(pair[1], base / mask_sub / f"{item_id}.pt")
    return root


def expect_feature_error(fn, *fragments: str) -> str:
    with pytest.raises(FeatureError) as exc:
        fn()
    msg = str(exc.value)
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"
    return msg


# ---------------------------------------------------------------------------------- per-id


def test_per_id_load_casts_and_zeroes_padding(tmp_path: Path) -> None:
    feat, mask = good_video(valid=7)
    root = make_root(tmp_path, video=(feat.double(), mask))
    store = FeatureStore(root)
    f, m = store.video(VID)
    assert f.dtype == torch.float32 and m.dtype == torch.float32
    assert f.shape == (50, 512) and m.shape == (50,)
    assert torch.equal(m, mask)
    assert torch.allclose(f[:7], feat[:7].float()) and (f[7:] == 0).all()
    mf, mm = store.music(MID)
    assert mf.shape == (96, 768) and (mf[40:] == 0).all() and mm.sum() == 40
    assert store.num_snippets == 96 and store.num_frames == 50


def test_music_is_read_once_per_track(tmp_path: Path) -> None:
    store = FeatureStore(make_root(tmp_path), use_packed=False)
    assert store.music(MID)[0] is store.music(MID)[0]  # cached per id, not re-read per row


def test_batched_per_id_reads_equal_one_by_one_and_fail_in_order(tmp_path: Path) -> None:
    """get_many gives the same tensors as one get() per id, repeated ids included, and with two bad
    files the error names the first one in the batch's order."""
    root = make_root(tmp_path)
    base = root / "vit_feature1"
    ids = [str(100000000000 + i) for i in range(9)]
    for n, item_id in enumerate(ids):
        feat, mask = good_video(valid=5 + n)
        torch.save(feat, base / "vit_feature" / f"{item_id}.pt")
        torch.save(mask, base / "vit_mask" / f"{item_id}.pt")
    batch = ids + ids[:2]
    f, m = FeatureStore(root, use_packed=False).videos(batch)
    one = FeatureStore(root, use_packed=False)
    for row, item_id in enumerate(batch):
        assert torch.equal(f[row], one.video(item_id)[0]) and torch.equal(m[row], one.video(item_id)[1])
    for item_id in (ids[6], ids[3]):
        (base / "vit_mask" / f"{item_id}.pt").write_bytes(b"not a torch file")
    expect_feature_error(lambda: FeatureStore(root, use_packed=False).videos(ids), f"vit_mask/{ids[3]}.pt")


def test_bool_mask_accepted(tmp_path: Path) -> None:
    feat, mask = good_video()
    store = FeatureStore(make_root(tmp_path, video=(feat, mask.bool())))
    assert store.video(VID)[1].dtype == torch.float32


def test_check_passes_and_reports_missing(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    store = FeatureStore(root)
    store.check([VID], [MID])
    missing = [str(100000000000 + i) for i in range(7)]
    msg = expect_feature_error(lambda: store.check([VID] + missing, [MID]),
                               "7 of 8 video id(s) have no feature files",
                               str(root / "vit_feature1" / "vit_feature" / f"{missing[0]}.pt"),
                               "more", "features/README.md")
    assert "music" not in msg.split("\n")[0]


def test_check_reports_missing_mask_only(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    (root / "ast_feature2p5" / "ast_mask" / f"{MID}.pt").unlink()
    expect_feature_error(lambda: FeatureStore(root).check([VID], [MID]),
                         "1 of 1 music id(s) have no feature files", f"ast_mask/{MID}.pt")


def test_missing_file_on_load(tmp_path: Path) -> None:
    store = FeatureStore(make_root(tmp_path))
    expect_feature_error(lambda: store.video("999"), "999.pt", "not found")


def test_truncated_file(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    path = root / "vit_feature1" / "vit_feature" / f"{VID}.pt"
    path.write_bytes(path.read_bytes()[:500])
    expect_feature_error(lambda: FeatureStore(root).video(VID), str(path), "truncated or corrupt")
    # check() loads the first few ids' content too, so it fails before training.
    expect_feature_error(lambda: FeatureStore(root).check([VID], [MID]), str(path))


def test_not_a_tensor(tmp_path: Path) -> None:
    root = make_root(tmp_path)
    path = root / "vit_feature1" / "vit_mask" / f"{VID}.pt"
    torch.save({"mask": 1}, path)
    expect_feature_error(lambda: FeatureStore(root).video(VID), str(path), "contains a dict")


@pytest.mark.parametrize("feat, fragment", [
    (torch.randn(50, 768), "shape [50, 768], expected [50, 512]"),
    (torch.randn(50, 512, 1), "shape [50, 512, 1]"),
])
def test_wrong_shape(tmp_path: Path, feat: torch.Tensor, fragment: str) -> None:
    root = make_root(tmp_path, video=(feat, good_video()[1]))
    expect_feature_error(lambda: FeatureStore(root).video(VID), "vit_feature", fragment)


def test_wrong_row_count_hints_stride(tmp_path: Path) -> None:
    root = make_root(tmp_path, music=good_music(rows=48))  # a stride-5 file in the 2.5 folder
    expect_feature_error(lambda: FeatureStore(root).music(MID), f"{MID}.pt", "48 rows, expected 96",
                         "another stride")


def test_int_dtype(tmp_path: Path) -> None:
    feat, mask = good_video()
    root = make_root(tmp_path, video=(feat.long(), mask))
    expect_feature_error(lambda: FeatureStore(root).video(VID), f"{VID}.pt", "dtype torch.int64",
                         "floating-point")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_in_valid_rows(tmp_path: Path, bad: float) -> None:
    feat, mask = good_video(valid=10)
    feat[3, 17] = bad
    root = make_root(tmp_path, video=(feat, mask))
    expect_feature_error(lambda: FeatureStore(root).video(VID), f"vit_feature/{VID}.pt", "NaN or inf")


def test_nan_in_padded_rows_is_zeroed(tmp_path: Path) -> None:
    feat, mask = good_video(valid=10)
    feat[30] = float("nan")
    f, _ = FeatureStore(make_root(tmp_path, video=(feat, mask))).video(VID)
    assert torch.isfinite(f).all() and (f[30] == 0).all()


def test_all_zero_mask(tmp_path: Path) -> None:
    root = make_root(tmp_path, music=(torch.randn(96, 768), torch.zeros(96)))
    expect_feature_error(lambda: FeatureStore(root).music(MID), f"ast_mask/{MID}.pt", "all zeros")


def test_mask_length_disagrees_with_rows(tmp_path: Path) -> None:
    root = make_root(tmp_path, video=(torch.randn(50, 512), torch.ones(40)))
    expect_feature_error(lambda: FeatureStore(root).video(VID), f"vit_mask/{VID}.pt",
                         "mask length 40 disagrees with the 50 feature rows")


def test_mask_values_not_binary(tmp_path: Path) -> None:
    mask = torch.ones(50) * 0.5
    root = make_root(tmp_path, video=(torch.randn(50, 512), mask))
    expect_feature_error(lambda: FeatureStore(root).video(VID), f"vit_mask/{VID}.pt", "0 or 1", "0.5")


def test_store_configuration_errors(tmp_path: Path) -> None:
    expect_feature_error(lambda: FeatureStore(tmp_path / "nowhere"), "does not exist", "MGSV_feature.zip")
    root = make_root(tmp_path)
    expect_feature_error(lambda: FeatureStore(root, stride=3.0), "--stride 3", "not supported")
    store5 = FeatureStore(root, stride=5.0)  # a root may hold one modality only
    store5.check([VID], [])
    for use in (lambda: store5.music(MID), lambda: store5.check([VID], [MID])):
        expect_feature_error(use, "ast_feature5 not found", "ast_feature2p5", "--stride")
    assert set(MUSIC_DIRS) == {2.5, 5.0, 7.5, 10.0}


def test_errors_are_value_errors() -> None:
    assert issubclass(FeatureError, ValueError)


# ---------------------------------------------------------------------------------- packed


def all_ids(root: Path) -> tuple[list[str], list[str]]:
    dfs = [load_annotations(root / "dataset" / "MGSV-EC" / f"{s}_data.csv") for s in ("train", "val", "test")]
    videos = [v for df in dfs for v in df["video_id"]]
    musics = sorted({m for df in dfs for m in df["music_id"]})
    return videos, musics


def test_packed_equals_per_id(demo_data_copy: Path) -> None:
    root = demo_data_copy / "features" / "Kuai_feature"
    videos, musics = all_ids(demo_data_copy)
    assert pack_features.main(["--frozen_feature_path", str(root), "--no_progress"]) == 0
    packed, per_id = FeatureStore(root), FeatureStore(root, use_packed=False)
    assert "packed" in packed.backends["video"] and "packed" in packed.backends["music"]
    assert "per-id" in per_id.backends["video"]
    pairs = ((packed.videos(videos), per_id.videos(videos)), (packed.musics(musics), per_id.musics(musics)))
    for a, b in pairs:
        assert a[0].dtype == torch.float32 and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # Duplicated ids in a batch (many rows share a track) and single-id access.
    dup = [musics[3], musics[0], musics[3]]
    assert torch.equal(packed.musics(dup)[0], per_id.musics(dup)[0])
    assert torch.equal(packed.video(videos[5])[0], per_id.video(videos[5])[0])
    assert torch.equal(packed.music(musics[1])[1], per_id.music(musics[1])[1])
    packed.check(videos, musics)
    expect_feature_error(lambda: packed.check(["1"], musics), "1 of 1 video id(s)",
                         "'1' (not in the packed store)", "packed float32 store")
    # Other strides are packed independently; stride 5 stays per-id here.
    assert "per-id" in FeatureStore(root, stride=5.0).backends["music"]


def test_fp16_packing_is_close(demo_data_copy: Path) -> None:
    root = demo_data_copy / "features" / "Kuai_feature"
    videos, musics = all_ids(demo_data_copy)
    pack_features.pack(root, fp16=True, progress=False)
    packed, per_id = FeatureStore(root), FeatureStore(root, use_packed=False)
    a, b = packed.videos(videos[:50]), per_id.videos(videos[:50])
    assert a[0].dtype == torch.float32 and torch.equal(a[1], b[1])
    assert torch.allclose(a[0], b[0], rtol=1e-3, atol=1e-3) and not torch.equal(a[0], b[0])
    assert torch.allclose(packed.musics(musics)[0], per_id.musics(musics)[0], rtol=1e-3, atol=1e-3)


def test_stale_packed_store_is_ignored(demo_data_copy: Path) -> None:
    root = demo_data_copy / "features" / "Kuai_feature"
    videos, _ = all_ids(demo_data_copy)
    modality = video_modality(root)
    pack_modality(modality, progress=False)
    assert open_packed(modality) is not None
    # Rewrite one source file with new content: packed store must not be used any more.
    path = modality.feat_path(videos[0])
    feat = torch.load(path)
    torch.save(feat + 1, path)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.warns(UserWarning, match="out of date"):
        store = FeatureStore(root)
    assert "per-id" in store.backends["video"]
    assert torch.equal(store.video(videos[0])[0][0], (feat[0] + 1))
    # Re-packing fixes it.
    pack_features.pack(root, modalities=("video",), progress=False)
    assert "packed" in FeatureStore(root).backends["video"]


def test_packed_store_used_when_per_id_files_removed(demo_data_copy: Path) -> None:
    root = demo_data_copy / "features" / "Kuai_feature"
    videos, musics = all_ids(demo_data_copy)
    before = FeatureStore(root, use_packed=False).musics(musics)
    pack_modality(music_modality(root), progress=False)
    shutil.rmtree(root / "ast_feature2p5")
    store = FeatureStore(root)
    assert "packed" in store.backends["music"]
    assert torch.equal(store.musics(musics)[0], before[0])


def test_interrupted_pack_is_not_used(demo_data_copy: Path) -> None:
    root = demo_data_copy / "features" / "Kuai_feature"
    modality = music_modality(root)
    pack_modality(modality, progress=False)
    (modality.packed_dir / "manifest.json").unlink()  # what a crash before the last write leaves
    assert open_packed(modality) is None
    assert "per-id" in FeatureStore(root).backends["music"]


def test_pack_refuses_unpaired_files(demo_data_copy: Path) -> None:
    root = demo_data_copy / "features" / "Kuai_feature"
    next((root / "vit_feature1" / "vit_mask").glob("*.pt")).unlink()
    expect_feature_error(lambda: pack_modality(video_modality(root), progress=False),
                         "feature without a mask")
    assert pack_features.main(["--frozen_feature_path", str(root), "--modality", "video",
                               "--no_progress"]) == 2


def test_packed_source_pickles_without_arrays(demo_data_copy: Path) -> None:
    root = demo_data_copy / "features" / "Kuai_feature"
    pack_modality(video_modality(root), progress=False)
    store = FeatureStore(root)
    videos, _ = all_ids(demo_data_copy)
    expected = store.videos(videos[:4])[0]
    blob = pickle.dumps(store)
    assert len(blob) < 1_000_000  # the memmap (~20 MB here) is reopened, not copied
    assert torch.equal(pickle.loads(blob).videos(videos[:4])[0], expected)


# ---------------------------------------------------------------------------------- dataset


def test_dataset_items_and_collate(demo_data: Path) -> None:
    csv = demo_data / "dataset" / "MGSV-EC" / "val_data.csv"
    ds = build_dataset(csv, demo_data / "features" / "Kuai_feature")
    df = load_annotations(csv)
    assert len(ds) == len(df)
    item = ds[2]
    assert item["video_id"] == df["video_id"][2] and item["music_id"] == df["music_id"][2]
    assert item["frame_feats"].shape == (50, 512) and item["music_feats"].shape == (96, 768)
    assert item["frame_mask"].shape == (50,) and item["music_mask"].shape == (96,)
    s, e = df["music_start"][2], df["music_end"][2]
    assert torch.allclose(item["spans_target"], torch.tensor([[(s + e) / 2 / 240, (e - s) / 240]],
                                                                dtype=torch.float32))
    assert torch.allclose(item["gt_moment"], torch.tensor([[s, e]], dtype=torch.float32))
    assert item["m_duration"] == df["music_total_duration"][2]
    assert item["v_duration"] == pytest.approx(df["video_end"][2] - df["video_start"][2])
    batch = collate_fn([ds[i] for i in range(5)])
    assert batch["frame_feats"].shape == (5, 50, 512) and batch["spans_target"].shape == (5, 1, 2)
    assert batch["m_duration"].dtype == torch.float64 and batch["m_duration"].shape == (5,)
    assert batch["video_id"] == list(df["video_id"][:5])
    # DataLoader path (__getitems__, batched store calls) gives the same batch.
    loaded = next(iter(DataLoader(ds, batch_size=5, shuffle=False, collate_fn=collate_fn)))
    for k, v in batch.items():
        assert torch.equal(v, loaded[k]) if isinstance(v, torch.Tensor) else v == loaded[k]


def test_dataset_clamps_end_to_max_m_duration(demo_data: Path) -> None:
    df = load_annotations(demo_data / "dataset" / "MGSV-EC" / "val_data.csv").head(1).copy()
    df.loc[0, ["music_start", "music_end", "music_total_duration"]] = [200.0, 240.04, 240.04]
    ds = MGSVDataset(df, FeatureStore(demo_data / "features" / "Kuai_feature"))
    item = ds[0]
    assert torch.allclose(item["gt_moment"], torch.tensor([[200.0, 240.0]]))
    assert torch.allclose(item["spans_target"], torch.tensor([[220.0 / 240, 40.0 / 240]]))


def test_build_dataset_reports_missing_features(demo_data: Path, tmp_path: Path) -> None:
    df = pd.read_csv(demo_data / "dataset" / "MGSV-EC" / "val_data.csv", dtype=str)
    df.loc[0, "video_id"] = "123456789012"
    df.to_csv(tmp_path / "v.csv", index=False)
    expect_feature_error(lambda: build_dataset(tmp_path / "v.csv", demo_data / "features" / "Kuai_feature"),
                         "1 of 40 video id(s) have no feature files", "123456789012.pt")
