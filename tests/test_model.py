"""Tests of model.py (method.md §2-6, 11, 13): every check compares against an
independent computation or an invariant, with configs small enough for CPU."""

import math
import os

import pytest
import torch
import torch.nn.functional as F

import localize
import retrieval
from augment import AUDIO_DIM, AUDIO_SLOTS, VISUAL_DIM
from finetune import EquiAVClassifier
from model import (PREDICTORS, EquiAV, EquiAVOutput, PatchEmbed, TransformationPredictor,
                   ViTEncoder, drop_path, get_config)

# Smaller than `tiny`: T != F and a non-square audio grid so layout mistakes show.
SMALL = dict(audio_length=48, mel_bins=16, image_size=32, patch_size=8, embed_dim=32, depth=2,
             num_heads=4, aug_hidden=24, pred_heads=2, pred_head_dim=8, proj_hidden=48,
             proj_dim=16)


def small_cfg(**kw):
    return get_config("tiny", **{**SMALL, **kw})


def make_inputs(cfg, B=3, S=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    T, Fb, H = cfg.audio_length, cfg.mel_bins, cfg.image_size
    return dict(
        x_a=torch.randn(B, T, Fb, generator=g), x_v=torch.randn(B, 3, H, H, generator=g),
        x_a_aug=torch.randn(B, T, Fb, generator=g), x_v_aug=torch.randn(B, 3, H, H, generator=g),
        t_a=torch.rand(B, AUDIO_DIM, generator=g), t_v=torch.rand(B, VISUAL_DIM, generator=g),
        T_a=torch.rand(B, S, AUDIO_DIM, generator=g), T_v=torch.rand(B, S, VISUAL_DIM, generator=g))


def close(a, b, tol=1e-5):
    return torch.allclose(a, b, atol=tol, rtol=tol)


# ----------------------------------------------------------------- predictor

def test_predictor_output_is_mean_of_single_vector_predictions():
    torch.manual_seed(0)
    cfg = small_cfg()
    pred = TransformationPredictor(cfg, AUDIO_DIM).eval()
    h = torch.randn(3, 10, cfg.embed_dim)
    t = torch.randn(3, 5, AUDIO_DIM)
    singles = torch.stack([pred(h, t[:, i]) for i in range(5)], dim=1)  # each (B, d_t) input
    assert close(pred(h, t), singles.mean(dim=1))
    assert close(pred(h, t[:, 2]), pred(h, t[:, 2:3]))
    # and the vectors matter (otherwise the check above would be vacuous)
    assert not close(singles[:, 0], singles[:, 1], 1e-3)


def test_predictor_matches_spec4_written_out():
    torch.manual_seed(1)
    cfg = small_cfg()
    p = TransformationPredictor(cfg, VISUAL_DIM).eval()
    h = torch.randn(2, 7, cfg.embed_dim)
    t = torch.randn(2, VISUAL_DIM)
    e = p.aug_encoder
    qg = lambda x: x * torch.sigmoid(1.702 * x)
    q = p.norm_aug(e.fc3(qg(e.fc2(qg(e.fc1(t))))))                      # (B, 24)
    H, hd = cfg.pred_heads, cfg.pred_head_dim
    qh = p.to_q(q).view(2, H, hd)
    kh = p.to_k(h).view(2, 7, H, hd)
    vh = p.to_v(h).view(2, 7, H, hd)
    att = torch.softmax(torch.einsum("bhd,bnhd->bhn", qh, kh) / math.sqrt(hd), dim=-1)
    out = p.to_out(torch.einsum("bhn,bnhd->bhd", att, vh).reshape(2, H * hd))
    y = h.mean(1) + out
    y = y + p.mlp.fc2(F.gelu(p.mlp.fc1(p.norm(y))))
    assert close(p(h, t), y)


@pytest.mark.parametrize("kind", sorted(PREDICTORS))
def test_every_predictor_kind_centroid_is_mean_of_singles_and_trains_e_m(kind):
    torch.manual_seed(3)
    cfg = small_cfg(predictor=kind, pred_rank=4)
    pred = PREDICTORS[kind](cfg, AUDIO_DIM)
    h = torch.randn(3, 10, cfg.embed_dim)
    t = torch.randn(3, 6, AUDIO_DIM)
    singles = torch.stack([pred(h, t[:, i]) for i in range(6)], dim=1)   # (B, S, D), one at a time
    out = pred(h, t)
    assert out.shape == (3, cfg.embed_dim)
    assert close(out, singles.mean(dim=1))
    assert not close(singles[:, 0], singles[:, 1], 1e-3)                # t changes the prediction
    out.square().sum().backward()
    grads = [p.grad for p in pred.aug_encoder.parameters()]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)      # the gradient reaches e_m
    model = EquiAV(cfg)                                                  # and the model builds it
    assert type(model.predictor_a) is PREDICTORS[kind]


