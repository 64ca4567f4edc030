"""Zero-shot audio-visual retrieval and sound-source localization (method.md §13).

Retrieval: every clip of a manifest is embedded with the pretrained EquiAV's
inter-modal centroid embeddings z_inter_a, z_inter_v (method.md §6) computed with a
fixed set of centroid vectors, so the embeddings are deterministic (method.md §9);
audio->visual and visual->audio Recall@1/5/10 and median rank come from the
cosine-similarity matrix, computed in row chunks so memory stays bounded.

Equivariance (the paper's figure 1 and its predictor-similarity column): how
close the predicted embedding of an augmentation is to the embedding of the
augmented input, and how much of t a ridge regression reads back from the
latter (equivariance_metrics).

Localization (figure 3 of the paper; method.md §13): the script scores localize.py's
maps where the manifest carries boxes and on the toy distractor split, and draws
figure3.png.

    python retrieval.py                                   # toy data, default checkpoint
    python retrieval.py --checkpoint equiav.pth --preset base \\
        --manifest audioset_retrieval.json --norm_stats audioset
    torchrun --nproc_per_node 8 retrieval.py ...          # embeddings on 8 GPUs
"""
import dataclasses
import json
import math
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

import augment
import convert
import data
import localize
import toy
import utils
from model import EquiAV
from utils import option


@dataclasses.dataclass
class RetrievalConfig:
    """Every field is a `--field value` option."""
    checkpoint: str = option(convert.TOY_CHECKPOINT,
                             "our pretraining checkpoint (default: where `python pretrain.py` "
                             "writes) or an authors' EquiAV state dict")
    preset: str = option("base", "model preset for an authors' checkpoint (ours stores its own "
                                 "config)")
    manifest: str = option("", "clips to retrieve among; empty = the toy dataset's retrieval split")
    toy_root: str = option("data/toy", "where the toy dataset lives (generated if absent)")
    norm_stats: str = option("auto", "fbank normalization: auto (the checkpoint's stats, else "
                                     "stats.json next to the manifest), dataset (that "
                                     "stats.json), audioset, vggsound, or MEAN,STD")
    out_dir: str = option("runs/retrieval", "retrieval.json and figure3.png are written here")
    S: int = option(16, "augmentation vectors per centroid (method.md §6), as in pretraining")
    seed: int = option(0, "seed of the centroid vectors")
    chunk_size: int = option(4096, "query rows per similarity block")
    batch_size: int = option(32, "clips per forward")
    num_workers: int = option(2, "data loader workers")
    localize: int = option(8, "clips of the manifest drawn in figure3.png; 0: no localization "
                               "at all")
    localize_indices: str = option("", "comma-separated manifest indices to draw instead of the "
                                       "first --localize")
    map: str = option("gradient", "sound-source map (method.md §13): gradient (integrated "
                                   "gradients times the calibrated confidence), gradient_raw "
                                   "(without it), gradient_input, occlusion, token or "
                                   "attention; a comma list scores each, the first is drawn")
    confidence_data: str = option("auto", "training clips the map's confidence is calibrated on "
                                          "(true against mismatched pairs): auto (train.json "
                                          "beside the manifest, or the toy's), none, or "
                                          "MANIFEST; stored beside the checkpoint")
    negatives: bool = option(True, "also score the maps under sounds the frame does not make: "
                                   "the manifest's {name}_{silence,noise,offscreen}.json "
                                   "beside it (the toy writes them), else silence and another "
                                   "clip's sound built here")
    occlusion_chunk: int = option(64, "patch tokens removed at once by the occlusion map "
                                      "(memory: chunk x S predictor rows per clip)")
    distractor: str = option("auto", "localization on a split whose frames show a silent object "
                                     "too: auto (the toy's test_distractor and "
                                     "test_distractor_swap on toy data), none, or MANIFEST or "
                                     "MANIFEST,SWAPPED_MANIFEST (the same clips, in the same "
                                     "order, with another object sounding)")
    figure_distractors: int = option(4, "distractor clips drawn in figure3.png as well")
    random_weights: bool = option(False, "evaluate a freshly initialised model of the "
                                         "checkpoint's config instead (a baseline)")
    augmented_views: bool = option(True, "also retrieve with one side's input replaced by its "
                                         "augmented view, per augmentation group (the paper's "
                                         "premise: the class survives, the pairing partly not)")
    amp: bool = option(False, "mixed precision on CUDA")
    device: Optional[str] = option(None, "cpu or cuda (default: cuda when available)")


