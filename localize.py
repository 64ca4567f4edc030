"""Sound-source localization, the paper's figure 3 (method.md §13): maps and their scores.

A map over the visual patch grid says how much each patch contributes to a clip's
audio-visual similarity s = cos(z_inter_a, z_inter_v), upsampled to the frame. The default,
"gradient", is integrated gradients of s from a grey frame's tokens (complete: the patches
add up to s - s_grey), times the probability that the sound is the frame's own, a logistic
fit of s on training clips (fit_confidence), so that a wrong sound leaves the frame dark.
Also: "gradient_raw" (without that factor), "gradient_input" (gradient x input), "occlusion"
(s - s without patch token i), "token" (cos(z_inter_a, g_inter_v(h_i))) and "attention"
(the predictor's cross-attention, which does not hear the sound).

Scores, where a manifest has boxes: the pointing game overall and by object size, the IoU
at the box's own area, and the literature's cIoU@0.5, mean cIoU and AUC (LVS, EZ-VSL),
each beside the centre point, a centred Gaussian and a random point scored alike
(against_baselines gives the ratios); under negative sounds (silence, noise, an off-screen
sound) the share of the frame above a threshold fixed on the true sounds (pIA) and the
AUROC of s; on the toy's distractor split the sounding and the silent object apart.
figure3.png draws each frame and its map beside the augmented view nearest to the visual
centroid; negatives.png each clip's maps under its four sounds. retrieval.py runs it all.
"""
import math
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import augment
import data
import utils

MAPS = ("gradient", "gradient_raw", "gradient_input", "occlusion", "token", "attention")
IG_STEPS = 8   # integrated gradients' midpoint steps (4 scored within 1 point of 8 when chosen)
SIZE_BUCKETS = {"<10%": (0.0, 0.10), "10-30%": (0.10, 0.30), ">30%": (0.30, 1.01)}


# ---------------------------------------------------------------------------
# The maps (method.md §13)
# ---------------------------------------------------------------------------

def visual_inter_without(model, h, T, drop):
    """model.inter_from_tokens("v", h, T) with patch token i removed from h (from the mean
    and the keys/values u_v reads), for every i in drop (c,) -> (B, c, proj_dim). The model
    does the removal itself (its `keep` mask); here h is repeated once per removed token."""
    B, N, D = h.shape
    c = drop.numel()
    keep = drop.view(c, 1) != torch.arange(N, device=h.device)          # (c, N): row r lacks drop[r]
    h_each = h.unsqueeze(1).expand(B, c, N, D).reshape(B * c, N, D)
    T_each = None if T is None else T.repeat_interleave(c, dim=0)        # (B c, S, d_t)
    z = model.inter_from_tokens("v", h_each, T_each, keep=keep.repeat(B, 1))
    return z.view(B, c, -1)


