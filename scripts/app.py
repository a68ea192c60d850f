"""A web page to try grounding in a browser: pick or upload a short video, get the tracks that fit it,
the moment in each, and hear (and see) the result.

    python scripts/app.py --demo demo_out                          # after bash scripts/demo.sh
    python scripts/app.py --load_uni_model_path RUN/pytorch_model.bin.best_r1 --index music.index \
        [--queries dataset/MGSV-EC/test_data.csv --frozen_feature_path features/Kuai_feature] \
        [--clip_weights model/pretrained_models/ViT-B-32.pt] [--music_dir DIR] [--video_dir DIR] \
        [--topk 5] [--port 7860] [--out_dir app_out]

Then open http://127.0.0.1:7860. The server listens on 127.0.0.1 only, has no public share link, and
sends nothing anywhere (Gradio's analytics are switched off before Gradio is imported).

Input: a query picked from --queries (its stored CLIP features; works with no media at all), or an
uploaded video (CLIP features extracted as ground.py --video does; needs --clip_weights).
Output: the top-k tracks (score, the model's moment, confidence, and the track's canonical clip
when the index holds usage history), the timeline plot of ground.py --plot, and an audio player
cut to the moment for each track whose audio file is found (the music_path column of the CSV the
index was built from or of --queries, looked up as written and under --music_dir, else
<music_dir>/<music_id>.<ext>). "Preview" renders the query's video (the upload, or for a picked
query its CSV video_path or <video_dir>/<video_id>.<ext>) with the chosen track's moment as its soundtrack
(utils/ground/render.py), shown in the page and downloadable. Plots, clips and previews are written to
--out_dir.

--demo DIR reads the layout scripts/demo.sh leaves (flags given explicitly take precedence):
    DIR/logs/*/*+demo*/pytorch_model.bin.best_r1  checkpoint (the newest run)
    DIR/music.index                              index of the test split's tracks
    DIR/dataset/MGSV-EC/test_data.csv            queries, with their ground truth
    DIR/features/Kuai_feature                    their CLIP features
    DIR/media/music, DIR/media/videos            synthesised audio / videos (scripts/make_demo_media.py), optional
    DIR/app_out                                  outputs
Bad arguments: one-line error, exit status 2.
"""
from __future__ import annotations

import argparse
import html
import os
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.extract.media import VIDEO_EXTENSIONS  # noqa: E402

DEMO_CHECKPOINT = "logs/*/*+demo*/pytorch_model.bin.best_r1"
MAX_TOPK = 20


def offline_environment() -> None:
    """Keep Gradio (and the Hugging Face client it imports) from contacting anything: no analytics, no
    version check, no telemetry; requests to the page's own address never go through a proxy."""
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
    for key in ("NO_PROXY", "no_proxy"):
        hosts = [h for h in os.environ.get(key, "").split(",") if h]
        os.environ[key] = ",".join(hosts + [h for h in ("127.0.0.1", "localhost") if h not in hosts])


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--demo", default=None, help="folder left by scripts/demo.sh (see the module docstring)")
    p.add_argument("--load_uni_model_path", default=None, help="MaDe checkpoint the index was built with")
    p.add_argument("--index", default=None, help="folder written by scripts/build_music_index.py")
    p.add_argument("--queries", default=None, help="CSV with a video_id column: queries to pick from")
    p.add_argument("--frozen_feature_path", default=None, help="feature root of the --queries videos")
    p.add_argument("--clip_weights", default=None,
                   help="OpenAI CLIP ViT-B/32 checkpoint for uploads (default model/pretrained_models/ViT-B-32.pt)")
    p.add_argument("--music_dir", default=None, help="folder of the tracks' audio files")
    p.add_argument("--video_dir", default=None,
                   help="folder of the --queries videos (<video_id>.<ext>; default: the CSV's folder)")
    p.add_argument("--out_dir", default=None, help="plots, moment clips and previews (default app_out)")
    p.add_argument("--topk", type=int, default=5, help=f"tracks shown per query (1..{MAX_TOPK})")
    p.add_argument("--fade", type=float, default=0.3, help="fade in/out of clips and previews (s)")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda")
    p.add_argument("--port", type=int, default=7860, help="port on 127.0.0.1")
    return p


