"""scripts/app.py: the grounding page, driven in headless Chromium (the Debian package, through
Playwright's Python API; no browser is downloaded) over a tiny folder in demo.sh's layout.

What a user relies on: `app.py --demo DIR` serves on 127.0.0.1; picking a query and pressing the button
shows the top-k table (the same tracks as ground.py, best first) and the timeline plot, with a player for
each track whose audio is known; "Preview" renders the query's video with the chosen moment, shown and
downloadable; an upload that is not a video gives a message in the page and the server keeps serving; the
page asks nothing of any other host. A screenshot of the grounded page is kept in test-artifacts/
(MGSV_TEST_ARTIFACTS to change) for a person to look at.

The browser tests skip (with the reason) when Chromium or Playwright is missing; .ci/run installs both.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import av
import pandas as pd
import pytest
import torch

from tests.cli_helpers import cli_env
from tests.conftest import REPO_ROOT, load_script
from tests.media_helpers import openai_clip_state_dict, write_video

BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOPK = 3
ARTIFACTS = Path(os.environ.get("MGSV_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def clip_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random CLIP ViT in OpenAI's layout (small): uploads go through real extraction."""
    path = tmp_path_factory.mktemp("clip") / "ViT-B-32.pt"
    torch.save(openai_clip_state_dict(width=64, layers=2, seed=1), path)
    return path


@pytest.fixture(scope="module")
def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=BROWSER_ARGS, headless=True)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_demo: dict, clip_weights: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """`python scripts/app.py --demo DIR` in its own process, as a user starts it."""
    tmp = tmp_path_factory.mktemp("app_server")
    port = free_port()
    env = cli_env()
    env.update(GRADIO_TEMP_DIR=str(tmp / "gradio"))
    log_path = tmp / "app.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "scripts/app.py", "--demo", str(tiny_demo["root"]), "--port",
                                 str(port), "--device", "cpu", "--clip_weights", str(clip_weights),
                                 "--topk", str(TOPK)], cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while "serving on" not in log_path.read_text():
            if proc.poll() is not None or time.time() > deadline:
                pytest.fail(f"app.py did not start (status {proc.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": f"http://127.0.0.1:{port}/", "proc": proc, "log": log_path, "tmp": tmp}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def page(browser, server: dict):
    """A fresh tab on the page; every request to another host is refused and counted (there must be none)."""
    context = browser.new_context(viewport={"width": 1280, "height": 1400})
    tab = context.new_page()
    elsewhere: list[str] = []

    def route(r) -> None:
        if r.request.url.startswith(server["url"]) or r.request.url.startswith(("blob:", "data:")):
            r.continue_()
        else:
            elsewhere.append(r.request.url)
            r.abort()

    tab.route("**/*", route)
    tab.set_default_timeout(90_000)
    tab.goto(server["url"])
    tab.wait_for_selector("#ground_query")
    yield tab
    context.close()
    assert elsewhere == [], f"the page contacted other hosts: {elsewhere}"
    assert server["proc"].poll() is None, "the server stopped"
    assert "Traceback" not in server["log"].read_text()


def wait_status(tab, text: str) -> str:
    tab.wait_for_function("t => document.querySelector('#status').innerText.includes(t)", arg=text)
    return tab.locator("#status").inner_text()


def choose(tab, dropdown: str, option: str) -> None:
    tab.click(f"{dropdown} input")
    tab.get_by_role("option", name=option, exact=True).click()


def table_rows(tab) -> list[list[str]]:
    rows = tab.locator("#topk-table tbody tr")
    return [[c.inner_text() for c in rows.nth(i).locator("td").all()] for i in range(rows.count())]


def ground_py(tiny_demo: dict, tmp: Path, *query: str) -> list[dict]:
    out = tmp / f"ground_{len(list(tmp.glob('ground_*.json')))}.json"
    assert load_script("ground").run(["--load_uni_model_path", str(tiny_demo["ckpt"]), "--index",
                                      str(tiny_demo["index"]), "--device", "cpu", "--topk", str(TOPK), "--quiet",
                                      "--out", str(out), *query]) == 0
    return json.loads(out.read_text())[0]["tracks"]


