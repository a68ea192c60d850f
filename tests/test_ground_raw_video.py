"""scripts/ground.py --video: a raw video is grounded through CLIP extraction, with the same result
as extracting its features first and passing the .pt file; missing CLIP weights give a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import load_script
from tests.media_helpers import openai_clip_state_dict, write_video
from utils.train.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def setup(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from model.made import build_model
    from utils.train.options import parse_args
    tmp = tmp_path_factory.mktemp("ground_raw")
    args = parse_args(["--device", "cpu"], mode="train")
    torch.manual_seed(0)
    ckpt = tmp / "pytorch_model.bin.best_r1"
    save_checkpoint(ckpt, build_model(args), args, epoch=0)
    index = tmp / "music.index"
    rc = load_script("build_music_index").run(
        ["--load_uni_model_path", str(ckpt), "--frozen_feature_path", str(demo_data / "features/Kuai_feature"),
         "--music_ids", str(demo_data / "dataset/MGSV-EC/test_data.csv"), "--out", str(index), "--quiet"])
    assert rc == 0
    clip_weights = tmp / "ViT-B-32.pt"
    torch.save(openai_clip_state_dict(width=64, layers=2, seed=1), clip_weights)
    video = write_video(tmp / "query.mp4", seconds=6.4)
    return {"tmp": tmp, "ckpt": ckpt, "index": index, "clip": clip_weights, "video": video}


def test_raw_video_equals_extracted_features(setup: dict) -> None:
    from model.clip_encoder import load_clip
    from utils.extract.extract import extract_video_features
    ground = load_script("ground")
    out_raw = setup["tmp"] / "raw.json"
    assert ground.run(["--load_uni_model_path", str(setup["ckpt"]), "--index", str(setup["index"]),
                       "--video", str(setup["video"]), "--clip_weights", str(setup["clip"]),
                       "--device", "cpu", "--topk", "3", "--out", str(out_raw), "--quiet"]) == 0
    feat, mask = extract_video_features(setup["video"], load_clip(setup["clip"], "cpu"), "cpu")
    assert int(mask.sum()) == 7                                   # 6.4 s -> frames at t = 0..6
    torch.save(feat, setup["tmp"] / "query.pt")
    torch.save(mask, setup["tmp"] / "query_mask.pt")
    out_pt = setup["tmp"] / "pt.json"
    assert ground.run(["--load_uni_model_path", str(setup["ckpt"]), "--index", str(setup["index"]),
                       "--video_feature", str(setup["tmp"] / "query.pt"),
                       "--video_mask", str(setup["tmp"] / "query_mask.pt"),
                       "--device", "cpu", "--topk", "3", "--out", str(out_pt), "--quiet"]) == 0
    raw, pt = json.loads(out_raw.read_text()), json.loads(out_pt.read_text())
    assert [t["music_id"] for t in raw[0]["tracks"]] == [t["music_id"] for t in pt[0]["tracks"]]
    for a, b in zip(raw[0]["tracks"], pt[0]["tracks"]):
        assert a["start"] == pytest.approx(b["start"], abs=1e-4) and a["score"] == pytest.approx(b["score"], abs=1e-5)


def test_raw_video_without_clip_weights_is_a_clear_error(setup: dict, capsys: pytest.CaptureFixture) -> None:
    rc = load_script("ground").run(["--load_uni_model_path", str(setup["ckpt"]), "--index", str(setup["index"]),
                                    "--video", str(setup["video"]), "--clip_weights",
                                    str(setup["tmp"] / "missing" / "ViT-B-32.pt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2 and "ViT-B-32.pt" in err and "model/pretrained_models" in err
    assert "Traceback" not in err
