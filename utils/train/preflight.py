"""Checks that train.py and test.py run before anything heavy: run folders, annotation CSVs,
the settings of a resumed run, and how the project's own errors are reported.

Nothing here imports torch. A mistyped flag, a bad CSV or a folder that already holds a
finished run is therefore reported within a second instead of after torch (several seconds
to import) and the feature store are loaded, and the caller has not created any output
yet when it fails.
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

# Files train.py writes into a run folder. Only these are ever moved by --overwrite.
RUN_FILE_PATTERNS = ("pytorch_model.bin*", "train_state.json", "events.out.tfevents.*", "*_train.log")
# A folder holding one of these is a run (finished or resumable) that must not be mixed with a new one.
RUN_MARKERS = ("pytorch_model.bin*", "train_state.json")

# Settings of a resumed run (see resume_settings). INVOCATION_KEYS always come from the
# command line: how this machine runs and logs, not what is trained. RELOCATABLE_KEYS (where
# the data and outputs are) come from the run unless given again, and may then differ.
# Every other setting decides what is trained and comes from the run.
INVOCATION_KEYS = frozenset({
    "device", "amp", "compile", "num_workers", "eval_chunk", "local_rank", "rank", "world_size",
    "resume", "resume_path", "overwrite", "start_epoch", "mode", "load_uni_model_path", "save_json",
    "tb_writer", "num_display", "metrics_json", "feature_device",
})
RELOCATABLE_KEYS = frozenset({
    "train_csv", "val_csv", "test_csv", "frozen_feature_path", "music_frozen_feature_path",
    "frame_frozen_feature_path", "use_packed", "output_dir", "name", "batch_size_val", "save_model",
})

# (module, class) of the project's input errors: train.py/test.py print their message and
# exit with status 2 instead of a traceback. Anything else is a bug and keeps its traceback.
USER_ERRORS = (
    ("utils.data.annotations", "AnnotationError"),
    ("utils.data.features", "FeatureError"),
    ("utils.train.checkpoint", "CheckpointError"),
    ("model.checkpoint_compat", "CheckpointMismatchError"),
    ("model.pretrained", "MissingWeightsError"),
    ("utils.evaluate.offline", "EvaluationError"),
    ("utils.train.preflight", "RunDirError"),
    ("utils.train.preflight", "ConfigError"),
    ("utils.device", "DeviceError"),
    ("utils.io", "OutputError"),
    ("utils.io", "UnsafeFileError"),
)
# Failures of a run that had started correctly (a checkpoint write on a full disk): one paragraph
# too, but exit status 1, as a run that failed rather than input that was refused.
RUN_FAILURES = (
    ("utils.io", "WriteError"),
)


class RunDirError(ValueError):
    """The output folder holds a run that would be overwritten, or --resume points nowhere."""


class ConfigError(ValueError):
    """Settings that cannot work with this data or machine (caught before training starts)."""


# ------------------------------------------------------------------ errors
def is_user_error(exc: BaseException, classes: Sequence[tuple[str, str]] = USER_ERRORS) -> bool:
    """True for the project's own input errors (see USER_ERRORS, or `classes`).

    Looked up in sys.modules rather than imported: a module that was never imported cannot
    have raised, and importing it here would load torch just to print a message.
    """
    for module_name, class_name in classes:
        module = sys.modules.get(module_name)
        cls = getattr(module, class_name, None) if module is not None else None
        if cls is not None and isinstance(exc, cls):
            return True
    return False


def user_error_message(exc: BaseException) -> str:
    """The error's own text; for errors re-raised from a DataLoader worker, without the
    worker's traceback that torch embeds in the message."""
    text = str(exc)
    if "Original Traceback (most recent call last)" in text:
        # The worker's traceback ends with "<module.>ClassName: <the original message>".
        last = None
        for last in re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(exc).__name__)}: ", text, flags=re.MULTILINE):
            pass
        if last is not None:
            text = text[last.end():]
    return text.strip()


