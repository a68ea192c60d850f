"""Extract CLIP video features and AST music features from raw media into the official folder layout.

    python scripts/extract_features.py --videos DIR_or_CSV --music DIR_or_CSV --out features/Kuai_feature \
        [--clip_weights model/pretrained_models/ViT-B-32.pt] [--ast_weights model/pretrained_models/audioset_0.4593.pth]
        [--stride 2.5] [--filter 10] [--device auto] [--batch_size 32]

Output (what train.py / test.py / ground.py read, the authors' folder layout):
    OUT/vit_feature1/vit_feature/<video_id>.pt   [50,512] float32    OUT/vit_feature1/vit_mask/<video_id>.pt  [50]
    OUT/ast_feature2p5/ast_feature/<music_id>.pt [96,768] float32    OUT/ast_feature2p5/ast_mask/<music_id>.pt [96]
(the music folder follows --stride: 2.5 -> ast_feature2p5, 5 -> ast_feature5, 7.5 -> ast_feature7p5, 10 -> ast_feature10)

Inputs (--videos and --music are independent; either may be omitted):
  * a directory: every media file directly inside it; the id is the file name without extension (two files of
    one name, e.g. a.mp4 and a.mov, are an error: which one the features should come from cannot be guessed).
  * a CSV file: one row per item (repeated rows of an id and its file are extracted once, as the MGSV-EC
    splits list a track once per video; an id given with two different files is an error). The id comes from
    the video_id / music_id column (read as text, so 113722188340 stays exactly that). The file comes from a
    path column if there is one (videos: video_path or path; music: music_path or path), else <ROOT>/<id>.<ext>
    is looked up.
    A path is tried as written (relative paths under ROOT first), then under ROOT with 1, 2, ... leading
    folders removed, down to ROOT/<file name>. ROOT is --video_root / --music_root (default: the CSV's
    folder). So the MGSV-EC CSVs work directly, e.g. ``--music dataset/MGSV-EC/test_data.csv --music_root
    /data/source_music`` finds "/Data/music/source_music/0/7+5x4...+title.mp3" as
    /data/source_music/0/7+5x4...+title.mp3 or /data/source_music/7+5x4...+title.mp3 (or deeper copies), and
    ``--videos test_data.csv --video_root /data/videos`` finds /data/videos/113722188340.mp4.
  * a single media file.

Ids already extracted (feature AND mask file present) are skipped, so an interrupted run resumes where it
stopped; --overwrite recomputes. Each file is written atomically, feature first and mask last, so a mask file
marks a complete item. Unreadable media are reported at the end (and in OUT/extraction_failures.json) without
stopping the run. That file accumulates over runs into the same --out: {"video"|"music": [{"id", "path", "error",
"folder"}]}, one entry per id and feature folder; an id listed again replaces its earlier entry (dropped when it
is extracted now or was already), entries of ids not listed this time are kept. Exit status: 0 on success or
partial success, 1 if every listed item failed (none extracted now or earlier), 2 for bad arguments, no inputs,
an id given twice with different files, an unreadable earlier failure list, or missing/unloadable weight files
(all checked before any work).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model.ast_encoder import AST_FILE_NAME, AST_SOURCE, DEFAULT_AST_WEIGHTS  # noqa: E402
from model.clip_encoder import CLIP_FILE_NAME, CLIP_SOURCE, DEFAULT_CLIP_WEIGHTS  # noqa: E402
from model.pretrained import MissingWeightsError, require_weights  # noqa: E402
from utils.extract.extract import (MAX_V_FRAMES, MUSIC_DIRS, VIDEO_DIR, extract_music_features,  # noqa: E402
                                   extract_video_features, load_ast, load_clip, music_dir_for_stride)
from utils.extract.media import AUDIO_EXTENSIONS, VIDEO_EXTENSIONS  # noqa: E402
from utils.extract.media_paths import find_by_id, resolve_path  # noqa: E402
from utils.device import DeviceError, resolve_device  # noqa: E402
from utils.io import atomic_torch_save, atomic_write_json  # noqa: E402


class InputError(ValueError):
    """Bad --videos / --music specification (reported as a usage error, exit status 2)."""


class EncoderLoadError(RuntimeError):
    """The encoder could not be built from its weight file (fatal: every item would fail the same way)."""


@dataclass
class Item:
    """One video or track to extract; `error` is set when its file could not be located."""
    id: str
    path: Path | None
    error: str | None = None


@dataclass
class Modality:
    """Everything that differs between the video and the music pass."""
    name: str                       # "video" / "music"
    id_column: str
    path_columns: tuple[str, ...]
    extensions: tuple[str, ...]
    feat_dir: Path
    mask_dir: Path


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--videos", help="directory of videos, CSV with video_id (+ optional path column), or one file")
    p.add_argument("--music", help="directory of audio files, CSV with music_id (+ music_path), or one file")
    p.add_argument("--out", required=True, help="feature root (e.g. features/Kuai_feature)")
    p.add_argument("--video_root", help="base folder for video paths/ids in a CSV (default: the CSV's folder)")
    p.add_argument("--music_root", help="base folder for music paths/ids in a CSV (default: the CSV's folder)")
    p.add_argument("--clip_weights", default=str(DEFAULT_CLIP_WEIGHTS), help="OpenAI CLIP ViT-B-32.pt")
    p.add_argument("--ast_weights", default=str(DEFAULT_AST_WEIGHTS), help="AST audioset_0.4593.pth")
    p.add_argument("--stride", type=float, default=2.5, choices=sorted(MUSIC_DIRS),
                   help="seconds between music window centres; also picks the output folder")
    p.add_argument("--filter", type=float, default=10.0, help="music window length in seconds (authors' script: 10)")
    p.add_argument("--max_v_frames", type=int, default=MAX_V_FRAMES, help="video slots (1 per second)")
    p.add_argument("--audio_channel", choices=("first", "mean"), default="first",
                   help="multi-channel audio: first channel (as the authors' pipeline) or the mean of all")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch_size", type=int, default=32, help="frames / music windows per encoder forward")
    p.add_argument("--overwrite", action="store_true", help="recompute ids that are already extracted")
    return p


# ----------------------------------------------------------------------------------------- input listing
def _safe_id(raw: str) -> str | None:
    """Ids become file names: reject empty ones and anything that would escape the output folder."""
    raw = raw.strip()
    if not raw or raw in (".", "..") or "/" in raw or "\\" in raw or raw.lower() == "nan":
        return None
    return raw


def _same_file(a: str, b: str, root: Path) -> bool:
    """Two path cells of one id name the same media file (as written, or once resolved)."""
    if a == b:
        return True
    found_a, found_b = (resolve_path(v, root) if v else None for v in (a, b))
    return found_a is not None and found_b is not None and found_a.resolve() == found_b.resolve()


def _refuse_repeated(source: Path, what: str, clashes: list[str]) -> None:
    """One id, two different files: whichever were extracted, the other's features would be missing
    under that id, so the list is refused before any work (as utils.data.annotations refuses repeated videos)."""
    if clashes:
        more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
        raise InputError(f"{source}: {what} given twice with different files: {'; '.join(clashes[:3])}{more}. "
                         "Each id names one feature file: remove one of them or give it its own id.")


def _items_from_csv(csv_path: Path, mod: Modality, root: Path) -> list[Item]:
    df = pd.read_csv(csv_path, dtype=str, keep_default_na=False)
    if mod.id_column not in df.columns:
        raise InputError(f"{csv_path} has no {mod.id_column} column (columns: {list(df.columns)})")
    path_col = next((c for c in mod.path_columns if c in df.columns), None)
    items: list[Item] = []
    seen: dict[str, tuple[int, str]] = {}  # id -> (line, path cell) of its first row
    clashes: list[str] = []
    paths = df[path_col] if path_col else [""] * len(df)
    for line, (raw_id, value) in enumerate(zip(df[mod.id_column], paths), start=2):  # line 1 is the header
        item_id = _safe_id(str(raw_id))
        if item_id is None:
            items.append(Item(f"<line {line}>", None, f"{csv_path}:{line}: bad {mod.id_column} {raw_id!r}"))
            continue
        value = str(value).strip()
        if item_id in seen:  # the same file again (a track used by many videos) is extracted once
            first_line, first_value = seen[item_id]
            if not _same_file(first_value, value, root):
                clashes.append(f"{mod.id_column} {item_id!r} on line {first_line} ({first_value!r}) "
                               f"and line {line} ({value!r})")
            continue
        seen[item_id] = (line, value)
        path = resolve_path(value, root) if value else None
        if path is None:
            path = find_by_id(item_id, root, mod.extensions)
        error = None if path else (f"file not found ({path_col}={value!r}, root {root})" if value
                                   else f"no {root}/{item_id}.<ext> with ext in {list(mod.extensions)}")
        items.append(Item(item_id, path, error))
    _refuse_repeated(csv_path, "an id", clashes)
    return items


def _items_from_dir(directory: Path, mod: Modality) -> list[Item]:
    items: dict[str, Item] = {}
    clashes: list[str] = []
    for path in sorted(directory.iterdir()):
        if path.is_file() and path.suffix.lower() in mod.extensions:
            if path.stem in items:
                clashes.append(f"id {path.stem!r} from {items[path.stem].path.name} and {path.name}")
                continue
            items[path.stem] = Item(path.stem, path)
    _refuse_repeated(directory, "an id (a file name without extension)", clashes)
    return list(items.values())


def list_items(spec: str, mod: Modality, root: str | None) -> list[Item]:
    """Items named by a directory, a CSV or a single file (see the module docstring)."""
    source = Path(spec)
    if source.is_dir():
        items = _items_from_dir(source, mod)
    elif source.is_file() and source.suffix.lower() == ".csv":
        items = _items_from_csv(source, mod, Path(root) if root else source.parent)
    elif source.is_file():
        items = [Item(source.stem, source)]
    else:
        raise InputError(f"--{'videos' if mod.name == 'video' else 'music'} {spec}: no such file or folder")
    if not items:
        raise InputError(f"no {mod.name} files found in {spec} (extensions {list(mod.extensions)})")
    return items


# ------------------------------------------------------------------------------------------- extraction
def is_done(mod: Modality, item_id: str) -> bool:
    """An item is complete only when both files exist (the mask is written last)."""
    return (mod.feat_dir / f"{item_id}.pt").is_file() and (mod.mask_dir / f"{item_id}.pt").is_file()


def run_modality(mod: Modality, items: list[Item], extract: Callable[[Path], tuple[torch.Tensor, torch.Tensor]],
                 overwrite: bool) -> tuple[int, int, list[dict[str, str]]]:
    """Extract every item not yet done. Returns (extracted, skipped, failures)."""
    extracted, skipped, failures = 0, 0, []
    bar = tqdm(items, desc=mod.name, unit=mod.name, dynamic_ncols=True)
    for item in bar:
        if not overwrite and is_done(mod, item.id):
            skipped += 1
            continue
        folder = mod.feat_dir.parent.name  # which feature folder lacks the id (music: one per stride)
        if item.error is not None:
            failures.append({"id": item.id, "path": str(item.path or ""), "error": item.error, "folder": folder})
            continue
        try:
            feat, mask = extract(item.path)
        except EncoderLoadError:
            raise
        except Exception as e:  # one bad file must not stop a 50k-file run; all are listed at the end
            failures.append({"id": item.id, "path": str(item.path), "error": f"{type(e).__name__}: {e}",
                             "folder": folder})
            continue
        atomic_torch_save(feat.float().contiguous(), mod.feat_dir / f"{item.id}.pt")
        atomic_torch_save(mask.float().contiguous(), mod.mask_dir / f"{item.id}.pt")
        extracted += 1
        bar.set_postfix(done=extracted, skipped=skipped, failed=len(failures))
    return extracted, skipped, failures


# ------------------------------------------------------------------------------------------ failure list
FAILURES_NAME = "extraction_failures.json"


def read_failures(path: Path) -> dict[str, list[dict]]:
    """The failure list an earlier run left in --out ({} when there is none). One that is not a
    failure list is refused rather than replaced: it is the only record of what failed before."""
    if not path.is_file():
        return {}
    try:
        failures = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        failures = e
    if not (isinstance(failures, dict) and all(
            isinstance(entries, list) and all(isinstance(f, dict) and isinstance(f.get("id"), str) for f in entries)
            for entries in failures.values())):
        raise InputError(f"{path} (the failure list of an earlier run) is not a {{modality: [{{id, ...}}]}} JSON "
                         "object; move it away or delete it, then run again.")
    return failures


def merge_failures(earlier: dict[str, list[dict]], modality: str, folder: str, listed: set[str],
                   failures: list[dict]) -> dict[str, list[dict]]:
    """`earlier` with one pass's outcome: the entries of the ids it listed (in its folder; entries
    written before failures named their folder count as any) give way to its failures."""
    kept = [f for f in earlier.get(modality, []) if not (f["id"] in listed and f.get("folder", folder) == folder)]
    merged = {**earlier, modality: kept + failures}
    return {name: entries for name, entries in merged.items() if entries}


def _lazy(loader: Callable[[], object]) -> Callable[[], object]:
    """Load an encoder on first use, so a fully resumed run does not pay for loading ~90M parameters."""
    cache: list[object] = []

    def get() -> object:
        if not cache:
            try:
                cache.append(loader())
            except Exception as e:  # a bad weight file is fatal, not a per-item failure
                raise EncoderLoadError(f"{type(e).__name__}: {e}") from e
        return cache[0]
    return get


def _make_jobs(args: argparse.Namespace, out: Path, device: torch.device) -> list[tuple]:
    """(modality, items, extract function) for each requested modality; encoders load lazily."""
    jobs = []
    if args.videos:
        mod = Modality("video", "video_id", ("video_path", "path"), VIDEO_EXTENSIONS,
                       out / VIDEO_DIR / "vit_feature", out / VIDEO_DIR / "vit_mask")
        clip = _lazy(lambda: load_clip(args.clip_weights, device))
        jobs.append((mod, list_items(args.videos, mod, args.video_root),
                     lambda p: extract_video_features(p, clip(), device, args.max_v_frames, args.batch_size)))
    if args.music:
        music_dir = out / music_dir_for_stride(args.stride)
        mod = Modality("music", "music_id", ("music_path", "path"), AUDIO_EXTENSIONS,
                       music_dir / "ast_feature", music_dir / "ast_mask")
        ast = _lazy(lambda: load_ast(args.ast_weights, device))
        jobs.append((mod, list_items(args.music, mod, args.music_root),
                     lambda p: extract_music_features(p, ast(), args.stride, args.filter, device,
                                                      args.batch_size, args.audio_channel)))
    return jobs


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    if not args.videos and not args.music:
        print("error: nothing to do: give --videos and/or --music", file=sys.stderr)
        return 2
    if args.batch_size < 1 or args.max_v_frames < 1 or args.filter <= 0:
        print("error: --batch_size and --max_v_frames must be >= 1 and --filter > 0", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:  # fail before any work if a needed weight file is missing
        if args.videos:
            require_weights(args.clip_weights, "CLIP ViT-B/32", CLIP_FILE_NAME, CLIP_SOURCE)
        if args.music:
            require_weights(args.ast_weights, "AST (AudioSet 0.4593)", AST_FILE_NAME, AST_SOURCE)
    except MissingWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        jobs = _make_jobs(args, out, resolve_device(args.device))
    except (InputError, DeviceError, pd.errors.ParserError, UnicodeDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    failures_file = out / FAILURES_NAME
    try:
        all_failures = read_failures(failures_file)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    earlier_count = sum(map(len, all_failures.values()))
    attempted = available = 0
    for mod, items, extract in jobs:
        try:
            done, skipped, failures = run_modality(mod, items, extract, args.overwrite)
        except EncoderLoadError as e:
            print(f"error: cannot load the {mod.name} encoder: {e}", file=sys.stderr)
            return 2
        print(f"{mod.name}: {len(items)} listed, {done} extracted, {skipped} already done, "
              f"{len(failures)} failed -> {mod.feat_dir.parent}", file=sys.stderr)
        for f in failures[:20]:
            print(f"  FAILED {f['id']}: {f['path'] + ': ' if f['path'] else ''}{f['error']}", file=sys.stderr)
        if len(failures) > 20:
            print(f"  ... and {len(failures) - 20} more", file=sys.stderr)
        attempted += done + len(failures)
        available += done + skipped
        all_failures = merge_failures(all_failures, mod.name, mod.feat_dir.parent.name, {i.id for i in items},
                                      failures)
    if all_failures:
        atomic_write_json(all_failures, failures_file)
        print(f"failure list written to {failures_file} ({sum(map(len, all_failures.values()))} entries; "
              f"{earlier_count} before this run)", file=sys.stderr)
    else:
        failures_file.unlink(missing_ok=True)  # every earlier failure has been extracted since
    # Failure status only when nothing usable came out of the inputs (already extracted items count as usable).
    return 1 if attempted and not available else 0


if __name__ == "__main__":
    sys.exit(main())