def localize(model, x_a, x_v, T_a=None, T_v=None, method="occlusion", chunk=64, confidence=None):
    """Sound-source maps over the visual patch grid (method.md §13) -> (B, rows, cols).

    x_a (B, T, F) normalized fbank, x_v (B, 3, H, W) ImageNet-normalized; T_a, T_v the
    fixed evaluation vectors (B, S, d_t). With s = cos(z_inter_a, z_inter_v):
    "gradient_raw": integrated gradients of s over the visual tokens the inter path
      reads, from the tokens of a grey frame h0 to the frame's h (integrated_gradients):
      m_i = (h_i - h0_i) . mean over the path of ds/dh_i, so that sum_i m_i = s(h) - s(h0);
    "gradient": that map times the calibrated probability that the sound belongs to the
      frame, p = confidence.probability(s) (a Confidence fitted on training clips), so
      that a wrong sound leaves the frame dark;
    "gradient_input": gradient x input, m_i = h_i . ds/dh_i (kept for comparison):
      the inter path is nearly scale-invariant in h (LayerNorms),
      so by Euler's theorem its map sums to about 0 whatever s is, and a large object,
      which makes most of the mean it is scaled along, comes out cold inside;
    "occlusion": m_i = s - s_{-i}, s recomputed with patch token i removed from the
      tokens the visual inter path reads (chunk tokens at a time);
    "token": m_i = cos(z_inter_a, g_inter_v(h_i)), the literal reading, which
      g_inter_v, trained on whole-frame embeddings only, was never fit for;
    "attention": m_i = the predictor's cross-attention on patch i, averaged over its heads
      and the S centroid queries: what u_v reads to make the visual centroid (no audio).
    """
    if method not in MAPS:
        raise ValueError(f"unknown localization method {method!r}: {', '.join(MAPS)}")
    if method == "gradient" and confidence is None:
        raise ValueError("the gradient map needs a Confidence fitted on training clips "
                         "(retrieval.py fits one); gradient_raw is the map without it")
    model = utils.unwrap(model)
    with torch.no_grad():
        z_a = F.normalize(model.inter_from_tokens("a", model.inter_tokens("a", x_a), T_a), dim=-1)
        h = model.inter_tokens("v", x_v)                                     # (B, N, D)
    if method == "attention":
        if model.predictor_v is None or T_v is None:
            raise ValueError("the attention map needs a model with a predictor and T_v")
        with torch.no_grad():
            m = model.predictor_v.attention(h, T_v).mean(dim=1)             # (B, N)
    elif method == "token":
        with torch.no_grad():
            z_tok = F.normalize(model.proj_inter_v(h), dim=-1)              # (B, N, P)
            m = torch.einsum("bp,bnp->bn", z_a, z_tok)
    elif method == "gradient_input":
        m = (h * _grad_of_s(model, z_a, h, T_v)).sum(dim=-1)
    elif method in ("gradient", "gradient_raw"):
        with torch.no_grad():   # the baseline: a grey frame (ImageNet's mean colour, 0 normalized)
            h0 = model.inter_tokens("v", torch.zeros_like(x_v[:1])).expand_as(h)
        m = integrated_gradients(model, z_a, h, h0, T_v)
        if method == "gradient":
            with torch.no_grad():
                s = F.cosine_similarity(z_a, model.inter_from_tokens("v", h, T_v), dim=-1)
            m = m * confidence.probability(s)[:, None]
    else:
        with torch.no_grad():
            s = F.cosine_similarity(z_a, model.inter_from_tokens("v", h, T_v), dim=-1)
            parts = []
            for drop in torch.arange(h.shape[1], device=h.device).split(chunk):
                z = visual_inter_without(model, h, T_v, drop)                # (B, c, P)
                parts.append(s[:, None] - F.cosine_similarity(z_a[:, None], z, dim=-1))
            m = torch.cat(parts, dim=1)
    return m.view(m.shape[0], *model.visual_encoder.grid)                  # (B, rows, cols)


def _grad_of_s(model, z_a, h, T_v):
    """ds/dh (B, N, D) of s = cos(z_a, z_inter_v(h)); clips do not interact: one backward."""
    with torch.enable_grad():
        h = h.detach().requires_grad_(True)
        s = F.cosine_similarity(z_a, model.inter_from_tokens("v", h, T_v), dim=-1)
        grad, = torch.autograd.grad(s.sum(), h)
    return grad


def integrated_gradients(model, z_a, h, h0, T_v, steps=IG_STEPS):
    """Integrated gradients (Sundararajan et al. 2017) of s over the tokens: (h - h0) .
    the mean of ds/dh at the midpoints of `steps` equal pieces of the straight path from
    h0 to h, summed over D -> (B, N). Its patches add up to s(h) - s(h0) (completeness, up
    to the midpoint rule's error), which gradient x input, at h alone, does not."""
    total = torch.zeros_like(h)
    for k in range(steps):
        total += _grad_of_s(model, z_a, h0 + (k + 0.5) / steps * (h - h0), T_v)
    return ((h - h0) * total / steps).sum(dim=-1)


class Confidence(NamedTuple):
    """p = sigmoid(a s + b): the probability that a clip's sound belongs to its frame, from
    s = cos(z_inter_a, z_inter_v), fitted on training clips (fit_confidence)."""
    a: float
    b: float

    def probability(self, s):
        return torch.sigmoid(self.a * s + self.b)