def csv_query(tiny_demo: dict, tmp: Path, video_id: str) -> list[str]:
    rows = pd.read_csv(tiny_demo["csv"], dtype=str, keep_default_na=False)
    path = tmp / f"query_{video_id}.csv"
    rows[rows["video_id"] == video_id].to_csv(path, index=False)
    return ["--video_feature", str(path), "--frozen_feature_path", str(tiny_demo["features"])]


def media_queries(tiny_demo: dict) -> list[str]:
    return sorted(p.stem for p in (tiny_demo["root"] / "media/videos").glob("*.mp4"))


# ------------------------------------------------------------------------------------------------ browser
def test_page_grounds_a_query_like_ground_py(page, tiny_demo: dict, tmp_path: Path) -> None:
    video_id = media_queries(tiny_demo)[-1]
    choose(page, "#query", f"{video_id} (video)")
    page.click("#ground_query")
    wait_status(page, f"Done: {TOPK} tracks for {video_id}")
    rows = table_rows(page)
    page.wait_for_function("() => { const i = document.querySelector('#plot img');"
                           " return i && i.complete && i.naturalWidth > 0; }")
    expected = ground_py(tiny_demo, tmp_path, *csv_query(tiny_demo, tmp_path, video_id))
    assert [r[1] for r in rows] == [t["music_id"] for t in expected]      # top-1 first, same order
    top = expected[0]
    if top["end"] > top["start"]:
        assert rows[0][3] == f"{top['start']:.1f}–{top['end']:.1f} s"
    assert "Ground truth" in page.locator("#summary").inner_text()
    # A player for every track whose audio the demo synthesised (all of the returned ones) with a moment.
    for i, row in enumerate(rows):
        assert page.locator(f"#moment{i}").is_visible() == (row[-1] == "player below")
    assert any(row[-1] == "player below" for row in rows)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "app_page.png"), full_page=True)


def test_preview_renders_the_query_video(page, tiny_demo: dict) -> None:
    video_id = media_queries(tiny_demo)[0]
    choose(page, "#query", f"{video_id} (video)")
    page.click("#ground_query")
    wait_status(page, f"Done: {TOPK} tracks for {video_id}")
    playable = [r[1] for r in table_rows(page) if r[-1] == "player below" and "past" not in r[3]]
    assert playable, f"fixture: no returned track with audio and a moment inside it: {table_rows(page)}"
    music_id = playable[-1]
    choose(page, "#preview_track", music_id)
    page.click("#preview")
    wait_status(page, f"with {music_id} from")
    page.wait_for_selector("#preview_video video[src]")
    links = [a.get_attribute("href") or "" for a in page.locator("#preview_file a").all()]
    assert any(h.endswith(f"{music_id}_preview.mp4".replace("+", "%2B")) for h in links), links  # downloadable
    out = tiny_demo["root"] / "app_out" / f"{video_id}_{music_id}_preview.mp4"
    with av.open(str(out)) as c:
        assert sorted(s.type for s in c.streams) == ["audio", "video"]
    source = tiny_demo["root"] / "media/videos" / f"{video_id}.mp4"
    with av.open(str(out)) as a, av.open(str(source)) as b:
        assert [bytes(p) for p in a.demux(video=0) if p.size] == [bytes(p) for p in b.demux(video=0) if p.size]


def upload(tab, path: Path) -> None:
    tab.set_input_files("#upload input[type=file]", str(path))
    tab.wait_for_function("n => document.querySelector('#upload').innerText.includes(n)", arg=path.stem)
    tab.click("#ground_upload")


