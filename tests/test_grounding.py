"""Grounding tools: ground.py agrees with test.py (top-1 of the MsG ranking, SmG moment on
the ground-truth track), two-stage scores are the exhaustive ones, float16 indexes stay finite, bad
input exits 2 with one line, the index refuses other weights, the plot is drawn, and the README's
ten lines run as written.

One random-weight checkpoint is enough: the equalities hold for any weights.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import REPO_ROOT, load_script
from utils.ground.grounding import ground
from utils.ground.index import write_index
from utils.ground.library import open_index
from utils.ground.model import GroundingError, load_model
from utils.ground.queries import load_video, prepare_video, read_music_ids
from utils.ground.search import exhaustive_scores, select_tracks, top_by_score, two_stage_scores
from utils.train.checkpoint import save_checkpoint

def docs_example() -> str:
    """The Python example of docs/grounding.md, read from the page itself so that the two cannot drift."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "grounding.md").read_text()
    blocks = [b.split("```", 1)[0] for b in page.split("```python\n")[1:]]
    (example,) = [b for b in blocks if "from utils.ground import" in b]
    return example


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _checkpoint(path: Path, seed: int) -> Path:
    from model.made import build_model
    from utils.train.options import parse_args
    args = parse_args(["--device", "cpu"], mode="train")
    torch.manual_seed(seed)
    save_checkpoint(path, build_model(args), args, epoch=0)
    return path


@pytest.fixture(scope="module")
def setup(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Checkpoint, index of the test split's tracks (via the CLI) and the loaded model."""
    tmp = tmp_path_factory.mktemp("grounding")
    ckpt = _checkpoint(tmp / "pytorch_model.bin.best_r1", seed=0)
    paths = {"tmp": tmp, "ckpt": ckpt, "csv": demo_data / "dataset/MGSV-EC/test_data.csv",
             "features": demo_data / "features/Kuai_feature", "index": tmp / "music.index"}
    rc = load_script("build_music_index").run(
        ["--load_uni_model_path", str(ckpt), "--frozen_feature_path", str(paths["features"]),
         "--music_ids", str(paths["csv"]), "--out", str(paths["index"]), "--quiet"])
    assert rc == 0
    paths["gm"] = load_model(ckpt, "cpu")
    paths["library"] = open_index(paths["index"], paths["gm"])
    return paths


@pytest.fixture(scope="module")
def test_py_rows(setup: dict) -> list[dict]:
    """test.py --save_json 1 on the test split: its MsG top-1 and SmG moments."""
    spec = importlib.util.spec_from_file_location("_mgsv_test_entry", REPO_ROOT / "test.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--load_uni_model_path", str(setup["ckpt"]), "--test_csv", str(setup["csv"]),
                        "--frozen_feature_path", str(setup["features"]), "--save_json", "1",
                        "--device", "cpu"]) == 0
    (out,) = setup["tmp"].glob("*-test/uni_test_*.json")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def ground_rows(setup: dict) -> list[dict]:
    """ground.py on 12 of the test videos (the detector dominates the cost) against all 40 tracks."""
    out, subset = setup["tmp"] / "results.json", setup["tmp"] / "queries.csv"
    subset.write_text("\n".join(setup["csv"].read_text().splitlines()[:13]) + "\n")
    rc = load_script("ground").run(
        ["--load_uni_model_path", str(setup["ckpt"]), "--index", str(setup["index"]),
         "--video_feature", str(subset), "--frozen_feature_path", str(setup["features"]),
         "--topk", "3", "--out", str(out), "--quiet"])
    assert rc == 0
    return json.loads(out.read_text())


def test_matches_test_py(test_py_rows: list[dict], ground_rows: list[dict]) -> None:
    by_video = {r["video_id"]: r for r in test_py_rows}
    assert len(by_video) == 40 and len(ground_rows) == 12
    for got in ground_rows:
        ref = by_video[got["video_id"]]
        assert got["tracks"][0]["music_id"] == ref["topk_music_ids"][0]            # MsG top-1
        assert [t["music_id"] for t in got["tracks"]] == ref["topk_music_ids"][:3]
        np.testing.assert_allclose([t["score"] for t in got["tracks"]], ref["topk_scores"][:3], atol=2e-6)
        gt = got["ground_truth"]
        assert gt["rank"] == ref["gt_rank"]
        # SmG: test.py writes 3 decimals.
        assert gt["pred_start"] == pytest.approx(ref["pred_st"], abs=6e-4)
        assert gt["pred_end"] == pytest.approx(ref["pred_ed"], abs=6e-4)
        assert gt["iou"] == pytest.approx(ref["iou"], abs=6e-4)
        # Moments inside [0, min(240, duration)] (start may pass the end, as in clip_moments).
        for t in got["tracks"]:
            assert t["start"] >= 0 and t["end"] <= 240 and 0 <= t["confidence"] <= 1