def test_linear_and_hypernetwork_predictors_match_their_formulas():
    torch.manual_seed(4)
    cfg = small_cfg(pred_rank=3)
    h = torch.randn(2, 7, cfg.embed_dim)
    t = torch.randn(2, VISUAL_DIM)
    pooled = h.mean(dim=1)                                               # (B, D)
    lin = PREDICTORS["linear"](cfg, VISUAL_DIM)
    e = lin.aug_encoder(t)
    assert close(lin(h, t), torch.cat([pooled, e], 1) @ lin.fc.weight.T + lin.fc.bias)
    hyp = PREDICTORS["hypernetwork"](cfg, VISUAL_DIM)
    w = hyp.to_weights(hyp.aug_encoder(t))                               # (B, 2 D r)
    D, r = cfg.embed_dim, 3
    for b in range(2):
        U, V = w[b, :D * r].view(D, r), w[b, D * r:].view(r, D)
        assert close(hyp(h[b:b + 1], t[b:b + 1])[0], pooled[b] + U @ (V @ pooled[b]))


def test_base_predictor_sizes_by_kind():
    """The base preset's audio predictor (d_t = 24), counted from the layer shapes: the
    attention kind 6.17M, the hypernetwork 6.45M (rank 16), the linear 0.93M."""
    cfg = get_config("base")
    D, A, hidden, inner, r = cfg.embed_dim, AUDIO_DIM, cfg.aug_hidden, 512, cfg.pred_rank
    e_m = (A + 1) * hidden + 2 * (hidden + 1) * hidden
    counts = {"attention": e_m + 2 * hidden + (hidden + 1) * inner + 2 * (D + 1) * inner
              + inner * D + 2 * D + (D + 1) * 4 * D + (4 * D + 1) * D,
              "linear": e_m + (D + hidden + 1) * D,
              "hypernetwork": e_m + (hidden + 1) * 2 * D * r}
    for kind, n in counts.items():
        got = sum(p.numel() for p in PREDICTORS[kind](get_config("base", predictor=kind), A).parameters())
        assert got == n, kind
    assert round(counts["attention"] / 1e6, 2) == 6.17 and round(counts["hypernetwork"] / 1e6, 2) == 6.45


def test_unknown_predictor_kind_is_refused():
    with pytest.raises(ValueError, match="predictor='mlp' must be attention, linear or hypernetwork"):
        small_cfg(predictor="mlp")


def identity_vectors(n, slots, dim):
    """No augmentation (method.md §8): RRC on at full extent, jitter order 0, 1/3, 2/3, 1."""
    t = torch.zeros(n, dim)
    t[:, slots["rrc_on"]] = 1.0
    for name in ("rrc_height", "rrc_width", "rrc_time_len", "rrc_freq_width"):
        if name in slots:
            t[:, slots[name]] = 1.0
    for i in range(4):
        t[:, slots[f"cj_order{i}"]] = i / 3
    return t