def fit_confidence(s_true, s_wrong, iterations=50):
    """Logistic regression of "the sound is the frame's own" on s, true pairs (label 1)
    against mismatched pairs (label 0), by Newton's method on the mean log-loss in float64
    (two parameters; a tiny ridge keeps separable data finite). Returns a Confidence."""
    s = torch.cat([torch.as_tensor(s_true), torch.as_tensor(s_wrong)]).double()
    y = torch.cat([torch.ones(len(s_true)), torch.zeros(len(s_wrong))]).double()
    x = torch.stack([s, torch.ones_like(s)], dim=1)                        # (n, 2)
    w = torch.zeros(2, dtype=torch.float64)
    ridge = 1e-4 * torch.eye(2, dtype=torch.float64)
    for _ in range(iterations):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) / len(y) + ridge @ w
        hess = (x.T * (p * (1 - p))) @ x / len(y) + ridge
        w = w - torch.linalg.solve(hess, grad)
    return Confidence(float(w[0]), float(w[1]))


# ---------------------------------------------------------------------------
# Maps at the frame's resolution, and the literature's scores
# ---------------------------------------------------------------------------

def upsample_maps(sim, size):
    """Patch-grid maps (B, H/p, W/p) -> (B, H, W), bilinear (pixel-centre aligned)."""
    return F.interpolate(sim[:, None].float(), size=tuple(size), mode="bilinear",
                         align_corners=False)[:, 0]


def localization_maps(model, audio, frame, T_a, T_v, method="occlusion", amp=False, chunk=64,
                      confidence=None):
    """Heat maps of where the sound is, at the frame's resolution (localize).

    audio (B, T, F) normalized fbank; frame (B, 3, H, W) in [0, 1]; T_a (1 or B,
    S, 24), T_v (1 or B, S, 18) the fixed centroid vectors. Returns (B, H, W).
    """
    b = audio.shape[0]
    with utils.autocast_context(audio.device, amp):
        sim = localize(model, audio, augment.normalize_image(frame), T_a.expand(b, -1, -1),
                       T_v.expand(b, -1, -1), method=method, chunk=chunk,
                       confidence=confidence)
    return upsample_maps(sim.detach(), frame.shape[-2:])               # (B, H, W)


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


def box_masks(boxes, h, w):
    """B lists of [x0, y0, x1, y1] (fractions) -> (B, h, w) bool, the union of each
    clip's boxes: the pixels whose centre lies inside one."""
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) / w
    ys = (torch.arange(h, dtype=torch.float64) + 0.5) / h
    out = torch.zeros(len(boxes), h, w, dtype=torch.bool)
    for i, clip_boxes in enumerate(boxes):
        for x0, y0, x1, y1 in clip_boxes:
            out[i] |= ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]
    return out


def binarize(maps):
    """The localization literature's prediction (LVS; EZ-VSL): each map min-max
    normalised and cut at its median, the pixels above the value at position H W / 2
    of its ascending order: the top half (fewer where values tie). (B, H, W) -> bool."""
    flat = maps.reshape(maps.shape[0], -1).double()
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    flat = (flat - lo) / (hi - lo).clamp_min(1e-12)
    median = flat.sort(dim=1).values[:, flat.shape[1] // 2, None]
    return (flat > median).view(maps.shape)


def ciou(pred, gt):
    """Consensus IoU per clip (LVS, Chen et al. 2021): sum(p g) / (sum g + sum p (1 - g)),
    pred and gt (B, H, W) bool. A clip without ground truth pixels scores 0."""
    inter = (pred & gt).flatten(1).sum(1).double()
    return inter / (gt.flatten(1).sum(1) + (pred & ~gt).flatten(1).sum(1)).double().clamp_min(1)


def ciou_scores(cious):
    """cIoU@0.5 (% of clips with cIoU >= 0.5), mean cIoU, and AUC: the area under the
    fraction of clips with cIoU >= x over x = 0, 0.05, ..., 1 (21 points, trapezoid)."""
    xs = torch.linspace(0, 1, 21, dtype=torch.float64)
    frac = (cious[None, :] >= xs[:, None]).double().mean(1)
    return {"ciou@0.5": 100.0 * (cious >= 0.5).double().mean().item(),
            "mean_ciou": cious.mean().item(), "auc": torch.trapezoid(frac, xs).item()}


def gaussian_map(h, w, sigma=0.25):
    """A centred Gaussian, (h, w), sigma a fraction of each side: the baseline map."""
    ys = ((torch.arange(h) + 0.5) / h - 0.5) / sigma
    xs = ((torch.arange(w) + 0.5) / w - 0.5) / sigma
    return torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))