def test_json_shape(ground_rows: list[dict]) -> None:
    row = ground_rows[0]
    assert set(row["tracks"][0]) == {"music_id", "score", "start", "end", "confidence", "canonical"}
    scores = [t["score"] for t in row["tracks"]]
    assert scores == sorted(scores, reverse=True)


def test_two_stage_rescores_with_the_exhaustive_scores(setup: dict) -> None:
    gm, library = setup["gm"], setup["library"]
    torch.manual_seed(0)
    v = torch.nn.functional.normalize(torch.randn(6, 256), dim=-1)
    full = exhaustive_scores(gm, library, v)
    rows, scores = two_stage_scores(gm, library, v, 7)
    for b in range(6):
        torch.testing.assert_close(scores[b], full[b, rows[b]], atol=1e-6, rtol=0)
    # An arbitrary selection (any order) gathers the same numbers as the stored blocks.
    pick = np.array([39, 0, 17, 5])
    torch.testing.assert_close(gm.model.score_videos(v, select_tracks(library, pick, gm.device), 6),
                               full[:, pick], atol=1e-6, rtol=0)
    # K = N - 1 keeps the exhaustive top-5 whenever the worst track is not in it.
    top_ex = top_by_score(full, None, 5)[0]
    rows, scores = two_stage_scores(gm, library, v, len(library) - 1)
    assert (top_by_score(scores, rows, 5)[0] == top_ex).all()


def test_float16_index_close_and_finite(setup: dict) -> None:
    gm, tmp, library = setup["gm"], setup["tmp"], setup["library"]
    # The stored tracks of the float32 index, re-indexed in float16 (no need to run the encoder again).
    tracks = [library.tracks.get(np.arange(len(library)), gm.device)]
    write_index(gm, library.music_ids, tracks, tmp / "fp16.index", dtype="float16")
    lib16 = open_index(tmp / "fp16.index", gm)
    assert lib16.size_bytes() < 0.6 * library.size_bytes()
    v = torch.nn.functional.normalize(torch.randn(8, 256), dim=-1)
    s16, s32 = exhaustive_scores(gm, lib16, v), exhaustive_scores(gm, library, v)
    assert torch.isfinite(s16).all()
    assert (s16 - s32).abs().max() < 5e-3
    rows, scores = two_stage_scores(gm, lib16, v, 10)   # the re-padded path too (mask offset restored)
    assert torch.isfinite(scores).all()


def test_single_video_file_without_mask(setup: dict, demo_data: Path, tmp_path: Path) -> None:
    """A .pt of only the valid frames, no mask: same answer as the padded file with its mask."""
    vid = "".join(setup["csv"].read_text().splitlines()[1].split(",")[:1])
    feat_file = setup["features"] / "vit_feature1/vit_feature" / f"{vid}.pt"
    mask_file = setup["features"] / "vit_feature1/vit_mask" / f"{vid}.pt"
    feat, mask = torch.load(feat_file), torch.load(mask_file)
    torch.save(feat[mask.bool()].clone(), tmp_path / "short.pt")
    gm, library = setup["gm"], setup["library"]
    a = ground(gm, library, *load_video(feat_file, mask_file), topk=3)[0]
    b = ground(gm, library, *load_video(tmp_path / "short.pt"), topk=3)[0]
    assert [t.music_id for t in a.tracks] == [t.music_id for t in b.tracks]
    for x, y in zip(a.tracks, b.tracks):
        assert (x.score, x.start, x.end) == pytest.approx((y.score, y.start, y.end), abs=1e-4)