def resolve_demo(args: argparse.Namespace) -> None:
    """Fill the paths --demo DIR implies, unless given explicitly."""
    if args.demo is None:
        return
    root = Path(args.demo)
    if not root.is_dir():
        raise FileNotFoundError(f"--demo {root}: no such folder; run bash scripts/demo.sh first")
    if args.load_uni_model_path is None:
        runs = sorted(root.glob(DEMO_CHECKPOINT), key=lambda p: p.stat().st_mtime)
        if not runs:
            raise FileNotFoundError(f"--demo {root}: no {DEMO_CHECKPOINT}; run bash scripts/demo.sh first")
        args.load_uni_model_path = str(runs[-1])
    index = root / "music.index"
    if args.index is None:
        if not index.is_dir():
            raise FileNotFoundError(f"--demo {root}: no music.index; run bash scripts/demo.sh (it builds one) "
                                    "or scripts/build_music_index.py --out " + str(index))
        args.index = str(index)
    present = {"queries": root / "dataset/MGSV-EC/test_data.csv", "frozen_feature_path": root / "features/Kuai_feature",
               "music_dir": root / "media/music", "video_dir": root / "media/videos"}
    for name, path in present.items():
        if getattr(args, name) is None and path.exists():
            setattr(args, name, str(path))
    if args.out_dir is None:
        args.out_dir = str(root / "app_out")


def page_config(args: argparse.Namespace):
    from utils.ground.page import PageConfig
    resolve_demo(args)
    if args.load_uni_model_path is None or args.index is None:
        raise ValueError("pass --demo DIR, or --load_uni_model_path and --index")
    if not 1 <= args.topk <= MAX_TOPK:
        raise ValueError(f"--topk must be in 1..{MAX_TOPK}")
    if not 0 < args.port < 65536:
        raise ValueError("--port must be in 1..65535")
    if args.fade < 0:
        raise ValueError("--fade must be >= 0")
    for name in ("music_dir", "video_dir"):
        if getattr(args, name) is not None and not Path(getattr(args, name)).is_dir():
            raise FileNotFoundError(f"--{name} {getattr(args, name)}: no such folder")
    return PageConfig(checkpoint=args.load_uni_model_path, index=args.index, queries_csv=args.queries,
                      feature_root=args.frozen_feature_path, clip_weights=args.clip_weights,
                      music_dir=args.music_dir, video_dir=args.video_dir, out_dir=args.out_dir or "app_out",
                      topk=args.topk, device=args.device, fade=args.fade)


# ------------------------------------------------------------------------------------------------ the page
def message(text: str) -> str:
    """An error for the status line (Markdown; multi-line messages keep their lines)."""
    return "**Error:** " + text.strip().replace("\n", "  \n")


def guarded(fn: Callable[..., Any], clear: Callable[[str], Any]) -> Callable[..., Any]:
    """Run a handler; bad input becomes a message in the page, an unexpected error too (with its traceback
    in the server's log only), and the server keeps serving either way."""
    from utils.ground.page import PAGE_ERRORS

    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PAGE_ERRORS as e:
            return clear(message(str(e)))
        except Exception as e:  # a bug: say so in the page, keep the details for the log
            traceback.print_exc()
            return clear(message(f"unexpected {type(e).__name__}: {e} (details in the server log)"))
    run.__name__ = fn.__name__
    return run


