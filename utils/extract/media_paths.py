"""Finding a video's or a track's media file from its id.

Shared by scripts/extract_features.py (which file to extract) and the grounding tools
(which audio to play or put under a preview, which video a CSV query came from).

A file is looked up the way MGSV-EC CSVs need: a path column (music_path / video_path) is
tried as written, then under a root folder with 1, 2, ... leading folders removed (the
CSVs carry paths of the authors' machine, e.g. /Data/music/source_music/0/<id>+title.mp3);
without a usable path, <root>/<id>.<ext> is looked for.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from utils.extract.media import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS


def find_by_id(item_id: str, root: Path, extensions: Iterable[str]) -> Path | None:
    """<root>/<id>.<ext> for the first extension (lower or upper case) that exists."""
    if not item_id or "/" in item_id or "\\" in item_id or item_id in (".", ".."):
        return None  # an id is a file name, never a path out of the folder
    for ext in extensions:
        for candidate in (root / f"{item_id}{ext}", root / f"{item_id}{ext.upper()}"):
            if candidate.is_file():
                return candidate
    return None


def resolve_path(value: str, root: Path) -> Path | None:
    """Try the path as written (relative: under root first), then root/<the path with 1, 2, ... leading
    components dropped>, ending with root/<file name>: CSVs written on another machine keep working when the
    media tree was copied to a different place at any depth."""
    p = Path(value)
    candidates = [p] if p.is_absolute() else [root / p, p]
    candidates += [root.joinpath(*p.parts[k:]) for k in range(1, len(p.parts))]
    return next((c for c in candidates if c.is_file()), None)


def read_path_column(csv_path: str | os.PathLike, id_column: str, path_columns: tuple[str, ...]) -> dict[str, str]:
    """{id: path as written} from a CSV's first path column present (first occurrence wins); {} when the
    file is missing, unreadable or has no such columns -- a path table is a hint, never required."""
    import pandas as pd
    try:
        df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, pd.errors.ParserError, UnicodeDecodeError):
        return {}
    column = next((c for c in path_columns if c in df.columns), None)
    if id_column not in df.columns or column is None:
        return {}
    table: dict[str, str] = {}
    for item_id, value in zip(df[id_column], df[column]):
        item_id, value = str(item_id).strip(), str(value).strip()
        if item_id and value and item_id not in table:
            table[item_id] = value
    return table


class MediaLocator:
    """id -> media file, from path tables (CSV columns) and/or a root folder.

    Lookups only touch the file system, so a locator over a 100k-row CSV is cheap to
    query for the handful of tracks a page shows.
    """

    def __init__(self, root: str | os.PathLike | None, extensions: Iterable[str],
                 paths: dict[str, str] | None = None, base: str | os.PathLike | None = None):
        self.root = Path(root) if root else None
        self.extensions = tuple(extensions)
        self.paths = paths or {}
        # Relative paths in a CSV are relative to the CSV's folder when no root is given.
        self.base = Path(base) if base else None

    def find(self, item_id: str) -> Path | None:
        value = self.paths.get(item_id)
        for root in (r for r in (self.root, self.base) if r is not None):
            found = resolve_path(value, root) if value else None
            found = found or find_by_id(item_id, root, self.extensions)
            if found is not None:
                return found
        return None


def music_locator(music_dir: str | os.PathLike | None, csvs: Iterable[str | os.PathLike | None] = ()) -> MediaLocator:
    """Audio files of tracks: the music_path column of the given CSVs (e.g. the split an index was built
    from), looked up as written and under `music_dir`, else <music_dir>/<music_id>.<ext>."""
    return _locator(music_dir, csvs, "music_id", ("music_path", "path"), AUDIO_EXTENSIONS)


def video_locator(video_dir: str | os.PathLike | None, csvs: Iterable[str | os.PathLike | None] = ()) -> MediaLocator:
    """Video files of queries: a video_path column, else <video_dir>/<video_id>.<ext>."""
    return _locator(video_dir, csvs, "video_id", ("video_path", "path"), VIDEO_EXTENSIONS)


def _locator(root: str | os.PathLike | None, csvs: Iterable[str | os.PathLike | None], id_column: str,
             path_columns: tuple[str, ...], extensions: tuple[str, ...]) -> MediaLocator:
    paths: dict[str, str] = {}
    base = None
    for csv in csvs:
        if csv is None or not Path(csv).is_file():
            continue
        for item_id, value in read_path_column(csv, id_column, path_columns).items():
            paths.setdefault(item_id, value)
        base = base or Path(csv).parent
    return MediaLocator(root, extensions, paths, base if root is None else None)


def index_source_csv(manifest: dict) -> str | None:
    """The CSV an index was built from (build_music_index.py --music_ids), when it was a CSV and is still
    there: its music_path column tells where each track's audio lives."""
    source = manifest.get("music_ids_source")
    if not isinstance(source, str) or not source.lower().endswith(".csv") or not Path(source).is_file():
        return None
    return source
