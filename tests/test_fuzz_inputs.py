"""Standing fuzz test of the input contract (hypothesis, fixed seed, ~15 s), entry points run
in-process:

  * prediction JSONs and annotation CSVs given to `python -m utils.evaluate`;
  * per-id feature files (wrong dims, dtypes, NaN, huge, empty, not a tensor at all) given to
    `scripts/pack_features.py`, which reads and validates every one;
  * music indexes whose manifest or array files were damaged, given to `scripts/ground.py`.

Each ends with exit status 0 or 2 -- never an exception -- and a refusal is one `error:` line
naming the file. Exit 0 is only allowed with the unchanged result: the features served are the
file's own (padded rows zeroed), the grounding results those of the intact index.
Valid inputs are mutated one way at a time so the examples stay close to what users meet."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from utils.evaluate.offline import main  # noqa: E402

settings.register_profile("ci", derandomize=True, max_examples=40, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.load_profile("ci")

HEADER = "video_id,music_id,video_start,video_end,music_start,music_end,music_total_duration\n"
ROWS = ["11,7+a,0,20,0,20,100\n", "12,7+a,0,30,50,80,100\n", "13,4+b,0,10,40,50,60\n"]
GOOD = [{"video_id": "11", "ranked_music_ids": ["7+a", "4+b"], "pred_st": 0.0, "pred_ed": 20.0},
        {"video_id": "12", "ranked_music_ids": ["4+b", "7+a"], "pred_st": 60.0, "pred_ed": 90.0},
        {"video_id": "13", "ranked_music_ids": ["4+b"], "pred_st": 45.0, "pred_ed": 80.0}]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-10**400, max_value=10**400) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)


def _run(tmp: Path, csv_text: str, preds_text: str, capsys: pytest.CaptureFixture) -> tuple[int, str]:
    (tmp / "gt.csv").write_text(csv_text, encoding="utf-8", errors="surrogatepass")
    (tmp / "preds.json").write_text(preds_text, encoding="utf-8", errors="surrogatepass")
    status = main(["--gt_csv", str(tmp / "gt.csv"), "--pred_json", str(tmp / "preds.json")])
    return status, capsys.readouterr().err


def _assert_contract(status: int, err: str, tmp: Path) -> None:
    assert status in (0, 2)
    assert "Traceback" not in err
    if status == 2:
        assert err.startswith("error: ") and (str(tmp / "preds.json") in err or str(tmp / "gt.csv") in err), err


@given(entry=st.integers(0, 2), key=st.sampled_from(["video_id", "ranked_music_ids", "pred_st", "pred_ed", "x"]),
       value=json_values, drop=st.booleans())
def test_mutated_prediction_field(tmp_path: Path, capsys: pytest.CaptureFixture, entry: int, key: str, value,
                                  drop: bool) -> None:
    preds = json.loads(json.dumps(GOOD))
    if drop:
        preds[entry].pop(key, None)
    else:
        preds[entry][key] = value
    status, err = _run(tmp_path, HEADER + "".join(ROWS), json.dumps(preds), capsys)
    _assert_contract(status, err, tmp_path)
    if key in ("video_id", "pred_st", "pred_ed", "ranked_music_ids") and (drop or value is None):
        assert status == 2


@given(text=st.text(max_size=60) | st.sampled_from(["[" * 100_000, "[1e999]", "[" + "9" * 5000 + "]", "\ufeff[]",
                                                     "NaN", "{}", "[{}]", "null"]))
def test_arbitrary_prediction_text(tmp_path: Path, capsys: pytest.CaptureFixture, text: str) -> None:
    status, err = _run(tmp_path, HEADER + "".join(ROWS), text, capsys)
    _assert_contract(status, err, tmp_path)
    assert status == 2  # no text here is a complete prediction list for the three videos


@given(row=st.integers(0, 2), column=st.integers(0, 6),
       cell=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=10)
       | st.sampled_from(["nan", "inf", "-1", "1e400", "", "0x10", '"', "\n"]))
def test_mutated_annotation_cell(tmp_path: Path, capsys: pytest.CaptureFixture, row: int, column: int,
                                 cell: str) -> None:
    cells = ROWS[row].rstrip("\n").split(",")
    cells[column] = cell
    rows = list(ROWS)
    rows[row] = ",".join(cells) + "\n"
    status, err = _run(tmp_path, HEADER + "".join(rows), json.dumps(GOOD), capsys)
    _assert_contract(status, err, tmp_path)


# ------------------------------------------------------------------ per-id feature files
FRAMES = 4  # --max_v_frames: small tensors, the same rules as the real 50
FEATURE_SHAPES = [(FRAMES, 512), (FRAMES - 1, 512), (FRAMES + 1, 512), (FRAMES, 511), (0, 512), (FRAMES,),
                  (FRAMES, 512, 1), (), (FRAMES, 0)]
DTYPES = [torch.float32, torch.float16, torch.float64, torch.bfloat16, torch.int64, torch.uint8, torch.bool,
          torch.complex64]
SPECIAL = [None, float("nan"), float("inf"), -float("inf"), 1e6, 7e4, 1e30, 1e-40, 0.0]
MASKS = ["valid", "first row", "zeros", "wrong length", "2-D", "value 2", "bool", "NaN", "float64", "not a tensor"]
NOT_TENSORS = [None, "x", [1.0, 2.0], {"feat": 1}, 3, b"\x00" * 8]


def _feature(shape: tuple, dtype: torch.dtype, special: float | None, where: int, seed: int) -> torch.Tensor:
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if special is not None and x.numel():
        x.view(-1)[where % x.numel()] = special
    return x.to(dtype) if dtype != torch.complex64 else torch.complex(x.float(), x.float())


def _mask(kind: str) -> object:
    valid = torch.ones(FRAMES)
    valid[FRAMES // 2:] = 0  # half the rows are padding, where NaN is allowed (they are zeroed)
    return {"valid": valid, "first row": torch.eye(FRAMES)[0], "zeros": torch.zeros(FRAMES),
            "wrong length": torch.ones(FRAMES + 1), "2-D": valid[None], "value 2": valid * 2,
            "bool": valid.bool(), "NaN": valid.masked_fill(valid == 0, float("nan")),
            "float64": valid.double(), "not a tensor": valid.tolist()}[kind]


@pytest.fixture(scope="module")
def feature_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A feature root with one sound video beside the one each example replaces."""
    root = tmp_path_factory.mktemp("fuzz_features")
    for sub in ("vit_feature", "vit_mask"):
        (root / "vit_feature1" / sub).mkdir(parents=True)
    torch.save(torch.randn(FRAMES, 512), root / "vit_feature1" / "vit_feature" / "good.pt")
    torch.save(torch.ones(FRAMES), root / "vit_feature1" / "vit_mask" / "good.pt")
    return root


