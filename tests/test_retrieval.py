import math
import os

import pytest
import torch
import torch.nn.functional as F

import localize
import retrieval


# ---------------------------------------------------------------------------
# Retrieval metrics on embeddings with a known ranking
# ---------------------------------------------------------------------------

def _brute_force_ranks(q, k):
    """Rank of key i for query i by a full stable sort of each row."""
    sim = q @ k.T
    order = torch.sort(-sim, dim=1, stable=True).indices
    return torch.tensor([(order[i] == i).nonzero().item() + 1 for i in range(q.shape[0])])


def test_retrieval_metrics_known_ranking():
    v = torch.eye(4)
    a = F.normalize(torch.tensor([[1.0, 0.0, 0.0, 0.0],      # partner first:  rank 1
                                  [0.9, 0.1, 0.0, 0.0],      # clip 0 closer:  rank 2
                                  [0.5, 0.4, 0.3, 0.0],      # clips 0, 1:     rank 3
                                  [0.0, 0.0, 0.0, 1.0]]), dim=-1)
    m = retrieval.retrieval_metrics(a, v)
    assert m["a2v_R@1"] == pytest.approx(50.0)
    assert m["a2v_R@5"] == m["a2v_R@10"] == pytest.approx(100.0)
    assert m["a2v_medr"] == 1.0        # 0-based ranks 0,0,1,2: median 0.5, floored, +1
    # visual -> audio: video clip 1 finds audio 1 (0.110) below audio 2 (0.566): rank 2;
    # video clip 2 finds audio 2 first: rank 1; clips 0 and 3: rank 1
    assert m["v2a_R@1"] == pytest.approx(75.0)
    assert m["v2a_medr"] == 1.0
    assert set(m) == {f"{d}_{k}" for d in ("a2v", "v2a")
                      for k in ("R@1", "R@5", "R@10", "medr")}


def test_retrieval_ties_are_ranked_like_a_stable_sort():
    # identical embeddings: query i finds its partner after the i clips before it
    z = F.normalize(torch.ones(10, 3), dim=-1)
    m = retrieval.retrieval_metrics(z, z, chunk_size=3)
    assert (m["a2v_R@1"], m["a2v_R@5"], m["a2v_R@10"]) == pytest.approx((10.0, 50.0, 100.0))
    assert m["a2v_medr"] == 5.0        # ranks 1..10: 0-based median 4.5 -> 4 + 1


def test_retrieval_chunking_matches_full_matrix_and_brute_force():
    g = torch.Generator().manual_seed(0)
    z_a = F.normalize(torch.randn(57, 8, generator=g), dim=-1)
    z_v = F.normalize(z_a + 0.8 * torch.randn(57, 8, generator=g), dim=-1)
    full = retrieval.retrieval_metrics(z_a, z_v, chunk_size=4096)
    for chunk in (1, 7, 56):
        assert retrieval.retrieval_metrics(z_a, z_v, chunk_size=chunk) == full
    ranks = retrieval._ranks(z_a, z_v, 5)
    assert torch.equal(ranks, _brute_force_ranks(z_a, z_v))
    assert full["a2v_R@5"] == pytest.approx(100 * (ranks <= 5).float().mean().item())
    ranks_v = _brute_force_ranks(z_v, z_a)
    assert full["v2a_R@1"] == pytest.approx(100 * (ranks_v == 1).float().mean().item())
    assert full["v2a_medr"] == math.floor(float(torch.quantile((ranks_v - 1).double(), 0.5))) + 1


def test_retrieval_metrics_rejects_bad_input():
    # (speed is measured in bench.py, not asserted here)
    z = F.normalize(torch.randn(10, 8, generator=torch.Generator().manual_seed(1)), dim=-1)
    with pytest.raises(ValueError, match="equal shape"):
        retrieval.retrieval_metrics(z, z[:9])
    with pytest.raises(ValueError, match="at least one clip"):
        retrieval.retrieval_metrics(z[:0], z[:0])
    with pytest.raises(ValueError, match="chunk_size must be positive"):
        retrieval.retrieval_metrics(z, z, chunk_size=0)


# ---------------------------------------------------------------------------
# Deterministic embeddings
# ---------------------------------------------------------------------------

