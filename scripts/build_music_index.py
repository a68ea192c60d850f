"""Encode a music library once into an index folder for scripts/ground.py.

    python scripts/build_music_index.py --load_uni_model_path RUN/pytorch_model.bin.best_r1 \
        --frozen_feature_path features/Kuai_feature --music_ids dataset/MGSV-EC/test_data.csv \
        --out indexes/test_music [--prior_csv dataset/MGSV-EC/train_data.csv] [--stride 2.5] \
        [--dtype float32|float16] [--overwrite]

--music_ids: a CSV with a music_id column (an MGSV-EC split works: a track's many rows are one
track, and its music_total_duration, which must agree across them, gives the track durations)
or a text file with one id per line, each id once (durations are then estimated from the AST
mask: valid snippets x stride). The index records the checkpoint path, a sha256
fingerprint of its weights and the configuration; ground.py refuses an index built with other
weights. With --prior_csv (an annotation CSV, normally the training split) the index also stores
each track's canonical clip there and how many videos use it; ground.py then shows it beside the
model's moment. The folder is written under a temporary name and renamed when complete.
Exit status 2 with a one-line message on bad input.

    python scripts/build_music_index.py --verify INDEX

compares every file of an existing index with the content digests recorded when it was built
(ground.py checks sizes, headers and ids on every open, digests only of files whose stat
changed); exit status 0 when it is sound, 2 with the rebuild command when it is not.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    # Required unless --verify (checked in main: argparse cannot make them conditional).
    p.add_argument("--load_uni_model_path", help="MaDe checkpoint file (required)")
    p.add_argument("--frozen_feature_path", help="feature root (holds ast_feature2p5/...) (required)")
    p.add_argument("--music_ids", help="CSV with a music_id column, or a text file of ids (required)")
    p.add_argument("--out", help="index folder to create (required)")
    p.add_argument("--verify", metavar="INDEX", default=None,
                   help="instead of building: check every content digest of an existing index")
    p.add_argument("--stride", type=float, default=None,
                   help="music window hop in seconds (default: the checkpoint's, else 2.5)")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                   help="storage of embeddings/tokens; float16 halves the size (scores change ~1e-3)")
    p.add_argument("--batch_size", type=int, default=64, help="tracks encoded per forward pass")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--use_packed", type=int, choices=[0, 1], default=1, help="use a packed feature store if present")
    p.add_argument("--prior_csv", default=None,
                   help="annotation CSV whose usage of each track (canonical clip, number of videos) is stored")
    p.add_argument("--overwrite", action="store_true", help="replace an existing index at --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    from utils.ground.index import build_index, check_out_folder, read_usage
    from utils.ground.library import open_index
    from utils.ground.model import load_model
    from utils.ground.queries import read_music_ids
    parser = get_parser()
    args = parser.parse_args(argv)
    if args.verify is not None:
        lib = open_index(args.verify, verify=True)
        print(f"{args.verify}: ok ({len(lib)} tracks; the content digests of its "
              f"{len(lib.manifest['files'])} files match)")
        return 0
    missing = [f"--{k}" for k in ("load_uni_model_path", "frozen_feature_path", "music_ids", "out")
               if getattr(args, k) is None]
    if missing:
        parser.error(f"the following arguments are required: {', '.join(missing)} (or --verify INDEX)")
    if args.batch_size < 1:
        raise ValueError("--batch_size must be >= 1")
    t0 = time.time()
    # Cheap checks first, so bad input fails before the model loads.
    read_music_ids(args.music_ids)
    if args.prior_csv is not None:
        read_usage(args.prior_csv)
    check_out_folder(Path(args.out), args.overwrite)
    gm = load_model(args.load_uni_model_path, args.device)
    if args.stride is not None and args.stride != gm.stride:
        print(f"warning: --stride {args.stride:g} differs from the checkpoint's {gm.stride:g}", file=sys.stderr)
        gm.args.stride = args.stride
    out = build_index(gm, args.music_ids, args.frozen_feature_path, args.out, batch_size=args.batch_size,
                      dtype=args.dtype, overwrite=args.overwrite, use_packed=bool(args.use_packed),
                      progress=not args.quiet, prior_csv=args.prior_csv)
    lib = open_index(out)
    m = lib.manifest
    print(f"wrote {out}: {len(lib)} tracks, {lib.size_bytes() / 2**20:.1f} MiB ({m['dtype']}), "
          f"{m['durations_from_mask']} duration(s) estimated from the mask, "
          f"{m.get('tracks_with_usage', 0)} with a canonical clip, {time.time() - t0:.1f} s; "
          f"weights sha256 {m['fingerprint'][:12]}")
    return 0


def run(argv: list[str] | None = None) -> int:
    """main() with bad input reported as one line on stderr and exit status 2 (no traceback)."""
    from utils.ground.model import GroundingError
    from utils.train.checkpoint import CheckpointError
    try:
        return main(argv)
    except (GroundingError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(run())
