"""MaDe: parameter count, shapes, padding invariance, X-Pool maths, exact chunked scoring."""
import math

import pytest
import torch
import torch.nn.functional as F

from model.made import MaDe, build_criterion, build_model, count_trainable_parameters
from model.position import sine_positions_1d, sinusoid_table
from utils.train.options import parse_args

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = ["--dim_input", "32", "--SA_temporal_heads", "4", "--detr_nheads", "4", "--detr_dim_feedforward", "64",
         "--contrastive_dim", "16", "--detr_enc_layers", "1", "--detr_dec_layers", "3"]


def small_model(*extra: str, seed: int = 0) -> MaDe:
    torch.manual_seed(seed)
    return build_model(parse_args(SMALL + list(extra)))


def make_batch(b: int, lv: int, lm: int, seed: int = 0, min_valid: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    nv = torch.randint(min_valid, lv + 1, (b,), generator=gen)
    nm = torch.randint(min_valid, lm + 1, (b,), generator=gen)
    frame_mask = (torch.arange(lv)[None] < nv[:, None]).float()
    music_mask = (torch.arange(lm)[None] < nm[:, None]).float()
    return {"frame_feats": torch.randn(b, lv, 512, generator=gen) * frame_mask[..., None],
            "frame_mask": frame_mask,
            "music_feats": torch.randn(b, lm, 768, generator=gen) * music_mask[..., None],
            "music_mask": music_mask,
            "spans_target": torch.rand(b, 1, 2, generator=gen) * 0.4 + 0.1,
            "v_duration": nv.float(), "music_id": [f"m{i % 3}" for i in range(b)],
            "video_id": [str(i) for i in range(b)]}


def perturb(module: torch.nn.Module, scale: float = 0.3, seed: int = 1) -> None:
    """Move X-Pool away from its identity initialisation (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def flat_outputs(out: dict) -> dict:
    flat = {k: out[k] for k in ("video_emb", "music_emb", "frame_tokens", "snippet_tokens")}
    flat.update({f"sim_{k}": v for k, v in out["similarities"].items() if v is not None})
    det = out["detection"]
    flat.update({k: v for k, v in det.items() if torch.is_tensor(v)})
    for i, aux in enumerate(det["aux_outputs"]):
        flat.update({f"aux{i}_{k}": v for k, v in aux.items()})
    return flat


def test_default_model_parameter_count_and_forward():
    torch.manual_seed(0)
    model = build_model(parse_args([])).eval()
    assert count_trainable_parameters(model) == 10_534_917
    with torch.no_grad():
        out = model(make_batch(2, 50, 96))
    assert out["video_emb"].shape == (2, 256) and out["snippet_tokens"].shape == (2, 96, 256)
    det = out["detection"]
    assert det["pred_logits"].shape == (2, 1, 2) and det["pred_spans"].shape == (2, 1, 2)
    assert len(det["aux_outputs"]) == 5
    assert out["logit_scale"].item() == pytest.approx(math.log(1 / 0.03))


@pytest.mark.parametrize("b,lv,lm", [(1, 50, 96), (3, 7, 11), (5, 50, 24)])
def test_shapes(b, lv, lm):
    model = small_model().eval()
    with torch.no_grad():
        out = model(make_batch(b, lv, lm))
    assert out["video_emb"].shape == (b, 32) and out["music_emb"].shape == (b, 32)
    assert out["frame_tokens"].shape == (b, lv, 32) and out["snippet_tokens"].shape == (b, lm, 32)
    assert out["similarities"]["dual"].shape == out["similarities"]["single"].shape == (b, b)
    det = out["detection"]
    assert det["pred_spans"].shape == (b, 1, 2) and det["proj_vid_mem"].shape == (b, lv, 16)
    assert len(det["aux_outputs"]) == 2
    assert ((det["pred_spans"] > 0) & (det["pred_spans"] < 1)).all()
    assert torch.allclose(out["video_emb"].norm(dim=-1), torch.ones(b))
    # padded token rows are zero
    assert (out["frame_tokens"][make_batch(b, lv, lm)["frame_mask"] == 0] == 0).all()


CONFIGS = [[], ["--separate_positions", "1", "--residual_from_input", "1"], ["--agg_module", "None"],
           ["--with_cls_token", "1"], ["--fusion_mask", "0"], ["--detr_pre_norm", "1"],
           ["--vmr_loss", "dual_single_feature_fuse", "--moment_query_type", "xpool"]]


@pytest.mark.parametrize("extra", CONFIGS, ids=lambda e: " ".join(e) or "default")
def test_padding_invariance(extra):
    """Changing the content of padded frames/snippets changes no output (eval mode)."""
    model = small_model(*extra).eval()
    batch = make_batch(4, 9, 13, min_valid=2)
    noisy = dict(batch)
    noisy["frame_feats"] = batch["frame_feats"] + 5 * torch.randn_like(batch["frame_feats"]) * (1 - batch["frame_mask"])[..., None]
    noisy["music_feats"] = batch["music_feats"] + 5 * torch.randn_like(batch["music_feats"]) * (1 - batch["music_mask"])[..., None]
    with torch.no_grad():
        a, b = flat_outputs(model(batch)), flat_outputs(model(noisy))
    if "--fusion_mask" in extra:  # X-Pool attends to padded snippets by design there
        a = {k: v for k, v in a.items() if k != "sim_single"}
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_xpool_matches_explicit_formula():
    model = small_model()
    xp = model.xpool.eval()
    assert torch.equal(xp.cross_attn.q_proj.weight, torch.eye(32)) and xp.linear_proj.bias.abs().sum() == 0
    perturb(xp)
    gen = torch.Generator().manual_seed(3)
    v, s = torch.randn(3, 32, generator=gen), torch.randn(2, 5, 32, generator=gen)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]).float()
    with torch.no_grad():
        pooled = xp(v, s, mask)
        a = xp.cross_attn
        for j in range(2):
            for i in range(3):
                q = a.q_proj(xp.layer_norm1(v[i]))
                valid = s[j][mask[j] > 0]
                k, u = a.k_proj(xp.layer_norm1(valid)), a.v_proj(xp.layer_norm1(valid))
                w = torch.softmax(k @ q / math.sqrt(32), dim=0)
                h = xp.layer_norm2(a.out_proj(w @ u))
                expected = xp.layer_norm3(h + xp.linear_proj(h))
                assert torch.allclose(pooled[j, i], expected, atol=1e-5)


@pytest.mark.parametrize("vmr_loss,fusion", [("dual_single_loss_fuse", "XA-music"), ("single", "XA-music"),
                                             ("dual_single_sim_fuse", "XA-music"),
                                             ("dual_single_feature_fuse", "XA-music"), ("dual", "NO")])
@pytest.mark.parametrize("fusion_mask", ["1", "0"])
def test_chunked_scoring_equals_all_pairs(vmr_loss, fusion, fusion_mask):
    model = small_model("--vmr_loss", vmr_loss, "--vmr_fusion", fusion, "--fusion_mask", fusion_mask).eval()
    if model.xpool is not None:
        perturb(model.xpool)
    gen = torch.Generator().manual_seed(5)
    nv, nm, length = 23, 19, 12
    v = F.normalize(torch.randn(nv, 32, generator=gen), dim=-1)
    m = F.normalize(torch.randn(nm, 32, generator=gen), dim=-1)
    mask = (torch.rand(nm, length, generator=gen) < 0.5).float()   # holes, not only a prefix
    mask[:, 3] = 1
    mask[0] = 1
    sm = torch.randn(nm, length, 32, generator=gen) * mask[..., None]
    with torch.no_grad():
        reference = model.retrieval_score(model.retrieval_similarities(v, m, sm, mask))
        for block, chunk in [(4, 5), (16, 0), (1, 23)]:
            scores = model.score_videos(v, model.index_music(m, sm, mask, block_size=block), chunk)
            assert scores.shape == (nv, nm)
            assert (scores - reference).abs().max() < 1e-5


def test_index_rejects_track_without_snippets():
    model = small_model().eval()
    mask = torch.ones(3, 4)
    mask[1] = 0
    with pytest.raises(ValueError, match="without any valid snippet"):
        model.index_music(torch.randn(3, 32), torch.randn(3, 4, 32), mask)


def test_sine_positions_hand_case():
    pos = sine_positions_1d(torch.tensor([[1.0, 1.0, 0.0]]), 4)
    x = torch.tensor([1.0, 2.0, 2.0]) / (2 + 1e-6) * 2 * math.pi
    assert torch.allclose(pos[0, :, 0], torch.sin(x)) and torch.allclose(pos[0, :, 1], torch.cos(x))
    assert torch.allclose(pos[0, :, 2], torch.sin(x / 100)) and torch.allclose(pos[0, :, 3], torch.cos(x / 100))
    table = sinusoid_table(3, 4)
    assert torch.allclose(table[2], torch.tensor([math.sin(2), math.cos(2), math.sin(0.02), math.cos(0.02)]))


def test_separate_positions_make_music_independent_of_frames():
    """With the fix, the detector's view of the music does not depend on the video's length."""
    torch.manual_seed(0)
    fm1, fm2 = torch.tensor([[1.0, 1.0, 0.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    mm = torch.tensor([[1.0, 1.0, 1.0]])
    together = [sine_positions_1d(torch.cat([f, mm], 1), 8)[:, 4:] for f in (fm1, fm2)]
    assert not torch.allclose(together[0], together[1])  # the original's coupling
    assert torch.equal(sine_positions_1d(mm, 8), sine_positions_1d(mm, 8))


def test_fix_flags_reach_the_modules():
    default = small_model()
    assert all(layer.use_self_attn for layer in default.transformer.decoder.layers)  # original: always on
    assert default.video_encoder.transformer.layers[0][1].dropout == 0.8
    fixed = small_model("--decoder_SA_fix", "1", "--temporal_dropout", "0.1")
    assert not any(layer.use_self_attn for layer in fixed.transformer.decoder.layers)
    assert fixed.video_encoder.transformer.layers[0][1].dropout == 0.1
    assert small_model("--decoder_SA_fix", "1", "--decoder_SA", "1").transformer.decoder.layers[0].use_self_attn


def test_param_groups():
    model = small_model()
    groups = model.param_groups(parse_args(SMALL + ["--matching_lr", "1e-3", "--detection_lr", "2e-3"]))
    assert [g["name"] for g in groups] == ["temporal", "matching", "detection"]
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 2e-3]
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    everything = {id(p) for p in model.parameters()}
    assert everything - set(ids) == {id(model.decoder_query_embed.weight)}  # frozen, as the original
    assert id(model.logit_scale) in {id(p) for p in groups[1]["params"]}
    trained = model.param_groups(parse_args(SMALL + ["--train_query_pos", "1"]))
    assert {id(p) for g in trained for p in g["params"]} == everything


def test_options_change_the_architecture():
    base = count_trainable_parameters(small_model())
    assert count_trainable_parameters(small_model("--transformer_is_share", "1")) < base
    assert count_trainable_parameters(small_model("--contrastive_align_loss", "0")) < base
    assert small_model("--vmr_fusion", "NO", "--vmr_loss", "dual").xpool is None
    assert small_model("--agg_module", "None").video_encoder.transformer is None


@pytest.mark.parametrize("extra", [["--moment_query_type", "music"], ["--moment_query_type", "zero"],
                                   ["--moment_query_type", "xpool"], ["--predict_center", "1"],
                                   ["--mml_localization", "regression"],
                                   ["--num_moment_queries", "3", "--decoder_SA", "1"],
                                   ["--aux_loss", "0"], ["--with_act_after_proj", "1"],
                                   ["--vmr_fusion", "NO", "--vmr_loss", "dual"], ["--mask_same_music", "1"]],
                         ids=lambda e: " ".join(e))
def test_variants_train_step(extra):
    args = parse_args(SMALL + extra)
    torch.manual_seed(0)
    model, criterion = build_model(args), build_criterion(args)
    batch = make_batch(4, 6, 10)
    out = model(batch)
    loss, parts = criterion(out, batch)
    assert torch.isfinite(loss)
    loss.backward()
    assert model.video_encoder.proj.weight.grad is not None
    det = out["detection"]
    assert det["pred_spans"].shape == (4, args.num_moment_queries, 2)
    if args.predict_center:
        assert torch.allclose(det["pred_spans"][..., 1], (batch["v_duration"] / 240)[:, None])
    if not args.aux_loss:
        assert det["aux_outputs"] == [] and "loss_span_0" not in parts


def test_training_reduces_the_loss():
    args = parse_args(SMALL + ["--temporal_dropout", "0", "--detr_dropout", "0"])
    torch.manual_seed(0)
    model, criterion = build_model(args), build_criterion(args)
    optimizer = torch.optim.Adam(model.param_groups(args))
    query_pos = model.decoder_query_embed.weight.detach().clone()
    batch = make_batch(8, 6, 10)
    losses = []
    for _ in range(10):
        loss, _ = criterion(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert torch.equal(model.decoder_query_embed.weight, query_pos)  # in no optimiser group, as the original


def test_bf16_autocast_forward_and_exact_scoring():
    """Mixed precision reaches the forward and the losses; index/score stay float32 and exact."""
    args = parse_args(SMALL)
    torch.manual_seed(0)
    model, criterion = build_model(args).eval(), build_criterion(args)
    batch = make_batch(4, 6, 10)
    with torch.no_grad():
        fp32 = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(batch)
            loss, _ = criterion(out, batch)
            index = model.index_music(fp32["music_emb"], fp32["snippet_tokens"], batch["music_mask"])
            scores = model.score_videos(fp32["video_emb"], index)
    assert torch.isfinite(loss)
    assert scores.dtype == torch.float32
    exact = model.retrieval_score(model.retrieval_similarities(fp32["video_emb"], fp32["music_emb"],
                                                               fp32["snippet_tokens"], batch["music_mask"]))
    assert (scores - exact).abs().max() < 1e-5


@pytest.mark.parametrize("query", ["video", "xpool"])
def test_forward_without_losses_gives_the_same_outputs(query):
    """losses=False (evaluation without a criterion) skips the loss-only parts and changes nothing else."""
    model = small_model("--moment_query_type", query).eval()
    perturb(model.xpool)
    batch = make_batch(6, 12, 20)
    with torch.no_grad():
        full, lean = model(batch), model(batch, losses=False)
    assert lean["similarities"] is None and "proj_queries" not in lean["detection"]
    want = {k: v for k, v in flat_outputs(full).items() if not k.startswith("sim_") and "proj_" not in k}
    got = {k: v for k, v in flat_outputs({**lean, "similarities": {}}).items()}
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
