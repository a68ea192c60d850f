"""MGSV-EC annotation CSVs: schema, loading and validation.

One CSV row = one query video and its ground-truth music moment. The official
files (dataset/MGSV-EC/{train,val,test}_data.csv) have 16 columns; the model
only reads seven of them (REQUIRED_COLUMNS), the rest are metadata.

Everything is validated when the file is loaded, because a bad row otherwise
surfaces much later as a NaN loss or a deep torch traceback. A problem is
reported with the file, the 1-based line number in the CSV (line 1 is the
header) and what is wrong; `skip_bad_rows=True` drops such rows with a warning
instead.

Ids are read as text: music ids contain '+' (e.g. '7+5x4mjjeiubm49fg') and
video ids are integers in the CSV ('113722188340') which pandas would
otherwise turn into int64 or, with a single missing value, into float
('113722188340.0'), silently breaking the feature file names.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from utils.data.constants import MAX_M_DURATION

COLUMNS: list[str] = [
    "video_id", "music_id", "video_start", "video_end", "music_start", "music_end",
    "music_total_duration", "video_segment_duration", "music_segment_duration", "music_path",
    "video_total_duration", "video_width", "video_height", "video_total_frames",
    "video_frame_rate", "video_category",
]
ID_COLUMNS: tuple[str, ...] = ("video_id", "music_id")
# Times in seconds that the code uses: validated strictly, stored as float64.
TIME_COLUMNS: tuple[str, ...] = (
    "video_start", "video_end", "music_start", "music_end", "music_total_duration",
)
REQUIRED_COLUMNS: tuple[str, ...] = ID_COLUMNS + TIME_COLUMNS
# Informational numeric columns: converted leniently (unparsable -> NaN), never an error.
OPTIONAL_NUMERIC_COLUMNS: tuple[str, ...] = (
    "video_segment_duration", "music_segment_duration", "video_total_duration",
    "video_width", "video_height", "video_total_frames", "video_frame_rate",
)
# How many problems an error message lists before saying "... and N more".
MAX_LISTED = 5
_FIX_HINT = ("Fix or remove these rows, or pass --skip_bad_rows (skip_bad_rows=True) "
             "to drop them with a warning.")


class AnnotationError(ValueError):
    """A problem with an annotation CSV (missing file/columns, bad or duplicate rows)."""


def csv_line(row_index: int) -> int:
    """1-based line number in the CSV file of the 0-based data row `row_index` (header is line 1)."""
    return row_index + 2


def _read_raw(path: Path) -> pd.DataFrame:
    """Read every cell as text, keeping empty cells as '' (so 'NA' or 'null' ids stay text)."""
    if not path.is_file():
        raise AnnotationError(
            f"{path}: annotation file not found. Put the MGSV-EC CSVs in dataset/MGSV-EC/ "
            "(see dataset/MGSV-EC/README.md) or make synthetic ones with scripts/make_demo_data.py.")
    try:
        # utf-8-sig: tolerate a byte-order mark written by spreadsheet programs.
        df = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise AnnotationError(f"{path}: the file is empty (no header, no rows); "
                              "expected an MGSV-EC annotation CSV.") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path}: not a readable CSV file ({exc}).") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _check_columns(df: pd.DataFrame, path: Path) -> None:
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise AnnotationError(
            f"{path}: missing required column(s) {missing}; found {list(df.columns)}. "
            f"An MGSV-EC annotation CSV has the header: {','.join(COLUMNS)}")
    if len(df) == 0:
        raise AnnotationError(f"{path}: the file has a header but no data rows.")


def _parse_times(df: pd.DataFrame) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """Convert TIME_COLUMNS to float64; return the values and per-row parse problems."""
    problems: dict[int, list[str]] = {}
    values = {}
    for col in TIME_COLUMNS:
        raw = df[col].astype(str).str.strip()
        num = pd.to_numeric(raw, errors="coerce").astype("float64")
        bad = ~np.isfinite(num.to_numpy())
        for i in np.flatnonzero(bad):
            text = raw.iloc[i]
            what = "is empty" if text == "" else (
                f"is not finite ({text!r})" if text.lower().lstrip("+-") in ("nan", "inf", "infinity")
                else f"is not a number ({text!r})")
            problems.setdefault(int(i), []).append(f"{col} {what}")
        values[col] = num
    return pd.DataFrame(values, index=df.index), problems


def _check_rows(times: pd.DataFrame, ids: pd.DataFrame, max_m_duration: float,
                tolerance: float, problems: dict[int, list[str]]) -> None:
    """Add semantic problems of each row (ids, ordering of times, durations) to `problems`."""
    for col in ID_COLUMNS:
        for i in np.flatnonzero((ids[col] == "").to_numpy()):
            problems.setdefault(int(i), []).append(f"{col} is empty")
    t = {c: times[c].to_numpy() for c in TIME_COLUMNS}
    with np.errstate(invalid="ignore"):  # NaNs were reported above; comparisons with NaN are False
        rules = [
            (t["music_start"] < -tolerance, "music_start {music_start:g} < 0"),
            (t["music_start"] >= t["music_end"], "music_start {music_start:g} >= music_end {music_end:g}"),
            (t["music_end"] > t["music_total_duration"] + tolerance,
             "music_end {music_end:g} > music_total_duration {music_total_duration:g}"),
            (t["music_total_duration"] > max_m_duration + tolerance,
             "music_total_duration {music_total_duration:g} > max_m_duration " + f"{max_m_duration:g}"
             + " (raise --max_m_duration or drop the row)"),
            (t["video_start"] < -tolerance, "video_start {video_start:g} < 0"),
            (t["video_start"] >= t["video_end"], "video_start {video_start:g} >= video_end {video_end:g}"),
        ]
    for bad, template in rules:
        for i in np.flatnonzero(bad):
            row = {c: t[c][i] for c in TIME_COLUMNS}
            problems.setdefault(int(i), []).append(template.format(**row))


def _describe(problems: dict[int, list[str]]) -> str:
    rows = sorted(problems)
    lines = [f"  line {csv_line(i)}: {'; '.join(problems[i])}" for i in rows[:MAX_LISTED]]
    if len(rows) > MAX_LISTED:
        lines.append(f"  ... and {len(rows) - MAX_LISTED} more bad row(s)")
    return "\n".join(lines)


def _check_duplicates(video_ids: pd.Series, path: Path) -> None:
    """Video ids are the query identity (feature file name, metrics key): they must be unique."""
    dup = video_ids[video_ids.duplicated(keep=False)]
    if dup.empty:
        return
    groups = dup.groupby(dup, sort=False).groups
    listed = [f"  video_id {vid!r} on lines {', '.join(str(csv_line(int(i))) for i in idx)}"
              for vid, idx in list(groups.items())[:MAX_LISTED]]
    if len(groups) > MAX_LISTED:
        listed.append(f"  ... and {len(groups) - MAX_LISTED} more duplicated id(s)")
    raise AnnotationError(
        f"{path}: {len(groups)} duplicate video_id(s); each row must be a different query video:\n"
        + "\n".join(listed) + "\nRemove the duplicated rows (keep one row per video).")


def load_annotations(csv_path: str | os.PathLike, max_m_duration: float = MAX_M_DURATION,
                     skip_bad_rows: bool = False, tolerance: float = 0.05) -> pd.DataFrame:
    """Load and validate one MGSV-EC annotation CSV.

    Returns a DataFrame with a fresh RangeIndex, all columns of the file, ids as Python
    `str` (object dtype), TIME_COLUMNS as float64 and OPTIONAL_NUMERIC_COLUMNS (when
    present) converted leniently to numbers. Checks: required columns present, at least
    one row, ids non-empty, times finite, 0 <= music_start < music_end <=
    music_total_duration <= max_m_duration and video_start < video_end (each `<=` allows
    `tolerance` seconds of rounding slack), unique video ids.

    Bad rows raise AnnotationError (file, line numbers, problems) unless `skip_bad_rows`,
    in which case they are dropped with a warning giving their count. Duplicate video
    ids are always an error: which duplicate is right cannot be guessed.
    """
    path = Path(csv_path)
    raw = _read_raw(path)
    _check_columns(raw, path)
    ids = pd.DataFrame({c: raw[c].astype(str).str.strip() for c in ID_COLUMNS}, index=raw.index)
    times, problems = _parse_times(raw)
    _check_rows(times, ids, max_m_duration, tolerance, problems)
    if problems:
        summary = f"{path}: {len(problems)} bad row(s) of {len(raw)}:\n{_describe(problems)}"
        if not skip_bad_rows:
            raise AnnotationError(f"{summary}\n{_FIX_HINT}")
        if len(problems) == len(raw):
            raise AnnotationError(f"{summary}\nEvery row is bad; nothing left after skip_bad_rows.")
        warnings.warn(f"skip_bad_rows: dropped {summary}", stacklevel=2)
    keep = np.ones(len(raw), dtype=bool)
    keep[list(problems)] = False

    df = raw.copy()
    for col in ID_COLUMNS:
        # object dtype of plain Python str, independent of pandas' default string dtype.
        df[col] = pd.Series([str(v) for v in ids[col]], index=raw.index, dtype=object)
    for col in TIME_COLUMNS:
        df[col] = times[col]
    for col in OPTIONAL_NUMERIC_COLUMNS:
        if col in df.columns:
            df[col] = pd.to_numeric(df[col].str.strip(), errors="coerce")
    df = df[keep]
    _check_duplicates(df["video_id"], path)
    return df.reset_index(drop=True)


def format_annotations_csv(df: pd.DataFrame) -> str:
    """CSV text with the official column order and fixed float formatting (3 decimals, '\\n').

    Used to write synthetic splits byte-reproducibly; columns absent from `df` are an error.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise AnnotationError(f"cannot write annotations: missing column(s) {missing}")
    return df[COLUMNS].to_csv(index=False, float_format="%.3f", lineterminator="\n")

