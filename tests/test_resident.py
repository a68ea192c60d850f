"""--feature_device: batches gathered from resident features equal the DataLoader's (ids, order, tensors)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from utils.train.distributed import DistInfo
from utils.train.options import parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _args(*extra: str):
    return parse_args(["--num_workers", "0", "--seed", "3", *extra], mode="train")


def _batches(loader, sampler, epochs: tuple[int, ...]) -> list[dict]:
    out = []
    for epoch in epochs:
        sampler.set_epoch(epoch)
        out += [{**b, "epoch": epoch} for b in loader]
    return out


def _assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want) > 0
    for g, w in zip(got, want):
        assert set(g) == set(w)
        for key, value in w.items():
            if torch.is_tensor(value):
                assert g[key].dtype == value.dtype and g[key].device.type == "cpu", key
                assert torch.equal(g[key], value), f"{key} differs in epoch {w['epoch']}"
            else:
                assert g[key] == value, key


@pytest.fixture(scope="module")
def packed_demo(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo data with its packed store."""
    import shutil

    from conftest import load_script
    root = tmp_path_factory.mktemp("resident") / "demo"
    shutil.copytree(demo_data, root)
    load_script("pack_features").pack(root / "features/Kuai_feature", progress=False)
    return root


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("packed", [False, True])
def test_resident_batches_equal_the_dataloader(demo_data: Path, packed_demo: Path, world_size: int,
                                               packed: bool) -> None:
    """Two epochs, every rank of a simulated torchrun, per-id files and the packed store: the same
    ids in the same order and equal tensors."""
    from utils.data.dataset import build_dataset
    from utils.data.resident import ResidentLoader
    from utils.train.setup import make_loader, make_train_loader
    root = packed_demo if packed else demo_data
    dataset = build_dataset(root / "dataset/MGSV-EC/train_data.csv", root / "features/Kuai_feature")
    assert dataset.store.is_packed == packed
    cpu = torch.device("cpu")
    for rank in range(world_size):
        info = DistInfo(rank=rank, world_size=world_size)
        ref_loader, ref_sampler = make_loader(dataset, 24, True, True, 3, info, cpu, _args())
        want = _batches(ref_loader, ref_sampler, (1, 2))
        loader, sampler = make_train_loader(dataset, 24, info, cpu, _args("--feature_device", "cpu"))
        assert isinstance(loader, ResidentLoader) and len(loader) == len(ref_loader)
        got = _batches(loader, sampler, (1, 2))
        _assert_same_batches(got, want)
        assert [b["video_id"] for b in got if b["epoch"] == 1] != [b["video_id"] for b in got if b["epoch"] == 2]


def test_auto_keeps_the_dataloader_on_cpu(demo_data: Path) -> None:
    from torch.utils.data import DataLoader

    from utils.data.dataset import build_dataset
    from utils.train.setup import make_train_loader
    dataset = build_dataset(demo_data / "dataset/MGSV-EC/train_data.csv", demo_data / "features/Kuai_feature")
    loader, _ = make_train_loader(dataset, 24, DistInfo(), torch.device("cpu"), _args())
    assert isinstance(loader, DataLoader)


def test_cuda_features_need_cuda_training(demo_data: Path) -> None:
    from utils.data.dataset import build_dataset
    from utils.data.resident import choose_feature_device
    from utils.train.preflight import ConfigError
    dataset = build_dataset(demo_data / "dataset/MGSV-EC/train_data.csv", demo_data / "features/Kuai_feature")
    with pytest.raises(ConfigError, match="--feature_device cuda"):
        choose_feature_device("cuda", dataset, torch.device("cpu"))


def test_resident_features_hold_each_id_once(demo_data: Path) -> None:
    """Repeated tracks are stored once; the footprint resident_bytes predicts is the one allocated."""
    from utils.data.dataset import build_dataset
    from utils.data.resident import ResidentFeatures, resident_bytes
    dataset = build_dataset(demo_data / "dataset/MGSV-EC/train_data.csv", demo_data / "features/Kuai_feature")
    features = ResidentFeatures(dataset, torch.device("cpu"))
    assert features.music_feats.shape[0] == len(set(dataset.music_ids)) < len(dataset)
    assert features.nbytes == resident_bytes(dataset)


def test_training_with_resident_features_equals_the_dataloader_run(demo_data: Path, tmp_path: Path) -> None:
    """train.py end to end: --feature_device cpu trains the very same run (weights bit for bit)."""
    from cli_helpers import (comparable_history, demo_paths, only_run_dir, output, read_state, run_cli, subset_csv,
                             train_args)

    from utils.train.checkpoint import LAST_NAME, load_checkpoint
    demo = demo_paths(demo_data)
    train = subset_csv(demo["train"], tmp_path / "train_data.csv", 48)
    val = subset_csv(demo["val"], tmp_path / "val_data.csv", 20)
    states, histories = [], []
    for name, extra in (("loader", []), ("resident", ["--feature_device", "cpu"])):
        proc = run_cli("train.py", train_args(train, val, demo["features"], tmp_path / name, 2, *extra))
        assert proc.returncode == 0, output(proc)[-3000:]
        run = only_run_dir(tmp_path / name)
        states.append(load_checkpoint(run / LAST_NAME)["model_state_dict"])
        histories.append(comparable_history(read_state(run)))
        if extra:
            assert "training features resident on cpu" in output(proc)
    assert histories[0] == histories[1]
    assert states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