class _Clips(torch.utils.data.Dataset):
    """Random clips in the dataset's dict format (an evaluation split)."""
    train = False

    def __init__(self, n, cfg, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.audio = torch.randn(n, cfg.audio_length, cfg.mel_bins, generator=g)
        self.frame = torch.rand(n, 3, cfg.image_size, cfg.image_size, generator=g)

    def __len__(self):
        return len(self.audio)

    def __getitem__(self, i):
        return {"audio": self.audio[i], "frame": self.frame[i], "index": i}


@pytest.fixture(scope="module")
def tiny_equiav():
    from model import EquiAV, get_config
    torch.manual_seed(0)
    return EquiAV(get_config("tiny", depth=1)).eval()


def test_extract_embeddings_deterministic_and_in_dataset_order(tiny_equiav):
    model = tiny_equiav
    ds = _Clips(7, model.cfg)
    backwards = torch.utils.data.DataLoader(ds, batch_size=3, sampler=list(range(6, -1, -1)))
    z_a, z_v = retrieval.extract_embeddings(model, backwards, "cpu", S=4, seed=3)
    # reference: every clip in one batch, the seeded centroid vectors shared by all clips
    T_a, T_v = retrieval.centroid_vectors(model.cfg, 4, 3)
    import augment
    ref_a, ref_v = model.embed(ds.audio, augment.normalize_image(ds.frame),
                               T_a.expand(7, -1, -1), T_v.expand(7, -1, -1))
    torch.testing.assert_close(z_a, ref_a, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(z_v, ref_v, atol=1e-5, rtol=1e-4)
    assert torch.allclose(z_a.norm(dim=1), torch.ones(7))
    # another batch size gives the same embeddings; another seed does not
    again = retrieval.extract_embeddings(model, torch.utils.data.DataLoader(ds, batch_size=5),
                                         "cpu", S=4, seed=3)
    torch.testing.assert_close(again[0], z_a, atol=1e-5, rtol=1e-4)
    other = retrieval.extract_embeddings(model, torch.utils.data.DataLoader(ds, batch_size=5),
                                         "cpu", S=4, seed=4)
    assert not torch.allclose(other[0], z_a, atol=1e-4)

    class _Train(_Clips):
        train = True
    with pytest.raises(ValueError, match="evaluation dataset"):
        retrieval.extract_embeddings(model, torch.utils.data.DataLoader(_Train(2, model.cfg)),
                                     "cpu")


# ---------------------------------------------------------------------------
# Localization
# ---------------------------------------------------------------------------

def test_upsampled_map_peaks_inside_the_planted_patch():
    g = torch.Generator().manual_seed(0)
    grid = 0.1 * torch.rand(3, 6, 6, generator=g)
    planted = [(0, 0), (2, 5), (4, 3)]                # (row, col) of the most similar patch
    for b, (r, c) in enumerate(planted):
        grid[b, r, c] = 1.0
    maps = localize.upsample_maps(grid, (96, 96))
    assert maps.shape == (3, 96, 96)
    peaks = localize.map_peaks(maps)                  # (x, y) fractions
    for b, (r, c) in enumerate(planted):
        x, y = peaks[b].tolist()
        assert c / 6 <= x < (c + 1) / 6 and r / 6 <= y < (r + 1) / 6
        # points_in_boxes agrees: inside the planted patch's box, outside a far one
        box = [[c / 6, r / 6, (c + 1) / 6, (r + 1) / 6]]
        assert localize.points_in_boxes(peaks[b:b + 1], [box]).item()
        far = [[(c + 3) % 6 / 6, (r + 3) % 6 / 6, ((c + 3) % 6 + 1) / 6, ((r + 3) % 6 + 1) / 6]]
        assert not localize.points_in_boxes(peaks[b:b + 1], [far]).item()


def test_localization_maps_match_token_similarities(tiny_equiav):
    model = tiny_equiav
    ds = _Clips(2, model.cfg, seed=1)
    T_a, T_v = retrieval.centroid_vectors(model.cfg, 4, 0)
    maps = localize.localization_maps(model, ds.audio, ds.frame, T_a, T_v, method="token")
    assert maps.shape == (2, 96, 96)                   # the frame's shape
    # independent computation: z_inter_a against every visual token through g_inter_v
    import augment
    z_a, _ = model.embed(ds.audio, augment.normalize_image(ds.frame), T_a.expand(2, -1, -1),
                         retrieval.centroid_vectors(model.cfg, 4, 0)[1].expand(2, -1, -1))
    tokens = F.normalize(model.proj_inter_v(model.visual_encoder(augment.normalize_image(ds.frame))), dim=-1)
    sim = torch.einsum("bd,bnd->bn", z_a, tokens).view(2, 6, 6)   # rows, cols of the patch grid
    torch.testing.assert_close(maps, localize.upsample_maps(sim, (96, 96)), atol=1e-5, rtol=1e-4)
    # the peak lies in the patch of the highest token similarity
    r, c = divmod(sim[0].argmax().item(), 6)
    x, y = localize.map_peaks(maps)[0].tolist()
    assert c / 6 <= x < (c + 1) / 6 and r / 6 <= y < (r + 1) / 6


def test_localization_grid_png(tmp_path):
    from PIL import Image
    frames = torch.full((3, 3, 16, 20), 0.5)
    maps = torch.zeros(3, 16, 20)
    maps[:, 4, 10] = 1.0                               # the hottest pixel
    path = tmp_path / "grid.png"
    localize.save_localization_grid(str(path), frames, maps, boxes=[[[0, 0, 0.5, 0.5]]] * 3,
                                     captions=["a", "b", "c"], cols=2, scale=1)
    img = Image.open(path)
    assert img.size == (2 * (2 * 20 + 2 + 6) + 6, 2 * (16 + 14 + 6) + 6)
    # heat colours: cold is blue, hot is red; the overlay is half frame, half colour
    torch.testing.assert_close(localize.heat_colors(torch.tensor([[0.0, 1.0]]))[:, 0],
                               torch.tensor([[0.0, 0.5], [0.0, 0.0], [0.5, 0.0]]))
    px = img.getpixel((6 + 20 + 2 + 3, 6 + 14 + 12))   # a cold pixel of clip 0's overlay
    assert px[2] > px[0]


# ---------------------------------------------------------------------------
# The script, end to end on a very small toy dataset
# ---------------------------------------------------------------------------

def test_retrieval_script_end_to_end(tmp_path, tiny_equiav, monkeypatch):
    import dataclasses
    import json

    import data
    import toy
    import utils
    root = tmp_path / "toy"
    toy.make_toy_dataset(root, n_train=8, n_test=8, n_retrieval=8, n_train_multilabel=0,
                         n_test_multilabel=0, n_distractor=4, num_workers=0)
    ckpt = tmp_path / "pretrain" / "checkpoint.pt"
    utils.save_checkpoint({"model": tiny_equiav.state_dict(),
                           "model_config": dataclasses.asdict(tiny_equiav.cfg),
                           "model_flags": {"use_centroid": True, "equivariant": True},
                           "norm_stats": [-5.0, 4.0]}, ckpt)
    cfg = retrieval.RetrievalConfig(checkpoint=str(ckpt), toy_root=str(root),
                                    out_dir=str(tmp_path / "out"), batch_size=4, num_workers=0,
                                    localize=3, figure_distractors=2, S=4, device="cpu")
    res = retrieval.main(cfg)
    saved = json.loads((tmp_path / "out" / "retrieval.json").read_text())
    assert saved["n_clips"] == 8 and saved["norm_stats"] == [-5.0, 4.0]   # the checkpoint's
    for key, value in saved["retrieval"].items():
        assert value == pytest.approx(res["retrieval"][key])
        if "R@" in key:   # percentages of 8 clips
            assert value * 8 / 100 == pytest.approx(round(value * 8 / 100))
    assert saved["retrieval"]["a2v_R@10"] == 100.0
    assert -1 <= saved["equivariance"]["similarity_v"] <= 1
    loc = saved["localization"]
    assert loc["method"] == "gradient" and (tmp_path / "out" / "figure3.png").exists()
    # the gate was fitted on the toy's training clips and stored beside the checkpoint, where
    # it is found again while the checkpoint is unchanged and fitted anew when it changes
    stored = json.loads((tmp_path / "pretrain" / "checkpoint_confidence.json").read_text())
    assert stored["clips"] == 8 and loc["confidence"] == {"a": stored["a"], "b": stored["b"]}
    fits = []
    monkeypatch.setattr(localize, "fit_confidence", lambda *a: fits.append(1) or
                        localize.Confidence(1.0, 0.0))
    def dataset_of(path):
        return data.AudioVisualDataset(path, train=False, norm_mean=-5.0, norm_std=4.0,
                                       audio_length=tiny_equiav.cfg.audio_length,
                                       mel_bins=tiny_equiav.cfg.mel_bins,
                                       image_size=tiny_equiav.cfg.image_size)
    again = retrieval.fitted_confidence(tiny_equiav, cfg, dataset_of, torch.device("cpu"))
    assert again == (stored["a"], stored["b"]) and not fits
    os.utime(ckpt, ns=(1, 1))
    assert retrieval.fitted_confidence(tiny_equiav, cfg, dataset_of, torch.device("cpu")) == (1.0, 0.0)
    assert fits == [1]
    # negative sounds: the toy's three manifests were written beside its retrieval split
    assert set(loc["negatives"]["pia"]) == {"true", "silence", "noise", "offscreen"}
    assert set(loc["negatives"]["auroc"]) == {"silence", "noise", "offscreen"}
    assert (tmp_path / "out" / "negatives.png").exists()
    assert set(loc["against_baselines"]) == set(k for k, v in loc["manifest"]["baselines"].items()
                                                if isinstance(v, dict))
    assert loc["manifest"]["n_clips"] == 8 and 0.0 <= loc["manifest"]["sounding"]["pointing_game"] <= 100.0
    # the centre baseline, recomputed from the manifest's boxes
    entries = data.read_manifest(toy.toy_paths(root)["retrieval"])
    centre = [any(b[0] <= 0.5 <= b[2] and b[1] <= 0.5 <= b[3]
                  for b in (data.box_in_crop(box, e["frame_size"], 96)
                            for box in e["boxes"][data.EVAL_FRAME])) for e in entries]
    assert loc["manifest"]["baselines"]["centre_point"]["pointing_game"] == pytest.approx(100.0 * sum(centre) / 8)
    # the distractor split and its swap: sounding and silent objects scored apart, paired
    d, w = loc["distractor"], loc["distractor_swap"]
    assert d["n_clips"] == w["n_clips"] == 4 and "silent" in d and "silent" in w
    both = [a and b for a, b in zip(d["sounding"]["hits"], w["sounding"]["hits"])]
    assert loc["follows_sound"] == pytest.approx(100.0 * sum(both) / 4)
    # 3 manifest clips and 2 distractor clips, each a row of two (frame, map) pairs
    from PIL import Image
    width, height = Image.open(tmp_path / "out" / "figure3.png").size
    assert height == 5 * (2 * 96 + 14 + 6) + 6


def test_localization_scores_planted_maps(tmp_path, monkeypatch):
    """Maps planted at the middle of each clip's sounding box (or, negated, with the sign
    flipped) on a distractor split: the pointing game is 100 % on the sounding object
    and 0 % on the silent one (the minimum diagnostic the other way round)."""
    import data
    import toy
    root = tmp_path / "toy"
    toy.make_toy_dataset(root, n_train=0, n_test=1, n_retrieval=1, n_train_multilabel=0,
                         n_test_multilabel=0, n_distractor=6, num_workers=0)
    manifest = toy.toy_paths(root)["test_distractor"]
    entries = data.read_manifest(manifest)
    ds = data.AudioVisualDataset(manifest, audio_length=256, mel_bins=64, image_size=96,
                                 train=False, norm_mean=0.0, norm_std=1.0)
    size = 96

    def planted(sign):
        def fake_maps(model, audio, frame, T_a, T_v, method, amp=False, chunk=64, confidence=None):
            out = torch.zeros(audio.shape[0], size, size)
            for j in range(audio.shape[0]):
                e = entries[fake_maps.seen + j]
                box = e["boxes"][data.EVAL_FRAME][e["sounding"][0]]
                x0, y0, x1, y1 = data.box_in_crop(box, e["frame_size"], size)
                # the box's middle pixel (the box edges hold no pixel centres safely)
                out[j, int((y0 + y1) / 2 * size), int((x0 + x1) / 2 * size)] = sign
            fake_maps.seen += audio.shape[0]
            return out
        fake_maps.seen = 0
        return fake_maps

    monkeypatch.setattr(localize, "localization_maps", planted(1.0))
    score = localize.evaluate_localization(None, ds, entries, None, None, "cpu", batch_size=4)
    assert score["n_clips"] == 6
    assert score["sounding"]["pointing_game"] == 100.0 and score["silent"]["pointing_game"] == 0.0
    assert score["minimum_in_box"] < 100.0
    monkeypatch.setattr(localize, "localization_maps", planted(-1.0))
    score = localize.evaluate_localization(None, ds, entries, None, None, "cpu", batch_size=4)
    assert score["minimum_in_box"] == 100.0 and score["sounding"]["pointing_game"] < 100.0
    by_size = score["minimum_in_box_by_size"]
    assert sum(n for _, n in by_size.values()) == 6
    assert all(share == 100.0 for share, n in by_size.values() if n)


def test_ciou_auc_and_binarization_against_hand_made_masks():
    # min-max normalised, cut at the value at position H W / 2 = 8 of the ascending order
    m = torch.arange(16.0).view(1, 4, 4) * 3 - 5     # distinct values: the top 7 pixels
    pred = localize.binarize(m)[0]
    assert pred.flatten().tolist() == [False] * 9 + [True] * 7
    gt = torch.zeros(1, 4, 4, dtype=torch.bool)
    gt[0, 2:, 2:] = True        # pixels 10, 11, 14, 15: all predicted; 9, 12, 13 predicted outside
    assert localize.ciou(pred[None], gt).item() == pytest.approx(4 / (4 + 3))
    flat = localize.binarize(torch.ones(1, 4, 4))   # a flat map predicts nothing
    assert not flat.any() and localize.ciou(flat, gt).item() == 0.0
    # cIoU@0.5, mean and AUC by brute force over 21 thresholds (trapezoid)
    g = torch.Generator().manual_seed(0)
    cious = torch.rand(50, generator=g, dtype=torch.float64)
    got = localize.ciou_scores(cious)
    xs = [k / 20 for k in range(21)]
    frac = [sum(float(c) >= x for c in cious) / 50 for x in xs]
    auc = sum((frac[k] + frac[k + 1]) / 2 * 0.05 for k in range(20))
    assert got["auc"] == pytest.approx(auc)
    assert got["ciou@0.5"] == pytest.approx(100 * sum(float(c) >= 0.5 for c in cious) / 50)
    assert got["mean_ciou"] == pytest.approx(cious.mean().item())
    # box masks: pixel centres inside; a perfect prediction scores 1, a disjoint one 0
    mask = localize.box_masks([[[0.0, 0.0, 0.5, 0.5]], [[0.5, 0.5, 1.0, 1.0]]], 4, 4)
    assert mask[0].nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]
    assert localize.ciou(mask, mask).tolist() == [1.0, 1.0]
    assert localize.ciou(mask[[1, 0]], mask).tolist() == [0.0, 0.0]


def test_boxes_follow_the_crop_and_flip_of_a_view():
    import augment
    t = augment.visual_identity(1)[0]
    S = augment.VISUAL_SLOTS
    t[S["rrc_top"]], t[S["rrc_left"]], t[S["rrc_height"]], t[S["rrc_width"]] = 0.5, 0.25, 0.5, 0.5
    assert localize.boxes_after_view([[0.25, 0.5, 0.5, 0.75]], t) == [[0.0, 0.0, 0.5, 0.5]]
    t[S["flip_on"]] = 1.0
    assert localize.boxes_after_view([[0.25, 0.5, 0.5, 0.75]], t) == [[0.5, 0.0, 1.0, 0.5]]
    assert localize.boxes_after_view([[0.0, 0.0, 0.2, 0.2]], t) == []   # outside the crop


# ---------------------------------------------------------------------------
# Equivariance measures
# ---------------------------------------------------------------------------

def test_ridge_r2_known_answers():
    g = torch.Generator().manual_seed(0)
    t = torch.rand(400, 3, generator=g)
    mix = torch.randn(3, 8, generator=g)
    x = t @ mix + 0.5                                   # contains t linearly
    res, tot = retrieval.ridge_r2(x[::2], t[::2], x[1::2], t[1::2], lam=1e-6)
    assert (1 - res / tot).min() > 0.999
    const = torch.ones(400, 8)                          # knows nothing about t
    res, tot = retrieval.ridge_r2(const[::2], t[::2], const[1::2], t[1::2], lam=1.0)
    assert (1 - res / tot).abs().max() < 0.05
    # pooled per group: 1 - sum SS_res / sum SS_tot over the group's columns
    r2 = retrieval.group_r2(torch.tensor([1.0, 3.0, 0.0]), torch.tensor([2.0, 6.0, 0.0]),
                            {"a": 0, "b": 1, "c": 2}, {"ab": ("a", "b"), "c": ("c",)})
    assert r2["ab"] == pytest.approx(0.5) and math.isnan(r2["c"])


def test_equivariance_metrics_deterministic_and_known_answers(tiny_equiav, monkeypatch):
    model = tiny_equiav
    ds = _Clips(12, model.cfg, seed=2)
    a = retrieval.equivariance_metrics(model, torch.utils.data.DataLoader(ds, batch_size=5),
                                       "cpu", seed=1)
    b = retrieval.equivariance_metrics(model, torch.utils.data.DataLoader(ds, batch_size=12),
                                       "cpu", seed=1)
    assert a["similarity_v"] == pytest.approx(b["similarity_v"], abs=1e-6)
    assert a["r2_a"]["flip"] == pytest.approx(b["r2_a"]["flip"], abs=1e-6)
    assert -1 <= a["similarity_a"] <= 1 and set(a["r2_v"]) == set(retrieval.augment.VISUAL_GROUPS)
    # the similarity is the mean cosine of what intra_embeddings returns for t
    import augment
    g = torch.Generator().manual_seed(2)
    t_a = augment.sample_audio_params(12, g, model.cfg.audio_length, model.cfg.mel_bins)
    equi, aug, ident = retrieval.intra_embeddings(model, "a", ds.audio, augment.apply_audio(ds.audio, t_a), t_a)
    assert b["similarity_a"] == pytest.approx(F.cosine_similarity(equi, aug).mean().item(), abs=1e-5)
    assert b["identity_similarity_a"] == pytest.approx(
        F.cosine_similarity(ident, aug).mean().item(), abs=1e-5)

    # an "encoder" whose augmented embedding holds t linearly scores R^2 ~ 1 in every group
    def holds_t(model, m, x, x_aug, t):
        z = torch.cat([t, torch.full((t.shape[0], 1), 1e3)], dim=1)
        return z, z, z
    monkeypatch.setattr(retrieval, "intra_embeddings", holds_t)
    big = _Clips(200, model.cfg, seed=3)
    eq = retrieval.equivariance_metrics(model, torch.utils.data.DataLoader(big, batch_size=50),
                                        "cpu", lam=1e-9)
    for m in ("a", "v"):
        assert min(eq[f"r2_{m}"].values()) > 0.99, eq[f"r2_{m}"]


def test_augmented_views_identity_reproduces_clean_and_groups_differ(tiny_equiav, monkeypatch):
    model = tiny_equiav
    ds = _Clips(10, model.cfg, seed=4)
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    clean = retrieval.retrieval_metrics(*retrieval.extract_embeddings(model, loader, "cpu", S=4))
    views = retrieval.augmented_views(model, loader, "cpu", S=4)
    import augment
    assert set(views["audio"]) == {*augment.AUDIO_GROUPS, "all"}
    assert set(views["visual"]) == {*augment.VISUAL_GROUPS, "all"}
    z_clean = retrieval.extract_embeddings(model, loader, "cpu", S=4)
    # a group's views are other inputs: the embeddings of that side move
    t = augment.sample_visual_params(10, torch.Generator().manual_seed(1), 32, 32)
    z_view = retrieval.extract_embeddings(model, loader, "cpu", S=4, view=("v", t))
    assert torch.equal(z_view[0], z_clean[0]) and not torch.allclose(z_view[1], z_clean[1])
    # the identity augmentation in every group reproduces clean retrieval exactly
    monkeypatch.setattr(augment, "sample_audio_params", lambda n, *a, **k: augment.audio_identity(n))
    monkeypatch.setattr(augment, "sample_visual_params", lambda n, *a, **k: augment.visual_identity(n))
    # (the patch also makes the centroid vectors the identity: compare under the same patch)
    clean_here = retrieval.retrieval_metrics(*retrieval.extract_embeddings(model, loader, "cpu", S=4))
    same = retrieval.augmented_views(model, loader, "cpu", S=4)
    for rows in same.values():
        for metrics in rows.values():
            assert metrics == clean_here
    assert any(m != clean for rows in views.values() for m in rows.values())


# ---------------------------------------------------------------------------
# Localization scored at any object size, and under negative sounds
# ---------------------------------------------------------------------------

def test_iou_at_box_area_takes_as_many_patches_as_the_box_has():
    # 4 x 4 patch grid of 16-pixel patches; the box covers patches (1..2, 1..2): k = 4
    box = [[[0.25, 0.25, 0.75, 0.75]]]
    on = torch.zeros(1, 64, 64)
    on[0, 16:48, 16:48] = 1.0                               # exactly the box's patches
    half = torch.zeros(1, 64, 64)
    half[0, 16:48, 16:32] = 2.0                             # two of them, ...
    half[0, 0:16, 0:32] = 1.0                               # ... then two outside
    off = torch.zeros(1, 64, 64)
    off[0, 48:, :] = torch.arange(64.0)                     # the bottom row of patches only
    assert localize.iou_at_area(on, box, (4, 4)).item() == 1.0
    assert localize.iou_at_area(half, box, (4, 4)).item() == pytest.approx(2 / 6)
    assert localize.iou_at_area(off, box, (4, 4)).item() == 0.0


def test_pointing_by_object_size_and_baselines_scored_like_maps():
    # three clips: a small (6 %), a middle (25 %) and a large (56 %) box, all centred
    boxes = [[[0.38, 0.38, 0.62, 0.62]], [[0.25, 0.25, 0.75, 0.75]], [[0.12, 0.12, 0.87, 0.87]]]
    sizes = localize.object_sizes(boxes, 96, 96)
    assert [localize.by_size(torch.ones(3), sizes)[k][1] for k in localize.SIZE_BUCKETS] == [1, 1, 1]
    corner = torch.zeros(3, 96, 96)
    corner[:, 2, 2] = 1.0                                   # every maximum in the corner
    s = localize.score_maps(corner, boxes)
    assert s["pointing_game"] == 0.0 and all(v[0] == 0.0 for v in s["pointing_by_size"].values())
    base = localize.baseline_maps(3, 96, 96)
    centre = localize.score_maps(base["centre_point"], boxes)
    assert centre["pointing_game"] == 100.0                 # centred boxes: the centre hits
    assert centre["iou_at_area"] > localize.score_maps(corner, boxes)["iou_at_area"]
    rand = localize.score_maps(base["random_point"], [[[0.0, 0.0, 1.0, 1.0]]] * 3)
    assert rand["pointing_game"] == 100.0                   # the whole frame: any point hits


def test_negative_sounds_threshold_is_fixed_on_the_true_maps(tmp_path, monkeypatch):
    """Planted maps: the true sound's peak at 2 (threshold = half the median maximum = 1)
    over a 10 % patch; silence lights the whole frame at 1.5; the confidence follows the
    planted values. pIA, AUROC and the threshold come out as the rules say."""
    import data
    import toy
    root = tmp_path / "toy"
    toy.make_toy_dataset(root, n_train=0, n_test=4, n_retrieval=4, n_train_multilabel=0,
                         n_test_multilabel=0, n_distractor=0, num_workers=0)
    manifests = toy.negative_manifests(root, "retrieval")
    kw = dict(audio_length=256, mel_bins=64, image_size=96, train=False, norm_mean=0.0,
              norm_std=1.0)
    ds = data.AudioVisualDataset(toy.toy_paths(root)["retrieval"], **kw)
    silent = data.AudioVisualDataset(manifests["silence"], **kw)
    is_silence = {}

    def fake_maps(model, audio, frame, T_a, T_v, method, amp=False, chunk=64, confidence=None):
        quiet = audio.flatten(1).std(1) < 1e-6             # digital silence: a constant fbank
        m = torch.zeros(audio.shape[0], 96, 96)
        m[:, :30, :30] = 2.0                               # 900 / 9216 of the frame
        m[quiet] = 1.5
        is_silence["seen"] = quiet
        return m

    monkeypatch.setattr(localize, "localization_maps", fake_maps)
    monkeypatch.setattr(localize, "_confidence", lambda *a: 1.0 - is_silence["seen"].float())
    out, frames, maps = localize.evaluate_negatives(None, ds, {"silence": silent}, None, None,
                                                    "cpu", batch_size=2)
    assert out["threshold"] == 1.0
    assert out["pia"]["true"] == pytest.approx(100 * 900 / 9216)
    assert out["pia"]["silence"] == 100.0
    assert out["auroc"]["silence"] == 1.0 and frames.shape == (4, 3, 96, 96)
    scored = {"sounding": {"pointing_game": 50.0, "iou_at_area": 0.5},
              "baselines": {"centre_point": {"pointing_game": 40.0, "iou_at_area": 0.25},
                            "gaussian": {"pointing_game": 0.0, "iou_at_area": 0.4}, "n": 3}}
    ratios = localize.against_baselines(scored)
    assert ratios == {"centre_point": {"pointing_game": 1.25, "iou_at_area": 2.0},
                      "gaussian": {"pointing_game": None, "iou_at_area": 1.25}}


def test_attention_map_is_the_predictor_softmax_over_patches(tiny_equiav):
    model = tiny_equiav
    g = torch.Generator().manual_seed(1)
    h = torch.randn(2, 36, model.cfg.embed_dim, generator=g)
    t = torch.rand(2, 3, model.cfg.visual_aug_dim, generator=g)
    p = model.predictor_v
    with torch.no_grad():
        a = p.attention(h, t)                                            # (2, 3, 36)
        q = p.to_q(p.norm_aug(p.aug_encoder(t))).view(2, 3, p.num_heads, -1)
        k = p.to_k(h).view(2, 36, p.num_heads, -1)
        for head in range(p.num_heads):   # one head by hand
            w = (q[:, :, head] @ k[:, :, head].transpose(1, 2) / q.shape[-1] ** 0.5).softmax(-1)
            if head == 0:
                total = w
            else:
                total = total + w
    assert torch.allclose(a, total / p.num_heads, atol=1e-6)
    assert torch.allclose(a.sum(-1), torch.ones(2, 3), atol=1e-5)


def test_integrated_gradients_add_up_to_the_similarity_gained_over_a_grey_frame(tiny_equiav):
    import copy

    import augment
    model = copy.deepcopy(tiny_equiav).double()   # the limit is checked in float64
    ds = _Clips(2, model.cfg, seed=2)
    T_a, T_v = (t.expand(2, -1, -1).double() for t in retrieval.centroid_vectors(model.cfg, 4, 0))
    x_v = augment.normalize_image(ds.frame).double()
    ds.audio = ds.audio.double()
    with torch.no_grad():
        z_a = F.normalize(model.inter_from_tokens("a", model.inter_tokens("a", ds.audio), T_a), dim=-1)
        h = model.inter_tokens("v", x_v)
        h0 = model.inter_tokens("v", torch.zeros_like(x_v[:1])).expand_as(h)   # a grey frame

        def s(tokens):
            return F.cosine_similarity(z_a, model.inter_from_tokens("v", tokens, T_v), dim=-1)
        gain = s(h) - s(h0)
    # completeness: the patches add up to the gain (ReLU kinks make the midpoint rule
    # converge unevenly: within 1e-3 at 64 steps, 1e-4 at 256, here)
    fine = localize.integrated_gradients(model, z_a, h, h0, T_v, steps=256)
    torch.testing.assert_close(fine.sum(1), gain, atol=2e-4, rtol=0)
    assert gain.abs().min() > 5e-3                            # and the gain is not ~0
    # localize()'s gradient_raw is that map (8 steps) on the patch grid; gradient is it times p
    raw = localize.localize(model, ds.audio, x_v, T_a, T_v, method="gradient_raw")
    torch.testing.assert_close(raw.flatten(1), localize.integrated_gradients(model, z_a, h, h0, T_v))
    confidence = localize.Confidence(3.0, -1.0)
    gated = localize.localize(model, ds.audio, x_v, T_a, T_v, method="gradient",
                              confidence=confidence)
    torch.testing.assert_close(gated, raw * torch.sigmoid(3.0 * s(h) - 1.0)[:, None, None])
    with pytest.raises(ValueError, match="needs a Confidence"):
        localize.localize(model, ds.audio, x_v, T_a, T_v, method="gradient")


def test_fit_confidence_recovers_a_logistic_rule():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(20000, generator=g, dtype=torch.float64) * 2 - 1
    own = torch.rand(20000, generator=g, dtype=torch.float64) < torch.sigmoid(6 * s - 1)
    confidence = localize.fit_confidence(s[own], s[~own])
    assert confidence.a == pytest.approx(6.0, abs=0.4) and confidence.b == pytest.approx(-1.0, abs=0.15)
    assert confidence.probability(torch.tensor([1 / 6])).item() == pytest.approx(0.5, abs=0.05)


def test_a_shared_colour_scale_keeps_a_weak_map_dark():
    frame = torch.full((3, 16, 20), 0.5)
    weak = torch.full((16, 20), 0.01)
    weak[4, 10] = 0.02
    own = localize.overlay(frame, weak)                      # its own scale: a red pixel
    shared = localize.overlay(frame, weak, scale=(0.0, 1.0))  # a clip's four maps' scale
    # half frame (0.5 grey), half colour: red at its own maximum, no red on the shared scale
    assert own[0, 4, 10] == pytest.approx(0.5) and shared[0].max() == pytest.approx(0.25)
    assert shared[2].min() > 0.5