def test_identity_vector_path_is_deterministic_and_per_sample():
    torch.manual_seed(2)
    cfg = small_cfg()
    pred = TransformationPredictor(cfg, AUDIO_DIM)  # train mode: still no randomness inside
    h = torch.randn(4, 12, cfg.embed_dim)
    t = identity_vectors(4, AUDIO_SLOTS, AUDIO_DIM)
    a, b = pred(h, t), pred(h, t)
    assert torch.equal(a, b)
    # each sample's prediction depends only on its own tokens
    assert close(pred(h[1:2], t[1:2]), a[1:2])
    # embed() with the same fixed-seed centroid vectors is deterministic too
    model = EquiAV(cfg).eval()
    x = make_inputs(cfg, B=2)
    e1 = model.embed(x["x_a"], x["x_v"], x["T_a"], x["T_v"])
    e2 = model.embed(x["x_a"], x["x_v"], x["T_a"], x["T_v"])
    assert torch.equal(e1[0], e2[0]) and torch.equal(e1[1], e2[1])


# ------------------------------------------------------------------- encoder

def test_one_channel_audio_conv_equals_three_channel_conv_on_repeated_spectrogram():
    torch.manual_seed(3)
    w3, b = torch.randn(16, 3, 8, 8), torch.randn(16)
    pe = PatchEmbed(1, 16, 8)
    with torch.no_grad():
        pe.proj.weight.copy_(w3.sum(dim=1, keepdim=True))
        pe.proj.bias.copy_(b)
    img = torch.randn(2, 1, 16, 48)
    ref = F.conv2d(img.repeat(1, 3, 1, 1), w3, b, stride=8).flatten(2).transpose(1, 2)
    assert close(pe(img), ref, 1e-4)


