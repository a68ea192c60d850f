"""Standing fuzz test of the input contract (hypothesis, fixed seed, a few seconds): malformed
prediction JSONs and annotation CSVs given to `python -m utils.evaluate` (in-process) end with
exit status 0 or 2 -- never an exception -- and a refusal is an `error:` message naming the file.
Valid inputs are mutated one way at a time so the examples stay close to what users write."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from utils.evaluate import main  # noqa: E402

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