def has_boxes(entries):
    return all(isinstance(e, dict) and e.get("boxes") for e in entries)


def clip_boxes(entry, image_size, frame_file):
    """(sounding boxes, silent boxes) of a manifest entry in the evaluation frame, as
    fractions of the model's centre crop.

    entry["boxes"]: per frame, per object (the toy's layout), or one list of boxes
    for the evaluation frame (VGG-SS / Flickr-SoundNet style); [x0, y0, x1, y1] as
    fractions of the stored frame. entry["sounding"]: the indices of the objects
    that sound (default all). entry["frame_size"] [W, H], else read from frame_file.
    """
    boxes = entry["boxes"]
    if isinstance(boxes[0][0], (list, tuple)):
        boxes = boxes[data.EVAL_FRAME]
    size = entry.get("frame_size")
    if size is None:
        with Image.open(frame_file) as img:
            size = img.size
    mapped = [data.box_in_crop(box, size, image_size) for box in boxes]
    sounding = set(entry.get("sounding", range(len(mapped))))
    return ([b for k, b in enumerate(mapped) if k in sounding],
            [b for k, b in enumerate(mapped) if k not in sounding])


def iou_at_area(maps, boxes, grid):
    """IoU of each map's top-k patches with its boxes, k = the boxes' area in patches (at
    least 1): no threshold, so a small object can score as well as a large one. maps
    (B, H, W) are averaged down to the patch grid (rows, cols); a patch is in a box when
    its centre is. (B,) float64."""
    pooled = F.adaptive_avg_pool2d(maps[:, None].double(), grid)[:, 0].flatten(1)   # (B, P)
    truth = box_masks(boxes, *grid).flatten(1)                                     # (B, P)
    k = truth.sum(1).clamp(min=1)
    order = pooled.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order))
    top = ranks < k[:, None]
    return (top & truth).sum(1).double() / (top | truth).sum(1).double()


def object_sizes(boxes, h=96, w=96):
    """Each clip's union of boxes as a fraction of the crop, (B,) float64."""
    return box_masks(boxes, h, w).flatten(1).double().mean(1)


def by_size(values, sizes):
    """Mean of per-clip values (B,) in each object-size bucket: {bucket: (mean, clips)}."""
    out = {}
    for name, (lo, hi) in SIZE_BUCKETS.items():
        inside = (sizes >= lo) & (sizes < hi)
        out[name] = (values[inside].double().mean().item() if inside.any() else float("nan"),
                     int(inside.sum()))
    return out


