"""Where does a trained MaDe find the moment? Its detector against X-Pool's attention.

    python scripts/diagnose_localisation.py --load_uni_model_path RUN/pytorch_model.bin.best_r1 \
        --test_csv dataset/MGSV-EC/test_data.csv --frozen_feature_path features/Kuai_feature

Single-music grounding (every video against its ground-truth track), three readouts:
  detector  MaDe's moment detector, scored as test.py scores it (same mIoU);
  xpool     the window of the video's length holding the most of X-Pool's attention (the
            video's query over its track's snippets, in the retrieval branch);
  start0    [0, video length], the start-of-track prior.
Each on all videos and on the moments that start after --late seconds, where the prior fails.
Then: the share of detector moments that start within 2 s, and how far the detector's centre
moves when each video is paired with another video's track (near 0: it does not read the
music). An X-Pool readout that localises while the detector does not means the alignment has
been learnt by the matching branch but not (yet) by the detector. Flags are test.py's; exit status 2 with one paragraph on bad
input.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.spans import foreground_index, spans_to_seconds, top_moment
from utils.data.dataset import build_dataset, collate_fn  # noqa: E402
from utils.evaluate.metrics import smg_ious  # noqa: E402
from utils.ground.model import load_model  # noqa: E402
from utils.train.checkpoint import CheckpointError  # noqa: E402
from utils.train.loop import to_device  # noqa: E402
from utils.train.options import parse_args  # noqa: E402
from utils.train.preflight import run_cli  # noqa: E402


def best_window_starts(attention: np.ndarray, stride: float, v_duration: np.ndarray, m_duration: np.ndarray,
                       step: float = 0.5) -> np.ndarray:
    """For each row, the start s (on a `step` grid, window inside the track) of the window
    [s, s + v_duration] whose snippet centres (stride * l) hold the most attention."""
    centres = stride * np.arange(attention.shape[1])
    starts = np.empty(len(attention))
    for i, (a, d, m) in enumerate(zip(attention, v_duration, m_duration)):
        cand = np.arange(0.0, max(0.0, m - d) + 1e-9, step)                          # [S]
        inside = (centres[None, :] >= cand[:, None]) & (centres[None, :] <= cand[:, None] + d)
        starts[i] = cand[int(np.argmax(inside.astype(a.dtype) @ a))]
    return starts


@torch.no_grad()
def diagnose(model: torch.nn.Module, loader: DataLoader, args: argparse.Namespace, device: torch.device,
             late: float = 10.0) -> dict:
    model.eval()
    fg = foreground_index(args)
    det, xp, gt, v_dur, m_dur, shift = [], [], [], [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        out = model(batch)
        span, _ = top_moment(out["detection"], fg)
        det.append(spans_to_seconds(span, args.max_m_duration).cpu())
        a = model.xpool.paired_attention(out["video_emb"], out["snippet_tokens"], batch["music_mask"])
        xp.append(a.float().cpu())
        if len(span) > 1:  # the same videos with the next video's track
            swapped = dict(batch, music_feats=batch["music_feats"].roll(1, 0),
                           music_mask=batch["music_mask"].roll(1, 0))
            other, _ = top_moment(model(swapped)["detection"], fg)
            shift.append(((other[:, 0] - span[:, 0]).abs() * args.max_m_duration).cpu())
        gt.append(batch["gt_moment"][:, 0].cpu())
        v_dur.append(batch["v_duration"].cpu())
        m_dur.append(batch["m_duration"].cpu())
    det_se, gt_se = torch.cat(det).double().numpy(), torch.cat(gt).double().numpy()
    v_dur, m_dur = torch.cat(v_dur).double().numpy(), torch.cat(m_dur).double().numpy()
    xp_start = best_window_starts(torch.cat(xp).double().numpy(), args.stride, v_dur,
                                  np.minimum(m_dur, args.max_m_duration))
    readouts = {"detector": det_se, "xpool": np.stack([xp_start, xp_start + v_dur], 1),
                "start0": np.stack([np.zeros_like(v_dur), v_dur], 1)}
    is_late = gt_se[:, 0] > late
    result = {"videos": len(gt_se), "late_videos": int(is_late.sum()), "late": late}
    for name, pred in readouts.items():
        iou = smg_ious(pred, gt_se, m_dur, args.max_m_duration)
        result[f"{name}_mIoU"] = float(iou.mean())
        result[f"{name}_mIoU_late"] = float(iou[is_late].mean()) if is_late.any() else float("nan")
    result["detector_starts_within_2s"] = float(100 * np.mean(det_se[:, 0] < 2.0))
    result["gt_starts_within_2s"] = float(100 * np.mean(gt_se[:, 0] < 2.0))
    result["detector_centre_shift_s"] = float(torch.cat(shift).mean()) if shift else float("nan")
    return result


def report(r: dict) -> str:
    lines = [f"single-music grounding on {r['videos']} videos ({r['late_videos']} moments start after {r['late']:g} s)",
             f"{'mIoU':<10}{'all':>8}{'late':>8}"]
    for name in ("detector", "xpool", "start0"):
        lines.append(f"{name:<10}{r[f'{name}_mIoU']:>8.4f}{r[f'{name}_mIoU_late']:>8.4f}")
    lines.append(f"detector moments starting within 2 s: {r['detector_starts_within_2s']:.1f} % "
                 f"(ground truth: {r['gt_starts_within_2s']:.1f} %)")
    lines.append(f"detector centre moves by {r['detector_centre_shift_s']:.2f} s on average when each video gets "
                 "another video's track (near 0: the detector does not read the music)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--late", type=float, default=10.0, help="moments starting after this many seconds are 'late'")
    own, rest = pre.parse_known_args(argv)
    args = parse_args(rest, mode="test")
    # The model and its settings (stride, max_m_duration, frame slots) come from the checkpoint,
    # as in test.py; the command line gives the split, the features and the batch size.
    gm = load_model(args.load_uni_model_path, args.device)
    if gm.model.xpool is None:
        raise CheckpointError(f"{gm.checkpoint} was trained without X-Pool (--vmr_fusion NO): there is no "
                              "attention to compare the detector with.")
    cfg = gm.args
    dataset = build_dataset(args.test_csv, args.frozen_feature_path, stride=cfg.stride,
                            max_m_duration=cfg.max_m_duration, skip_bad_rows=args.skip_bad_rows,
                            use_packed=bool(args.use_packed), num_frames=cfg.max_v_frames)
    loader = DataLoader(dataset, batch_size=args.batch_size_val, collate_fn=collate_fn)
    print(report(diagnose(gm.model, loader, cfg, gm.device, own.late)))
    return 0


def run(argv: list[str] | None = None) -> int:
    """main() with bad input reported as one paragraph and exit status 2 (no traceback)."""
    return run_cli(lambda: main(argv))


if __name__ == "__main__":
    sys.exit(run())
