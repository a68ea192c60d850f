"""Data-parallel training and evaluation (torchrun, DDP) give the one-process results.

Three tests start real 2-process gloo groups on CPU with
`python -m torch.distributed.run --standalone --nproc_per_node 2`:
  * training: after DDP's all-reduce both ranks hold the one-process gradient of the same
    global batch (global-batch negatives), or the mean of the per-half-batch gradients with
    --local_negatives behaviour; after a few optimizer steps the ranks' parameters are identical;
  * test.py on an odd-sized split: the same metrics and per-video predictions as one process;
  * train.py resumed under torchrun from a one-process run: one writer (log, TensorBoard, state).
Dropout is switched off where one process is compared with two (see tests/dist_worker.py).
The others check the loss decomposition and the evaluation sharding without processes.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.losses import RetrievalLoss, music_id_codes
from model.made import MaDe, MaDeConfig
from utils.train import distributed as D

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import dist_worker  # noqa: E402

TINY = ["--dim_input", "32", "--detr_dim_feedforward", "64", "--detr_enc_layers", "1", "--detr_dec_layers", "2"]
RUN = ["--device", "cpu", "--num_workers", "0"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def torchrun(args: list[str], timeout: int = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    # --standalone: torchrun binds a free port itself (a port found free here could be taken before
    # torchrun binds it).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def entry_point(name: str):
    """train.py / test.py as a module (`import test` could find the standard library's package)."""
    spec = importlib.util.spec_from_file_location(f"_mgsv_dist_{name}", REPO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_rows(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text().splitlines(keepends=True)
    dst.write_text("".join(lines[:n + 1]))  # header + n rows
    return dst


# ------------------------------------------------------------------ without processes
@pytest.mark.parametrize("n,world", [(37, 2), (40, 2), (5, 3), (2, 4), (1, 2)])
def test_shard_sampler_covers_the_split_once(n, world):
    shards = [list(D.ShardSampler(n, r, world)) for r in range(world)]
    assert len({len(s) for s in shards}) == 1            # same number of batches on every rank
    flat = [i for s in shards for i in s]
    assert flat[:n] == list(range(n))                     # rank order + trim = the split's order
    assert set(flat[n:]) <= {n - 1}                       # padding only repeats the last row


@pytest.mark.parametrize("vmr_loss,mask_same", [("dual_single_loss_fuse", 0), ("dual_single_loss_fuse", 1),
                                                ("dual", 1), ("single", 0), ("dual_single_sim_fuse", 1),
                                                ("dual_single_feature_fuse", 0)])
def test_rank_blocks_average_to_the_global_loss_and_gradient(vmr_loss, mask_same, monkeypatch):
    """Simulated ranks: each computes its rows (local videos x all tracks) and columns (all videos x
    local tracks) from gathered tensors; the mean of the per-rank losses equals the one-process
    loss over the global batch, and so does its gradient (what DDP's averaging applies, given that
    the gather's backward sums every rank's gradient for a row)."""
    torch.manual_seed(0)
    cfg = MaDeConfig(d_model=32, detr_ffn=64, enc_layers=1, dec_layers=2, vmr_loss=vmr_loss,
                     vmr_fusion="NO" if vmr_loss == "dual" else "XA-music")
    model = MaDe(cfg).eval()  # no dropout: one forward is shared by the two computations
    world, b = 3, 2
    n = world * b
    mask = torch.ones(n, 12)
    mask[1, 7:] = 0
    mask[4, 3:] = 0
    v, _ = model.encode_video(torch.randn(n, 6, 512), torch.ones(n, 6))
    m, Sm = model.encode_music(torch.randn(n, 12, 768), mask)
    ids = ["a", "b", "c", "a", "d", "b"]  # the same track on different ranks
    loss_fn = RetrievalLoss(vmr_loss, weight=0.7, mask_same_music=bool(mask_same))
    params = [p for p in model.parameters() if p.requires_grad]

    pooled = model.xpool(v, Sm, mask) if model.xpool is not None else None
    one = loss_fn(model._similarities(v, m, pooled), model.logit_scale, ids)["retrieval_loss"]
    loss_fn.gather = lambda x: music_id_codes(ids, x.device)  # the ids' gather
    per_rank = []
    for r in range(world):
        rows = slice(r * b, (r + 1) * b)
        sims = model.block_similarities((v[rows], m[rows], Sm[rows], mask[rows]), (v, m, Sm, mask), r * b)
        assert sims["dual"].shape == (b, n) and sims["dual_cols"].shape == (n, b)
        per_rank.append(loss_fn(sims, model.logit_scale, ids[rows])["retrieval_loss"])
    mean = torch.stack(per_rank).mean()
    assert mean.item() == pytest.approx(one.item(), rel=1e-5)
    g_one = torch.autograd.grad(one, params, retain_graph=True, allow_unused=True)
    g_mean = torch.autograd.grad(mean, params, allow_unused=True)
    for p, a, c in zip(params, g_one, g_mean):
        assert (a is None) == (c is None)
        if a is not None:
            torch.testing.assert_close(c, a, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra", ["", "--mml_localization regression", "--decoder_SA_fix 1",
                                   "--decoder_SA_fix 1 --decoder_SA 1", "--vmr_fusion NO --vmr_loss dual",
                                   "--moment_query_type zero", "--aux_loss 0 --contrastive_align_loss 0"])
def test_ddp_unused_parameter_rule_matches_a_real_backward(extra):
    """DDP without find_unused_parameters hangs/raises when a parameter gets no gradient."""
    from model.made import build_criterion, build_model
    from utils.train.options import parse_args
    args = parse_args([*TINY, *extra.split()], mode="train")
    torch.manual_seed(0)
    model, criterion = build_model(args), build_criterion(args)
    n, lm = 3, args.max_snippet_num
    batch = {"frame_feats": torch.randn(n, 50, 512), "frame_mask": torch.ones(n, 50),
             "music_feats": torch.randn(n, lm, 768), "music_mask": torch.ones(n, lm),
             "spans_target": torch.tensor([[[0.3, 0.1]], [[0.5, 0.2]], [[0.6, 0.05]]]),
             "gt_moment": torch.zeros(n, 1, 2), "m_duration": torch.full((n,), 200.0, dtype=torch.float64),
             "v_duration": torch.full((n,), 20.0, dtype=torch.float64), "video_id": ["1", "2", "3"],
             "music_id": ["a", "b", "c"]}
    loss, _ = criterion(model(batch), batch)
    loss.backward()
    unused = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert bool(unused) == D.has_unused_parameters(args), unused


def test_single_process_helpers_are_identities():
    x = torch.randn(3, 2)
    assert D.gather_with_grad(x) is x and D.all_gather_varlen(x) is x
    assert D.all_gather_objects("a") == ["a"] and D.broadcast_object(5) == 5 and D.all_true(True)
    assert not D.is_dist() and D.get_world_size() == 1


def test_cleanup_lets_go_of_the_gil_before_destroying_the_group(monkeypatch):
    # gloo's worker threads must drop their finished collectives (which takes the GIL) before the
    # interpreter shuts down, or the rank aborts with exit -6 after finishing its work.
    calls = []
    monkeypatch.setattr(D.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(D.dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(D.time, "sleep", lambda s: calls.append(("sleep", s)))
    D.cleanup()
    assert calls == [("sleep", D.DRAIN_S), "destroy"] and D.DRAIN_S > 0


@pytest.mark.parametrize("outcome", ["returns", "user error", "bug"])
def test_entry_points_tear_the_group_down_however_they_end(outcome, monkeypatch):
    # A rank stopping on an error must not abort at shutdown instead of printing its message.
    from utils.train.preflight import ConfigError, run_cli
    torn_down = []
    monkeypatch.setattr(D, "cleanup", lambda: torn_down.append(True))

    def main() -> int:
        if outcome == "user error":
            raise ConfigError("bad flag")
        if outcome == "bug":
            raise RuntimeError("a bug")
        return 0

    if outcome == "bug":
        with pytest.raises(RuntimeError):
            run_cli(main)
    else:
        assert run_cli(main) == (2 if outcome == "user error" else 0)
    assert torn_down == [True]


# ------------------------------------------------------------------ two processes
def test_two_process_training_matches_one_process(demo_data, tmp_path):
    torchrun([str(REPO / "tests" / "dist_worker.py"), str(tmp_path), str(demo_data)])
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # One process, same seed, same global batch (DistributedSampler deals the same rows).
    from utils.logger import setup_logger
    setup_logger(None)
    args = dist_worker.tiny_args(demo_data)
    loader, _, model, criterion, _, _, ddp_model = dist_worker.setup(args, D.DistInfo())
    batch = next(iter(loader))
    assert sorted(batch["video_id"]) == sorted(ranks[0]["video_ids"] + ranks[1]["video_ids"])
    assert not set(ranks[0]["video_ids"]) & set(ranks[1]["video_ids"])
    assert set(ranks[0]["music_ids"]) & set(ranks[1]["music_ids"])  # same-music masking across ranks
    loss, grads = dist_worker.step_grads(ddp_model, model, criterion, batch)
    # Per-rank losses average to the global-batch loss ...
    assert (ranks[0]["loss"] + ranks[1]["loss"]).item() / 2 == pytest.approx(loss.item(), rel=1e-5)
    # ... and the synchronised gradients are the one-process gradients (the X-Pool key bias has a
    # zero true gradient, ~1e-7 of float noise: hence the absolute tolerance on the global scale).
    scale = max(g.abs().max().item() for g in grads.values())
    assert set(grads) == set(ranks[0]["grads"]) == set(ranks[1]["grads"])
    for name, g in grads.items():
        assert torch.equal(ranks[0]["grads"][name], ranks[1]["grads"][name]), name
        torch.testing.assert_close(ranks[0]["grads"][name], g, rtol=1e-4, atol=1e-6 * scale, msg=name)

    # --local_negatives: each rank's own half batch; DDP averages the two halves' gradients.
    halves = [{k: v[r::2] for k, v in batch.items()} for r in range(2)]  # rank r's rows (interleaved)
    local = [dist_worker.step_grads(ddp_model, model, criterion, h) for h in halves]
    for r in range(2):
        assert halves[r]["video_id"] == ranks[r]["video_ids"]
        assert ranks[r]["loss_local"].item() == pytest.approx(local[r][0].item(), rel=1e-5)
    for name in grads:
        expected = (local[0][1][name] + local[1][1][name]) / 2
        torch.testing.assert_close(ranks[0]["grads_local"][name], expected, rtol=1e-4, atol=1e-6 * scale, msg=name)
    assert not torch.allclose(ranks[0]["grads_local"]["logit_scale"], grads["logit_scale"])

    # A few optimizer steps: the ranks' parameters stay identical, and they did move.
    moved = False
    for name, p in model.named_parameters():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        moved |= not torch.equal(ranks[0]["params"][name], p.detach())
    assert moved


def test_two_process_test_py_matches_one_process(demo_data, tmp_path):
    test_script = entry_point("test")
    from model.made import build_model
    from utils.train.checkpoint import save_checkpoint
    from utils.train.options import parse_args

    csv = write_rows(demo_data / "dataset/MGSV-EC/test_data.csv", tmp_path / "odd_test.csv", 37)
    args = parse_args(TINY, mode="train")
    torch.manual_seed(3)
    ckpt = tmp_path / "one" / "model.pt"
    ckpt.parent.mkdir()
    save_checkpoint(ckpt, build_model(args), args, epoch=1)
    (tmp_path / "two").mkdir()
    shutil.copy(ckpt, tmp_path / "two" / "model.pt")

    def argv(folder: str) -> list[str]:
        return ["--load_uni_model_path", str(tmp_path / folder / "model.pt"), "--test_csv", str(csv),
                "--frozen_feature_path", str(demo_data / "features/Kuai_feature"), "--batch_size_val", "8",
                "--metrics_json", str(tmp_path / f"{folder}.json"), "--save_json", "1", *RUN]

    assert test_script.main(argv("one")) == 0
    torchrun(["test.py", *argv("two")])
    one, two = (json.loads((tmp_path / f"{f}.json").read_text()) for f in ("one", "two"))
    assert one.keys() == two.keys()
    for key in one:  # ranks and counts exactly; mIoU is a float mean (batch composition: ~1e-9)
        assert two[key] == pytest.approx(one[key], abs=1e-6), key
    rows = [json.loads(next((tmp_path / f).glob("*-test/uni_test_*.json")).read_text())
            for f in ("one", "two")]
    assert len(rows[0]) == len(rows[1]) == 37                      # no duplicated or dropped video
    for a, b in zip(*rows):
        assert (a["video_id"], a["topk_music_ids"], a["gt_rank"]) == (b["video_id"], b["topk_music_ids"], b["gt_rank"])
        assert a["topk_scores"] == pytest.approx(b["topk_scores"], abs=2e-6)
        assert (a["pred_st"], a["pred_ed"]) == pytest.approx((b["pred_st"], b["pred_ed"]), abs=2e-3)


def test_train_resumes_under_torchrun_with_one_writer(demo_data, tmp_path):
    train_script = entry_point("train")

    data = demo_data / "dataset/MGSV-EC"
    argv = [*TINY, *RUN, "--train_csv", str(write_rows(data / "train_data.csv", tmp_path / "train.csv", 32)),
            "--val_csv", str(write_rows(data / "val_data.csv", tmp_path / "val.csv", 11)),
            "--frozen_feature_path", str(demo_data / "features/Kuai_feature"), "--output_dir", str(tmp_path / "runs"),
            "--name", "ddp", "--batch_size_train", "16", "--batch_size_val", "8"]
    assert train_script.main([*argv, "--epochs", "1", "--tb_writer", "0"]) == 0
    run_dir = next((tmp_path / "runs").glob("*/*+ddp"))
    torchrun(["train.py", *argv, "--epochs", "2", "--resume", str(run_dir)])

    state = json.loads((run_dir / "train_state.json").read_text())
    assert state["finished"] and [h["epoch"] for h in state["history"]] == [1, 2]
    assert all("R1" in h["val"] for h in state["history"])
    logs = sorted(run_dir.glob("*_train.log"))
    text = "".join(p.read_text() for p in logs)
    assert text.count("resumed from epoch 1") == 1                 # rank 1 writes no log file
    assert len(list(run_dir.glob("events.out.tfevents*"))) == 1    # nor TensorBoard events
    last = torch.load(run_dir / "pytorch_model.bin.last", weights_only=False)
    assert last["epoch"] == 2 and len(last["resume"]["rng_per_rank"]) == 2
