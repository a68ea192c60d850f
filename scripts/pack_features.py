"""Pack the per-id feature files into memory-mapped arrays (fast training input).

    python scripts/pack_features.py --frozen_feature_path features/Kuai_feature [--stride 2.5] [--fp16]

Reads every <id>.pt of vit_feature1 and of the music folder of --stride (validating
each file: shape, dtype, finite values, 0/1 mask), and writes

    <root>/packed/vit_feature1/{feats.npy, masks.npy, ids.json, manifest.json}
    <root>/packed/ast_feature2p5/{feats.npy, masks.npy, ids.json, manifest.json}

atomically, manifest last. FeatureStore(use_packed=True) then memory-maps these
instead of opening four small files per sample, as long as the manifest's fingerprint
of the per-id files still matches (re-run this script after changing them). The
per-id files may be deleted afterwards; the packed store is then used as is.

--fp16 halves the size (video ~2.7 GB instead of ~5.4 GB for the full MGSV-EC); the
loader casts back to float32, so values are close to, not equal to, the originals.
Re-running is a no-op when the store is up to date (use --force to rebuild). A rebuild is
written into a staging folder and swapped in at the end, so a failed one leaves the previous
store usable. --verify checks an existing store against the content digests recorded when
it was packed (its own files and, where present, the per-id files) and exits 2 if it is damaged
or out of date.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.data.constants import MAX_M_DURATION  # noqa: E402
from utils.data.features import FeatureError, Modality, music_modality, video_modality
from utils.data.packed import inspect_packed, open_packed, pack_modality, rebuild_command  # noqa: E402
from utils.io import OutputError, WriteError, check_writable_dir  # noqa: E402


def pack(root: str | Path, stride: float = 2.5, fp16: bool = False,
         modalities: tuple[str, ...] = ("video", "music"), max_m_duration: float = MAX_M_DURATION, num_frames: int = 50, force: bool = False,
         progress: bool = True) -> dict[str, dict]:
    """Pack the requested modalities of `root`; return {modality: manifest}."""
    targets: dict[str, Modality] = {}
    if "video" in modalities:
        targets["video"] = video_modality(root, num_frames)
    if "music" in modalities:
        targets["music"] = music_modality(root, stride, max_m_duration)
    for modality in targets.values():  # before hours of reading, not after
        check_writable_dir(modality.packed_dir.parent, "packed store folder")
    manifests = {}
    for name, modality in targets.items():
        current = None if force else open_packed(modality, warn=False)
        wanted = "float16" if fp16 else "float32"
        if current is not None and current.manifest["feats_dtype"] == wanted:
            print(f"{modality.packed_dir}: up to date ({current.manifest['num_items']} items), skipped")
            manifests[name] = current.manifest
            continue
        t0 = time.time()
        manifests[name] = pack_modality(modality, fp16=fp16, progress=progress)
        print(f"{modality.packed_dir}: packed {manifests[name]['num_items']} {name} items "
              f"({wanted}) in {time.time() - t0:.1f} s")
    return manifests


def verify(root: str | Path, stride: float, modalities: tuple[str, ...], max_m_duration: float,
           num_frames: int) -> int:
    """Compare every content digest of the stores of `modalities`; 0 when all are sound, else 2."""
    status = 0
    for name in modalities:
        modality = video_modality(root, num_frames) if name == "video" else music_modality(root, stride, max_m_duration)
        store, problem = inspect_packed(modality, verify=True)
        if store is not None:
            print(f"{modality.packed_dir}: ok ({store.manifest['num_items']} {name} items, digests match)")
            continue
        status = 2
        why = f"is {problem}" if problem else "does not exist"
        print(f"error: packed store {modality.packed_dir} {why}; rebuild it with {rebuild_command(modality)}",
              file=sys.stderr)
    return status


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--frozen_feature_path", required=True,
                   help="feature root holding vit_feature1/ and ast_feature*/ (e.g. features/Kuai_feature)")
    p.add_argument("--stride", type=float, default=2.5, help="music window hop: selects ast_feature<stride>/")
    p.add_argument("--max_m_duration", type=float, default=MAX_M_DURATION)
    p.add_argument("--max_v_frames", type=int, default=50, help="frames per video file")
    p.add_argument("--fp16", action="store_true", help="store features as float16 (half the size)")
    p.add_argument("--modality", choices=["both", "video", "music"], default="both")
    p.add_argument("--force", action="store_true", help="rebuild even if the packed store is up to date")
    p.add_argument("--verify", action="store_true",
                   help="check the store's content digests (and the per-id files') instead of packing")
    p.add_argument("--no_progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    modalities = ("video", "music") if args.modality == "both" else (args.modality,)
    if args.verify:
        return verify(args.frozen_feature_path, args.stride, modalities, args.max_m_duration, args.max_v_frames)
    try:
        pack(args.frozen_feature_path, args.stride, args.fp16, modalities, args.max_m_duration,
             args.max_v_frames, args.force, progress=not args.no_progress)
    except (FeatureError, OutputError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WriteError as exc:  # disk full part-way: the previous store is untouched
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
