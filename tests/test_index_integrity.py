"""The music index proves its integrity: any edit of one of its files -- ids, arrays, manifest,
even in place with the size kept and the mtime restored -- is found before ground.py answers a
query (exit 2, one line naming the index and the command that rebuilds it); an untouched index
opens without reading its files; --verify compares every content digest; an index of the earlier
format is refused with the same one-line advice."""
from __future__ import annotations

import json
import os
import shlex
import time
from pathlib import Path

import pytest
from cli_helpers import demo_paths, read_csv_text, tiny_checkpoint
from conftest import load_script

import utils.ground.library as library_module
from utils.ground.index import build_index
from utils.ground.library import open_index
from utils.ground.model import GroundingError, load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
build_cli, ground_cli = load_script("build_music_index"), load_script("ground")


@pytest.fixture(scope="module")
def model(demo_data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny checkpoint, its loaded model, 8 tracks of the val split and one query video."""
    tmp = tmp_path_factory.mktemp("index_integrity")
    ckpt = tiny_checkpoint(tmp / "pytorch_model.bin.best_r1")
    demo = demo_paths(demo_data)
    val = read_csv_text(demo["val"])
    ids_file = tmp / "ids.txt"
    ids_file.write_text("\n".join(list(dict.fromkeys(val["music_id"]))[:8]) + "\n")
    video = demo["features"] / "vit_feature1" / "vit_feature" / f"{val['video_id'].iloc[0]}.pt"
    return {"ckpt": ckpt, "gm": load_model(ckpt, "cpu"), "ids": ids_file, "features": demo["features"],
            "video": video}


def _build(model: dict, out: Path) -> Path:
    return build_index(model["gm"], model["ids"], model["features"], out)


def _ground(model: dict, index: Path, tmp: Path, *extra: str) -> int:
    return ground_cli.run(["--load_uni_model_path", str(model["ckpt"]), "--index", str(index), "--video_feature",
                           str(model["video"]), "--device", "cpu", "--quiet", "--out", str(tmp / "results.json"),
                           *extra])


def _edit_in_place(path: Path) -> None:
    """Change one byte, same size, mtime restored: only the ctime tells."""
    time.sleep(0.02)  # past the build's clock tick (the kernel stamps ctimes at a few-ms granularity)
    st = path.stat()
    data = bytearray(path.read_bytes())
    if path.name == "manifest.json":  # a plausible edit that keeps it valid JSON: 8 tracks -> 9
        data[data.index(b'"num_tracks": 8') + 14] = ord("9")
    else:  # near the end: inside an array's data, or the last id of music_ids.json
        data[-2] ^= 0x01
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    after = path.stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)


def _assert_refused(err: str, index: Path, why: str) -> None:
    assert err.startswith(f"error: index {index} is ") and why in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert "build_music_index.py --load_uni_model_path" in err and f"--out {index}" in err


def test_untouched_index_opens_without_reading_its_files(model: dict, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A 7 GB library must not be hashed on every query: digests are compared only when due."""
    index = _build(model, tmp_path / "music.index")
    files = json.loads((index / "manifest.json").read_text())["files"]
    assert {"music_ids.json", "m.npy", "tokens.bin", "xpool_keys.bin", "xpool_gram.bin"} <= set(files)
    digested = []
    real_digest = library_module.file_digest
    monkeypatch.setattr(library_module, "file_digest", lambda p: digested.append(Path(p).name) or real_digest(p))
    open_index(index, model["gm"])
    assert digested == []
    open_index(index, model["gm"], verify=True)
    assert sorted(digested) == sorted(files)
    assert build_cli.run(["--verify", str(index)]) == 0
    assert f"{index}: ok (8 tracks; the content digests of its {len(files)} files match)" in capsys.readouterr().out


def test_every_file_edited_in_place_is_found_before_results(model: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Whatever file the index holds (the list is the manifest's, not this test's)."""
    names = sorted(json.loads((_build(model, tmp_path / "probe.index") / "manifest.json").read_text())["files"])
    for name in [*names, "manifest.json"]:
        index = _build(model, tmp_path / f"{name}.index")
        _edit_in_place(index / name)
        assert _ground(model, index, tmp_path) == 2, name
        why = "manifest.json was edited" if name == "manifest.json" else f"{name} changed since the index was built"
        _assert_refused(capsys.readouterr().err, index, why)
        assert not (tmp_path / "results.json").exists()
        assert build_cli.run(["--verify", str(index)]) == 2
        _assert_refused(capsys.readouterr().err, index, why)


def test_reordered_ids_are_found(model: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Swapped ids keep every byte count: the rows would silently answer for other tracks."""
    index = _build(model, tmp_path / "music.index")
    path = index / "music_ids.json"
    ids = json.loads(path.read_text())
    ids[0], ids[1] = ids[1], ids[0]
    time.sleep(0.02)
    st = path.stat()
    path.write_text(json.dumps(ids, ensure_ascii=False) + "\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    assert _ground(model, index, tmp_path) == 2
    _assert_refused(capsys.readouterr().err, index, "music_ids.json changed since the index was built")


def test_verify_finds_an_edit_the_stat_does_not_show(model: dict, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    """Should a file change with its whole stat as recorded (a restored backup, a clock set back),
    the everyday open trusts it; --verify does not."""
    index = _build(model, tmp_path / "music.index")
    files = json.loads((index / "manifest.json").read_text())["files"]
    _edit_in_place(index / "m.npy")
    monkeypatch.setattr(library_module, "stat_record", lambda p: files[Path(p).name]["stat"])
    assert _ground(model, index, tmp_path) == 0
    capsys.readouterr()
    assert _ground(model, index, tmp_path, "--verify") == 2
    _assert_refused(capsys.readouterr().err, index, "m.npy changed since the index was built")


@pytest.mark.parametrize("change", ["added file", "missing file", "truncated array", "old format"])
def test_index_not_as_built_is_refused(model: dict, tmp_path: Path, change: str,
                                       capsys: pytest.CaptureFixture) -> None:
    index = _build(model, tmp_path / "music.index")
    manifest_path = index / "manifest.json"
    if change == "added file":  # a file the reader may use (as a later version's usage.json) but was not built
        (index / "usage.json").write_text("{}")
        why = "not as built: it holds usage.json"
    elif change == "missing file":
        (index / "xpool_gram.bin").unlink()
        why = "incomplete: xpool_gram.bin missing"
    elif change == "truncated array":
        with open(index / "tokens.bin", "r+b") as f:
            f.truncate(100)
        why = "damaged: tokens.bin is not the size it was built with"
    else:
        manifest = json.loads(manifest_path.read_text())
        for key in ("files", "manifest_digest"):
            del manifest[key]
        manifest["format"] = "mgsv-music-index/1"
        manifest_path.write_text(json.dumps(manifest))
        why = "was built by an earlier version (format mgsv-music-index/1)"
    assert _ground(model, index, tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: index {index} ") and why in err and err.count("\n") == 1, err
    assert "--overwrite`" in err and "Traceback" not in err


def test_the_printed_command_rebuilds_the_index(model: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    index = _build(model, tmp_path / "music.index")
    _edit_in_place(index / "xpool_keys.bin")
    assert _ground(model, index, tmp_path) == 2
    command = capsys.readouterr().err.split("rebuild it with `")[1].split("`")[0]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "scripts/build_music_index.py"]
    assert build_cli.run([*argv[2:], "--quiet"]) == 0
    assert _ground(model, index, tmp_path) == 0
    assert build_cli.run(["--verify", str(index)]) == 0


def test_verify_needs_no_other_flag_and_building_needs_them(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        build_cli.main(["--out", "x.index"])
    assert info.value.code == 2
    assert "--load_uni_model_path, --frozen_feature_path, --music_ids (or --verify INDEX)" in capsys.readouterr().err
    with pytest.raises(GroundingError, match="not a music index"):
        build_cli.main(["--verify", "no_such.index"])