def _expected(feat: object, mask: object) -> tuple[np.ndarray, np.ndarray]:
    """What the loader must serve for a file it accepts: float32 values, padded rows zeroed."""
    f, m = feat.to(torch.float32).numpy(), torch.as_tensor(mask).to(torch.float32).numpy()
    return np.where(m[:, None] == 1, f, np.float32(0)), m


@given(aspect=st.sampled_from(["shape", "dtype", "value", "mask", "payload"]), shape=st.sampled_from(FEATURE_SHAPES),
       dtype=st.sampled_from(DTYPES), special=st.sampled_from(SPECIAL), where=st.integers(0, 10_000),
       mask=st.sampled_from(MASKS), seed=st.integers(0, 3),
       payload=st.sampled_from([*range(len(NOT_TENSORS)), "garbage bytes", "empty file"]))
def test_malformed_feature_file(feature_root: Path, capsys: pytest.CaptureFixture, aspect: str, shape: tuple,
                                dtype: torch.dtype, special: float | None, where: int, mask: str, seed: int,
                                payload) -> None:
    """A sound pair with one `aspect` changed."""
    from conftest import load_script

    from utils.data.features import video_modality
    from utils.data.packed import open_packed
    feat_path = feature_root / "vit_feature1" / "vit_feature" / "x.pt"
    mask_path = feature_root / "vit_feature1" / "vit_mask" / "x.pt"
    shape, dtype = (shape if aspect == "shape" else (FRAMES, 512)), (dtype if aspect == "dtype" else torch.float32)
    special, mask = (special if aspect == "value" else None), (mask if aspect == "mask" else "valid")
    payload = payload if aspect == "payload" else None
    feat = _feature(shape, dtype, special, where, seed)
    if payload == "garbage bytes":
        feat_path.write_bytes(b"PK\x03\x04 not really a zip")
    elif payload == "empty file":
        feat_path.write_bytes(b"")
    elif payload is not None:
        feat = NOT_TENSORS[payload]
        torch.save(feat, feat_path)
    else:
        torch.save(feat, feat_path)
    torch.save(_mask(mask), mask_path)
    status = load_script("pack_features").main(["--frozen_feature_path", str(feature_root), "--modality", "video",
                                                "--max_v_frames", str(FRAMES), "--force", "--no_progress"])
    err = capsys.readouterr().err
    assert status in (0, 2) and "Traceback" not in err
    if status == 2:
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert str(feat_path) in err or str(mask_path) in err, err
        return
    store = open_packed(video_modality(feature_root, FRAMES))
    served = [t.numpy() for t in store.get("x")]
    for got, want in zip(served, _expected(feat, _mask(mask))):
        np.testing.assert_array_equal(got, want)