def test_bad_uploads_give_a_message_and_the_server_keeps_serving(page, server: dict, tiny_demo: dict,
                                                                 clip_weights: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.mp4"
    text.write_text("a text file renamed .mp4\n")
    upload(page, text)
    assert "notes.mp4: cannot open" in wait_status(page, "Error")
    empty = tmp_path / "empty.mp4"
    with av.open(str(empty), "w") as c:   # a video stream that never received a frame
        s = c.add_stream("mpeg4", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        c.start_encoding()
    page.goto(server["url"])
    upload(page, empty)
    assert "empty.mp4: no video" in wait_status(page, "empty.mp4")
    assert page.locator("#topk-table").count() == 0
    # Still serving: a real upload is grounded as ground.py --video grounds it, then a listed query.
    clip = write_video(tmp_path / "holiday.mp4", seconds=6.4)
    page.goto(server["url"])
    upload(page, clip)
    wait_status(page, f"Done: {TOPK} tracks for holiday-")
    expected = ground_py(tiny_demo, tmp_path, "--video", str(clip), "--clip_weights", str(clip_weights))
    assert [r[1] for r in table_rows(page)] == [t["music_id"] for t in expected]
    video_id = media_queries(tiny_demo)[0]
    choose(page, "#query", f"{video_id} (video)")
    page.click("#ground_query")
    wait_status(page, f"Done: {TOPK} tracks for {video_id}")


# --------------------------------------------------------------------------------------- without a browser
def test_missing_clip_weights_is_a_message(tiny_demo: dict, tmp_path: Path) -> None:
    from model.pretrained import MissingWeightsError
    from utils.ground.page import GroundingPage, PageConfig
    page = GroundingPage(PageConfig(checkpoint=str(tiny_demo["ckpt"]), index=str(tiny_demo["index"]),
                                    clip_weights=str(tmp_path / "nowhere" / "ViT-B-32.pt"), device="cpu",
                                    out_dir=str(tmp_path / "out")), say=lambda _: None)
    with pytest.raises(MissingWeightsError, match="ViT-B-32.pt") as e:
        page.ground_upload(write_video(tmp_path / "v.mp4", seconds=2.0))
    assert "never downloads" in str(e.value)


def test_canonical_clip_column_only_with_usage_history(tiny_demo: dict, tmp_path: Path) -> None:
    """The index may carry each track's canonical clip (the start most training uses take): the table
    shows it when the hits have it, and has no such column otherwise."""
    from utils.ground.page import GroundingPage, PageConfig, table
    page = GroundingPage(PageConfig(checkpoint=str(tiny_demo["ckpt"]), index=str(tiny_demo["index"]),
                                    queries_csv=str(tiny_demo["csv"]), feature_root=str(tiny_demo["features"]),
                                    device="cpu", out_dir=str(tmp_path)), say=lambda _: None)
    shown = page.ground_query(page.query_choices()[0][1])
    headers, rows = table(shown)
    assert "canonical clip" not in headers and len(rows) == len(shown.result.tracks)
    for hit in shown.result.tracks:
        hit.canonical_start, hit.canonical_end, hit.uses = 12.0, 32.5, 7
    headers, rows = table(shown)
    assert rows[0][headers.index("canonical clip")] == "12.0–32.5 s (7 uses)"


@pytest.mark.parametrize("args, phrase", [
    (["--demo", "no/such/folder"], "run bash scripts/demo.sh first"),
    (["--load_uni_model_path", "x.bin"], "pass --demo DIR, or --load_uni_model_path and --index"),
])
def test_bad_arguments_are_one_line(args: list[str], phrase: str, capsys: pytest.CaptureFixture) -> None:
    assert load_script("app").run(args) == 2
    err = capsys.readouterr().err
    assert phrase in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_port_in_use_is_one_line(tiny_demo: dict) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "scripts/app.py", "--demo", str(tiny_demo["root"]), "--port", str(port),
                               "--device", "cpu"], cwd=REPO_ROOT, env=cli_env(), capture_output=True, text=True,
                              timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.strip() == f"error: cannot serve on 127.0.0.1:{port}: the port is in use (or not allowed); " \
                                  "pass another --port"


def test_unexpected_errors_become_a_message(capsys: pytest.CaptureFixture) -> None:
    """A bug in a handler must not leave the page without an answer: the user gets a line, the log the details."""
    app = load_script("app")

    def broken(_: str) -> list:
        raise RuntimeError("index row out of range")

    def bad_input(_: str) -> list:
        raise FileNotFoundError("clip.mp4: file not found")

    assert app.guarded(broken, lambda text: [text])("x") == \
        ["**Error:** unexpected RuntimeError: index row out of range (details in the server log)"]
    assert "Traceback" in capsys.readouterr().err
    assert app.guarded(bad_input, lambda text: [text])("x") == ["**Error:** clip.mp4: file not found"]
    assert capsys.readouterr().err == ""
