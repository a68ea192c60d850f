"""scripts/diagnose_localisation.py: X-Pool's paired attention is the attention its forward
uses, the window readout finds the attended window, and the detector column equals test.py's
mIoU on the same checkpoint and split."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, load_script
from utils.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")
diag = load_script("diagnose_localisation")


def test_paired_attention_is_the_forward_attention() -> None:
    from model.xpool import XPool
    torch.manual_seed(0)
    xpool = XPool(16).eval()
    with torch.no_grad():  # away from the identity initialisation
        for p in xpool.parameters():
            p.add_(0.3 * torch.randn_like(p))
    videos, snippets = torch.randn(5, 16), torch.randn(5, 7, 16)
    mask = torch.ones(5, 7)
    mask[1, 4:] = 0
    a = xpool.paired_attention(videos, snippets, mask)
    assert torch.allclose(a.sum(-1), torch.ones(5)) and (a[1, 4:] == 0).all()
    # Rebuild P[i, i] from the weights with X-Pool's own layers: equals the forward's diagonal.
    ca = xpool.cross_attn
    o = ca.out_proj(torch.einsum("bl,bld->bd", a, ca.v_proj(xpool.layer_norm1(snippets))))
    h = xpool.layer_norm2(o)
    rebuilt = xpool.layer_norm3(h + xpool.linear_proj(h))
    forward = xpool(videos, snippets, mask)                                   # [tracks, videos, d]
    assert torch.allclose(rebuilt, forward.diagonal(dim1=0, dim2=1).T, atol=1e-5)


def test_best_window_starts() -> None:
    a = np.zeros((2, 20))
    a[0, 10:15] = 0.2                       # centres 25-35 s
    a[1, 11:13] = 0.5                       # centres 27.5 and 30 s: only [20, 30] covers both in a 30 s track
    starts = diag.best_window_starts(a, 2.5, np.array([10.0, 10.0]), np.array([100.0, 30.0]))
    assert starts[0] == 25.0                # [25, 35] holds all the mass
    assert starts[1] == 20.0                # the window stays inside the track


def test_detector_column_equals_test_py(demo_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from model.made import build_model
    from utils.train.options import parse_args
    args = parse_args(["--device", "cpu"], mode="train")
    torch.manual_seed(0)
    ckpt = tmp_path / "pytorch_model.bin.best_r1"
    save_checkpoint(ckpt, build_model(args), args, epoch=0)
    common = ["--load_uni_model_path", str(ckpt), "--test_csv", str(demo_data / "dataset/MGSV-EC/test_data.csv"),
              "--frozen_feature_path", str(demo_data / "features/Kuai_feature"), "--device", "cpu"]
    assert diag.run(common + ["--late", "5"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()
            if len(line.split()) == 3 and line.split()[0] in ("detector", "xpool", "start0")}
    assert set(rows) == {"detector", "xpool", "start0"} and "moments start after 5 s" in out

    spec = importlib.util.spec_from_file_location("_mgsv_test_entry", REPO_ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(common + ["--metrics_json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert float(rows["detector"][0]) == pytest.approx(metrics["mIoU"], abs=1e-4)


def test_bad_checkpoint_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert diag.run(["--load_uni_model_path", str(tmp_path / "missing.bin")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
