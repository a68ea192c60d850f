"""Feature extraction from raw media (scripts/extract_features.py, utils/extract/extract.py, utils/extract/media.py,
model/ast_encoder.py): synthetic video/audio written here with PyAV / wave, encoders with random weights saved
in the formats users download, then shapes, masks, numerics against reference forwards, determinism,
resumability, failure handling, CSV inputs, and loading through utils.data.store.FeatureStore."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script
from media_helpers import (ast_checkpoint, ast_reference_forward, openai_clip_state_dict, save_torchscript,
                           second_colour, write_video, write_wav)

from model.ast_encoder import AST_FILE_NAME, ASTEncoder, build_ast, convert_ast_checkpoint, infer_ast_config, load_ast
from model.clip_encoder import (CLIP_FILE_NAME, CLIPImageEncoder, build_clip_vision, convert_openai_clip,
                                infer_clip_config)
from model.pretrained import MissingWeightsError
from utils.extract.extract import extract_music_features, extract_video_features, music_windows
from utils.extract.fbank import ast_input
from utils.extract.media import MediaError, decode_audio, decode_frames_1fps

main = load_script("extract_features").main


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("media")
    (d / "videos").mkdir()
    (d / "music").mkdir()
    write_video(d / "videos" / "clip124.mp4", 12.4)
    (d / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video")
    write_wav(d / "music" / "track100.wav", 100.0)
    (d / "music" / "broken.wav").write_bytes(b"RIFF....WAVEfmt garbage")
    write_wav(d / "short12.wav", 12.0, sample_rate=16000, channels=1)
    return d


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Small random encoders (real token counts: 50 image tokens, 1214 audio tokens; reduced width/depth)."""
    d = tmp_path_factory.mktemp("weights")
    clip_sd = openai_clip_state_dict(width=64, layers=2)
    torch.save(clip_sd, d / CLIP_FILE_NAME)
    save_torchscript(clip_sd, d / "ViT-B-32-jit.pt")
    ast_sd = ast_checkpoint(width=128, depth=2)
    torch.save(ast_sd, d / AST_FILE_NAME)
    return dict(dir=d, clip=d / CLIP_FILE_NAME, clip_jit=d / "ViT-B-32-jit.pt", ast=d / AST_FILE_NAME,
                ast_sd=ast_sd)


def _run(media_args: list[str], out: Path, weights: dict, *extra: str) -> int:
    return main([*media_args, "--out", str(out), "--clip_weights", str(weights["clip"]),
                 "--ast_weights", str(weights["ast"]), "--device", "cpu", "--stride", "10", *extra])


