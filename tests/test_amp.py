"""--amp on the CPU: bf16 autocasts there (fast where the CPU has AMX or AVX512-BF16), fp16 is refused
in one line, and float32 (--amp none, the paper's setting) stays the default."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from utils.data.dataset import collate_fn
from utils.device import DeviceError, check_amp
from utils.train.distributed import DistInfo
from utils.train.loop import autocast_context
from utils.train.options import parse_args
from utils.train.setup import build_loaders, build_training, seed_everything

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CPU = torch.device("cpu")


def test_which_amp_runs_where() -> None:
    assert check_amp("none", CPU) is None
    assert check_amp("fp16", torch.device("cuda")) is None and check_amp("bf16", torch.device("cuda")) is None
    note = check_amp("bf16", CPU)
    assert note is None or "slower than float32" in note   # None where the CPU multiplies bf16 natively
    with pytest.raises(DeviceError, match=r"^--amp fp16 needs CUDA; on the CPU use --amp bf16 or none$"):
        check_amp("fp16", CPU)
    with pytest.raises(DeviceError, match=r"^--compile with --amp bf16 on the CPU trains on NaN gradients"):
        check_amp("bf16", CPU, compile_model=True)       # inductor's CPU bf16 attention-dropout backward
    assert check_amp("none", CPU, compile_model=True) is None
    assert check_amp("bf16", torch.device("cuda"), compile_model=True) is None
    assert parse_args([], mode="train").amp == "none"


def test_bf16_training_loss_on_the_cpu_is_autocast_and_close_to_float32(demo_data: Path) -> None:
    losses = {}
    for amp in ("none", "bf16"):
        args = parse_args(["--dim_input", "32", "--detr_dim_feedforward", "64", "--detr_enc_layers", "1",
                           "--detr_dec_layers", "2", "--batch_size_train", "8", "--no-do_eval", "--device", "cpu",
                           "--num_workers", "0", "--amp", amp,
                           "--train_csv", str(demo_data / "dataset/MGSV-EC/train_data.csv"),
                           "--frozen_feature_path", str(demo_data / "features/Kuai_feature")], mode="train")
        seed_everything(args.seed)
        loader, _, _ = build_loaders(args, DistInfo(), CPU)
        model, criterion, _, _, _ = build_training(args, CPU, DistInfo(), len(loader))
        model.eval()   # no dropout: the two losses differ by the precision only
        batch = collate_fn(loader.dataset.__getitems__(list(range(8))))
        with autocast_context(CPU, args.amp):
            outputs = model(batch)
            loss, _ = criterion(outputs, batch)
        assert outputs["video_emb"].dtype == (torch.bfloat16 if amp == "bf16" else torch.float32)
        loss.backward()
        assert all(p.dtype == torch.float32 for p in model.parameters())   # the weights stay float32
        losses[amp] = float(loss.detach())
    assert losses["bf16"] != losses["none"]
    assert abs(losses["bf16"] - losses["none"]) < 0.05 * abs(losses["none"]), losses
