"""torch.distributed helpers: a plain `python train.py` stays single-process;
`torchrun --nproc_per_node N train.py ...` (or several nodes with torchrun's
--nnodes/--node_rank/--rdzv_* flags) turns on DistributedDataParallel.

torchrun exports RANK / WORLD_SIZE / LOCAL_RANK; their presence is what
switches distributed mode on. Backend: nccl on CUDA, gloo on CPU.

What runs where (see also docs/distributed.md):
  * training: DistributedSampler (set_epoch every epoch) gives each rank
    batch_size_train / world_size rows; the retrieval loss sees the GLOBAL batch
    through `gather_with_grad` (model/made.py), so --batch_size_train means the
    same number of negatives on any number of processes;
  * evaluation: `ShardSampler` cuts the split into contiguous, equally long
    shards (the last one padded by repeating a row); utils/evaluate/engine.collect gathers
    every rank's rows and drops the padding, so all ranks compute the metrics
    over the whole split exactly as one process does;
  * only rank 0 writes files (checkpoints, logs, TensorBoard).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Sampler


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Initialise the process group when launched by torchrun, else a single process."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo()
    world_size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise ValueError(f"LOCAL_RANK {local_rank} but this node has {torch.cuda.device_count()} "
                                 "visible GPUs: lower torchrun's --nproc_per_node")
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


# How long cleanup() lets go of the GIL before tearing the process group down (see there).
DRAIN_S = 0.05


def cleanup() -> None:
    """Destroy the process group; call it once every collective is done, before the process exits.

    A gloo worker thread drops its reference to a finished collective just after the caller's wait
    returns, and that drop can take the GIL (the work holds Python state). If the main thread reaches
    interpreter shutdown first, the worker cannot get the GIL, its thread is unwound inside a
    destructor and the process aborts ("terminate called without an active exception", exit -6):
    a run that finished its work but fails under torchrun. Sleeping releases the GIL so the workers
    finish first; measured with two CPU ranks on a loaded 2-core machine, 7 of 16 runs aborted
    without it and 0 of 16 with it. (Seen with gloo; NCCL's watchdog thread also drops finished
    works, and 50 ms is nothing next to a run, so every backend waits.)
    """
    if dist.is_available() and dist.is_initialized():
        time.sleep(DRAIN_S)
        dist.destroy_process_group()


# ------------------------------------------------------------------ collectives
# torch 2.14 renamed the single-tensor collectives (the old names warn); torch >= 2.1 is supported.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the SUM of the gradients for its rows.

    Each rank's loss uses the other ranks' rows, so the gradient of a row is the sum of the
    contributions of every rank's loss. DDP then averages parameter gradients over ranks,
    which turns "sum over ranks of the per-rank losses" into their mean (see
    model/losses.py for why that mean is the one-process global loss). Same semantics as
    torch.distributed.nn.functional.all_gather (deprecated in this torch), written out so
    that the backward is a reduce-scatter on NCCL and an all-reduce (no reduce-scatter
    in gloo) on CPU.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        ctx.rank, ctx.n = rank, x.shape[0]
        x = x.contiguous()
        out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_single(out, x)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            own = torch.empty((ctx.n, *grad.shape[1:]), dtype=grad.dtype, device=grad.device)
            _reduce_scatter_single(own, grad, op=dist.ReduceOp.SUM)
            return own
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on every rank (same n everywhere) -> [world * n, ...] in rank order, differentiable.

    Identity in a single process.
    """
    if not is_dist():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def all_gather_varlen(x: torch.Tensor) -> torch.Tensor:
    """Concatenate [n_r, ...] of every rank in rank order; n_r may differ (pad, gather, trim)."""
    if not is_dist():
        return x
    world = dist.get_world_size()
    size = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    longest = max(sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


def ddp_wrap(model: torch.nn.Module, device: torch.device, local_rank: int,
             find_unused_parameters: bool = False) -> torch.nn.Module:
    """DistributedDataParallel without per-forward buffer sync (MaDe's only buffers are constant
    position tables; rank 0's weights and buffers are still copied to every rank at start)."""
    import inspect

    from torch.nn.parallel import DistributedDataParallel as DDP
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
               else {"broadcast_buffers": False})
    return DDP(model, device_ids=[local_rank] if device.type == "cuda" else None,
               find_unused_parameters=find_unused_parameters, **no_sync)


def has_unused_parameters(args: Any) -> bool:
    """Configurations whose forward leaves trainable parameters unused (DDP must then look for
    them every step): the regression head never runs the DETR decoder, and --decoder_SA_fix 1
    without --decoder_SA keeps the decoder's self-attention weights but skips them.
    tests/test_distributed.py checks this rule against real backward passes."""
    return args.mml_localization == "regression" or bool(args.decoder_SA_fix and not args.decoder_SA)


def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] (pickled; for small things such as id lists)."""
    if not is_dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (out of place)."""
    if not is_dist():
        return x
    x = x.detach().clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_true(flag: bool, device: torch.device | str = "cpu") -> bool:
    """True when flag is True on every rank: lets all ranks take the same branch (no deadlock)."""
    if not is_dist():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item() > 0)


# ------------------------------------------------------------------ evaluation sharding
def shard_bounds(n: int, rank: int, world_size: int) -> tuple[int, int, int]:
    """(start, stop, shard_len): rank's contiguous rows [start, stop) of n, every shard shard_len long."""
    shard_len = max(1, math.ceil(n / world_size))
    start = min(n, rank * shard_len)
    return start, min(n, start + shard_len), shard_len


class ShardSampler(Sampler[int]):
    """Evaluation sampler: rank r gets the contiguous rows [r*s, (r+1)*s) of the split, s = ceil(n/world).

    Every rank yields exactly s indices (the last shards are padded by repeating the split's
    last row), so every rank runs the same number of batches. Concatenating the ranks' outputs
    in rank order and keeping the first n rows gives the split in its own order, duplicates
    removed: that is what utils/evaluate/engine.collect does. (DistributedSampler interleaves ranks and
    pads at the front of the permutation; this layout makes the trim a slice.)
    """

    def __init__(self, num_rows: int, rank: int = 0, world_size: int = 1):
        if num_rows < 1:
            raise ValueError("cannot shard an empty split")
        self.num_rows, self.rank, self.world_size = int(num_rows), int(rank), int(world_size)
        self.start, self.stop, self.shard_len = shard_bounds(self.num_rows, self.rank, self.world_size)

    def __iter__(self) -> Iterator[int]:
        yield from range(self.start, self.stop)
        yield from [self.num_rows - 1] * (self.shard_len - (self.stop - self.start))

    def __len__(self) -> int:
        return self.shard_len