def _load(out: Path, sub: str, kind: str, item_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    feat_dir, mask_dir = {"video": ("vit_feature", "vit_mask"), "music": ("ast_feature", "ast_mask")}[kind]
    return (torch.load(out / sub / feat_dir / f"{item_id}.pt", weights_only=True),
            torch.load(out / sub / mask_dir / f"{item_id}.pt", weights_only=True))


# ---------------------------------------------------------------------------------------------- geometry
def test_music_windows_follow_reference_geometry():
    centres, bounds, mask = music_windows(100.0, 2.5, 10.0)
    assert len(centres) == 96 and centres[-1] == 237.5
    # padding 0: first windows are clipped at 0 (5 s, 7.5 s), the last one at 240 s (7.5 s)
    assert bounds[0].tolist() == [0, 80000] and bounds[1].tolist() == [0, 120000]
    assert bounds[3].tolist() == [40000, 200000] and bounds[-1].tolist() == [3720000, 3840000]
    assert mask.sum() == 41  # centres 0, 2.5, ..., 100 (a centre equal to the duration counts)
    for stride, n, valid in [(5.0, 48, 21), (7.5, 32, 14), (10.0, 24, 11)]:
        c, _, m = music_windows(100.0, stride, 10.0)
        assert len(c) == n and m.sum() == valid


# ---------------------------------------------------------------------------------------------- decoding
def _grey(img) -> float:
    arr = np.asarray(img)
    return float(arr[4:-4, 4: arr.shape[1] // 2 - 4].mean())


def test_video_frames_one_per_second(media, tmp_path):
    frames, duration = decode_frames_1fps(media / "videos" / "clip124.mp4")
    assert len(frames) == 13 and abs(duration - 12.4) < 1e-6
    for i, frame in enumerate(frames):  # slot i shows the frame on screen at t = i s
        assert abs(_grey(frame) - second_colour(i)) < 10, i
    # exactly 12.0 s: t = 12 has no frame of its own, so slot 12 repeats the final frame (authors' end.jpg)
    frames, _ = decode_frames_1fps(write_video(tmp_path / "clip120.mp4", 12.0))
    assert len(frames) == 13 and abs(_grey(frames[12]) - second_colour(11)) < 10
    # long clips stop at max_frames
    frames, _ = decode_frames_1fps(write_video(tmp_path / "long.mp4", 60.0, fps=2), max_frames=50)
    assert len(frames) == 50 and abs(_grey(frames[49]) - second_colour(49)) < 10


def test_audio_decoding_resamples_and_picks_channel(media, tmp_path):
    first = decode_audio(media / "music" / "track100.wav")
    mean = decode_audio(media / "music" / "track100.wav", channel="mean")
    assert first.dtype == torch.float32 and first.shape == mean.shape == (1_600_000,)  # 100 s at 16 kHz
    assert not torch.allclose(first, mean) and first.abs().max() <= 1.0
    with pytest.raises(MediaError, match="broken.wav"):
        decode_audio(media / "music" / "broken.wav")
    with pytest.raises(MediaError, match="not found"):
        decode_audio(tmp_path / "missing.mp3")
    with pytest.raises(MediaError, match="no video stream"):
        decode_frames_1fps(media / "music" / "track100.wav")


# ----------------------------------------------------------------------------------------- AST loading
def test_ast_checkpoint_conversion_and_geometry(weights):
    state = convert_ast_checkpoint(weights["ast_sd"])
    assert not any(k.startswith(("head", "mlp_head", "module")) for k in state)
    assert infer_ast_config(state) == dict(embed_dim=128, depth=2, num_heads=2)
    encoder = load_ast(weights["ast"])
    vit = encoder.vit
    assert vit.patch_embed.proj.stride == (10, 10) and vit.patch_embed.proj.kernel_size == (16, 16)
    assert vit.patch_embed.grid_size == (12, 101) and tuple(vit.pos_embed.shape) == (1, 1214, 128)
    with pytest.raises(ValueError, match="unexpected key"):
        convert_ast_checkpoint({"module.encoder.weight": torch.zeros(1)})


def test_ast_missing_weights_error_says_where(tmp_path):
    with pytest.raises(MissingWeightsError) as err:
        load_ast(tmp_path / AST_FILE_NAME)
    msg = str(err.value)
    assert str(tmp_path / AST_FILE_NAME) in msg and "model/pretrained_models" in msg
    assert "YuanGongND/ast" in msg and "dropbox" in msg


def test_music_features_equal_reference_pipeline(media, weights):
    """Windowing + fbank + AST against an AST forward written from the paper, on a 12 s track at stride 10."""
    encoder = load_ast(weights["ast"])
    feat, mask = extract_music_features(media / "short12.wav", encoder, stride=10.0, filter=10.0, batch_size=1)
    assert feat.shape == (24, 128) and mask.tolist() == [1, 1] + [0] * 22
    wave = decode_audio(media / "short12.wav")
    wave = torch.nn.functional.pad(wave, (0, 240 * 16000 - wave.numel()))
    inputs = torch.stack([ast_input(wave[0:80000]), ast_input(wave[80000:240000])])  # [0,5) s and [5,15) s
    with torch.no_grad():
        torch.testing.assert_close(feat[:2], ast_reference_forward(weights["ast_sd"], inputs), rtol=1e-4, atol=1e-4)
    assert torch.count_nonzero(feat[2:]) == 0


# ------------------------------------------------------------------------------------ full-size encoders
def test_real_architecture_shapes(media):
    """ViT-B/32 and AST at their real sizes (random weights, converted from the published layouts in memory):
    a 12.4 s clip and the two valid windows of a 12 s track."""
    clip_sd = openai_clip_state_dict(width=768, layers=12, text=False)
    vit = build_clip_vision(infer_clip_config(clip_sd), init=False)  # every tensor is loaded below
    vit.load_state_dict(convert_openai_clip(clip_sd, vit), strict=True)
    clip = CLIPImageEncoder(vit).eval()
    feat, mask = extract_video_features(media / "videos" / "clip124.mp4", clip, "cpu")
    assert feat.shape == (50, 512) and mask.sum() == 13 and torch.isfinite(feat).all()
    assert torch.count_nonzero(feat[13:]) == 0 and torch.all(feat[:13].abs().sum(1) > 0)
    del clip, vit, clip_sd

    state = convert_ast_checkpoint(ast_checkpoint(width=768, depth=12))
    ast_vit = build_ast(**infer_ast_config(state), init=False)
    assert tuple(ast_vit.pos_embed.shape) == (1, 1214, 768) and len(ast_vit.blocks) == 12
    ast_vit.load_state_dict(state, strict=True)
    feat, mask = extract_music_features(media / "short12.wav", ASTEncoder(ast_vit).eval(), 10.0, 10.0, "cpu")
    assert feat.shape == (24, 768) and mask.sum() == 2 and torch.isfinite(feat).all()
    assert torch.count_nonzero(feat[2:]) == 0


# --------------------------------------------------------------------------------------------- the script
def test_script_end_to_end_resume_and_failures(media, weights, tmp_path, capsys):
    out = tmp_path / "feats"
    args = ["--videos", str(media / "videos"), "--music", str(media / "music")]
    assert _run(args, out, weights) == 0  # broken files are reported, not fatal
    v_feat, v_mask = _load(out, "vit_feature1", "video", "clip124")
    assert v_feat.shape == (50, 512) and v_feat.dtype == torch.float32 and v_mask.shape == (50,)
    assert v_mask.tolist() == [1.0] * 13 + [0.0] * 37 and torch.count_nonzero(v_feat[13:]) == 0
    m_feat, m_mask = _load(out, "ast_feature10", "music", "track100")
    assert m_feat.shape == (24, 128) and m_mask.sum() == 11 and torch.count_nonzero(m_feat[11:]) == 0
    failures = json.loads((out / "extraction_failures.json").read_text())
    assert [f["id"] for f in failures["video"]] == ["broken"] and [f["id"] for f in failures["music"]] == ["broken"]
    err = capsys.readouterr().err
    assert "FAILED broken" in err and "1 extracted" in err

    # resumable: a second run recomputes nothing (files untouched) and still lists the broken inputs
    files = sorted(p for p in out.rglob("*.pt"))
    stamps = {p: p.stat().st_mtime_ns for p in files}
    assert _run(args, out, weights) == 0
    assert {p: p.stat().st_mtime_ns for p in files} == stamps
    assert "1 already done" in capsys.readouterr().err

    # a half-written item (feature without mask) is redone
    (out / "ast_feature10" / "ast_mask" / "track100.pt").unlink()
    assert _run(["--music", str(media / "music")], out, weights) == 0
    torch.testing.assert_close(_load(out, "ast_feature10", "music", "track100"), (m_feat, m_mask), rtol=0, atol=0)

    # deterministic, and the TorchScript archive gives the same encoder as the plain state dict
    out2 = tmp_path / "feats2"
    jit = dict(weights, clip=weights["clip_jit"])
    assert _run(args, out2, jit) == 0
    for sub, kind, item in [("vit_feature1", "video", "clip124"), ("ast_feature10", "music", "track100")]:
        a, b = _load(out, sub, kind, item), _load(out2, sub, kind, item)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])



def test_output_loads_through_feature_store(media, weights, tmp_path):
    """What train/test/ground read: utils.data.store.FeatureStore validates dims (512 / 768), so the AST here
    has the real width (one block) and the track is short (2 valid windows)."""
    features = pytest.importorskip("utils.data.store")
    out = tmp_path / "feats"
    ast768 = tmp_path / AST_FILE_NAME
    torch.save(ast_checkpoint(width=768, depth=1), ast768)
    assert _run(["--videos", str(media / "videos" / "clip124.mp4"), "--music", str(media / "short12.wav")], out,
                dict(weights, ast=ast768)) == 0
    store = features.FeatureStore(out, stride=10.0, use_packed=False)
    feat, mask = store.video("clip124")
    assert feat.shape == (50, 512) and mask.sum() == 13
    feat, mask = store.music("short12")
    assert feat.shape == (24, 768) and mask.sum() == 2
    store.check(["clip124"], ["short12"])


def test_script_stride_2p5_layout(media, weights, tmp_path):
    out = tmp_path / "feats"
    assert main(["--music", str(media / "music" / "track100.wav"), "--out", str(out), "--ast_weights",
                 str(weights["ast"]), "--device", "cpu", "--batch_size", "16"]) == 0
    feat, mask = _load(out, "ast_feature2p5", "music", "track100")
    assert feat.shape == (96, 128) and mask.sum() == 41 and mask[:41].all()


def test_script_csv_inputs(media, weights, tmp_path):
    """MGSV-EC style CSVs: numeric video ids found as <root>/<id>.mp4; music_path written for another machine
    re-rooted by file name; duplicate rows extracted once; a missing file is a reported failure."""
    vids, songs = tmp_path / "vids", tmp_path / "songs"
    vids.mkdir(), (songs / "0").mkdir(parents=True)
    os.symlink(media / "videos" / "clip124.mp4", vids / "113722188340.mp4")
    os.symlink(media / "music" / "track100.wav", songs / "0" / "7+5x4mjj+title.wav")
    os.symlink(media / "short12.wav", songs / "4+flat.wav")
    csv = tmp_path / "test_data.csv"
    csv.write_text("video_id,music_id,music_path\n"
                   "113722188340,7+5x4mjj,/Data/music/source_music/0/7+5x4mjj+title.wav\n"
                   "113722188340,7+5x4mjj,/Data/music/source_music/0/7+5x4mjj+title.wav\n"
                   "1001,4+flat,/Data/music/source_music/5/4+flat.wav\n"
                   "999,4+absent,/Data/music/source_music/3/4+absent+x.mp3\n")
    out = tmp_path / "feats"
    assert _run(["--videos", str(csv), "--video_root", str(vids), "--music", str(csv), "--music_root",
                 str(songs)], out, weights) == 0
    assert _load(out, "vit_feature1", "video", "113722188340")[1].sum() == 13
    assert _load(out, "ast_feature10", "music", "7+5x4mjj")[1].sum() == 11  # found as songs/0/<name>
    assert _load(out, "ast_feature10", "music", "4+flat")[1].sum() == 2  # found as songs/<name>
    failures = json.loads((out / "extraction_failures.json").read_text())
    assert [f["id"] for f in failures["video"]] == ["1001", "999"]
    assert [f["id"] for f in failures["music"]] == ["4+absent"]


def test_failure_list_accumulates_over_runs(media, weights, tmp_path, capsys):
    """Each run into one --out used to replace extraction_failures.json, so a --music run erased the
    video failures of the run before. Entries are keyed by (modality, id, folder): a later success
    removes one, a later failure replaces it, ids not listed again keep theirs."""
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("clip124.mp4", "broken.mp4"):
        os.symlink(media / "videos" / name, videos / name)
    out, failures_file = tmp_path / "feats", tmp_path / "feats" / "extraction_failures.json"
    out.mkdir()
    # A list written before entries named their folder, for an id no run lists again: kept as it is.
    failures_file.write_text(json.dumps({"video": [{"id": "old", "path": "/x/old.mp4", "error": "E"}]}))
    assert _run(["--videos", str(videos)], out, weights) == 0
    assert _run(["--music", str(media / "music")], out, weights) == 0
    failures = json.loads(failures_file.read_text())
    assert [(f["id"], f.get("folder")) for f in failures["video"]] == [("old", None), ("broken", "vit_feature1")]
    assert [(f["id"], f["folder"]) for f in failures["music"]] == [("broken", "ast_feature10")]
    assert "(3 entries; 2 before this run)" in capsys.readouterr().err
    # The broken video is replaced by a good one: its entry goes, the others stay.
    (videos / "broken.mp4").unlink()
    os.symlink(media / "videos" / "clip124.mp4", videos / "broken.mp4")
    assert _run(["--videos", str(videos)], out, weights) == 0
    assert _load(out, "vit_feature1", "video", "broken")[1].sum() == 13
    failures = json.loads(failures_file.read_text())
    assert [f["id"] for f in failures["video"]] == ["old"] and [f["id"] for f in failures["music"]] == ["broken"]
    # Music at another stride goes to another folder: the stride-10 failure is not settled by it.
    assert _run(["--music", str(media / "music" / "track100.wav")], out, weights, "--stride", "5") == 0
    assert [f["folder"] for f in json.loads(failures_file.read_text())["music"]] == ["ast_feature10"]


def test_unreadable_failure_list_is_kept_and_refused(media, weights, tmp_path, capsys):
    out = tmp_path / "feats"
    out.mkdir()
    (out / "extraction_failures.json").write_text('{"video": [')
    assert _run(["--videos", str(media / "videos" / "clip124.mp4")], out, weights) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out / 'extraction_failures.json'} (the failure list of an earlier run)")
    assert err.count("\n") == 1 and "move it away or delete it" in err
    assert (out / "extraction_failures.json").read_text() == '{"video": [' and not (out / "vit_feature1").exists()


