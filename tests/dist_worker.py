"""Two-process training check, run by tests/test_distributed.py under torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py OUT_DIR DATA_ROOT

Each rank builds the model, loaders and DDP wrapper exactly as train.py does (utils/train/setup.py), takes
its share of the first global batch, and saves to OUT_DIR/rank<r>.pt:
  * the first-step gradients (after DDP's all-reduce) with global-batch negatives, and again with
    --local_negatives behaviour, plus the per-rank losses and the batch's video ids;
  * the parameters after a few optimizer steps of utils/train/loop.train_one_epoch.
The test imports this module to compute the same things in one process.

Dropout: a rank's dropout masks cannot match one process's, so every dropout is off: the flags
--temporal_dropout 0 and --detr_dropout 0, and X-Pool's fixed p = 0.3 (no flag) set to 0 on the
module. The forward runs in train mode, as in training.
"""
from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from utils.io import atomic_torch_save  # noqa: E402
from utils.logger import Scalars, setup_logger  # noqa: E402
from utils.train import distributed as D  # noqa: E402
from utils.train.loop import to_device, train_one_epoch  # noqa: E402
from utils.train.options import parse_args  # noqa: E402
from utils.train.setup import build_loaders, build_training, seed_everything  # noqa: E402

GLOBAL_BATCH = 8
TRAIN_STEPS = 3


def tiny_args(data_root: Path, extra: list[str] | None = None):
    data = Path(data_root)
    return parse_args([
        "--dim_input", "32", "--detr_dim_feedforward", "64", "--detr_enc_layers", "1", "--detr_dec_layers", "2",
        "--temporal_dropout", "0", "--detr_dropout", "0", "--warmup_rate", "0",
        # The first global batch holds one track twice, on different ranks: the masking must
        # compare this rank's ids with the gathered ones. (Seed 2 deals such a batch from the
        # shared demo fixture; the test asserts it.)
        "--mask_same_music", "1", "--seed", "2",
        "--batch_size_train", str(GLOBAL_BATCH), "--no-do_eval", "--device", "cpu", "--num_workers", "0",
        "--tb_writer", "0", "--num_display", "1",
        "--train_csv", str(data / "dataset/MGSV-EC/train_data.csv"),
        "--frozen_feature_path", str(data / "features/Kuai_feature"), *(extra or [])], mode="train")


def no_dropout(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0  # X-Pool's dropout has no flag
        if isinstance(module, nn.MultiheadAttention):
            assert module.dropout == 0.0


def setup(args, dist_info: D.DistInfo):
    """(loader, sampler, model, criterion, optimizer, scheduler, ddp_model) as train.py builds them."""
    seed_everything(args.seed)
    device = torch.device("cpu")
    loader, _, sampler = build_loaders(args, dist_info, device, need_train=True)
    model, criterion, optimizer, scheduler, ddp_model = build_training(args, device, dist_info, len(loader))
    no_dropout(model)
    sampler.set_epoch(1)
    return loader, sampler, model, criterion, optimizer, scheduler, ddp_model


def step_grads(ddp_model: nn.Module, model: nn.Module, criterion: nn.Module, batch: dict):
    """Loss and parameter gradients of one training forward/backward (gradients cleared after)."""
    ddp_model.train()
    criterion.train()
    loss, _ = criterion(ddp_model(batch), batch)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def main(out_dir: str, data_root: str) -> None:
    torch.set_num_threads(1)
    dist_info = D.init_distributed("cpu")
    setup_logger(None, is_main=dist_info.is_main)
    args = tiny_args(Path(data_root))
    loader, _, model, criterion, optimizer, scheduler, ddp_model = setup(args, dist_info)
    assert model.gather_negatives is D.gather_with_grad and isinstance(ddp_model, nn.parallel.DistributedDataParallel)
    batch = to_device(next(iter(loader)), torch.device("cpu"))
    loss, grads = step_grads(ddp_model, model, criterion, batch)
    model.gather_negatives = None   # what --local_negatives 1 leaves
    loss_local, grads_local = step_grads(ddp_model, model, criterion, batch)
    model.gather_negatives = D.gather_with_grad
    train_one_epoch(ddp_model, criterion, loader, optimizer, scheduler, torch.device("cpu"), 1, args,
                    Scalars(None, enabled=False), 0, show_progress=False, max_steps=TRAIN_STEPS)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    atomic_torch_save({"rank": dist_info.rank, "world_size": dist_info.world_size, "video_ids": batch["video_id"],
                       "music_ids": batch["music_id"],
                       "loss": loss, "grads": grads, "loss_local": loss_local, "grads_local": grads_local,
                       "params": params}, Path(out_dir) / f"rank{dist_info.rank}.pt")
    D.cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