# ------------------------------------------------------------------ music indexes
@pytest.fixture(scope="module")
def index_setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model's index of 6 random tracks, a query, and the intact index's results."""
    from cli_helpers import tiny_checkpoint

    from utils.ground.index import encode_tracks, write_index
    from utils.ground.model import load_model
    root = tmp_path_factory.mktemp("fuzz_index")
    gm = load_model(tiny_checkpoint(root / "model.bin"), "cpu")
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(96)[None] < torch.tensor([[96], [60], [40], [30], [12], [5]])).float()
    feats = torch.randn(6, 96, 768, generator=g) * mask[..., None]
    write_index(gm, [f"t{i}" for i in range(6)], [encode_tracks(gm, feats, mask)], root / "music.index")
    torch.save(torch.randn(20, 512, generator=g), root / "clip.pt")
    setup = {"root": root, "index": root / "music.index"}
    assert _ground(setup, setup["index"]) == 0
    setup["results"] = (root / "results.json").read_text()
    return setup


def _ground(setup: dict, index: Path) -> int:
    from conftest import load_script
    (setup["root"] / "results.json").unlink(missing_ok=True)
    return load_script("ground").run(["--load_uni_model_path", str(setup["root"] / "model.bin"), "--index", str(index),
                                      "--video_feature", str(setup["root"] / "clip.pt"), "--device", "cpu",
                                      "--topk", "3", "--quiet", "--out", str(setup["root"] / "results.json")])


def _damaged_copy(setup: dict) -> Path:
    case = setup["root"] / "case.index"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(setup["index"], case)
    return case


def _assert_index_contract(setup: dict, index: Path, capsys: pytest.CaptureFixture) -> None:
    status = _ground(setup, index)
    err = capsys.readouterr().err
    assert status in (0, 2) and "Traceback" not in err
    if status == 2:
        assert err.startswith("error: ") and err.count("\n") == 1 and str(index) in err, err
        assert not (setup["root"] / "results.json").exists()
    else:  # accepted: then nothing that matters was changed
        assert (setup["root"] / "results.json").read_text() == setup["results"]


@given(which=st.integers(0, 99), kind=st.sampled_from(["flip", "truncate", "extend", "zero", "text"]),
       where=st.floats(0, 1, exclude_max=True), byte=st.integers(1, 255), text=st.text(max_size=40))
def test_damaged_index_file(index_setup: dict, capsys: pytest.CaptureFixture, which: int, kind: str, where: float,
                            byte: int, text: str) -> None:
    """Any file of the index: those its manifest lists (whatever the writer put there), and the manifest."""
    index = _damaged_copy(index_setup)
    names = sorted([*json.loads((index / "manifest.json").read_text())["files"], "manifest.json"])
    path = index / names[which % len(names)]
    data = bytearray(path.read_bytes())
    at = int(where * len(data))
    if kind == "flip":
        data[at] ^= byte
    elif kind == "truncate":
        del data[at:]
    elif kind == "extend":
        data[at:at] = bytes([byte]) * (1 + byte % 9)
    elif kind == "zero":
        data = bytearray(len(data))
    else:
        data = bytearray(text.encode("utf-8", "surrogatepass"))
    path.write_bytes(bytes(data))
    _assert_index_contract(index_setup, index, capsys)


@given(key=st.sampled_from(["format", "num_tracks", "dtype", "fingerprint", "files", "arrays", "config",
                            "num_snippets", "manifest_digest", "created", "x"]),
       value=json_values, drop=st.booleans(), nested=st.booleans(), forged=st.booleans())
def test_edited_index_manifest(index_setup: dict, capsys: pytest.CaptureFixture, key: str, value, drop: bool,
                               nested: bool, forged: bool) -> None:
    """An edit of any manifest field (a whole value, or one entry inside it) is refused or harmless --
    also when the manifest's own digest was recomputed (forged), so that only the other checks stand."""
    from utils.io import manifest_digest
    index = _damaged_copy(index_setup)
    manifest = json.loads((index / "manifest.json").read_text())
    target = manifest
    if nested and isinstance(manifest.get(key), dict) and manifest[key]:
        target, key = manifest[key], sorted(manifest[key])[0]
    if drop:
        target.pop(key, None)
    else:
        target[key] = value
    if forged:
        manifest["manifest_digest"] = manifest_digest(manifest)
    (index / "manifest.json").write_text(json.dumps(manifest))
    _assert_index_contract(index_setup, index, capsys)
