"""scripts/benchmark.py runs end to end on tiny sizes and reports what it promises (no timing checks)."""
from __future__ import annotations

import json

from conftest import load_script


def test_benchmark_smoke(tmp_path):
    bench = load_script("benchmark")
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--sections", "train", "load", "msg", "--train_batches", "8",
                       "--reference_batches", "8", "--steps", "1", "--msg_sizes", "40", "--workdir",
                       str(tmp_path / "work"), "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    env = res["environment"]
    assert env["cpu"] and env["torch"] and env["torch_threads"] == 1
    train = res["sections"]["train"]
    assert {r["path"] for r in train} == {"fast", "reference"} and all(r["samples_per_s"] > 0 for r in train)
    fast = [r for r in train if r["path"] == "fast"][0]
    assert fast["gflop"] > 0 and fast["gemm_floor_s"] == round(fast["gflop"] / env["gemm_gflops_floor"][0], 3)
    assert env["gemm_gflops_floor"][0] >= env["gemm_gflops"]
    assert "GEMM floor s" in res["markdown"]
    load = {r["store"]: r for r in res["sections"]["load"] if "store" in r}
    read = [r for r in res["sections"]["load"] if "read_tensor_us" in r][0]
    assert read["files"] > 0 and read["torch_load_us"] > 0 and read["read_tensor_us"] > 0
    assert set(load) == {"per-id", "packed"} and load["packed"]["workers"] == 0
    assert load["packed"]["samples_per_pass"] == load["per-id"]["samples_per_pass"] > 0
    msg = res["sections"]["msg"]
    assert msg["fast"][0]["peak_rss_mb"] >= msg["fast"][0]["rss_before_mb"] > 0
    assert msg["naive"][0]["seconds"] > 0
    assert msg["check"]["max_abs_diff"] < 1e-5  # chunked scoring == all-pairs X-Pool
    assert "| 40 x 40 |" in res["markdown"] and "packed / per-id" in res["markdown"]


def test_benchmark_epoch_section(tmp_path):
    """Whole epochs on both training-batch paths, with the step-only rate and the projection beside them."""
    bench = load_script("benchmark")
    out = tmp_path / "bench.json"
    assert bench.main(["--sections", "epoch", "--epoch_videos", "48", "--epoch_music", "12", "--epoch_val", "8",
                       "--epoch_batch", "16", "--epochs_timed", "1", "--steps", "1", "--feature_devices", "auto",
                       "cpu", "--workdir", str(tmp_path / "work"), "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["sections"]["epoch"]
    rows = {r["feature_device"]: r for r in res["rows"]}
    assert rows["auto"]["loader"] == "DataLoader" and rows["cpu"]["loader"] == "ResidentLoader"
    for r in rows.values():
        assert r["train_rows"] == 48 and r["val_rows"] == 8 and len(r["epochs"]) == 1
        assert 0 < r["epoch_samples_per_s"] <= r["train_samples_per_s"] and r["paper_100_epochs_h_projected"] > 0
    assert res["step"][0]["batch"] == 16 and res["step"][0]["samples_per_s"] > 0


def test_benchmark_eval_section(tmp_path):
    """test.py end to end in a fresh process: its time breakdown and peak RSS are read back."""
    bench = load_script("benchmark")
    out = tmp_path / "bench.json"
    assert bench.main(["--sections", "eval", "--eval_size", "24", "--eval_repeats", "1", "--workdir",
                       str(tmp_path / "work"), "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["sections"]["eval"]
    run = res["runs"][0]
    assert res["size"] == 24 and run["wall_s"] > 0 and run["peak_rss_gb"] > 0
    assert set(run["phases_s"]) == {"setup", "load", "encode", "score", "metrics", "other", "total"}
    assert run["phases_s"]["total"] <= run["wall_s"]
    assert res["flops"]["encode_gflop"] > 0 and res["flops"]["score_gflop"] > 0


def test_flop_counter_counts_matrix_products():
    """The GEMM floors rest on this count: 2*m*k*n per product, whatever else runs beside it."""
    import torch
    bench = load_script("benchmark")
    a, b = torch.randn(3, 4), torch.randn(4, 5)
    assert bench.count_flops(lambda: (a @ b).relu().sum()) == 2 * 3 * 4 * 5
    assert bench.count_flops(lambda: torch.nn.functional.linear(torch.randn(7, 4), torch.randn(6, 4))) == 2 * 7 * 4 * 6


def test_back_to_back_timing_calls_n_times_and_divides():
    """The step-only rate an epoch is compared with on CUDA: n calls between two syncs, per call."""
    import time

    import torch
    bench = load_script("benchmark")
    calls = []
    per_call = bench.timed_back_to_back(lambda: (calls.append(1), time.sleep(0.02)), torch.device("cpu"), 5)
    assert len(calls) == 5 and 0.02 <= per_call < 0.2
    row = {"batch": 8, "path": "fast", "samples_per_s": 10.0, "back_to_back_samples_per_s": 12.5}
    epoch = {"feature_device": "cuda", "loader": "resident", "batch": 8, "train_rows": 80, "val_rows": 8,
             "train_samples_per_s": 11.0, "epoch_samples_per_s": 10.5, "val_s": 0.1,
             "paper_100_epochs_h_projected": 1.0}
    assert "| 12.5 |" in bench.format_epoch([epoch], [row])   # the back-to-back rate, where measured


def test_fp16_on_the_cpu_is_refused_in_one_line(capsys):
    bench = load_script("benchmark")
    assert bench.main(["--amp", "fp16", "--device", "cpu", "--sections", "train", "--quick"]) == 2
    assert capsys.readouterr().err.strip() == "error: --amp fp16 needs CUDA; on the CPU use --amp bf16 or none"


def test_features_on_cuda_without_cuda_are_refused_in_one_line(capsys):
    bench = load_script("benchmark")
    assert bench.main(["--device", "cpu", "--sections", "epoch", "--feature_devices", "cuda", "--quick"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --feature_device cuda needs training on CUDA (--device is "
                                               "cpu); use --feature_device auto or cpu")


def test_benchmark_compile_trains_the_compiled_model(tmp_path, monkeypatch):
    """--compile: the train and epoch sections step the model train.py --compile would (torch.compile is
    replaced here by a recording wrapper: compiling is slow on 2 cores, and its speed is not checked)."""
    import torch

    from model import fast_ops
    bench = load_script("benchmark")
    monkeypatch.setattr(fast_ops, "PACK_TOKENS", fast_ops.PACK_TOKENS)  # build_training sets it process-wide
    calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            calls.append(1)
            return self.module(*args, **kwargs)

    monkeypatch.setattr(torch, "compile", Compiled)
    out = tmp_path / "bench.json"
    assert bench.main(["--compile", "--quick", "--sections", "train", "epoch", "--train_batches", "16",
                       "--reference_batches", "16", "--steps", "1", "--epoch_videos", "32", "--epoch_music", "8",
                       "--epoch_val", "8", "--epoch_batch", "16", "--epochs_timed", "1", "--workdir",
                       str(tmp_path / "work"), "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())["sections"]
    assert [r["path"] for r in res["train"]] == ["compiled"] and "gflop" not in res["train"][0]
    assert fast_ops.PACK_TOKENS == "never" and len(calls) == (1 + 1) + (1 + 2)  # train: warm-up, timed; epoch: the same
    assert res["epoch"]["rows"][0]["train_rows"] == 32