# ---------------------------------------------------------------------------
# Retrieval metrics
# ---------------------------------------------------------------------------

def _ranks(queries, keys, chunk_size):
    """1-based rank of key i among all keys for query i, (N,) long.

    Ties are broken deterministically as by a stable sort on decreasing
    similarity: a key tied with the true one counts as ranked before it
    exactly when its index is smaller. So identical embeddings never score
    better than chance, and the result does not depend on `chunk_size`.
    Only a (chunk_size, N) block of the similarity matrix exists at a time.
    """
    n = queries.shape[0]
    ranks = torch.empty(n, dtype=torch.long, device=queries.device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        c = stop - start
        sim = queries[start:stop] @ keys.T                            # (c, N)
        true = sim[:, start:stop].diagonal()[:, None]                 # (c, 1)
        # keys left of the chunk's rows win ties and keys right of them lose
        # them, so one comparison per entry; only the (c, c) block needs both
        before = (sim[:, :start] >= true).sum(1)
        after = (sim[:, stop:] > true).sum(1)
        block = sim[:, start:stop]
        lower = torch.ones(c, c, dtype=torch.bool, device=sim.device).tril(-1)  # key < query
        inside = torch.where(lower, block >= true, block > true).sum(1)
        ranks[start:stop] = 1 + before + after + inside
    return ranks


def clip_ranks(queries, keys):
    """1-based rank of key i among all keys for query i, (N,) long, ties as `_ranks`."""
    return _ranks(queries.float(), keys.float(), 4096)


def _summarize(ranks, prefix):
    ranks = ranks.cpu().double()
    out = {f"{prefix}_R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    # median of the 0-based ranks, floored, plus one (the CAV-MAE convention):
    # an integer rank even for an even number of clips
    out[f"{prefix}_medr"] = float(math.floor(np.median(ranks.numpy() - 1)) + 1)
    return out


def retrieval_metrics(z_a, z_v, chunk_size=4096):
    """Zero-shot retrieval metrics between paired embeddings (method.md §13).

    z_a, z_v: (N, d) L2-normalized; row i of each comes from the same clip.
    Returns {"a2v_R@1", "a2v_R@5", "a2v_R@10", "a2v_medr", "v2a_R@1", ...,
    "v2a_medr"}: Recall@k in percent (the true partner among the k most
    similar), median rank (1 = best). See `_ranks` for how ties are ranked.
    """
    if z_a.dim() != 2 or z_a.shape != z_v.shape:
        raise ValueError(f"z_a and z_v must be (N, d) of equal shape, got "
                         f"{tuple(z_a.shape)} and {tuple(z_v.shape)}")
    if z_a.shape[0] == 0:
        raise ValueError("retrieval_metrics needs at least one clip")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    z_a, z_v = z_a.float(), z_v.float()
    out = _summarize(_ranks(z_a, z_v, chunk_size), "a2v")
    out.update(_summarize(_ranks(z_v, z_a, chunk_size), "v2a"))
    return out


def chance_levels(n):
    """What random embeddings score among n clips: R@k = 100 min(k, n) / n, and the
    median rank under the convention of `_summarize` (ranks uniform in 1..n)."""
    out = {f"R@{k}": 100.0 * min(k, n) / n for k in (1, 5, 10)}
    out["medr"] = float((n + 1) // 2)
    return out


# ---------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------

def centroid_vectors(cfg, S, seed, inter_target="centroid"):
    """The fixed evaluation centroid vectors (method.md §9): T_a (1, S, 24), T_v (1, S, 18).

    Drawn once from a generator seeded with `seed` and shared by every clip,
    so a clip's embedding depends only on the clip, the model and the seed,
    never on the batch it is in or the rank that computes it. For a model whose
    inter target is "equivariant": the identity vectors (1, 1, d_t), its prediction of
    no augmentation.
    """
    if inter_target == "equivariant":
        return augment.audio_identity(1).unsqueeze(1), augment.visual_identity(1).unsqueeze(1)
    g = torch.Generator().manual_seed(seed)
    T_a = augment.sample_audio_vectors(1, S, g, T=cfg.audio_length, F=cfg.mel_bins)
    T_v = augment.sample_visual_vectors(1, S, g, H=cfg.image_size, W=cfg.image_size)
    return T_a, T_v


@torch.no_grad()
def extract_embeddings(model, loader, device, S=16, seed=0, amp=False, view=None):
    """Deterministic inter-modal embeddings of every clip of `loader` (method.md §13).

    `loader` must come from an evaluation dataset (train=False: the middle
    frame, no mixup); under torchrun each rank embeds its shard and the
    results are gathered. Returns z_a, z_v (N, d) float32, L2-normalized, on
    `device`, row i = dataset index i, identical on every rank. view = (m, t):
    modality m ("a" or "v") is embedded from its augmented view under t[i] (one
    vector per dataset index, on the CPU) instead of the clip itself.
    """
    if getattr(loader.dataset, "train", False):
        raise ValueError("extract_embeddings needs an evaluation dataset (train=False): "
                         "training datasets pick random frames and mix clips")
    model = utils.unwrap(model)
    was_training = model.training
    model.eval()
    vectors = centroid_vectors(model.cfg, S, seed, model.inter_target)
    T_a, T_v = utils.to_device_together(vectors, device)
    indices, zs_a, zs_v = [], [], []
    for batch in loader:
        x_a = batch["audio"].to(device, non_blocking=True)
        x_v = augment.frames_to(device, batch["frame"])
        if view is not None:
            t = view[1][batch["index"].long()]
            x_a = augment.apply_audio(x_a, t) if view[0] == "a" else x_a
            x_v = augment.apply_visual(x_v, t) if view[0] == "v" else x_v
        x_v = augment.normalize_image(x_v)
        b = x_a.shape[0]
        with utils.autocast_context(device, amp):
            z_a, z_v = model.embed(x_a, x_v, T_a.expand(b, -1, -1), T_v.expand(b, -1, -1))
        zs_a.append(F.normalize(z_a.float(), dim=-1))
        zs_v.append(F.normalize(z_v.float(), dim=-1))
        indices.append(batch["index"].to(device, non_blocking=True).long())
    model.train(was_training)
    _, z_a, z_v = utils.gather_in_dataset_order(torch.cat(indices), torch.cat(zs_a),
                                                torch.cat(zs_v))
    return z_a, z_v


def evaluate_retrieval(model, loader, device, S=16, seed=0, amp=False):
    """Zero-shot retrieval of every clip of an evaluation loader (collective under
    torchrun): (metrics of retrieval_metrics, chance_levels, number of clips)."""
    z_a, z_v = extract_embeddings(model, loader, device, S=S, seed=seed, amp=amp)
    return retrieval_metrics(z_a, z_v), chance_levels(z_a.shape[0]), z_a.shape[0]


def augmented_views(model, loader, device, S=16, seed=0, amp=False):
    """The paper's premise measured: zero-shot retrieval with one side's input replaced
    by its augmented view, one method.md §8 augmentation group at a time (sampled as training
    samples it, one fixed-seed vector per clip, the other slots at the identity) and all
    of them together. Returns {"audio": {group: metrics}, "visual": {...}} (collective
    under torchrun)."""
    cfg, n = utils.unwrap(model).cfg, len(loader.dataset)
    g = torch.Generator().manual_seed(seed + 2)   # neither the centroid nor the equivariance stream
    out = {}
    for m, name, groups, layout, t_all in (
            ("a", "audio", augment.AUDIO_GROUPS, augment.AUDIO_LAYOUT,
             augment.sample_audio_params(n, g, cfg.audio_length, cfg.mel_bins)),
            ("v", "visual", augment.VISUAL_GROUPS, augment.VISUAL_LAYOUT,
             augment.sample_visual_params(n, g, cfg.image_size, cfg.image_size))):
        out[name] = {}
        for group, names in list(groups.items()) + [("all", layout)]:
            view = (m, augment.only(t_all, names))
            z_a, z_v = extract_embeddings(model, loader, device, S, seed, amp, view=view)
            out[name][group] = retrieval_metrics(z_a, z_v)
    return out


def format_augmented_views(views, chance):
    """a->v R@10 per modality and group, against chance, as a small table."""
    lines = [f"a->v R@10 (%) with one side's input replaced by its augmented view "
             f"(chance {chance['R@10']:.1f}):"]
    for name, rows in views.items():
        lines.append(f"  {name:6s} " + "  ".join(f"{group} {m['a2v_R@10']:.1f}" for group, m in rows.items()))
    return "\n".join(lines)


def format_line(metrics, chance, n):
    """Both directions and chance on one line (pretrain.py's epoch summary)."""
    parts = [f"{d} R@1 {metrics[f'{d}_R@1']:.1f} R@5 {metrics[f'{d}_R@5']:.1f} "
             f"R@10 {metrics[f'{d}_R@10']:.1f} medr {metrics[f'{d}_medr']:.0f}"
             for d in ("a2v", "v2a")]
    parts.append(f"chance R@1 {chance['R@1']:.1f} R@5 {chance['R@5']:.1f} "
                 f"R@10 {chance['R@10']:.1f} medr {chance['medr']:.0f} (N={n})")
    return " | ".join(parts)


def format_table(metrics, chance):
    """Both directions and chance as a small table (retrieval.py's output)."""
    keys = ("R@1", "R@5", "R@10", "medr")
    lines = [f"{'direction':<15}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'MedR':>8}"]
    for name, d in (("audio->visual", "a2v"), ("visual->audio", "v2a")):
        lines.append(f"{name:<15}" + "".join(f"{metrics[f'{d}_{k}']:>8.1f}" for k in keys))
    lines.append(f"{'chance':<15}" + "".join(f"{chance[k]:>8.1f}" for k in keys))
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Equivariance: does the model keep what the augmentation did? (paper fig. 1, tab. 4)
# ---------------------------------------------------------------------------

def ridge_r2(x_fit, y_fit, x_test, y_test, lam=1.0):
    """Closed-form ridge regression y ~ x (with an intercept: both centred on the fit
    half), fitted on (x_fit, y_fit), scored on the test half.

    x: (n, d) features, y: (n, k) targets. Returns (SS_res, SS_tot) per target
    column on the test half, float64 (k,), so that groups of columns can be pooled:
    R^2 = 1 - sum SS_res / sum SS_tot. W = (X^T X + lam I)^-1 X^T Y.
    """
    x_fit, y_fit, x_test, y_test = (v.double().cpu() for v in (x_fit, y_fit, x_test, y_test))
    mx, my = x_fit.mean(0), y_fit.mean(0)
    xc = x_fit - mx
    w = torch.linalg.solve(xc.T @ xc + lam * torch.eye(xc.shape[1], dtype=torch.float64),
                           xc.T @ (y_fit - my))                                # (d, k)
    pred = (x_test - mx) @ w + my
    return ((y_test - pred) ** 2).sum(0), ((y_test - y_test.mean(0)) ** 2).sum(0)


def group_r2(ss_res, ss_tot, slots, groups):
    """R^2 per group of slots (groups: {name: slot names}), pooled over the group's
    columns; NaN for a group that does not vary on the test half."""
    out = {}
    for name, members in groups.items():
        idx = [slots[m] for m in members]
        tot = float(ss_tot[idx].sum())
        out[name] = 1.0 - float(ss_res[idx].sum()) / tot if tot > 0 else math.nan
    return out


@torch.no_grad()
def intra_embeddings(model, m, x, x_aug, t):
    """The intra-modal embeddings the equivariance measures compare, not normalized,
    each (B, proj_dim), for modality m ("a", "v"): z_equi = g_intra(u(h, t)) predicted
    from the original, z_aug = g_intra(mean_N(h')) encoded from x_aug = t(x), and
    z_identity = g_intra(u(h, t_identity)), the prediction told "no augmentation".
    An invariant model predicts g_intra(mean_N(h)) for both. t (B, d_t) on the CPU."""
    encoder, predictor, identity = ((model.audio_encoder, model.predictor_a, augment.audio_identity)
                                    if m == "a" else
                                    (model.visual_encoder, model.predictor_v, augment.visual_identity))
    proj_intra = model.proj_intra_a if m == "a" else model.proj_intra_v
    h, h_aug = encoder(x), encoder(x_aug, aug=True)
    if model.equivariant:
        both = utils.to_device(torch.stack([t, identity(t.shape[0])], dim=1), h.device)
        z_equi, z_id = proj_intra(predictor.predict_each(h, both.to(h.dtype))).unbind(dim=1)
    else:
        z_equi = z_id = proj_intra(h.mean(dim=1))
    return z_equi, proj_intra(h_aug.mean(dim=1)), z_id


@torch.no_grad()
def equivariance_metrics(model, loader, device, seed=0, amp=False, lam=1.0):
    """Two measures of how much of the augmentation an encoder keeps (collective
    under torchrun), on an evaluation loader, with one fixed-seed augmentation per
    clip (drawn for the whole split at once, so the result depends on neither the
    batch size nor the number of processes):

    - similarity_m: mean cos(z_equi_m, z_aug_m), how close the prediction from the
      original and t is to the embedding of the actually augmented input (the
      paper's "similarity" column), and identity_similarity_m: the same with the
      identity vector in place of t (what the predictor adds by knowing t);
    - r2_m: augmentation awareness, a ridge regression (lam) from the L2-normalised
      z_aug_m of the augmented input to its parameter vector t, fitted on the clips
      of even dataset index and scored on the odd ones, R^2 per augmentation group
      (augment.AUDIO_GROUPS / VISUAL_GROUPS). An invariant encoder should score low.
    """
    model = utils.unwrap(model)
    was_training = model.training
    model.eval()
    c, n = model.cfg, len(loader.dataset)
    g = torch.Generator().manual_seed(seed + 1)  # not the centroid vectors' stream
    t_all = {"a": augment.sample_audio_params(n, g, c.audio_length, c.mel_bins),
             "v": augment.sample_visual_params(n, g, c.image_size, c.image_size)}
    rows = {k: [] for k in ("index", "equi_a", "aug_a", "id_a", "equi_v", "aug_v", "id_v")}
    for batch in loader:
        index = batch["index"].long()
        x = {"a": batch["audio"].to(device, non_blocking=True),
             "v": augment.frames_to(device, batch["frame"])}
        x_aug = {"a": augment.apply_audio(x["a"], t_all["a"][index]),
                 "v": augment.normalize_image(augment.apply_visual(x["v"], t_all["v"][index]))}
        x["v"] = augment.normalize_image(x["v"])
        rows["index"].append(index.to(device, non_blocking=True))
        for m in ("a", "v"):
            with utils.autocast_context(device, amp):
                z = intra_embeddings(model, m, x[m], x_aug[m], t_all[m][index])
            for key, value in zip(("equi", "aug", "id"), z):
                rows[f"{key}_{m}"].append(F.normalize(value.float(), dim=-1))
    model.train(was_training)
    keys = list(rows)[1:]
    index, *z = utils.gather_in_dataset_order(*(torch.cat(rows[k]) for k in ["index"] + keys))
    z = dict(zip(keys, z))
    fit, test = index % 2 == 0, index % 2 == 1
    out = {}
    for m, slots, groups in (("a", augment.AUDIO_SLOTS, augment.AUDIO_GROUPS),
                             ("v", augment.VISUAL_SLOTS, augment.VISUAL_GROUPS)):
        out[f"similarity_{m}"] = (z[f"equi_{m}"] * z[f"aug_{m}"]).sum(-1).mean().item()
        out[f"identity_similarity_{m}"] = (z[f"id_{m}"] * z[f"aug_{m}"]).sum(-1).mean().item()
        t = t_all[m][index.cpu()]
        ss = ridge_r2(z[f"aug_{m}"][fit], t[fit.cpu()], z[f"aug_{m}"][test], t[test.cpu()], lam)
        out[f"r2_{m}"] = group_r2(*ss, slots, groups)
    return out


def format_equivariance(eq):
    """The measures on two short lines."""
    lines = [f"similarity A/V {eq['similarity_a']:.3f} / {eq['similarity_v']:.3f} (identity "
             f"vector {eq['identity_similarity_a']:.3f} / {eq['identity_similarity_v']:.3f})"]
    for m, name in (("a", "audio"), ("v", "visual")):
        lines.append(f"R^2 {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in eq[f"r2_{m}"].items()))
    return "\n  ".join(lines)


# ---------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------

def main(cfg):
    """Run retrieval (and localization) with `cfg`; returns the results dict."""
    utils.require_files(cfg, "manifest")
    convert.require_checkpoint(cfg.checkpoint, "checkpoint")
    _, _, _, device = utils.init_distributed(cfg.device)
    try:
        return run(cfg, device)
    finally:
        utils.cleanup_distributed()


def run(cfg, device):
    """Load the model and the clips, embed, score; localize on rank 0; write the JSON."""
    utils.print_config(f"EquiAV retrieval on {device}; config:", cfg)
    manifest = cfg.manifest or toy.ensure_toy_dataset(cfg.toy_root)["retrieval"]
    convert.require_checkpoint(cfg.checkpoint, "checkpoint")
    model = convert.load_equiav(cfg.checkpoint, cfg.preset)
    if cfg.random_weights:
        torch.manual_seed(cfg.seed)
        model = EquiAV(model.cfg, equivariant=model.equivariant, inter_target=model.inter_target)
    model = model.to(device).eval()
    mcfg = model.cfg
    stored = convert.peek_checkpoint(cfg.checkpoint).get("norm_stats")  # None: an authors' file
    mean, std = data.resolve_norm_stats(cfg.norm_stats, manifest, stored, mcfg.audio_length,
                                        mcfg.mel_bins)

    def dataset_of(path):
        return data.AudioVisualDataset(path, audio_length=mcfg.audio_length,
                                       mel_bins=mcfg.mel_bins, image_size=mcfg.image_size,
                                       train=False, norm_mean=mean, norm_std=std)

    dataset = dataset_of(manifest)
    loader = data.make_loader(dataset, cfg.batch_size, train=False, num_workers=cfg.num_workers,
                              pin_memory=device.type == "cuda")

    start = time.perf_counter()
    z_a, z_v = extract_embeddings(model, loader, device, S=cfg.S, seed=cfg.seed, amp=cfg.amp)
    embed_s = time.perf_counter() - start
    start = time.perf_counter()
    metrics = retrieval_metrics(z_a, z_v, chunk_size=cfg.chunk_size)
    metrics_s = time.perf_counter() - start
    n = z_a.shape[0]
    chance = chance_levels(n)
    utils.print0(f"zero-shot retrieval on {manifest}: {n} clips, {cfg.checkpoint}, "
                 f"S={cfg.S}, seed {cfg.seed} (embeddings {embed_s:.1f} s, "
                 f"metrics {metrics_s * 1000:.0f} ms)\n{format_table(metrics, chance)}")
    results = {"manifest": os.path.abspath(manifest), "checkpoint": cfg.checkpoint, "n_clips": n,
               "retrieval": metrics, "chance": chance, "norm_stats": [mean, std],
               "seconds": {"embeddings": embed_s, "metrics": metrics_s},
               "config": dataclasses.asdict(cfg)}
    eq = equivariance_metrics(model, loader, device, seed=cfg.seed, amp=cfg.amp)
    results["equivariance"] = eq
    utils.print0("equivariance (one fixed-seed augmentation per clip): "
                 + format_equivariance(eq))
    if cfg.augmented_views:
        results["augmented_views"] = augmented_views(model, loader, device, cfg.S, cfg.seed, cfg.amp)
        utils.print0(format_augmented_views(results["augmented_views"], chance))
    if cfg.localize > 0:
        confidence = fitted_confidence(model, cfg, dataset_of, device)   # on every rank
        if utils.is_main():
            results["localization"] = _localize(model, dataset, dataset_of, cfg, device,
                                                confidence)
    if utils.is_main():
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "retrieval.json"), "w") as f:
            json.dump(results, f, indent=1)
        utils.print0(f"wrote {os.path.join(cfg.out_dir, 'retrieval.json')}")
    utils.barrier(utils.RANK0_WORK_TIMEOUT_S)   # rank 0 alone localizes and draws
    return results


def _localize(model, dataset, dataset_of, cfg, device, confidence):
    """For each map of --map: scores on the manifest (when it has boxes), on the distractor
    split, under negative sounds, and against the baselines; figure3.png and negatives.png with the
    first map. Returns what goes under "localization" in retrieval.json."""
    vectors = centroid_vectors(model.cfg, cfg.S, cfg.seed, model.inter_target)
    T_a, T_v = utils.to_device_together(vectors, device)
    methods = [m.strip() for m in cfg.map.split(",") if m.strip()]
    if confidence is None and "gradient" in methods:
        methods = [m if m != "gradient" else "gradient_raw" for m in methods]
        utils.print0("no training clips to calibrate the confidence on (--confidence_data): "
                     "the gradient map is drawn raw (gradient_raw)")
    entries = data.read_manifest(dataset.manifest)
    splits = _distractor_manifests(cfg)
    negatives = _negatives(cfg, dataset, dataset_of) if cfg.negatives else {}
    out = {"method": methods[0], "maps": {}, "confidence": confidence and confidence._asdict()}
    for method in methods:
        kw = dict(method=method, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                  amp=cfg.amp, chunk=cfg.occlusion_chunk, confidence=confidence)
        one = {}
        if localize.has_boxes(entries):
            one["manifest"] = localize.evaluate_localization(model, dataset, entries, T_a, T_v,
                                                             device, **kw)
            utils.print0(localize.format_localization(f"localization on {dataset.manifest}",
                                                      one["manifest"]))
        scored = []
        for path in splits:
            ds, ents = dataset_of(path), data.read_manifest(path)
            scored.append(localize.evaluate_localization(model, ds, ents, T_a, T_v, device, **kw))
            utils.print0(localize.format_localization(f"distractor {path}", scored[-1]))
        if scored:
            one["distractor"] = scored[0]
        if len(scored) == 2:
            one["distractor_swap"] = scored[1]
            both = [a and b for a, b in zip(scored[0]["sounding"]["hits"],
                                            scored[1]["sounding"]["hits"])]
            one["follows_sound"] = 100.0 * float(np.mean(both))
            utils.print0(f"the map's maximum follows the sound (on the sounding object with "
                         f"either sound) in {one['follows_sound']:.1f}% of the clips")
        if negatives:
            one["negatives"], frames, neg_maps = localize.evaluate_negatives(
                model, dataset, negatives, T_a, T_v, device, **kw)
            utils.print0(localize.format_negatives(one["negatives"]))
            if method == methods[0]:
                _negatives_figure(cfg, frames, neg_maps, method)
        if "manifest" in one:
            one["against_baselines"] = localize.against_baselines(one["manifest"])
            ratios = "; ".join(f"{name.replace('_', ' ')} {_times(r['pointing_game'])}, "
                               f"{_times(r['iou_at_area'])}"
                               for name, r in one["against_baselines"].items())
            utils.print0(f"{method} against the baselines (pointing, IoU at box area): {ratios}")
        out["maps"][method] = one
    out.update(out["maps"][methods[0]])     # the first map's scores also at the top level
    chosen = ([int(i) for i in cfg.localize_indices.split(",")] if cfg.localize_indices
              else list(range(min(cfg.localize, len(dataset)))))
    figure = [_figure_clip(dataset, entries, i, "") for i in chosen]
    if splits:
        ds, ents = dataset_of(splits[0]), data.read_manifest(splits[0])
        figure += [_figure_clip(ds, ents, i, "distractor ")
                   for i in range(min(cfg.figure_distractors, len(ds)))]
    png = os.path.join(cfg.out_dir, "figure3.png")
    localize.save_figure3(png, model, figure, T_a, T_v, device, methods[0], cfg.amp, confidence)
    out["figure"] = png
    utils.print0(f"wrote {png}: frame | {methods[0]} map, and the augmented view nearest to the "
                 f"centroid | its map; sounding boxes green, map maxima white crosses")
    return out


def _times(ratio):
    return "–" if ratio is None else f"{ratio:.2f}x"


def fitted_confidence(model, cfg, dataset_of, device):
    """The map's Confidence (localize.fit_confidence) for this checkpoint, fitted on the
    training clips of --confidence_data by a rule fixed before any scoring: every clip's
    s with its own sound against s with the next clip's sound (wrapping), with the
    evaluation's fixed centroid vectors. Stored in {checkpoint}_confidence.json (by rank 0)
    and reused while the checkpoint file is unchanged (its size and time). None without
    clips. Collective under torchrun: every rank embeds its shard."""
    source = cfg.confidence_data
    if source == "auto":
        beside = os.path.join(os.path.dirname(os.path.abspath(cfg.manifest)), "train.json")
        source = (beside if cfg.manifest and os.path.exists(beside) else "none" if cfg.manifest
                  else toy.ensure_toy_dataset(cfg.toy_root)["train"])
    if source == "none" or cfg.random_weights:
        return None
    stat = os.stat(cfg.checkpoint)
    stamp = {"checkpoint_size": stat.st_size, "checkpoint_mtime_ns": stat.st_mtime_ns,
             "data": os.path.abspath(source), "S": cfg.S, "seed": cfg.seed}
    path = os.path.splitext(cfg.checkpoint)[0] + "_confidence.json"
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        if {k: stored.get(k) for k in stamp} == stamp:
            return localize.Confidence(stored["a"], stored["b"])
    loader = data.make_loader(dataset_of(source), cfg.batch_size, train=False,
                              num_workers=cfg.num_workers, pin_memory=device.type == "cuda")
    z_a, z_v = extract_embeddings(model, loader, device, S=cfg.S, seed=cfg.seed, amp=cfg.amp)
    s_true = (z_a * z_v).sum(-1)
    s_wrong = (z_a.roll(-1, dims=0) * z_v).sum(-1)     # frame i with clip i + 1's sound
    confidence = localize.fit_confidence(s_true.cpu(), s_wrong.cpu())
    if utils.is_main():
        with open(path, "w") as f:
            json.dump({**stamp, **confidence._asdict(), "clips": len(s_true)}, f, indent=1)
    utils.print0(f"confidence p = sigmoid({confidence.a:.2f} s + {confidence.b:.2f}), fitted on "
                 f"{len(s_true)} training clips of {source}: wrote {path}")
    return confidence


def _negatives(cfg, dataset, dataset_of):
    """{kind: dataset or how to build it} of the negative sounds for the manifest: the
    {stem}_{kind}.json beside it (the toy writes them for its splits), else silence and
    another clip's sound, built in localize.evaluate_negatives."""
    if not cfg.manifest:
        toy.negative_manifests(cfg.toy_root, "retrieval")
    stem = os.path.splitext(dataset.manifest)[0]
    found = {kind: f"{stem}_{kind}.json" for kind in toy.NEGATIVES}
    if all(os.path.exists(p) for p in found.values()):
        return {kind: dataset_of(path) for kind, path in found.items()}
    return {"silence": "silence", "scrambled": "scrambled"}


def _negatives_figure(cfg, frames, maps, method):
    """negatives.png: each clip's frame with its map under the true sound and each negative,
    the four on one colour scale per clip (its lowest value blue, its highest red), so that
    a map that stays dark under a wrong sound looks dark."""
    kinds = list(maps)
    order = [(i, k) for i in range(frames.shape[0]) for k in kinds]
    per_clip = torch.stack([maps[k] for k in kinds], dim=1).flatten(1)   # (clips, kinds H W)
    low, high = per_clip.min(dim=1).values, per_clip.max(dim=1).values
    png = os.path.join(cfg.out_dir, "negatives.png")
    localize.save_localization_grid(png, torch.stack([frames[i] for i, _ in order]),
                                    torch.stack([maps[k][i] for i, k in order]),
                                    captions=[f"#{i} {k}" for i, k in order], cols=len(kinds),
                                    colour_scales=[(low[i], high[i]) for i, _ in order])
    utils.print0(f"wrote {png}: frames with the {method} map under the true sound and "
                 + ", ".join(kinds[1:]))


def _figure_clip(dataset, entries, i, prefix):
    item = dataset[i]
    boxes = (localize.clip_boxes(entries[i], dataset.image_size, dataset.frame_file(i, data.EVAL_FRAME))[0]
             if localize.has_boxes(entries) else [])
    return item["audio"], augment.unit_range(item["frame"]), boxes, f"{prefix}#{i} {entries[i].get('labels', '')}"[:40]


def _distractor_manifests(cfg):
    if cfg.distractor == "none" or (cfg.distractor == "auto" and cfg.manifest):
        return []
    if cfg.distractor == "auto":
        paths = toy.ensure_toy_dataset(cfg.toy_root)
        return [paths["test_distractor"], paths["test_distractor_swap"]]
    return [p.strip() for p in cfg.distractor.split(",") if p.strip()]


if __name__ == "__main__":
    utils.run_script(main, RetrievalConfig, __doc__.splitlines()[0])
