"""Annotation CSV loading: real files (when present), schema and every bad-input message."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from utils.data.annotations import (COLUMNS, REQUIRED_COLUMNS, TIME_COLUMNS, AnnotationError, format_annotations_csv,
                                    load_annotations)

GOOD_ROW = {
    "video_id": "113722188340", "music_id": "7+5x4mjjeiubm49fg", "video_start": "0.0",
    "video_end": "25.722", "music_start": "23.22", "music_end": "48.942",
    "music_total_duration": "122.137", "video_segment_duration": "25.722",
    "music_segment_duration": "25.722", "music_path": "/Data/music/source_music/1/x.mp3",
    "video_total_duration": "25.75", "video_width": "608", "video_height": "1280",
    "video_total_frames": "618", "video_frame_rate": "24", "video_category": "Beauty",
}


def write_csv(path: Path, rows: list[dict], columns: list[str] = COLUMNS) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return path


def rows(n: int = 3, **changes_by_index: dict) -> list[dict]:
    """n good rows with distinct video ids; changes_by_index={'r1': {...}} edits row 1."""
    out = []
    for i in range(n):
        r = dict(GOOD_ROW, video_id=str(113722188340 + i))
        r.update(changes_by_index.get(f"r{i}", {}))
        out.append(r)
    return out


def expect_error(path: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(AnnotationError) as exc:
        load_annotations(path, **kwargs)
    msg = str(exc.value)
    assert str(path) in msg, msg
    for frag in fragments:
        assert frag in msg, f"{frag!r} not in: {msg}"
    return msg


# ---------------------------------------------------------------------------------- real data


@pytest.mark.parametrize("split", ["val", "test"])
def test_real_csvs_load_with_string_ids(real_data_dir: Path, split: str) -> None:
    df = load_annotations(real_data_dir / f"{split}_data.csv")
    assert len(df) == 2000
    assert list(df.columns) == COLUMNS
    assert df["video_id"].dtype == object and df["music_id"].dtype == object
    assert all(type(v) is str for v in df["video_id"]) and all(type(m) is str for m in df["music_id"])
    assert not df["video_id"].str.contains(r"[.e]").any()  # never went through float
    assert "7+5x4mjjeiubm49fg" in set(df["music_id"])
    for col in TIME_COLUMNS:
        assert df[col].dtype == np.float64
    assert df["video_id"].is_unique and df["music_id"].is_unique
    assert (df["music_total_duration"] < 240).all()


def test_real_test_csv_contains_known_video_id(real_data_dir: Path) -> None:
    df = load_annotations(real_data_dir / "test_data.csv")
    assert "113722188340" in set(df["video_id"])


# ---------------------------------------------------------------------------------- good input


def test_good_file_types_and_values(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", rows(3, r2={"video_id": "000123"}))
    df = load_annotations(path)
    assert df["video_id"].tolist() == ["113722188340", "113722188341", "000123"]  # leading zeros kept
    assert df["music_id"].iloc[0] == "7+5x4mjjeiubm49fg"
    assert df["music_start"].iloc[0] == pytest.approx(23.22)
    assert df["video_width"].iloc[0] == 608


def test_only_required_columns_needed(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", rows(2), columns=list(REQUIRED_COLUMNS))
    assert len(load_annotations(path)) == 2


def test_rounding_tolerance_accepts_end_slightly_past_track(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "a.csv", rows(1, r0={"music_end": "122.157"}))  # +0.02 s
    assert len(load_annotations(path)) == 1


def test_format_roundtrip(tmp_path: Path) -> None:
    df = load_annotations(write_csv(tmp_path / "a.csv", rows(2)))
    (tmp_path / "b.csv").write_text(format_annotations_csv(df), encoding="utf-8")
    again = load_annotations(tmp_path / "b.csv")
    assert again["video_id"].tolist() == df["video_id"].tolist()
    assert np.allclose(again["music_end"], df["music_end"])


# ---------------------------------------------------------------------------------- bad input


def test_missing_file(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope.csv", "not found", "dataset/MGSV-EC")


def test_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    path.write_text("")
    expect_error(path, "empty")


def test_header_only(tmp_path: Path) -> None:
    expect_error(write_csv(tmp_path / "h.csv", []), "no data rows")


def test_missing_columns_are_named(tmp_path: Path) -> None:
    cols = [c for c in COLUMNS if c not in ("music_end", "music_total_duration")]
    msg = expect_error(write_csv(tmp_path / "m.csv", rows(2), columns=cols), "missing required column")
    assert "music_end" in msg and "music_total_duration" in msg
    assert "'music_start'" not in msg.split("found")[0]  # only the missing ones are listed first


@pytest.mark.parametrize("value, problem", [
    ("abc", "music_start is not a number ('abc')"),
    ("", "music_start is empty"),
    ("nan", "music_start is not finite ('nan')"),
    ("inf", "music_start is not finite ('inf')"),
])
def test_non_numeric_or_nan_time(tmp_path: Path, value: str, problem: str) -> None:
    path = write_csv(tmp_path / "n.csv", rows(3, r1={"music_start": value}))
    expect_error(path, "line 3", problem, "--skip_bad_rows")


def test_start_not_before_end(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "s.csv", rows(2, r0={"music_start": "50", "music_end": "40"}))
    expect_error(path, "line 2", "music_start 50 >= music_end 40")


def test_end_past_track(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "e.csv", rows(2, r1={"music_end": "130"}))
    expect_error(path, "line 3", "music_end 130 > music_total_duration 122.137")


def test_duration_past_max_m_duration(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "d.csv", rows(2, r0={"music_total_duration": "250"}))
    expect_error(path, "line 2", "music_total_duration 250 > max_m_duration 240")
    # A larger --max_m_duration accepts it.
    assert len(load_annotations(path, max_m_duration=300)) == 2


def test_video_times(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "v.csv", rows(2, r1={"video_start": "5", "video_end": "5"}))
    expect_error(path, "line 3", "video_start 5 >= video_end 5")


def test_empty_id(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "i.csv", rows(2, r1={"music_id": ""}))
    expect_error(path, "line 3", "music_id is empty")


def test_duplicate_video_ids(tmp_path: Path) -> None:
    r = rows(4)
    r[3]["video_id"] = r[1]["video_id"]
    msg = expect_error(write_csv(tmp_path / "dup.csv", r), "duplicate video_id", r[1]["video_id"])
    assert "lines 3, 5" in msg
    # Not skippable: which copy is right cannot be guessed.
    expect_error(tmp_path / "dup.csv", "duplicate video_id", skip_bad_rows=True)


def test_all_problems_of_a_row_and_count_reported(tmp_path: Path) -> None:
    bad = {"music_start": "x", "music_total_duration": "999"}
    msg = expect_error(write_csv(tmp_path / "b.csv", rows(9, **{f"r{i}": bad for i in range(7)})),
                       "7 bad row(s) of 9", "and 2 more")
    assert "music_start is not a number ('x'); music_total_duration 999 > max_m_duration 240" in msg


def test_skip_bad_rows_drops_and_warns(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "k.csv", rows(4, r1={"music_end": "nan"}, r3={"music_start": "60",
                                                                          "music_end": "50"}))
    with pytest.warns(UserWarning, match=r"dropped .*2 bad row\(s\) of 4"):
        df = load_annotations(path, skip_bad_rows=True)
    assert df["video_id"].tolist() == ["113722188340", "113722188342"]
    assert df.index.tolist() == [0, 1]


def test_skip_bad_rows_with_nothing_left(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "all.csv", rows(2, r0={"music_end": "x"}, r1={"music_end": "y"}))
    expect_error(path, "nothing left", skip_bad_rows=True)


def test_errors_are_value_errors() -> None:
    assert issubclass(AnnotationError, ValueError)


def test_float_looking_ids_are_not_converted(tmp_path: Path) -> None:
    # pandas' default reader would make this column float because of the empty cell.
    df = pd.DataFrame([GOOD_ROW, dict(GOOD_ROW, video_id="113722188399", video_category="")])
    df.to_csv(tmp_path / "f.csv", index=False)
    out = load_annotations(tmp_path / "f.csv")
    assert out["video_id"].tolist() == ["113722188340", "113722188399"]
