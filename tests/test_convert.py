"""Checkpoint import (method.md §10), tested the way minGPT tests its weight import:
build weights in the other code's format, run an independent functional
forward of that code's model, convert + load into ours, compare outputs."""

import math

import pytest
import torch
import torch.nn.functional as F

import localize
from augment import AUDIO_SLOTS
from convert import (_fold_raw_affine, convert_official_state_dict, load_equiav,
                     load_mae_checkpoint, load_official_checkpoint)
from finetune import EquiAVClassifier
from model import EquiAV, EquiAVOutput, get_config

CFG = get_config("tiny", audio_length=48, mel_bins=16, image_size=32, patch_size=8, embed_dim=64,
                 depth=2, num_heads=4, aug_hidden=32, pred_heads=2, pred_head_dim=16,
                 proj_hidden=48, proj_dim=24)
D, P, DEPTH = CFG.embed_dim, CFG.patch_size, CFG.depth
T_LEN, F_BINS, IMG = CFG.audio_length, CFG.mel_bins, CFG.image_size
N_A, N_V = (T_LEN // P) * (F_BINS // P), (IMG // P) ** 2
INNER = CFG.pred_heads * CFG.pred_head_dim


# ------------------------------------------------------------- authors' format

def block_keys(prefix, g, with_unused_norms):
    shapes = {"norm1.weight": (D,), "norm1.bias": (D,), "attn.qkv.weight": (3 * D, D),
              "attn.qkv.bias": (3 * D,), "attn.proj.weight": (D, D), "attn.proj.bias": (D,),
              "norm2.weight": (D,), "norm2.bias": (D,), "mlp.fc1.weight": (4 * D, D),
              "mlp.fc1.bias": (4 * D,), "mlp.fc2.weight": (D, 4 * D), "mlp.fc2.bias": (D,)}
    if with_unused_norms:
        for n in ("norm1_a", "norm1_v", "norm2_a", "norm2_v"):
            shapes[f"{n}.weight"], shapes[f"{n}.bias"] = (D,), (D,)
    return {prefix + k: rand(s, g) for k, s in shapes.items()}


def rand(shape, g):
    # fan-in scaled so activations stay O(1); LayerNorm weights around 1
    fan_in = shape[-1] if len(shape) > 1 else 1
    if len(shape) == 4:
        fan_in = shape[1] * shape[2] * shape[3]
    return torch.randn(shape, generator=g, dtype=torch.float64) / math.sqrt(fan_in)


def authors_state_dict(seed=0):
    """The public model's keys (method.md §10) at CFG's sizes, with the prefixes,
    temperature keys and unused block norms the public checkpoints carry."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for s, d_t, n in (("a", 24, N_A), ("v", 18, N_V)):
        sd[f"patch_embed_{s}.proj.weight"] = rand((D, 3, P, P), g)
        sd[f"patch_embed_{s}.proj.bias"] = rand((D,), g)
        sd[f"modality_{s}"] = rand((1, 1, D), g)
        sd[f"pos_embed_{s}"] = rand((1, n, D), g)  # not sin-cos: loading must use these values
        for i in range(DEPTH):
            sd.update(block_keys(f"blocks_{s}.{i}.", g, with_unused_norms=True))
        for nm in (f"norm_{s}", f"norm_{s}_aug"):
            sd[f"{nm}.weight"], sd[f"{nm}.bias"] = 1 + 0.1 * rand((D,), g), rand((D,), g)
        for j, (o, i_) in zip((0, 2, 4), ((32, d_t), (32, 32), (32, 32))):
            sd[f"aug_encoder_{s}.{j}.weight"], sd[f"aug_encoder_{s}.{j}.bias"] = rand((o, i_), g), rand((o,), g)
        c = f"cross_attn_{s}."
        sd[c + "norm_aug.weight"], sd[c + "norm_aug.bias"] = 1 + 0.1 * rand((32,), g), rand((32,), g)
        sd[c + "attn.to_q.weight"], sd[c + "attn.to_q.bias"] = rand((INNER, 32), g), rand((INNER,), g)
        sd[c + "attn.to_k.weight"], sd[c + "attn.to_k.bias"] = rand((INNER, D), g), rand((INNER,), g)
        sd[c + "attn.to_v.weight"], sd[c + "attn.to_v.bias"] = rand((INNER, D), g), rand((INNER,), g)
        sd[c + "attn.to_out.weight"] = rand((D, INNER), g)
        sd[c + "norm.weight"], sd[c + "norm.bias"] = 1 + 0.1 * rand((D,), g), rand((D,), g)
        sd[c + "mlp.fc1.weight"], sd[c + "mlp.fc1.bias"] = rand((4 * D, D), g), rand((4 * D,), g)
        sd[c + "mlp.fc2.weight"], sd[c + "mlp.fc2.bias"] = rand((D, 4 * D), g), rand((D,), g)
        for kind in ("intra", "inter"):
            h = f"pred_{s}_{kind}."
            for fc, norm, (o, i_) in (("fc1", "norm1", (48, D)), ("fc2", "norm2", (48, 48)),
                                      ("fc3", "norm3", (24, 48))):
                sd[h + fc + ".weight"], sd[h + fc + ".bias"] = rand((o, i_), g), rand((o,), g)
                sd[h + norm + ".weight"], sd[h + norm + ".bias"] = 1 + 0.1 * rand((o,), g), rand((o,), g)
    prefixes = ("module.", "__M__.", "module.__M__.", "")
    out = {prefixes[i % 4] + k: v for i, (k, v) in enumerate(sd.items())}
    out["module.loss.temperature"] = torch.tensor(0.07, dtype=torch.float64)
    out["__M__.temperature_intra"] = torch.tensor(0.07, dtype=torch.float64)
    return out, sd


# ------------------------------------- independent functional forward (authors)

def ln(x, sd, name):
    return F.layer_norm(x, x.shape[-1:], sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def lin(x, sd, name):
    return F.linear(x, sd[name + ".weight"], sd.get(name + ".bias"))


def attend(q, k, v, heads):
    """Plain softmax attention: q (B, Sq, heads*hd), k/v (B, N, heads*hd)."""
    B, Sq, E = q.shape
    hd = E // heads
    q, k, v = (t.view(B, -1, heads, hd).transpose(1, 2) for t in (q, k, v))
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return (w @ v).transpose(1, 2).reshape(B, Sq, E)


def ref_encode(sd, s, image3, aug):
    """The public encoder on a 3-channel image (audio: the repeated (F, T) spectrogram)."""
    x = F.conv2d(image3, sd[f"patch_embed_{s}.proj.weight"], sd[f"patch_embed_{s}.proj.bias"], stride=P)
    x = x.flatten(2).transpose(1, 2) + sd[f"pos_embed_{s}"] + sd[f"modality_{s}"]
    for i in range(DEPTH):
        b = f"blocks_{s}.{i}."
        y = lin(ln(x, sd, b + "norm1"), sd, b + "attn.qkv")
        q, k, v = y.chunk(3, dim=-1)
        x = x + lin(attend(q, k, v, CFG.num_heads), sd, b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, sd, b + "norm2"), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return ln(x, sd, f"norm_{s}_aug" if aug else f"norm_{s}")


def ref_predict(sd, s, h, t_raw):
    """u_m with the public raw vectors t_raw (B, S, d_t) -> (B, D)."""
    qg = lambda x: x * torch.sigmoid(1.702 * x)
    e = lin(qg(lin(qg(lin(t_raw, sd, f"aug_encoder_{s}.0")), sd, f"aug_encoder_{s}.2")), sd,
            f"aug_encoder_{s}.4")
    c = f"cross_attn_{s}."
    q = lin(ln(e, sd, c + "norm_aug"), sd, c + "attn.to_q")
    a = attend(q, lin(h, sd, c + "attn.to_k"), lin(h, sd, c + "attn.to_v"), CFG.pred_heads)
    y = h.mean(1, keepdim=True) + F.linear(a, sd[c + "attn.to_out.weight"])
    y = y + lin(F.gelu(lin(ln(y, sd, c + "norm"), sd, c + "mlp.fc1")), sd, c + "mlp.fc2")
    return y.mean(1)


def ref_head(sd, name, x):
    x = F.relu(ln(lin(x, sd, name + ".fc1"), sd, name + ".norm1"))
    x = F.relu(ln(lin(x, sd, name + ".fc2"), sd, name + ".norm2"))
    return ln(lin(x, sd, name + ".fc3"), sd, name + ".norm3")


def audio_to_raw(t):
    """Our normalized audio vectors -> the public code's raw values (method.md §10)."""
    r = t.clone()
    r[..., 1:3] *= T_LEN                 # time-mask start/end in frames
    r[..., 3:5] *= F_BINS                # freq-mask start/end in bins
    r[..., [8, 10]] *= T_LEN / F_BINS    # crop time start / length divided by F
    r[..., [9, 11]] *= F_BINS / T_LEN    # crop freq start / width divided by T
    r[..., 13:17] *= 3                   # colour-jitter order 0..3
    return r


def visual_to_raw(t):
    r = t.clone()
    r[..., 6:10] *= 3
    return r


def ref_forward(sd, x_a, x_v, x_a_aug, x_v_aug, t_a, t_v, T_a, T_v):
    spec3 = lambda s: s.transpose(1, 2).unsqueeze(1).repeat(1, 3, 1, 1)  # (B, 3, F, T)
    out = {}
    for s, x, xa, t, TT, raw in (("a", spec3(x_a), spec3(x_a_aug), t_a, T_a, audio_to_raw),
                                 ("v", x_v, x_v_aug, t_v, T_v, visual_to_raw)):
        h, h_aug = ref_encode(sd, s, x, False), ref_encode(sd, s, xa, True)
        out[f"z_inter_{s}"] = ref_head(sd, f"pred_{s}_inter", ref_predict(sd, s, h, raw(TT)))
        out[f"z_equi_{s}"] = ref_head(sd, f"pred_{s}_intra", ref_predict(sd, s, h, raw(t)[:, None]))
        out[f"z_aug_{s}"] = ref_head(sd, f"pred_{s}_intra", h_aug.mean(1))
    return out


def inputs(B=2, S=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)
    return dict(x_a=r(B, T_LEN, F_BINS), x_v=r(B, 3, IMG, IMG), x_a_aug=r(B, T_LEN, F_BINS),
                x_v_aug=r(B, 3, IMG, IMG), t_a=u(B, 24), t_v=u(B, 18), T_a=u(B, S, 24),
                T_v=u(B, S, 18))


# ---------------------------------------------------------------------- tests

def test_converted_official_checkpoint_reproduces_the_public_model(tmp_path):
    raw_sd, clean_sd = authors_state_dict()
    path = tmp_path / "equiav_official.pth"
    torch.save({"model": raw_sd}, path)
    model = EquiAV(CFG).double().eval()
    report = load_official_checkpoint(model, path)
    assert report.missing == [] and report.unexpected == []
    x = inputs()
    with torch.no_grad():
        ours = model(**x)
        ref = ref_forward(clean_sd, **x)
    for name in EquiAVOutput._fields:
        assert torch.allclose(getattr(ours, name), ref[name], atol=1e-5, rtol=1e-5), name
    # the loaded (non sin-cos) position embeddings are the ones in use
    assert torch.equal(model.audio_encoder.pos_embed, clean_sd["pos_embed_a"])


def test_conversion_key_set_drops_temperature_and_unused_norms():
    raw_sd, _ = authors_state_dict()
    converted = convert_official_state_dict(raw_sd, CFG)
    assert set(converted) == set(EquiAV(CFG).state_dict())
    assert converted["audio_encoder.patch_embed.proj.weight"].shape == (D, 1, P, P)
    # unknown keys pass through so that loading reports them
    extra = convert_official_state_dict({"module.something_new": torch.zeros(1)}, CFG)
    assert list(extra) == ["something_new"]
    report = load_official_checkpoint(EquiAV(CFG), {**raw_sd, "module.something_new": torch.zeros(1)})
    assert report.unexpected == ["something_new"] and report.missing == []


def test_default_scales_are_the_base_sizes():
    """cfg=None means T=1024, F=128: the literal numbers of method.md §10."""
    w, b = torch.randn(8, 24, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    out = convert_official_state_dict({"aug_encoder_a.0.weight": w, "aug_encoder_a.0.bias": b})
    w2 = out["predictor_a.aug_encoder.fc1.weight"]
    expected = {1: 1024, 2: 1024, 3: 128, 4: 128, 6: 1, 8: 8, 9: 1 / 8, 10: 8, 11: 1 / 8,
                13: 3, 14: 3, 15: 3, 16: 3, 0: 1, 23: 1}
    for col, s in expected.items():
        assert torch.allclose(w2[:, col], w[:, col] * s), col
    assert torch.equal(out["predictor_a.aug_encoder.fc1.bias"], b)


def test_fold_absorbs_offsets_into_the_bias():
    g = torch.Generator().manual_seed(3)
    w, b = torch.randn(5, 24, generator=g), torch.randn(5, generator=g)
    table = {"tmask_start": (4.0, 0.5), "flip_on": (1.0, -2.0)}
    w2, b2 = _fold_raw_affine(w, b, AUDIO_SLOTS, table)
    x = torch.rand(7, 24, generator=g)
    raw = x.clone()
    raw[:, AUDIO_SLOTS["tmask_start"]] = 4.0 * x[:, AUDIO_SLOTS["tmask_start"]] + 0.5
    raw[:, AUDIO_SLOTS["flip_on"]] = x[:, AUDIO_SLOTS["flip_on"]] - 2.0
    assert torch.allclose(F.linear(x, w2, b2), F.linear(raw, w, b), atol=1e-5)


def test_shape_mismatch_names_key_and_shapes():
    raw_sd, _ = authors_state_dict()
    bad = dict(raw_sd)
    key = next(k for k in bad if k.endswith("blocks_v.1.mlp.fc1.weight"))
    bad[key] = torch.zeros(3, D, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"visual_encoder\.blocks\.1\.mlp\.fc1\.weight.*\(3, 64\).*\(256, 64\)"):
        load_official_checkpoint(EquiAV(CFG), bad)


def mae_state_dict(seed=5):
    g = torch.Generator().manual_seed(seed)
    sd = {"patch_embed.proj.weight": rand((D, 3, P, P), g), "patch_embed.proj.bias": rand((D,), g),
          "cls_token": rand((1, 1, D), g), "pos_embed": rand((1, 1 + N_V, D), g),
          "norm.weight": 1 + 0.1 * rand((D,), g), "norm.bias": rand((D,), g),
          "mask_token": rand((1, 1, 32), g), "decoder_embed.weight": rand((32, D), g),
          "decoder_embed.bias": rand((32,), g), "decoder_pos_embed": rand((1, 1 + N_V, 32), g),
          "decoder_blocks.0.norm1.weight": rand((32,), g), "decoder_norm.weight": rand((32,), g),
          "decoder_pred.weight": rand((P * P * 3, 32), g)}
    for i in range(DEPTH):
        sd.update(block_keys(f"blocks.{i}.", g, with_unused_norms=False))
    return sd


MAE_UNUSED = ["cls_token", "pos_embed", "mask_token", "decoder_embed.weight", "decoder_embed.bias",
              "decoder_pos_embed", "decoder_blocks.0.norm1.weight", "decoder_norm.weight",
              "decoder_pred.weight"]


def test_mae_checkpoint_initialises_both_encoders(tmp_path):
    mae = mae_state_dict()
    path = tmp_path / "mae.pth"
    torch.save({"model": mae}, path)
    model = EquiAV(CFG).double().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_mae_checkpoint(model, path)
    assert sorted(report.unexpected) == sorted(MAE_UNUSED)
    sd = model.state_dict()
    for enc in ("audio_encoder", "visual_encoder"):
        for k, v in mae.items():
            if k.startswith("blocks."):
                assert torch.equal(sd[f"{enc}.{k}"], v), k
        for n in ("norm", "norm_aug"):
            assert torch.equal(sd[f"{enc}.{n}.weight"], mae["norm.weight"])
        for k in ("pos_embed", "modality_embed"):  # not from MAE: kept as initialised
            assert torch.equal(sd[f"{enc}.{k}"], before[f"{enc}.{k}"])
            assert f"{enc}.{k}" in report.missing
    assert torch.equal(sd["visual_encoder.patch_embed.proj.weight"], mae["patch_embed.proj.weight"])
    assert torch.allclose(sd["audio_encoder.patch_embed.proj.weight"],
                          mae["patch_embed.proj.weight"].sum(1, keepdim=True))
    assert not any(k.startswith(("audio_encoder.", "visual_encoder.")) and
                   not k.endswith(("pos_embed", "modality_embed")) for k in report.missing)
    assert "proj_inter_a.fc1.weight" in report.missing
    # functional check: our 1-channel audio encoder == MAE weights on the 3-channel image
    ref_sd = {f"blocks_a.{k[len('blocks.'):]}": v for k, v in mae.items() if k.startswith("blocks.")}
    ref_sd.update({"patch_embed_a.proj.weight": mae["patch_embed.proj.weight"],
                   "patch_embed_a.proj.bias": mae["patch_embed.proj.bias"],
                   "pos_embed_a": sd["audio_encoder.pos_embed"],
                   "modality_a": sd["audio_encoder.modality_embed"],
                   "norm_a.weight": mae["norm.weight"], "norm_a.bias": mae["norm.bias"]})
    spec = inputs()["x_a"]
    with torch.no_grad():
        ours = model.audio_encoder(spec)
    ref = ref_encode(ref_sd, "a", spec.transpose(1, 2).unsqueeze(1).repeat(1, 3, 1, 1), aug=False)
    assert torch.allclose(ours, ref, atol=1e-6)


def test_mae_checkpoint_into_classifier_and_shape_error():
    mae = mae_state_dict()
    clf = EquiAVClassifier(CFG, num_classes=4, mode="audio").double()
    report = load_mae_checkpoint(clf, mae)
    assert torch.equal(clf.audio_encoder.blocks[1].mlp.fc2.weight, mae["blocks.1.mlp.fc2.weight"])
    assert sorted(report.unexpected) == sorted(MAE_UNUSED)
    assert sorted(report.missing) == ["audio_encoder.modality_embed", "audio_encoder.pos_embed",
                                      "head.bias", "head.weight"]
    bad = dict(mae)
    bad["blocks.0.attn.qkv.weight"] = torch.zeros(3 * D, D + 1, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"audio_encoder\.blocks\.0\.attn\.qkv\.weight.*\(192, 65\).*\(192, 64\)"):
        load_mae_checkpoint(clf, bad)


def test_scripts_load_an_authors_checkpoint_through_the_conversion(tmp_path):
    """convert.load_equiav (used by retrieval.py and finetune.py) tells an authors'
    file from ours and converts it: the float32 model matches the reference forward."""
    raw_sd, clean_sd = authors_state_dict()
    path = tmp_path / "equiav_official.pth"
    torch.save({"model": raw_sd}, path)
    model = load_equiav(str(path), CFG).eval()
    assert next(model.parameters()).dtype == torch.float32
    x = inputs()
    with torch.no_grad():
        ours = model(**{k: v.float() for k, v in x.items()})
        ref = ref_forward(clean_sd, **x)
    for name in EquiAVOutput._fields:
        torch.testing.assert_close(getattr(ours, name).double(), ref[name], atol=1e-4, rtol=1e-4)

    # the localization maps of method.md §13 run on the converted model
    for method in localize.MAPS:
        m = localize.localize(model, x["x_a"].float(), x["x_v"].float(), x["T_a"].float(),
                              x["T_v"].float(), method=method,
                              confidence=localize.Confidence(1.0, 0.0))
        assert m.shape == (x["x_a"].shape[0], *CFG.visual_grid) and torch.isfinite(m).all()