def report_user_error(exc: BaseException, logger: Any = None) -> None:
    """One paragraph on stderr (and in the run's log file when one is open)."""
    message = user_error_message(exc)
    print(f"error: {message}", file=sys.stderr, flush=True)
    if logger is not None:
        record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, message, None, None)
        for handler in logger.handlers:
            if isinstance(handler, logging.FileHandler):  # the console already has it (stderr)
                handler.handle(record)


def run_cli(main: Callable[[], int]) -> int:
    """Run an entry point: project errors print one paragraph and exit 2; bugs keep their traceback."""
    from utils.logger import get_logger
    try:
        return main()
    except Exception as e:
        if is_user_error(e):
            report_user_error(e, get_logger())
            return 2
        if is_user_error(e, RUN_FAILURES):
            report_user_error(e, get_logger())
            return 1
        raise
    finally:
        # A torchrun rank that stops on an error still tears its process group down, so it exits with
        # its own message and status, not an abort at interpreter shutdown (utils.train.distributed.cleanup).
        distributed = sys.modules.get("utils.train.distributed")
        if distributed is not None:
            distributed.cleanup()


# ------------------------------------------------------------------ run folders
def new_run_dir(args: Any) -> Path:
    """<output_dir>/<train_data>/<MMDD>+<name>, as the original."""
    return Path(args.output_dir) / args.train_data / f"{time.strftime('%m%d')}+{args.name}"