def score_maps(maps, boxes, grid=None):
    """Scores of maps (B, H, W) against B lists of boxes: the pointing game (the maximum
    inside a box), overall and per object size; the IoU at the box's own area (top-k
    patches on the patch `grid`, default one patch per 16 pixels); and the literature's
    cIoU@0.5, mean cIoU and AUC (median threshold: half the pixels are always predicted,
    so an object under a quarter of the frame can never reach IoU 0.5). Also the per-clip
    hits (for pairing two splits clip by clip)."""
    grid = grid or (maps.shape[1] // 16, maps.shape[2] // 16)
    hits = points_in_boxes(map_peaks(maps), boxes)
    sizes = object_sizes(boxes, *maps.shape[1:])
    iou = iou_at_area(maps, boxes, grid)
    cious = ciou(binarize(maps), box_masks(boxes, *maps.shape[1:]))
    pointing = {k: (100.0 * m, n) for k, (m, n) in by_size(hits, sizes).items()}
    return {"pointing_game": 100.0 * hits.double().mean().item(), "pointing_by_size": pointing,
            "iou_at_area": iou.mean().item(), **ciou_scores(cious), "hits": hits.tolist()}


def baseline_maps(n, h, w, seed=0):
    """The baselines, as maps scored like the model's: the centre point (a narrow centred
    peak: it points at the centre and its top-k is the central k patches), the centred
    Gaussian (sigma a quarter of each side) and a random point (uniform noise per clip)."""
    g = torch.Generator().manual_seed(seed)
    return {"centre_point": gaussian_map(h, w, sigma=0.05).expand(n, h, w),
            "gaussian": gaussian_map(h, w).expand(n, h, w),
            "random_point": torch.rand(n, h // 16, w // 16, generator=g)
            .repeat_interleave(16, 1).repeat_interleave(16, 2)}


def evaluate_localization(model, dataset, entries, T_a, T_v, device, method="occlusion",
                          batch_size=32, num_workers=0, amp=False, chunk=64, confidence=None):
    """Every clip of an evaluation dataset whose manifest `entries` carry boxes, scored
    against its sounding objects' boxes (and its silent ones', when some object does
    not sound): the pointing game and cIoU@0.5 / mean cIoU / AUC. Baselines on the
    sounding boxes: always the centre point, a uniformly random point (its expected
    score: the mean box area), and the centred Gaussian map scored like the maps.
    "minimum_in_box" is a diagnostic: how often the map's minimum is in a sounding box
    (overall and per object size: a map cold inside large objects shows there).
    """
    loader = data.make_loader(dataset, batch_size, train=False, num_workers=num_workers,
                              distributed=False)
    maps, sounding, silent = [], [], []
    for batch in loader:
        maps.append(localization_maps(model, batch["audio"].to(device, non_blocking=True),
                                      augment.frames_to(device, batch["frame"]),
                                      T_a, T_v, method, amp, chunk, confidence).cpu())
        for i in batch["index"].tolist():
            on, off = clip_boxes(entries[i], dataset.image_size,
                                 dataset.frame_file(i, data.EVAL_FRAME))
            sounding.append(on)
            silent.append(off)
    maps = torch.cat(maps)
    n, (h, w) = maps.shape[0], maps.shape[1:]
    coldest_in_box = points_in_boxes(map_peaks(-maps), sounding)
    out = {"method": method, "n_clips": n, "sounding": score_maps(maps, sounding),
           "minimum_in_box": 100.0 * coldest_in_box.double().mean().item(),
           "minimum_in_box_by_size": {k: (100.0 * m, c) for k, (m, c) in
                                      by_size(coldest_in_box, object_sizes(sounding)).items()}}
    if any(silent):
        out["silent"] = score_maps(maps, silent)
    out["baselines"] = {name: {k: v for k, v in score_maps(m, sounding).items() if k != "hits"}
                        for name, m in baseline_maps(n, h, w).items()}
    area = [min(1.0, sum((x1 - x0) * (y1 - y0) for x0, y0, x1, y1 in bs)) for bs in sounding]
    out["baselines"]["random_point_expected"] = 100.0 * float(np.mean(area))
    return out


@torch.no_grad()
def _confidence(model, audio, frame, T_a, T_v):
    """The clip's confidence that its sound is in its frame, defined before any scoring:
    s = cos(z_inter_a, z_inter_v), the retrieval similarity (method.md §13). (B,)"""
    b = audio.shape[0]
    z_a, z_v = utils.unwrap(model).embed(audio, augment.normalize_image(frame),
                                         T_a.expand(b, -1, -1), T_v.expand(b, -1, -1))
    return (z_a * z_v).sum(-1)


def evaluate_negatives(model, dataset, negatives, T_a, T_v, device, method="occlusion",
                       batch_size=32, num_workers=0, amp=False, chunk=64, confidence=None):
    """The maps under the true sound and under sounds the frame does not make.

    negatives: {kind: a dataset of the same frames, in the same order, with another sound}
    or {kind: "silence" | "scrambled"}, built here from `dataset` (digital silence; the next
    clip's sound). One global threshold is fixed on the true-sound maps before any negative
    is scored: half the median of their maxima. pIA (the fraction of the frame above it, %)
    for every set, and the AUROC of the confidence s (see _confidence) for the true sound
    against each negative. Also the maps and frames of the first clips (for the figure)."""
    def batches(ds):
        return data.make_loader(ds, batch_size, train=False, num_workers=num_workers,
                                distributed=False)
    silence = dataset._normalize(dataset.fbank(torch.zeros(41600), "silence"))    # (T, F)
    maps, conf, frames = {}, {}, []
    for kind, source in {"true": dataset, **negatives}.items():
        parts, scores = [], []
        loader = batches(dataset if isinstance(source, str) else source)
        for batch in loader:
            frame = augment.frames_to(device, batch["frame"])
            audio = batch["audio"]
            if source == "silence":
                audio = silence.expand_as(audio)
            elif source == "scrambled":   # the sound of the clip after it in the manifest
                audio = torch.stack([dataset[(int(i) + 1) % len(dataset)]["audio"]
                                     for i in batch["index"]])
            audio = audio.to(device, non_blocking=True)
            parts.append(localization_maps(model, audio, frame, T_a, T_v, method, amp, chunk,
                                           confidence).cpu())
            scores.append(_confidence(model, audio, frame, T_a, T_v).float().cpu())
            if kind == "true" and sum(len(f) for f in frames) < 8:
                frames.append(frame.cpu())
        maps[kind], conf[kind] = torch.cat(parts), torch.cat(scores)
    threshold = 0.5 * maps["true"].flatten(1).max(1).values.median().item()
    pia = {kind: 100.0 * (m > threshold).double().mean().item() for kind, m in maps.items()}
    auroc = {}
    for kind in negatives:   # how well s tells the true sound from this wrong one
        scores = torch.cat([conf["true"], conf[kind]])[:, None]                 # (n, 1)
        is_true = (torch.arange(len(scores)) < len(conf["true"]))[:, None]      # (n, 1)
        auroc[kind] = utils.roc_auc(scores, is_true).item()
    out = {"method": method, "threshold": threshold, "pia": pia, "auroc": auroc}
    figure = {kind: m[:8] for kind, m in maps.items()}
    return out, torch.cat(frames)[:8], figure


def against_baselines(scored):
    """The sounding object's pointing and IoU at box area as multiples of each baseline's
    (the centre point, the centred Gaussian, a random point), scored alike on the same
    clips: {baseline: {"pointing": ratio, "iou_at_area": ratio}} (None where the baseline
    scores 0)."""
    s = scored["sounding"]
    return {name: {key: (s[key] / b[key] if b[key] else None)
                   for key in ("pointing_game", "iou_at_area")}
            for name, b in scored["baselines"].items() if isinstance(b, dict)}


def format_negatives(score):
    pia = ", ".join(f"{k} {v:.1f}%" for k, v in score["pia"].items())
    roc = ", ".join(f"{k} {v:.3f}" for k, v in score["auroc"].items())
    return (f"negative sounds ({score['method']} map): pIA at one threshold {pia}; AUROC of the "
            f"confidence cos(z_a, z_v), true sound against {roc}")


def format_localization(name, score):
    """Lines for one evaluation: the model against the baselines, scored alike."""
    def row(what, s):
        sizes = " / ".join(f"{m:.1f}" for m, _ in s["pointing_by_size"].values())
        return (f"  {what:<16} pointing {s['pointing_game']:5.1f}% (by size {sizes})  IoU at "
                f"box area {s['iou_at_area']:.3f} | literature's, size-biased: cIoU@0.5 "
                f"{s['ciou@0.5']:.1f}%, mean cIoU {s['mean_ciou']:.3f}, AUC {s['auc']:.3f}")
    counts = " / ".join(f"{k} {n}" for k, (_, n) in score["sounding"]["pointing_by_size"].items())
    lines = [f"{name}: {score['method']} map, {score['n_clips']} clips (object sizes {counts})",
             row("sounding object", score["sounding"])]
    if "silent" in score:
        lines.append(row("silent object", score["silent"]))
    lines += [row(k.replace("_", " "), v) for k, v in score["baselines"].items() if isinstance(v, dict)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Figure 3 of the paper: the frame and its map, and the augmented view nearest
# to the visual centroid with its own map
# ---------------------------------------------------------------------------

@torch.no_grad()
def nearest_augmented_view(model, frame, T_v):
    """Among the S fixed centroid augmentations T_v (S, 18) applied to frame (3, H, W)
    in [0, 1], the one whose representation (mean-pooled tokens through norm_aug) is
    closest (cosine) to the visual centroid representation u_v(h_v, T_v) (mean_N(h_v)
    for a model without predictor). Returns (augmented frame (3, H, W), its t (18,))."""
    model = utils.unwrap(model)
    views = augment.apply_visual(frame.expand(T_v.shape[0], -1, -1, -1).contiguous(), T_v.cpu())
    reps = model.visual_encoder(augment.normalize_image(views), aug=True).mean(dim=1)  # (S, D)
    h = model.visual_encoder(augment.normalize_image(frame[None]))
    target = model.predictor_v(h, T_v[None]) if model.predictor_v is not None else h.mean(1)
    best = int(F.cosine_similarity(reps, target, dim=-1).argmax())
    return views[best], T_v[best]


def boxes_after_view(boxes, t):
    """Boxes (fractions of the frame) moved by the crop and flip that visual vector t
    applied; boxes that leave the view are dropped."""
    S = augment.VISUAL_SLOTS
    top, left, height, width = (float(t[S[k]]) for k in augment.VISUAL_GROUPS["crop"][1:])
    out = []
    for x0, y0, x1, y1 in boxes:
        x0, x1 = sorted(min(max((x - left) / width, 0.0), 1.0) for x in (x0, x1))
        y0, y1 = sorted(min(max((y - top) / height, 0.0), 1.0) for y in (y0, y1))
        if float(t[S["flip_on"]]) > 0.5:
            x0, x1 = 1.0 - x1, 1.0 - x0
        if x1 > x0 and y1 > y0:
            out.append([x0, y0, x1, y1])
    return out


def save_figure3(path, model, clips, T_a, T_v, device, method="occlusion", amp=False,
                 confidence=None):
    """One PNG in the manner of the paper's figure 3: a row per clip, the frame with
    its sounding boxes (green) and its map, then the augmented view nearest to the
    centroid with its map. clips: (audio (T, F), frame (3, H, W), boxes, caption)."""
    frames, maps, boxes, captions = [], [], [], []
    for audio, frame, clip_boxes, caption in clips:
        view, t = nearest_augmented_view(model, frame.to(device), T_v[0].to(device))
        both = torch.stack([frame.to(device), view])
        maps.append(localization_maps(model, audio[None].expand(2, -1, -1).to(device), both,
                                      T_a, T_v, method, amp, confidence=confidence).cpu())
        frames.append(both.cpu())
        boxes += [clip_boxes, boxes_after_view(clip_boxes, t)]
        captions += [caption, "nearest augmented view"]
    save_localization_grid(path, torch.cat(frames), torch.cat(maps), boxes, captions, cols=2)


def heat_colors(m):
    """A jet-like colormap: (H, W) in [0, 1] -> (3, H, W) RGB in [0, 1]
    (blue -> cyan -> yellow -> red), built from three clipped ramps."""
    return torch.stack([(1.5 - (4 * m - c).abs()).clamp(0, 1) for c in (3.0, 2.0, 1.0)])


def overlay(frame, m, alpha=0.5, scale=None):
    """frame (3, H, W) in [0, 1], map (H, W) -> the map coloured and blended over the
    frame: (3, H, W) in [0, 1]. scale (low, high): the values drawn blue and red (default:
    the map's own minimum and maximum)."""
    low, high = (m.min(), m.max()) if scale is None else scale
    m = ((m - low) / max(float(high - low), 1e-8)).clamp(0, 1)
    return (1 - alpha) * frame + alpha * heat_colors(m)


def _to_pil(img, scale):
    arr = (img.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr)
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_localization_grid(path, frames, maps, boxes=None, captions=None, cols=4, scale=2,
                           colour_scales=None):
    """One PNG: for every clip the frame (with its box, if known) next to the
    heat-map overlay (with the map's maximum marked by a white cross).

    frames (B, 3, H, W) in [0, 1]; maps (B, H, W); boxes: None or B lists of
    [x0, y0, x1, y1] fractions; captions: None or B strings; colour_scales: None (each
    map on its own scale) or B (low, high) pairs, e.g. shared by the maps of one clip.
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
        tone = None if colour_scales is None else colour_scales[i]
        grid.paste(_to_pil(overlay(frames[i].cpu(), maps[i].cpu(), scale=tone), scale), right)
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