def _bad_inputs(setup: dict, tmp: Path) -> list[tuple[list[str], str]]:
    torch.save(torch.randn(50, 256), tmp / "wrong_dim.pt")
    nan = torch.randn(20, 512)
    nan[3, 7] = float("nan")
    torch.save(nan, tmp / "nan.pt")
    torch.save(torch.randn(60, 512), tmp / "too_long.pt")
    torch.save(torch.zeros(10, 512), tmp / "empty.pt")
    torch.save(torch.randn(10, 512), tmp / "ok.pt")
    torch.save(torch.ones(9), tmp / "mask9.pt")
    (tmp / "no_id.csv").write_text("music_id\nx\n")
    other = _checkpoint(tmp / "other.bin", seed=1)
    base = ["--load_uni_model_path", str(setup["ckpt"]), "--index", str(setup["index"])]
    return [
        (base + ["--video_feature", str(tmp / "wrong_dim.pt")], "expected [frames <= 50, 512]"),
        (base + ["--video_feature", str(tmp / "nan.pt")], "NaN"),
        (base + ["--video_feature", str(tmp / "too_long.pt")], "60 frames"),
        (base + ["--video_feature", str(tmp / "empty.pt")], "no valid frame"),
        (base + ["--video_feature", str(tmp / "missing.pt")], "file not found"),
        (base + ["--video_feature", str(tmp / "ok.pt"), "--video_mask", str(tmp / "mask9.pt")], "does not match"),
        (base + ["--video_feature", str(tmp / "no_id.csv"), "--frozen_feature_path", str(setup["features"])],
         "no video_id column"),
        (base + ["--video_feature", str(setup["csv"])], "--frozen_feature_path"),
        (["--load_uni_model_path", str(setup["ckpt"]), "--index", str(tmp), "--video_feature",
          str(tmp / "ok.pt")], "not a music index"),
        (["--load_uni_model_path", str(other), "--index", str(setup["index"]), "--video_feature",
          str(tmp / "ok.pt")], "rebuild it"),
        (["--load_uni_model_path", str(tmp / "nope.bin"), "--index", str(setup["index"]), "--video_feature",
          str(tmp / "ok.pt")], "checkpoint not found"),
    ]


