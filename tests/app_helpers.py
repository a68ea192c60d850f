"""A tiny folder in the layout scripts/demo.sh leaves (what scripts/app.py --demo reads), in seconds:
synthetic data, a random-weight small MaDe saved where a demo run would be, an index of the test
split's tracks and synthesised media for a few queries. Random weights are enough: the page only has
to show what the model returns, and the tests compare it with ground.py on the same checkpoint."""
from __future__ import annotations

from pathlib import Path

import torch

from tests.cli_helpers import TINY_MODEL
from tests.conftest import load_script
from utils.train.checkpoint import save_checkpoint

TINY_DEMO = dict(num_music=16, num_videos=40, val_size=4, test_size=8, seed=3)
CHECKPOINT = Path("logs/MGSV-EC/0101+demo/pytorch_model.bin.best_r1")


def make_tiny_demo(root: Path, media_queries: int = 2, topk: int = 3) -> dict[str, Path]:
    from model.made import build_model
    from utils.train.options import parse_args
    load_script("make_demo_data").make_demo_data(root, **TINY_DEMO)
    args = parse_args(["--device", "cpu", *TINY_MODEL], mode="train")
    torch.manual_seed(0)
    ckpt = root / CHECKPOINT
    save_checkpoint(ckpt, build_model(args), args, epoch=0)
    paths = {"root": root, "ckpt": ckpt, "index": root / "music.index",
             "csv": root / "dataset/MGSV-EC/test_data.csv", "features": root / "features/Kuai_feature"}
    assert load_script("build_music_index").run(
        ["--load_uni_model_path", str(ckpt), "--frozen_feature_path", str(paths["features"]),
         "--music_ids", str(paths["csv"]), "--out", str(paths["index"]), "--device", "cpu", "--quiet"]) == 0
    assert load_script("make_demo_media").main(
        ["--demo", str(root), "--queries", str(media_queries), "--load_uni_model_path", str(ckpt),
         "--index", str(paths["index"]), "--topk", str(topk)]) == 0
    return paths