def html_table(headers: list[str], rows: list[list]) -> str:
    """The top-k table as plain HTML: every cell readable as text (ids are escaped), one row per track."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table id="topk-table"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def build_page(page) -> Any:
    import gradio as gr

    from utils.ground.page import format_moment, summary, table

    topk = page.cfg.topk
    choices = page.query_choices()
    with gr.Blocks(title="MGSV grounding") as blocks:
        gr.Markdown(f"## Background music for a short video\nIndex: {len(page.library)} tracks · "
                    f"model: `{page.cfg.checkpoint}` · top {topk} tracks per query")
        shown_state = gr.State(None)
        with gr.Row():
            with gr.Column():
                gr.Markdown("**Pick a query** (stored CLIP features; those marked (video) can be previewed)")
                query = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None,
                                    label="query video", elem_id="query", interactive=bool(choices))
                ground_query = gr.Button("Find music for this query", variant="primary", elem_id="ground_query",
                                         interactive=bool(choices))
            with gr.Column():
                gr.Markdown("**Or upload a video** (needs the CLIP weights)")
                upload = gr.File(label="video file", file_types=list(VIDEO_EXTENSIONS), type="filepath",
                                 elem_id="upload")
                ground_upload = gr.Button("Find music for the upload", variant="primary", elem_id="ground_upload")
        status = gr.Markdown("", elem_id="status")
        result_text = gr.Markdown("", elem_id="summary")
        result_table = gr.HTML("", elem_id="topk")
        plot = gr.Image(type="filepath", label="timeline: each track with its predicted moment",
                        interactive=False, elem_id="plot")
        players = [gr.Audio(visible=False, interactive=False, type="filepath", elem_id=f"moment{i}")
                   for i in range(topk)]
        gr.Markdown("**Preview**: the query's video with a track's moment as its soundtrack")
        with gr.Row():
            track = gr.Dropdown(choices=[], label="track", elem_id="preview_track")
            preview_button = gr.Button("Preview", elem_id="preview")
        preview_video = gr.Video(label="preview", interactive=False, height=420, elem_id="preview_video")
        preview_file = gr.File(label="download the preview", interactive=False, elem_id="preview_file")

        result_outputs = [status, result_text, result_table, plot, *players, track, shown_state,
                          preview_video, preview_file]

        def show(shown) -> list:
            headers, rows = table(shown)
            audio_updates = []
            for i in range(topk):
                a = shown.audio[i] if i < len(shown.audio) else None
                if a is not None and a.clip is not None:
                    label = f"#{a.hit.rank} {a.hit.music_id}: {format_moment(a.hit.start, a.hit.end)}"
                    audio_updates.append(gr.update(value=str(a.clip), label=label, visible=True))
                else:
                    audio_updates.append(gr.update(value=None, visible=False))
            ids = [h.music_id for h in shown.result.tracks]
            done = f"Done: {len(ids)} tracks for {shown.result.video_id}."
            return [done, summary(shown), html_table(headers, rows), str(shown.plot),
                    *audio_updates, gr.update(choices=ids, value=ids[0] if ids else None), shown, None, None]

        def cleared(text: str) -> list:
            return [text, "", "", None, *[gr.update(value=None, visible=False)] * topk,
                    gr.update(choices=[], value=None), None, None, None]

        def steps(progress: gr.Progress) -> Callable[[float, str], None]:
            return lambda fraction, what: progress(fraction, desc=what)

        def on_query(video_id: str | None, progress: gr.Progress = gr.Progress()) -> list:
            if not video_id:
                return cleared(message("pick a query first"))
            return show(page.ground_query(video_id, steps(progress)))

        def on_upload(path: str | None, progress: gr.Progress = gr.Progress()) -> list:
            if not path:
                return cleared(message("choose a video file first"))
            return show(page.ground_upload(path, steps(progress)))

        def on_preview(shown, music_id: str | None, progress: gr.Progress = gr.Progress()) -> list:
            if shown is None or not music_id:
                return [message("find music for a query first"), None, None]
            done = page.render(shown, music_id, steps(progress))
            note = (f"Preview: {done.video_seconds:.1f} s of video with {music_id} from "
                    f"{done.audio_start:.1f} s ({done.audio_seconds:.1f} s of music).")
            return [note, str(done.path), str(done.path)]

        ground_query.click(guarded(on_query, cleared), [query], result_outputs)
        ground_upload.click(guarded(on_upload, cleared), [upload], result_outputs)
        preview_button.click(guarded(on_preview, lambda text: [text, None, None]), [shown_state, track],
                             [status, preview_video, preview_file])
    return blocks


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    cfg = page_config(args)
    offline_environment()
    from utils.ground.page import GroundingPage
    page = GroundingPage(cfg)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    print("starting the web server (importing Gradio takes a few seconds)")
    blocks = build_page(page)
    # One request at a time: grounding already uses the machine's cores, and requests stay in order.
    blocks.queue(default_concurrency_limit=1)
    try:
        blocks.launch(server_name="127.0.0.1", server_port=args.port, share=False, inbrowser=False, quiet=True,
                      allowed_paths=[str(Path(cfg.out_dir).resolve())], ssr_mode=False, show_error=False,
                      prevent_thread_lock=True)
    except OSError:  # Gradio's own message names its environment variables, not our flag
        raise ValueError(f"cannot serve on 127.0.0.1:{args.port}: the port is in use (or not allowed); "
                         "pass another --port") from None
    print(f"serving on http://127.0.0.1:{args.port} (Ctrl+C stops)", flush=True)
    blocks.block_thread()
    return 0


def run(argv: list[str] | None = None) -> int:
    """main() with bad input reported as one line on stderr and exit status 2 (no traceback)."""
    from model.pretrained import MissingWeightsError
    from utils.data.features import FeatureError
    from utils.ground.model import GroundingError
    from utils.train.checkpoint import CheckpointError
    try:
        return main(argv)
    except (GroundingError, CheckpointError, FeatureError, MissingWeightsError, ValueError,
            FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(run())
