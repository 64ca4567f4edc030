"""Zero-shot audio-visual retrieval and sound-source localization (SPEC 13).

Retrieval: every clip of a manifest is embedded with the pretrained EquiAV's
inter-modal centroid embeddings z_inter_a, z_inter_v (SPEC 6) computed with a
fixed set of centroid vectors, so the embeddings are deterministic (SPEC 9);
audio->visual and visual->audio Recall@1/5/10 and median rank come from the
cosine-similarity matrix, computed in row chunks so memory stays bounded.

Localization: the similarity between a clip's audio embedding and every visual
patch token (EquiAV.localize), upsampled to the frame and drawn over it as a
heat map (figure 3 of the paper). On the toy dataset, whose manifests carry
the sounding object's box, a pointing-game score is reported next to the score
of always pointing at the frame centre.

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
from PIL import Image, ImageDraw

import augment
import convert
import data
import toy
import utils
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
                                     "stats.json next to the manifest), audioset, vggsound, or "
                                     "MEAN,STD")
    out_dir: str = option("runs/retrieval", "retrieval.json and localization.png are written here")
    S: int = option(16, "augmentation vectors per centroid (SPEC 6), as in pretraining")
    seed: int = option(0, "seed of the centroid vectors")
    chunk_size: int = option(4096, "query rows per similarity block")
    batch_size: int = option(32, "clips per forward")
    num_workers: int = option(2, "data loader workers")
    localize: int = option(8, "clips drawn in the localization grid (0: no localization)")
    localize_indices: str = option("", "comma-separated manifest indices to draw instead of the "
                                       "first --localize")
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


def _summarize(ranks, prefix):
    ranks = ranks.cpu().double()
    out = {f"{prefix}_R@{k}": 100.0 * (ranks <= k).double().mean().item() for k in (1, 5, 10)}
    # median of the 0-based ranks, floored, plus one (the CAV-MAE convention):
    # an integer rank even for an even number of clips
    out[f"{prefix}_medr"] = float(math.floor(np.median(ranks.numpy() - 1)) + 1)
    return out


def retrieval_metrics(z_a, z_v, chunk_size=4096):
    """Zero-shot retrieval metrics between paired embeddings (SPEC 13).

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

def centroid_vectors(cfg, S, seed):
    """The fixed evaluation centroid vectors (SPEC 9): T_a (1, S, 24), T_v (1, S, 18).

    Drawn once from a generator seeded with `seed` and shared by every clip,
    so a clip's embedding depends only on the clip, the model and the seed,
    never on the batch it is in or the rank that computes it.
    """
    g = torch.Generator().manual_seed(seed)
    T_a = augment.sample_audio_vectors(1, S, g, T=cfg.audio_length, F=cfg.mel_bins)
    T_v = augment.sample_visual_vectors(1, S, g, H=cfg.image_size, W=cfg.image_size)
    return T_a, T_v


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def extract_embeddings(model, loader, device, S=16, seed=0, amp=False):
    """Deterministic inter-modal embeddings of every clip of `loader` (SPEC 13).

    `loader` must come from an evaluation dataset (train=False: the middle
    frame, no mixup); under torchrun each rank embeds its shard and the
    results are gathered. Returns z_a, z_v (N, d) float32, L2-normalized, on
    `device`, row i = dataset index i, identical on every rank.
    """
    if getattr(loader.dataset, "train", False):
        raise ValueError("extract_embeddings needs an evaluation dataset (train=False): "
                         "training datasets pick random frames and mix clips")
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    T_a, T_v = (t.to(device) for t in centroid_vectors(model.cfg, S, seed))
    indices, zs_a, zs_v = [], [], []
    for batch in loader:
        x_a = batch["audio"].to(device, non_blocking=True)
        x_v = augment.normalize_image(batch["frame"].to(device, non_blocking=True))
        b = x_a.shape[0]
        with utils.autocast_context(device, amp):
            z_a, z_v = model.embed(x_a, x_v, T_a.expand(b, -1, -1), T_v.expand(b, -1, -1))
        zs_a.append(F.normalize(z_a.float(), dim=-1))
        zs_v.append(F.normalize(z_v.float(), dim=-1))
        indices.append(batch["index"].to(device).long())
    model.train(was_training)
    _, z_a, z_v = utils.gather_in_dataset_order(torch.cat(indices), torch.cat(zs_a),
                                                torch.cat(zs_v))
    return z_a, z_v


def evaluate_retrieval(model, loader, device, S=16, seed=0, amp=False):
    """Zero-shot retrieval of every clip of an evaluation loader (collective under
    torchrun): (metrics of retrieval_metrics, chance_levels, number of clips)."""
    z_a, z_v = extract_embeddings(model, loader, device, S=S, seed=seed, amp=amp)
    return retrieval_metrics(z_a, z_v), chance_levels(z_a.shape[0]), z_a.shape[0]


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
# Sound-source localization (SPEC 13)
# ---------------------------------------------------------------------------