def test_bad_inputs_exit_2(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ground_cli = load_script("ground")
    for argv, message in _bad_inputs(setup, tmp_path):
        assert ground_cli.run(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err


def test_entry_point_exit_status_without_traceback(setup: dict, tmp_path: Path) -> None:
    torch.save(torch.randn(50, 256), tmp_path / "bad.pt")
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/ground.py"), "--load_uni_model_path",
                           str(setup["ckpt"]), "--index", str(setup["index"]), "--video_feature",
                           str(tmp_path / "bad.pt")], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "512" in proc.stderr


def test_index_folder_rules(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gm = setup["gm"]
    build_cli = load_script("build_music_index")
    ids_txt = tmp_path / "ids.txt"
    csv_ids, durations = read_music_ids(setup["csv"])
    ids_txt.write_text("# three tracks\n" + "\n".join(csv_ids[:3]) + "\n\n")
    out = tmp_path / "small.index"
    argv = ["--load_uni_model_path", str(setup["ckpt"]), "--frozen_feature_path", str(setup["features"]),
            "--music_ids", str(ids_txt), "--out", str(out), "--quiet"]
    assert build_cli.run(argv) == 0
    lib = open_index(out, gm)
    assert lib.music_ids == csv_ids[:3] and lib.manifest["durations_from_mask"] == 3
    # No CSV durations: valid snippets x stride (documented estimate), within one stride of the truth.
    n_valid = np.asarray(lib.tracks.mask).sum(1)
    np.testing.assert_allclose(lib.durations, n_valid * 2.5)
    assert np.all(np.abs(lib.durations - [durations[m] for m in csv_ids[:3]]) <= 2.5)
    assert build_cli.run(argv) == 2 and "--overwrite" in capsys.readouterr().err
    (tmp_path / "not_an_index").mkdir()
    assert build_cli.run(argv[:-3] + ["--out", str(tmp_path / "not_an_index"), "--overwrite"]) == 2
    assert "not a music index" in capsys.readouterr().err
    assert build_cli.run(argv[:5] + [str(tmp_path / "missing.txt")] + argv[6:]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "not_an_index", "small.index"]
    # A failure while writing leaves nothing behind under the final name.
    with pytest.raises(RuntimeError):
        def chunks():
            yield from ()
            raise RuntimeError("encoder crashed")
        write_index(gm, ["a"], chunks(), tmp_path / "crashed.index")
    assert not any(p.name.startswith((".crashed", "crashed")) for p in tmp_path.iterdir())


def test_repeated_music_ids(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A text file or list names each track once: a repeat is refused (it used to vanish silently). A
    CSV split lists a track once per video: its rows are one track, unless they disagree on its length."""
    def refusal(source) -> str:
        with pytest.raises(GroundingError) as info:
            read_music_ids(source)
        return str(info.value)

    text = tmp_path / "ids.txt"
    text.write_text("a\nb\n# c\na\nc\nb\n")
    assert refusal(text) == (f"{text}: music ids listed more than once: a, b. Each id names one track of the "
                             "index: remove the repeated lines.")
    assert refusal(["x", "y", "x"]).startswith("the id list: music ids listed more than once: x.")
    csv = tmp_path / "train_data.csv"
    csv.write_text("video_id,music_id,music_total_duration\n1,a,120.5\n2,b,60\n3,a,120.500\n4,c,\n")
    assert read_music_ids(csv) == (["a", "b", "c"], {"a": 120.5, "b": 60.0})
    csv.write_text("video_id,music_id,music_total_duration\n1,a,120.5\n2,b,60\n3,a,121\n4,b,61\n")
    assert refusal(csv) == (f"{csv}: music_total_duration differs between rows of one track: a (120.5 and "
                            "121 s, line 4); b (60 and 61 s, line 5). A track has one length: correct the rows.")
    csv.write_text("video_id,music_id,music_total_duration\n1,a,abc\n")
    assert "line 2: music_total_duration 'abc' of a is not a positive number" in refusal(csv)
    # From the command line: exit 2, one line, before the checkpoint is even looked at.
    rc = load_script("build_music_index").run(["--load_uni_model_path", str(tmp_path / "absent.bin"),
                                               "--frozen_feature_path", str(tmp_path), "--music_ids", str(text),
                                               "--out", str(tmp_path / "x.index")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith(f"error: {text}: music ids listed more than once: a, b.") and err.count("\n") == 1


def test_prepare_video_mask_rules() -> None:
    feat = torch.randn(12, 512)
    feat[10:] = 0
    out, mask = prepare_video(feat)
    assert out.shape == (50, 512) and mask.sum() == 10 and mask[:10].all()
    with pytest.raises(GroundingError, match="0 or 1"):
        prepare_video(feat, torch.full((12,), 0.5))


def test_plot(setup: dict, tmp_path: Path) -> None:
    from matplotlib.image import imread
    gm, library = setup["gm"], setup["library"]
    q = load_script("ground").load_queries(
        load_script("ground").get_parser().parse_args(
            ["--load_uni_model_path", "x", "--index", "x", "--video_feature", str(setup["csv"]),
             "--frozen_feature_path", str(setup["features"])]), 50)
    result = ground(gm, library, q.feats[:1], q.masks[:1], topk=4, video_ids=q.video_ids[:1],
                    gt_music_ids=q.gt_music_ids[:1], gt_moments=q.gt_moments[:1])[0]
    from utils.ground.report import plot_result
    png = plot_result(result, tmp_path / "plot.png")
    img = imread(png)
    assert img.ndim == 3 and img.shape[0] > 200 and img.shape[1] > 800
    # Predicted moments (#1f77b4 at alpha 0.8 on white) and the ground-truth hatching (#d62728) are drawn.
    rgb = (img[..., :3] * 255).round()
    blue = np.all(np.abs(rgb - [75, 146, 195]) < 12, axis=-1).sum()
    red = np.all(np.abs(rgb - [214, 39, 40]) < 20, axis=-1).sum()
    assert blue > 500 and red > 50


def test_docs_example(setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        capsys: pytest.CaptureFixture) -> None:
    demo = setup["csv"].parents[2]
    (tmp_path / "demo").mkdir()
    for sub in ("dataset", "features"):
        os.symlink(demo / sub, tmp_path / "demo" / sub)
    (tmp_path / "runs/demo").mkdir(parents=True)
    os.symlink(setup["ckpt"], tmp_path / "runs/demo/pytorch_model.bin.best_r1")
    vid = setup["csv"].read_text().splitlines()[1].split(",")[0]
    os.symlink(setup["features"] / "vit_feature1/vit_feature" / f"{vid}.pt", tmp_path / "clip.pt")
    monkeypatch.chdir(tmp_path)
    exec(compile(docs_example(), "docs/grounding.md example", "exec"), {})
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 5 and all(" s  conf " in ln for ln in lines)
    assert (tmp_path / "result.png").stat().st_size > 10_000


def test_benchmark_building_blocks(setup: dict, tmp_path: Path) -> None:
    from utils.ground.bench import benchmark_grounding, format_benchmark
    rows = benchmark_grounding(setup["gm"], sizes=(64,), shortlist_ks=(8,), workdir=tmp_path, num_queries=4,
                               latency_queries=1, topk=2, log=lambda *a: None)
    (row,) = rows
    assert row["tracks"] == 64 and row["index_MiB"] > 0 and row["build_s"] > 0
    k = row["two_stage_K8"]
    assert 0 <= k["top1_preserved"] <= 1 and k["p50_ms"] > 0 and row["exhaustive"]["p95_ms"] > 0
    assert "| 64 |" in format_benchmark(rows)
    assert not any(tmp_path.iterdir())  # indexes removed unless keep=True


def test_shortlist_uses_faiss_when_installed(setup: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """faiss is optional (not installed here): a stand-in with its IndexFlatIP API must give the
    same shortlist as the matrix product."""
    import types

    from utils.ground.search import shortlist

    class IndexFlatIP:
        def __init__(self, dim: int):
            self.vectors = np.zeros((0, dim), dtype=np.float32)

        def add(self, x: np.ndarray) -> None:
            assert x.dtype == np.float32 and x.flags.c_contiguous
            self.vectors = np.concatenate([self.vectors, x])

        def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
            sims = x @ self.vectors.T
            idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(sims, idx, 1), idx

    library = setup["library"]
    v = torch.nn.functional.normalize(torch.randn(4, 256), dim=-1)
    plain = shortlist(library, v, 8)
    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(IndexFlatIP=IndexFlatIP))
    monkeypatch.setattr(library, "_faiss_index", None)
    with_faiss = shortlist(library, v, 8)
    assert (np.sort(with_faiss, 1) == np.sort(plain, 1)).all()


def test_index_with_usage_history_reports_canonical_clips(setup: dict, ground_rows: list[dict], demo_data: Path,
                                                         tmp_path: Path) -> None:
    """build_music_index --prior_csv stores each track's canonical clip in the training CSV; ground.py
    reports it beside the model's moment (trimmed to the query's length) and draws it in the plot."""
    from utils.data.annotations import load_annotations
    from utils.evaluate.track_prior import canonical_clips
    train_csv = demo_data / "dataset/MGSV-EC/train_data.csv"
    index = tmp_path / "usage.index"
    assert load_script("build_music_index").run(
        ["--load_uni_model_path", str(setup["ckpt"]), "--frozen_feature_path", str(setup["features"]),
         "--music_ids", str(setup["csv"]), "--out", str(index), "--prior_csv", str(train_csv), "--quiet"]) == 0
    clips = canonical_clips(load_annotations(train_csv))
    test_df = load_annotations(setup["csv"])
    seen = test_df[test_df["music_id"].isin(clips)]
    assert 0 < len(seen) < len(test_df)                     # the demo data has unseen tracks too
    queries = tmp_path / "queries.csv"
    test_df.iloc[:6].to_csv(queries, index=False)
    out, plot = tmp_path / "r.json", tmp_path / "r.png"
    assert load_script("ground").run(
        ["--load_uni_model_path", str(setup["ckpt"]), "--index", str(index), "--video_feature", str(queries),
         "--frozen_feature_path", str(setup["features"]), "--topk", "40", "--out", str(out),
         "--plot", str(plot), "--quiet"]) == 0
    rows = json.loads(out.read_text())
    checked = 0
    for row, (_, gt) in zip(rows, test_df.iloc[:6].iterrows()):
        length = gt["music_end"] - gt["music_start"]
        for t in row["tracks"]:
            clip = clips.get(t["music_id"])
            if clip is None:
                assert t["canonical"] is None
                continue
            assert t["canonical"]["start"] == clip.start and t["canonical"]["uses"] == clip.uses
            duration = setup["library"].durations[setup["library"].row_of(t["music_id"])]
            assert t["canonical"]["end"] == pytest.approx(min(clip.start + length, duration))
            checked += 1
    assert checked > 0
    assert len(list(tmp_path.glob("r_*.png"))) == 6
    # An index built without history reports none.
    assert all(t["canonical"] is None for row in ground_rows for t in row["tracks"])