def test_audio_layout_rows_are_frequency_cols_are_time():
    cfg = small_cfg(depth=0)
    enc = ViTEncoder(cfg, 1, cfg.audio_grid)
    rows, cols = cfg.audio_grid
    assert (rows, cols) == (16 // 8, 48 // 8)
    spec = torch.zeros(1, 48, 16)                 # (B, T, F)
    spec[0, 8 * 4 + 3, 8 * 1 + 5] = 1.0            # frame in time patch 4, bin in freq patch 1
    with torch.no_grad():
        diff = (enc(spec) - enc(torch.zeros_like(spec))).abs().sum(-1)
    assert diff[0].nonzero().flatten().tolist() == [1 * cols + 4]


def reference_sincos(dim, rows, cols):
    """Written independently of model.py, element by element."""
    out = torch.zeros(rows * cols, dim, dtype=torch.float64)
    quarter = dim // 4
    for r in range(rows):
        for c in range(cols):
            n = r * cols + c
            for half, pos in ((0, c), (1, r)):   # first half: column, second half: row
                for i in range(quarter):
                    w = 10000.0 ** (-i / quarter)
                    out[n, half * dim // 2 + i] = math.sin(pos * w)
                    out[n, half * dim // 2 + quarter + i] = math.cos(pos * w)
    return out.float()


def test_position_embedding_values_and_that_loaded_values_are_used():
    cfg = small_cfg()
    enc = ViTEncoder(cfg, 1, cfg.audio_grid)
    assert close(enc.pos_embed[0], reference_sincos(cfg.embed_dim, *cfg.audio_grid), 1e-6)
    assert "pos_embed" in enc.state_dict()
    x = torch.randn(2, cfg.audio_length, cfg.mel_bins)
    sd = enc.state_dict()
    sd["pos_embed"] = torch.randn_like(sd["pos_embed"])
    other = ViTEncoder(cfg, 1, cfg.audio_grid)
    other.load_state_dict(sd)
    assert torch.equal(other.pos_embed, sd["pos_embed"])
    with torch.no_grad():
        tokens = other.patch_embed(x.transpose(1, 2).unsqueeze(1)) + sd["pos_embed"] + other.modality_embed
        for blk in other.blocks:
            tokens = blk(tokens)
        assert close(other(x), other.norm(tokens))
        assert not close(other(x), enc(x), 1e-3)


def test_drop_path_drops_whole_samples_and_preserves_the_mean():
    torch.manual_seed(4)
    x = torch.ones(4000, 3, 5)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.view(4000, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 1 / 0.75).all(1)).all()
    assert abs(y.mean().item() - 1.0) < 0.05
    assert torch.equal(drop_path(x, 0.25, training=False), x)


# --------------------------------------------------------------------- EquiAV

def manual_outputs(model, x, centroid=True, equivariant=True):
    """method.md §6 written out from the submodules, one call per term."""
    res = {}
    for m, enc, pred, gi, ge in (("a", model.audio_encoder, model.predictor_a, model.proj_inter_a,
                                  model.proj_intra_a),
                                 ("v", model.visual_encoder, model.predictor_v, model.proj_inter_v,
                                  model.proj_intra_v)):
        h = enc(x[f"x_{m}"])
        h_aug = enc(x[f"x_{m}_aug"], aug=True)
        res[f"z_inter_{m}"] = gi(pred(h, x[f"T_{m}"]) if centroid else h.mean(1))
        res[f"z_equi_{m}"] = ge(pred(h, x[f"t_{m}"]) if equivariant else h.mean(1))
        res[f"z_aug_{m}"] = ge(h_aug.mean(1))
    return res


@pytest.mark.parametrize("centroid,equivariant", [(True, True), (False, True), (True, False),
                                                  (False, False)])
def test_forward_and_ablation_switches_match_manual_computation(centroid, equivariant):
    torch.manual_seed(5)
    cfg = small_cfg()
    full = EquiAV(cfg).eval()
    model = EquiAV(cfg, "centroid" if centroid else "original", equivariant=equivariant).eval()
    report = model.load_state_dict(full.state_dict(), strict=False)
    assert report.missing_keys == []
    x = make_inputs(cfg)
    with torch.no_grad():
        out = model(**x)
        ref_full = full(**x)
        manual = manual_outputs(model if model.predictor_a is not None else full, x,
                                centroid, equivariant)
    assert isinstance(out, EquiAVOutput)
    for name in EquiAVOutput._fields:
        assert close(getattr(out, name), manual[name], 1e-4), name
    # exactly the switched outputs differ from the full model
    changed = set()
    if not centroid:
        changed |= {"z_inter_a", "z_inter_v"}
    if not equivariant:
        changed |= {"z_equi_a", "z_equi_v"}
    for name in EquiAVOutput._fields:
        same = close(getattr(out, name), getattr(ref_full, name), 1e-4)
        assert same == (name not in changed), name
    if not (centroid or equivariant):
        assert model.predictor_a is None and model.predictor_v is None


@pytest.mark.parametrize("target", ["centroid", "original", "augmented", "equivariant"])
@pytest.mark.parametrize("equivariant", [True, False])
def test_each_inter_target_embeds_what_it_names(target, equivariant):
    """forward's z_inter and embed() per inter_target, against the submodules called
    by hand: the centroid of T, mean-pooled original tokens, mean-pooled augmented
    tokens (norm_aug), the single prediction of t; embed() evaluates the original
    input the same way, with the identity in place of the augmentation."""
    from augment import audio_identity, visual_identity
    torch.manual_seed(9)
    cfg = small_cfg()
    full = EquiAV(cfg).eval()
    model = EquiAV(cfg, equivariant=equivariant, inter_target=target).eval()
    model.load_state_dict(full.state_dict(), strict=False)
    x = make_inputs(cfg)
    with torch.no_grad():
        out = model(**x)
        # the caller gives an "equivariant" model the identity vectors (model.py imports nothing)
        evaluation = ((audio_identity(3), visual_identity(3)) if target == "equivariant"
                      else (x["T_a"], x["T_v"]))
        z_a, z_v = model.embed(x["x_a"], x["x_v"], *evaluation)
        for m, enc, gi, ge, ident in (("a", full.audio_encoder, full.proj_inter_a,
                                       full.proj_intra_a, audio_identity),
                                      ("v", full.visual_encoder, full.proj_inter_v,
                                       full.proj_intra_v, visual_identity)):
            pred = getattr(full, f"predictor_{m}")
            h, h_aug = enc(x[f"x_{m}"]), enc(x[f"x_{m}_aug"], aug=True)
            want = {"centroid": pred(h, x[f"T_{m}"]), "original": h.mean(1),
                    "augmented": h_aug.mean(1), "equivariant": pred(h, x[f"t_{m}"])}[target]
            assert close(getattr(out, f"z_inter_{m}"), gi(want), 1e-4), m
            at_eval = {"centroid": pred(h, x[f"T_{m}"]), "original": h.mean(1),
                       "augmented": enc(x[f"x_{m}"], aug=True).mean(1),
                       "equivariant": pred(h, ident(3))}[target]
            assert close(z_a if m == "a" else z_v, F.normalize(gi(at_eval), dim=-1), 1e-4), m
            intra = pred(h, x[f"t_{m}"]) if equivariant else h.mean(1)
            assert close(getattr(out, f"z_equi_{m}"), ge(intra), 1e-4), m
    needs = equivariant or target in ("centroid", "equivariant")
    assert (model.predictor_a is not None) == needs
    with pytest.raises(ValueError, match="inter_target must be one of"):
        EquiAV(cfg, inter_target="mean")


def test_intra_embeddings_for_the_equivariance_measures():
    from augment import visual_identity
    torch.manual_seed(10)
    cfg = small_cfg()
    model = EquiAV(cfg).eval()
    x = make_inputs(cfg)
    z_equi, z_aug, z_id = retrieval.intra_embeddings(model, "v", x["x_v"], x["x_v_aug"], x["t_v"])
    with torch.no_grad():
        out = model(**x)
        h = model.visual_encoder(x["x_v"])
        ref_id = model.proj_intra_v(model.predictor_v(h, visual_identity(3)))
    assert close(z_equi, out.z_equi_v, 1e-4) and close(z_aug, out.z_aug_v, 1e-4)
    assert close(z_id, ref_id, 1e-4) and not close(z_id, z_equi, 1e-3)
    invariant = EquiAV(cfg, equivariant=False, inter_target="original").eval()
    a, _, b = retrieval.intra_embeddings(invariant, "a", x["x_a"], x["x_a_aug"], x["t_a"])
    assert torch.equal(a, b)


def test_embed_is_normalized_forward_z_inter():
    torch.manual_seed(6)
    cfg = small_cfg()
    model = EquiAV(cfg).eval()
    x = make_inputs(cfg)
    z_a, z_v = model.embed(x["x_a"], x["x_v"], x["T_a"], x["T_v"])
    with torch.no_grad():
        out = model(**x)
    assert close(z_a.norm(dim=-1), torch.ones(3)) and close(z_v.norm(dim=-1), torch.ones(3))
    assert close(z_a, F.normalize(out.z_inter_a, dim=-1))
    assert close(z_v, F.normalize(out.z_inter_v, dim=-1))


def test_localize_matches_manual_map():
    torch.manual_seed(7)
    cfg = small_cfg()
    model = EquiAV(cfg).eval()
    x = make_inputs(cfg, B=2)
    sim = localize.localize(model, x["x_a"], x["x_v"], x["T_a"], method="token")
    rows, cols = cfg.visual_grid
    assert sim.shape == (2, rows, cols)
    with torch.no_grad():
        z_a = F.normalize(model.proj_inter_a(model.predictor_a(model.audio_encoder(x["x_a"]),
                                                              x["T_a"])), dim=-1)
        tokens = model.visual_encoder(x["x_v"])
        for b in range(2):
            for r in range(rows):
                for c in range(cols):
                    z_tok = F.normalize(model.proj_inter_v(tokens[b, r * cols + c]), dim=-1)
                    assert abs(sim[b, r, c].item() - (z_a[b] @ z_tok).item()) < 1e-5
    assert (sim.abs() <= 1 + 1e-6).all()


def test_tiny_forward_backward_gives_finite_gradients_everywhere():
    torch.manual_seed(8)
    cfg = get_config("tiny", drop_path=0.1)
    model = EquiAV(cfg).train()
    x = make_inputs(cfg, B=2, S=3)
    out = model(**x)
    # LayerNorm outputs sum to ~0, so weight them randomly to get real gradients
    loss = sum((o * torch.randn_like(o)).sum() for o in out)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- classifier

def test_classifier_modes_and_from_pretrained():
    torch.manual_seed(9)
    cfg = small_cfg()
    pre = EquiAV(cfg).eval()
    x = make_inputs(cfg)
    for mode in ("audio", "visual", "multimodal"):
        clf = EquiAVClassifier.from_pretrained(pre, num_classes=5, mode=mode, drop_path=0.1).eval()
        assert clf.cfg.drop_path == 0.1 and pre.cfg.drop_path == 0.0
        feats = []
        with torch.no_grad():
            if mode != "visual":
                feats.append(pre.audio_encoder(x["x_a"]).mean(1))   # norm_a (not norm_a_aug)
            if mode != "audio":
                feats.append(pre.visual_encoder(x["x_v"]).mean(1))
            expected = clf.head(torch.cat(feats, dim=-1))
            logits = clf(x["x_a"] if mode != "visual" else None, x["x_v"] if mode != "audio" else None)
        assert close(logits, expected, 1e-5), mode
        # the copy is a copy, not a shared module
        enc = clf.audio_encoder if mode != "visual" else clf.visual_encoder
        src = pre.audio_encoder if mode != "visual" else pre.visual_encoder
        assert enc is not src
        assert torch.equal(enc.blocks[0].attn.qkv.weight, src.blocks[0].attn.qkv.weight)
        assert enc.norm_aug is None
        # parameter groups partition the model
        ids = [id(p) for p in clf.encoder_parameters()] + [id(p) for p in clf.head_parameters()]
        assert sorted(ids) == sorted(id(p) for p in clf.parameters()) and len(set(ids)) == len(ids)
        assert [id(p) for p in clf.head_parameters()] == [id(clf.head.weight), id(clf.head.bias)]
    with pytest.raises(ValueError, match="mode"):
        EquiAVClassifier(cfg, 5, mode="audiovisual")


# -------------------------------------------------------------------- config

def test_get_config_errors_and_overrides():
    assert get_config("base").embed_dim == 768 and get_config("base").audio_grid == (8, 64)
    assert get_config("tiny", depth=1).depth == 1
    with pytest.raises(ValueError, match="huge"):
        get_config("huge")
    with pytest.raises(ValueError, match="embed_dimm"):
        get_config("tiny", embed_dimm=64)
    with pytest.raises(ValueError, match="num_heads"):
        get_config("tiny", num_heads=3)
    with pytest.raises(ValueError, match="audio_length"):
        get_config("tiny", audio_length=100)


# ------------------------------------------------------- localization maps (method.md §13)

def test_predictor_keep_mask_equals_removing_the_tokens():
    torch.manual_seed(11)
    cfg = small_cfg()
    pred = TransformationPredictor(cfg, AUDIO_DIM).eval()
    h = torch.randn(2, 7, cfg.embed_dim)
    t = torch.rand(2, 3, AUDIO_DIM)
    with torch.no_grad():
        assert close(pred.predict_each(h, t, torch.ones(2, 7, dtype=torch.bool)), pred.predict_each(h, t), 1e-6)
        for kept in ([0, 1, 2, 3, 5, 6], [1, 4], [6]):
            keep = torch.zeros(2, 7, dtype=torch.bool)
            keep[:, kept] = True
            got = pred.predict_each(h, t, keep)                                # (2, S, D)
            assert close(got, pred.predict_each(h[:, kept], t), 1e-5), kept
            assert not close(got, pred.predict_each(h, t), 1e-3)               # the mask does something


@pytest.mark.parametrize("target", ["centroid", "original", "equivariant"])
def test_occlusion_map_equals_a_loop_of_single_token_removals(target):
    torch.manual_seed(12)
    cfg = small_cfg()
    model = EquiAV(cfg, inter_target=target).eval()
    x = make_inputs(cfg, B=2)
    occ = localize.localize(model, x["x_a"], x["x_v"], x["T_a"], x["T_v"], method="occlusion", chunk=5)
    with torch.no_grad():
        z_a = F.normalize(model.inter_from_tokens("a", model.inter_tokens("a", x["x_a"]), x["T_a"]), dim=-1)
        h = model.inter_tokens("v", x["x_v"])
        s = F.cosine_similarity(z_a, model.inter_from_tokens("v", h, x["T_v"]))
        N = h.shape[1]
        for i in range(N):
            keep = [j for j in range(N) if j != i]
            s_i = F.cosine_similarity(z_a, model.inter_from_tokens("v", h[:, keep], x["T_v"]))
            assert close(occ.flatten(1)[:, i], s - s_i, 1e-5), i


def test_gradient_input_map_equals_a_finite_difference():
    """m_i = sum_d h_id ds/dh_id is the derivative of s when token i is scaled by 1 + eps."""
    torch.manual_seed(13)
    cfg = small_cfg()
    model = EquiAV(cfg).double().eval()
    x = {k: v.double() for k, v in make_inputs(cfg, B=2).items()}
    grad_map = localize.localize(model, x["x_a"], x["x_v"], x["T_a"], x["T_v"],
                                 method="gradient_input")
    with torch.no_grad():
        z_a = F.normalize(model.inter_from_tokens("a", model.inter_tokens("a", x["x_a"]), x["T_a"]), dim=-1)
        h = model.inter_tokens("v", x["x_v"])
        for i in (0, 7, 15):
            s = []
            for eps in (1e-6, -1e-6):
                hi = h.clone()
                hi[:, i] *= 1 + eps
                s.append(F.cosine_similarity(z_a, model.inter_from_tokens("v", hi, x["T_v"])))
            fd = (s[0] - s[1]) / 2e-6
            assert torch.allclose(grad_map.flatten(1)[:, i], fd, atol=1e-7, rtol=1e-5), i


@pytest.mark.parametrize("method", ["occlusion", "gradient", "gradient_raw", "gradient_input",
                                    "token"])
def test_each_map_peaks_at_a_planted_patch_that_dominates_the_similarity(method, monkeypatch):
    """Identity heads and mean pooling (inter target "original"): s = cos(z_a, mean_N h).
    One token carries z_a's direction strongly, the others are small noise: every map
    must put its maximum on that patch. The grey frame's tokens (the integrated gradients'
    baseline) are other small noise."""
    torch.manual_seed(14)
    cfg = small_cfg()
    model = EquiAV(cfg, inter_target="original").eval()
    model.proj_inter_a = model.proj_inter_v = torch.nn.Identity()
    rows, cols = cfg.visual_grid
    x = make_inputs(cfg, B=3)
    z_a = F.normalize(model.inter_from_tokens("a", model.inter_tokens("a", x["x_a"])), dim=-1)       # (3, D)
    h = 0.05 * torch.randn(3, rows * cols, cfg.embed_dim)
    planted = [3, 10, 14]
    for b, k in enumerate(planted):
        h[b, k] = 4.0 * z_a[b]
    grey = 0.05 * torch.randn(1, rows * cols, cfg.embed_dim)

    def tokens(m, xx):
        if m == "a":
            return EquiAV.inter_tokens(model, m, xx)
        return grey if not xx.any() else h          # the grey frame is all zeros, normalized
    monkeypatch.setattr(model, "inter_tokens", tokens)
    maps = localize.localize(model, x["x_a"], x["x_v"], x["T_a"], x["T_v"], method=method,
                             confidence=localize.Confidence(1.0, 0.0))
    assert maps.flatten(1).argmax(1).tolist() == planted
    with pytest.raises(ValueError, match="unknown localization method"):
        localize.localize(model, x["x_a"], x["x_v"], method="saliency")


def test_localize_base_preset_smoke():
    """The maps run at the paper's size (random weights, one clip)."""
    torch.manual_seed(15)
    cfg = get_config("base")
    model = EquiAV(cfg).eval()
    x = make_inputs(cfg, B=1, S=2)
    for method in ("occlusion", "gradient", "gradient_input", "token"):
        m = localize.localize(model, x["x_a"], x["x_v"], x["T_a"], x["T_v"], method=method,
                              confidence=localize.Confidence(1.0, 0.0))
        assert m.shape == (1, 14, 14) and torch.isfinite(m).all() and m.std() > 0, method


# ------------------------------------------------------- model.py copies out alone

def test_model_py_runs_alone_in_an_empty_folder(tmp_path):
    """model.py plus torch is enough: copied into an empty folder and run there in a fresh
    interpreter (no project folder on sys.path), it builds EquiAV and runs a forward."""
    import shutil
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    shutil.copy(os.path.join(here, "model.py"), tmp_path / "model.py")
    script = (
        "import sys, torch\n"
        "from model import EquiAV, get_config\n"
        "assert all('equiav' not in p and p != '' or p == '' for p in sys.path)\n"
        "cfg = get_config('tiny', depth=1, embed_dim=32, num_heads=2, aug_hidden=16, pred_heads=2,\n"
        "                 pred_head_dim=8, proj_hidden=32, proj_dim=16)\n"
        "m = EquiAV(cfg).eval()\n"
        "B, S = 2, 3\n"
        "x_a = torch.randn(B, cfg.audio_length, cfg.mel_bins)\n"
        "x_v = torch.randn(B, 3, cfg.image_size, cfg.image_size)\n"
        "t_a, t_v = torch.rand(B, cfg.audio_aug_dim), torch.rand(B, cfg.visual_aug_dim)\n"
        "T_a, T_v = torch.rand(B, S, cfg.audio_aug_dim), torch.rand(B, S, cfg.visual_aug_dim)\n"
        "out = m(x_a, x_v, x_a, x_v, t_a, t_v, T_a, T_v)\n"
        "assert all(z.shape == (B, 16) and torch.isfinite(z).all() for z in out)\n"
        "print('ok', sorted(k for k in sys.modules if k in ('augment', 'utils', 'convert')))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok []"


def test_original_and_augmented_inputs_end_in_their_own_norms():
    """norm_m ends the originals (z_equi, z_inter), norm_m_aug the augmented views (z_aug):
    they start equal, so change each and see which embeddings move."""
    torch.manual_seed(21)
    cfg = small_cfg()
    model = EquiAV(cfg).eval()
    x = make_inputs(cfg)
    with torch.no_grad():
        base = model(**x)
        for m in ("audio", "visual"):
            encoder = getattr(model, f"{m}_encoder")
            z = m[0]
            for norm, moved, kept in (("norm_aug", ("z_aug",), ("z_equi", "z_inter")),
                                      ("norm", ("z_equi", "z_inter"), ("z_aug",))):
                layer = getattr(encoder, norm)
                saved = layer.bias.clone()
                layer.bias.add_(0.5)
                out = model(**x)
                layer.bias.copy_(saved)
                for name in moved:
                    assert not close(getattr(out, f"{name}_{z}"), getattr(base, f"{name}_{z}"), 1e-3), (norm, name)
                for name in kept:
                    assert close(getattr(out, f"{name}_{z}"), getattr(base, f"{name}_{z}"), 1e-6), (norm, name)