def upsample_maps(sim, size):
    """Patch-grid maps (B, H/p, W/p) -> (B, H, W), bilinear (pixel-centre aligned)."""
    return F.interpolate(sim[:, None].float(), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


@torch.no_grad()
def localization_maps(model, audio, frame, T_a, amp=False):
    """Heat maps of where the sound is, at the frame's resolution.

    audio (B, T, F) normalized fbank; frame (B, 3, H, W) in [0, 1]; T_a
    (1 or B, S, 24) centroid vectors. Returns (B, H, W): the cosine
    similarity between each clip's audio embedding z_inter_a and each visual
    patch token through g_inter_v (EquiAV.localize), upsampled to (H, W).
    """
    model = _unwrap(model)
    b = audio.shape[0]
    with utils.autocast_context(audio.device, amp):
        sim = model.localize(audio, augment.normalize_image(frame), T_a.expand(b, -1, -1))
    return upsample_maps(sim, frame.shape[-2:])                       # (B, H, W)


def map_peaks(maps):
    """(B, H, W) -> (B, 2) float (x, y) of each map's maximum as fractions of the
    frame, at the pixel centre; the first maximum in row-major order on ties."""
    b, h, w = maps.shape
    flat = maps.reshape(b, -1).argmax(1)
    return torch.stack([(flat % w + 0.5) / w, (flat // w + 0.5) / h], 1).double()


def points_in_boxes(points, boxes):
    """points (B, 2) (x, y), boxes: a list of B lists of [x0, y0, x1, y1] (fractions).
    A point hits when it lies in any of its clip's boxes. Returns (B,) bool."""
    hits = []
    for (x, y), clip_boxes in zip(points.tolist(), boxes):
        hits.append(any(x0 <= x <= x1 and y0 <= y <= y1 for x0, y0, x1, y1 in clip_boxes))
    return torch.tensor(hits, dtype=torch.bool)


def heat_colors(m):
    """A jet-like colormap: (H, W) in [0, 1] -> (3, H, W) RGB in [0, 1]
    (blue -> cyan -> yellow -> red), built from three clipped ramps."""
    return torch.stack([(1.5 - (4 * m - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)])


def overlay(frame, m, alpha=0.5):
    """frame (3, H, W) in [0, 1], map (H, W) -> the map, min-max scaled per clip,
    coloured and blended over the frame: (3, H, W) in [0, 1]."""
    m = (m - m.min()) / (m.max() - m.min()).clamp_min(1e-8)
    return (1 - alpha) * frame + alpha * heat_colors(m)


def _to_pil(img, scale):
    arr = (img.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_localization_grid(path, frames, maps, boxes=None, captions=None, cols=4, scale=2):
    """One PNG: for every clip the frame (with its box, if known) next to the
    heat-map overlay (with the map's maximum marked by a white cross).

    frames (B, 3, H, W) in [0, 1]; maps (B, H, W); boxes: None or B lists of
    [x0, y0, x1, y1] fractions; captions: None or B strings.
    """
    b, _, h, w = frames.shape
    gap, pad, text_h = 2, 6, 14 if captions else 0
    tile_w, tile_h = w * scale, h * scale
    cell_w, cell_h = 2 * tile_w + gap, tile_h + text_h
    cols = max(1, min(cols, b))
    rows = math.ceil(b / cols)
    grid = Image.new("RGB", (cols * (cell_w + pad) + pad, rows * (cell_h + pad) + pad),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    peaks = map_peaks(maps)
    for i in range(b):
        x0 = pad + (i % cols) * (cell_w + pad)
        y0 = pad + (i // cols) * (cell_h + pad)
        left, right = (x0, y0 + text_h), (x0 + tile_w + gap, y0 + text_h)
        grid.paste(_to_pil(frames[i], scale), left)
        grid.paste(_to_pil(overlay(frames[i].cpu(), maps[i].cpu()), scale), right)
        for ox, oy in (left, right):
            for bx0, by0, bx1, by1 in (boxes[i] if boxes else []):
                draw.rectangle([ox + bx0 * tile_w, oy + by0 * tile_h,
                                ox + bx1 * tile_w - 1, oy + by1 * tile_h - 1],
                               outline=(0, 255, 0), width=2)
        px = right[0] + peaks[i, 0].item() * tile_w
        py = right[1] + peaks[i, 1].item() * tile_h
        draw.line([px - 6, py, px + 6, py], fill=(255, 255, 255), width=2)
        draw.line([px, py - 6, px, py + 6], fill=(255, 255, 255), width=2)
        if captions:
            draw.text((x0, y0), captions[i], fill=(0, 0, 0))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    grid.save(path)


def _clip_boxes(entry, image_size):
    """The clip's object boxes in the evaluation frame, as fractions of the model's crop."""
    return [data.box_in_crop(box, entry["frame_size"], image_size)
            for box in entry["boxes"][data.EVAL_FRAME]]


def pointing_game(model, dataset, entries, T_a, device, batch_size=32, num_workers=0, amp=False):
    """Pointing game over every clip of `dataset` (an eval AudioVisualDataset whose
    manifest `entries` carry per-frame "boxes" and "frame_size", as the toy's do).

    A clip counts as a hit when its heat map's maximum lies inside one of its
    objects' boxes in the evaluation frame. Returns percentages for the model,
    for always pointing at the frame centre, and the expected score of a
    uniformly random point (the mean box area), plus the number of clips.
    "minimum_in_box" is a diagnostic, not a score: how often the map's minimum
    falls in the box. SPEC 13's map applies g_inter_v to single patch tokens,
    which the inter-modal loss never sees, so nothing in training fixes the
    sign of the map's contrast between object and background.
    """
    loader = data.make_loader(dataset, batch_size, train=False, num_workers=num_workers,
                              distributed=False)
    hits, lows, centre, area = [], [], [], []
    for batch in loader:
        maps = localization_maps(model, batch["audio"].to(device), batch["frame"].to(device),
                                 T_a, amp)
        boxes = [_clip_boxes(entries[i], dataset.image_size) for i in batch["index"].tolist()]
        hits.append(points_in_boxes(map_peaks(maps).cpu(), boxes))
        lows.append(points_in_boxes(map_peaks(-maps).cpu(), boxes))
        centre.append(points_in_boxes(torch.full((len(boxes), 2), 0.5, dtype=torch.float64), boxes))
        area += [min(1.0, sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in bs)) for bs in boxes]
    return {"pointing_game": 100.0 * torch.cat(hits).double().mean().item(),
            "minimum_in_box": 100.0 * torch.cat(lows).double().mean().item(),
            "centre_baseline": 100.0 * torch.cat(centre).double().mean().item(),
            "random_point_expected": 100.0 * float(np.mean(area)),
            "n_clips": len(area)}


# ---------------------------------------------------------------------------
# The script
# ---------------------------------------------------------------------------

def main(cfg):
    """Run retrieval (and localization) with `cfg`; returns the results dict."""
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
    model = convert.load_equiav(cfg.checkpoint, cfg.preset).to(device).eval()
    mcfg = model.cfg
    stored = convert.peek_checkpoint(cfg.checkpoint).get("norm_stats")  # None: an authors' file
    mean, std = data.resolve_norm_stats(cfg.norm_stats, manifest, stored, mcfg.audio_length,
                                        mcfg.mel_bins)
    dataset = data.AudioVisualDataset(manifest, audio_length=mcfg.audio_length,
                                      mel_bins=mcfg.mel_bins, image_size=mcfg.image_size,
                                      train=False, norm_mean=mean, norm_std=std)
    loader = data.make_loader(dataset, cfg.batch_size, train=False, num_workers=cfg.num_workers)

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
    if cfg.localize > 0 and utils.is_main():
        results["localization"] = _localize(model, dataset, manifest, cfg, device)
    if utils.is_main():
        os.makedirs(cfg.out_dir, exist_ok=True)
        with open(os.path.join(cfg.out_dir, "retrieval.json"), "w") as f:
            json.dump(results, f, indent=1)
        utils.print0(f"wrote {os.path.join(cfg.out_dir, 'retrieval.json')}")
    utils.barrier()
    return results


def _localize(model, dataset, manifest, cfg, device):
    """The localization grid for the chosen clips and, with boxes, the pointing game."""
    entries = data.read_manifest(manifest)
    T_a = centroid_vectors(model.cfg, cfg.S, cfg.seed)[0].to(device)
    if cfg.localize_indices:
        chosen = [int(i) for i in cfg.localize_indices.split(",")]
    else:
        chosen = list(range(min(cfg.localize, len(dataset))))
    batch = data.collate([dataset[i] for i in chosen])
    maps = localization_maps(model, batch["audio"].to(device), batch["frame"].to(device), T_a,
                             cfg.amp)
    has_boxes = all(isinstance(e, dict) and "boxes" in e and "frame_size" in e for e in entries)
    boxes = [_clip_boxes(entries[i], dataset.image_size) for i in chosen] if has_boxes else None
    captions = [f"#{i} {entries[i].get('labels', '')}"[:48] for i in chosen]
    png = os.path.join(cfg.out_dir, "localization.png")
    save_localization_grid(png, batch["frame"], maps.cpu(), boxes, captions)
    out = {"png": png, "clips": chosen}
    utils.print0(f"wrote {png} ({len(chosen)} clips: frame | heat map, box in green, "
                 f"map maximum as a white cross)")
    if has_boxes:
        score = pointing_game(model, dataset, entries, T_a, device, cfg.batch_size,
                              cfg.num_workers, cfg.amp)
        out.update(score)
        utils.print0(f"pointing game on {score['n_clips']} clips: {score['pointing_game']:.1f}% "
                     f"of map maxima inside the object's box; centre point "
                     f"{score['centre_baseline']:.1f}%, random point "
                     f"{score['random_point_expected']:.1f}% (expected); diagnostic: the map's "
                     f"minimum is inside the box for {score['minimum_in_box']:.1f}%")
    return out


if __name__ == "__main__":
    main(utils.parse_config(RetrievalConfig, description=__doc__.splitlines()[0]))