def run_files(run_dir: Path, patterns: Sequence[str] = RUN_FILE_PATTERNS) -> list[Path]:
    if not run_dir.is_dir():
        return []
    found = {p for pattern in patterns for p in run_dir.glob(pattern) if p.is_file()}
    return sorted(found)


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that already holds a run unless --overwrite; creates nothing."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"the run folder {run_dir} exists and is not a folder; choose another --name "
                          "or --output_dir.")
    existing = [p.name for p in run_files(run_dir, RUN_MARKERS)]
    if existing and not overwrite:
        shown = ", ".join(existing[:4]) + (", ..." if len(existing) > 4 else "")
        raise RunDirError(
            f"{run_dir} already holds a run ({shown}). Pass --resume {run_dir} to continue it, "
            "--overwrite to train again into it (the old run's files are moved into a "
            "'replaced-<time>' subfolder, nothing is deleted), or choose another --name.")


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Move the files of an earlier run in `run_dir` (only the names train.py writes) into
    run_dir/replaced-<time>/, so a new run never mixes with it (an old .best_* file that the
    new run does not rewrite would otherwise be evaluated as the new run's) and nothing is
    deleted. Returns the subfolder, or None when there was nothing to move."""
    files = run_files(run_dir)
    if not files:
        return None
    target = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    suffix = 0
    while target.exists():
        suffix += 1
        target = run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{suffix}"
    target.mkdir(parents=True)
    for path in files:
        os.replace(path, target / path.name)
    return target


# ------------------------------------------------------------------ settings
def given_flags(argv: Sequence[str], mode: str = "train") -> set[str]:
    """Destinations of the flags written on the command line (not left at their defaults)."""
    from utils.train.options import get_parser
    parser = get_parser(mode)
    for action in parser._actions:  # argparse has no public way to ask "was this given?"
        action.default = argparse.SUPPRESS
    given, _ = parser.parse_known_args(list(argv))
    return set(vars(given))


def resume_settings(args: Any, saved: dict, given: set[str], source: str) -> list[str]:
    """Make `args` the resumed run's settings, so that `--resume RUN` alone continues the same run.

    The run's value is taken for every setting except INVOCATION_KEYS and the flags given on
    this command line. A given flag may differ from the run for RELOCATABLE_KEYS (data moved,
    ...) and for --epochs (a finished run may be extended; its learning-rate schedule is then
    recomputed for the new length, so it is not the run a longer --epochs would have given);
    for any other setting a different value is an error. Returns "key: value" notes for the
    settings taken from the run that differ from this command line's defaults.
    """
    conflicts, notes = [], []
    for key, value in saved.items():
        if key in INVOCATION_KEYS or not hasattr(args, key):
            continue
        current = getattr(args, key)
        if _same(current, value):
            continue
        if key in given:
            if key not in RELOCATABLE_KEYS and key != "epochs":
                conflicts.append(f"--{key} {current!r} (the run used {value!r})")
        else:
            notes.append(f"{key}: {value!r}")
            setattr(args, key, value)
    if conflicts:
        raise ConfigError(
            f"--resume {source}: these flags differ from the settings the run was trained with:\n  "
            + "\n  ".join(conflicts)
            + "\nA resumed run continues with its own settings: drop these flags (or start a new run "
            "with another --name to train with them).")
    if "frozen_feature_path" in given:  # the derived folders follow the new root
        from utils.data.constants import MUSIC_DIRS, VIDEO_DIR
        args.music_frozen_feature_path = os.path.join(args.frozen_feature_path, MUSIC_DIRS[float(args.stride)])
        args.frame_frozen_feature_path = os.path.join(args.frozen_feature_path, VIDEO_DIR)
    return notes


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return list(a) == list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else False
    if isinstance(a, float) or isinstance(b, float):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return a == b


# ------------------------------------------------------------------ inputs
def load_split(csv_path: str | os.PathLike, args: Any):
    """A split's annotations, validated (utils.data.annotations; pandas only)."""
    from utils.data.annotations import load_annotations
    return load_annotations(csv_path, max_m_duration=args.max_m_duration, skip_bad_rows=args.skip_bad_rows)


def check_batch_size(num_rows: int, batch_size: int, world_size: int, csv_path: str | os.PathLike) -> int:
    """Per-process batch size; refuses sizes that would run no step (the last batch is dropped)."""
    per_rank = batch_size // world_size
    if per_rank < 1 or per_rank * world_size != batch_size:
        raise ConfigError(f"--batch_size_train {batch_size} must be a positive multiple of the number of "
                          f"processes ({world_size}).")
    if num_rows // world_size < per_rank:
        raise ConfigError(
            f"--batch_size_train {batch_size} is larger than the training set ({num_rows} rows in {csv_path}"
            f"{f' over {world_size} processes' if world_size > 1 else ''}); incomplete batches are dropped, "
            "so no training step would run. Lower --batch_size_train.")
    return per_rank


# ------------------------------------------------------------------ evaluation outputs
def evaluation_dir(checkpoint: Path, output_dir: str | os.PathLike, sub: str) -> Path:
    """Where test.py writes its log and --save_json predictions: <checkpoint's folder>/<sub> as
    always when that folder is writable, else <output_dir>/<sub> (a checkpoint in a read-only
    folder -- a shared model store, a mounted download -- must still be evaluable)."""
    from utils.io import OutputError, check_writable_dir
    beside, fallback = evaluation_dirs(checkpoint, output_dir, sub)
    try:
        check_writable_dir(beside)
        return beside
    except OutputError:
        check_writable_dir(fallback, f"the checkpoint's folder is read-only, and --output_dir {output_dir}: folder")
        return fallback


def evaluation_dirs(checkpoint: Path, output_dir: str | os.PathLike, sub: str) -> tuple[Path, Path]:
    """(beside the checkpoint, under --output_dir): evaluation_dir's first and second choice."""
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / sub, Path(output_dir) / sub


def prediction_identity(checkpoint: Path, csv_path: str | os.PathLike, config: dict) -> str:
    """10 hex digits naming one evaluation: the checkpoint's and the CSV's content and the settings.

    --save_json files carry it, so evaluating two CSVs of the same file name (or two checkpoints
    of the same epoch) writes two files instead of silently replacing one with the other, while
    re-running the very same evaluation rewrites its own file."""
    import hashlib
    import json
    h = hashlib.blake2b(digest_size=5)
    for path in (Path(checkpoint), Path(csv_path)):
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()