def test_id_given_twice_with_different_files_is_refused(media, weights, tmp_path, capsys):
    """Before any work, one line naming the list and the id; the same file on many rows stays fine."""
    csv = tmp_path / "videos.csv"
    csv.write_text("video_id,video_path\n"
                   f"7,{media / 'videos' / 'clip124.mp4'}\n"
                   f"8,{media / 'videos' / 'clip124.mp4'}\n"
                   f"7,{media / 'videos' / 'broken.mp4'}\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    os.symlink(media / "videos" / "clip124.mp4", folder / "a.mp4")
    os.symlink(media / "videos" / "broken.mp4", folder / "a.mov")
    for source, phrase in ((csv, "video_id '7' on line 2 ("), (folder, "id 'a' from a.mov and a.mp4")):
        out = tmp_path / f"out_{source.name}"
        assert _run(["--videos", str(source)], out, weights) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {source}: ") and "given twice with different files" in err, err
        assert phrase in err and err.count("\n") == 1 and not out.exists()
    # The same file named twice (absolute, then relative to the CSV's folder) is one item.
    os.symlink(media / "videos" / "clip124.mp4", tmp_path / "clip.mp4")
    csv.write_text(f"video_id,video_path\n7,{tmp_path / 'clip.mp4'}\n7,clip.mp4\n")
    assert _run(["--videos", str(csv)], tmp_path / "ok", weights) == 0
    assert "1 listed, 1 extracted" in capsys.readouterr().err


def test_script_exit_status(media, weights, tmp_path, capsys):
    # weights missing -> 2, before any work, naming the file and where it comes from
    rc = main(["--videos", str(media / "videos"), "--out", str(tmp_path / "a"),
               "--clip_weights", str(tmp_path / "none" / CLIP_FILE_NAME)])
    err = capsys.readouterr().err
    assert rc == 2 and "ViT-B-32.pt" in err and "openaipublic" in err and not (tmp_path / "a").exists()
    # every attempted item failed -> 1
    only_broken = tmp_path / "broken"
    only_broken.mkdir()
    (only_broken / "x.mp4").write_bytes(b"junk")
    assert _run(["--videos", str(only_broken)], tmp_path / "b", weights) == 1
    # bad inputs -> 2
    assert _run(["--videos", str(tmp_path / "nope")], tmp_path / "c", weights) == 2
    assert _run([], tmp_path / "d", weights) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(["--music", str(empty)], tmp_path / "e", weights) == 2
