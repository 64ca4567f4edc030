"""Parameterized augmentations and their parameter vectors (SPEC 8).

Every augmentation is sampled per sample, applied to a whole batch at once on
the batch's device, and recorded as a normalized parameter vector t that the
augmentation encoder e_m reads (SPEC 3). The slot layouts below are the single
definition used by sampling, application, encoding and checkpoint conversion.

Parameters are sampled on CPU from a torch.Generator (vectorized over samples), then
apply_* decodes t alone -- it is a pure function of (input, t) -- so what t records is
what was done. Visual ops follow torchvision on the [0, 1] image; audio ops act on the
normalized (B, T, F) spectrogram (axis 1 time, axis 2 frequency) without clamping.
Our choices where SPEC 8 leaves room: visual blur kernel size 2 ceil(3 sigma) + 1;
crop boxes drawn like torchvision's RandomResizedCrop (10 attempts, then a centred
fallback); SpecAugment max widths scale with the input size (192 T/1024, 48 F/128).
"""

import math

import torch


# ---------------------------------------------------------------------------
# Slot layouts (SPEC 8). Order follows the public code so that its checkpoints
# convert (SPEC 10); every value is stored normalized.
# ---------------------------------------------------------------------------

# Visual, d_t = 18, applied to the [0, 1] image in this order.
VISUAL_LAYOUT = (
    "rrc_on", "rrc_top", "rrc_left", "rrc_height", "rrc_width",       # 0-4   top/H, left/W, height/H, width/W
    "cj_on", "cj_order0", "cj_order1", "cj_order2", "cj_order3",      # 5-9   op index applied 1st..4th, /3
    "cj_brightness", "cj_contrast", "cj_saturation", "cj_hue",        # 10-13 b-1, c-1, s-1, hue
    "blur_on", "blur_sigma",                                          # 14-15
    "flip_on",                                                        # 16    horizontal flip
    "gray_on",                                                        # 17
)

# Audio, d_t = 24, applied to the normalized (T, F) spectrogram in this order.
AUDIO_LAYOUT = (
    "specaug_on", "tmask_start", "tmask_end", "fmask_start", "fmask_end",  # 0-4   /T, /T, /F, /F
    "shift_on", "shift",                                                 # 5-6   shift/T
    "rrc_on", "rrc_time_start", "rrc_freq_start", "rrc_time_len", "rrc_freq_width",  # 7-11 /T, /F, /T, /F
    "cj_on", "cj_order0", "cj_order1", "cj_order2", "cj_order3",         # 12-16
    "cj_brightness", "cj_contrast", "cj_saturation", "cj_hue",           # 17-20
    "blur_on", "blur_sigma",                                             # 21-22
    "flip_on",                                                           # 23    flip of the frequency axis
)

VISUAL_SLOTS = {name: i for i, name in enumerate(VISUAL_LAYOUT)}
AUDIO_SLOTS = {name: i for i, name in enumerate(AUDIO_LAYOUT)}
# The slots of each augmentation, named as the paper's figures name them.
VISUAL_GROUPS = {"crop": VISUAL_LAYOUT[0:5], "colour jitter": VISUAL_LAYOUT[5:14],
                 "blur": VISUAL_LAYOUT[14:16], "flip": VISUAL_LAYOUT[16:17],
                 "grayscale": VISUAL_LAYOUT[17:18]}
AUDIO_GROUPS = {"specaugment": AUDIO_LAYOUT[0:5], "shift": AUDIO_LAYOUT[5:7],
                "crop": AUDIO_LAYOUT[7:12], "jitter": AUDIO_LAYOUT[12:21],
                "blur": AUDIO_LAYOUT[21:23], "flip": AUDIO_LAYOUT[23:24]}
assert sum(map(len, VISUAL_GROUPS.values())) == len(VISUAL_LAYOUT)
assert sum(map(len, AUDIO_GROUPS.values())) == len(AUDIO_LAYOUT)
# The crop's slots in (on, top, left, height, width) order of its (rows, cols) plane:
# the image is (H, W); the spectrogram (T, F), time as rows and frequency as columns.
VISUAL_CROP = ("rrc_on", "rrc_top", "rrc_left", "rrc_height", "rrc_width")
AUDIO_CROP = ("rrc_on", "rrc_time_start", "rrc_freq_start", "rrc_time_len", "rrc_freq_width")
VISUAL_DIM = len(VISUAL_LAYOUT)  # 18
AUDIO_DIM = len(AUDIO_LAYOUT)    # 24
assert VISUAL_DIM == 18 and AUDIO_DIM == 24

# ---------------------------------------------------------------------------
# Constants (SPEC 1, 8)
# ---------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's luma weights, used by grayscale, contrast and saturation.
_LUMA = (0.2989, 0.587, 0.114)

CROP_SCALE = (0.08, 1.0)                     # area fraction, both modalities
VISUAL_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)   # width / height
AUDIO_CROP_RATIO = (1.0 / 10.0, 1.5 / 8.0)   # freq width / time length, at T=1024, F=128
CROP_ATTEMPTS = 10                           # torchvision's rejection attempts before the fallback
P_SPECAUG, P_JITTER, P_BLUR, P_FLIP, P_GRAY = 0.8, 0.8, 0.5, 0.5, 0.2
JITTER_STRENGTH = 0.4                        # brightness/contrast/saturation factors U(0.6, 1.4)
HUE_RANGE = 0.1                              # hue shift U(-0.1, 0.1)
SIGMA_RANGE = (0.1, 2.0)
# SpecAugment max widths at the base size (T=1024, F=128); they scale with T and F.
TIME_MASK_MAX, FREQ_MASK_MAX, BASE_T, BASE_F = 192, 48, 1024, 128

# Colour-jitter ops, indexed as torchvision's ColorJitter (the recorded order uses these).
BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
_ORDER_NAMES = ("cj_order0", "cj_order1", "cj_order2", "cj_order3")
_FACTOR_NAMES = ("cj_brightness", "cj_contrast", "cj_saturation", "cj_hue")


def normalize_image(img):
    """ImageNet normalization, the last visual step (SPEC 1). img (B, 3, H, W) in [0, 1]."""
    mean = torch.tensor(IMAGENET_MEAN, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=img.device, dtype=img.dtype).view(1, 3, 1, 1)
    return (img - mean) / std


# ---------------------------------------------------------------------------
# Identity vectors (SPEC 8): full-extent crop, identity jitter order, all else 0
# ---------------------------------------------------------------------------

def _identity(n, slots, dim, full_names, device):
    t = torch.zeros(n, dim, dtype=torch.float32, device=device)
    for name in ("rrc_on",) + full_names:
        t[:, slots[name]] = 1.0
    for k, name in enumerate(_ORDER_NAMES):
        t[:, slots[name]] = k / 3.0
    return t


def audio_identity(n, device=None):
    """(n, 24) vector of "no augmentation" (SPEC 8)."""
    return _identity(n, AUDIO_SLOTS, AUDIO_DIM, ("rrc_time_len", "rrc_freq_width"), device)


def visual_identity(n, device=None):
    """(n, 18) vector of "no augmentation" (SPEC 8)."""
    return _identity(n, VISUAL_SLOTS, VISUAL_DIM, ("rrc_height", "rrc_width"), device)


# ---------------------------------------------------------------------------
# Sampling (on CPU, vectorized over samples)
# ---------------------------------------------------------------------------

def _check_generator(generator):
    if generator is not None and generator.device.type != "cpu":
        raise ValueError(f"augmentation parameters are sampled on CPU; got a generator on {generator.device}")


def _uniform(shape, lo, hi, generator, dtype=torch.float32):
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


def _bernoulli(n, p, generator):
    return torch.rand(n, generator=generator) < p


def _sample_crop_boxes(n, generator, H, W, scale, ratio):
    """torchvision's RandomResizedCrop.get_params, vectorized over samples and attempts.

    Each sample takes the first of CROP_ATTEMPTS (area, log-uniform aspect ratio w/h)
    draws that fits in the (H, W) plane, else the centre crop with the ratio clamped.
    Returns integer (top, left, height, width), each (n,) int64.
    """
    area = H * W
    target = area * _uniform((n, CROP_ATTEMPTS), *scale, generator, torch.float64)
    aspect = torch.exp(_uniform((n, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]),
                                generator, torch.float64))
    w = torch.round(torch.sqrt(target * aspect))   # round half to even, as Python's round()
    h = torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first = fits.int().argmax(dim=1, keepdim=True)   # first fitting attempt (0 if none fits)
    found = fits.any(dim=1)
    h = h.gather(1, first).squeeze(1).long()
    w = w.gather(1, first).squeeze(1).long()
    u_top = torch.rand(n, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, generator=generator, dtype=torch.float64)

    # Fallback: the whole plane, cropped to the nearest allowed aspect ratio, centred.
    in_ratio = W / H
    if in_ratio < ratio[0]:
        fw, fh = W, int(round(W / ratio[0]))
    elif in_ratio > ratio[1]:
        fw, fh = int(round(H * ratio[1])), H
    else:
        fw, fh = W, H
    h = torch.where(found, h, fh)
    w = torch.where(found, w, fw)
    top = torch.floor(u_top * (H - h + 1)).long().clamp(max=H - h)   # uniform in [0, H - h]
    left = torch.floor(u_left * (W - w + 1)).long().clamp(max=W - w)
    top = torch.where(found, top, (H - fh) // 2)
    left = torch.where(found, left, (W - fw) // 2)
    return top, left, h, w


def _sample_color_jitter(n, generator):
    """Colour jitter (SPEC 8): on with p 0.8, a random op order, factors.

    Returns on (n,) bool, order (n, 4) int64 (op index applied 1st..4th), and the
    stored values (n, 4): b-1, c-1, s-1, hue. Off samples get the identity order and 0s.
    """
    on = _bernoulli(n, P_JITTER, generator)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)   # a uniform permutation
    values = torch.cat([
        _uniform((n, 3), -JITTER_STRENGTH, JITTER_STRENGTH, generator),
        _uniform((n, 1), -HUE_RANGE, HUE_RANGE, generator),
    ], dim=1)
    order = torch.where(on[:, None], order, torch.arange(4))
    values = torch.where(on[:, None], values, 0.0)
    return on, order, values


def _write_crop(t, slots, names, boxes, H, W):
    """Store integer crop boxes (top, left, height, width) of an (H, W) plane in the
    crop slots `names` (VISUAL_CROP / AUDIO_CROP), normalized by (H, W, H, W)."""
    t[:, slots[names[0]]] = 1.0
    for name, value, size in zip(names[1:], boxes, (H, W, H, W)):
        t[:, slots[name]] = (value.double() / size).float()


def _write_blur_and_flip(t, slots, generator):
    """Sample and store the Gaussian blur (p 0.5, sigma U(0.1, 2)) and the flip (p 0.5)."""
    on = _bernoulli(t.shape[0], P_BLUR, generator)
    sigma = _uniform(t.shape[0], *SIGMA_RANGE, generator)
    t[:, slots["blur_on"]] = on.float()
    t[:, slots["blur_sigma"]] = torch.where(on, sigma, 0.0)
    t[:, slots["flip_on"]] = _bernoulli(t.shape[0], P_FLIP, generator).float()


def _write_color_jitter(t, slots, on, order, values):
    t[:, slots["cj_on"]] = on.float()
    for k, name in enumerate(_ORDER_NAMES):
        t[:, slots[name]] = order[:, k].float() / 3.0
    for k, name in enumerate(_FACTOR_NAMES):
        t[:, slots[name]] = values[:, k]


def sample_visual_params(n, generator, H=224, W=224):
    """Sample n visual augmentations (SPEC 8) -> (n, 18) float32 on CPU.

    RRC boxes are integers in the (H, W) input; stored top/H, left/W, height/H, width/W.
    """
    _check_generator(generator)
    S = VISUAL_SLOTS
    t = torch.zeros(n, VISUAL_DIM)
    boxes = _sample_crop_boxes(n, generator, H, W, CROP_SCALE, VISUAL_CROP_RATIO)
    _write_crop(t, S, VISUAL_CROP, boxes, H, W)
    _write_color_jitter(t, S, *_sample_color_jitter(n, generator))
    _write_blur_and_flip(t, S, generator)
    t[:, S["gray_on"]] = _bernoulli(n, P_GRAY, generator).float()
    return t


def sample_audio_params(n, generator, T=1024, F=128):
    """Sample n audio augmentations (SPEC 8) -> (n, 24) float32 on CPU.

    SpecAugment (p 0.8): a time mask of integer width floor(U(0, 192 T/1024)) and a
    frequency mask of width floor(U(0, 48 F/128)), each at a uniform integer start;
    stored as start/T, end/T (end exclusive), start/F, end/F. The time shift is on
    exactly when SpecAugment is: an integer uniform in [-T, T), stored shift/T. The crop
    of the (T, F) plane is torchvision's RRC with time as height and frequency as width.
    """
    _check_generator(generator)
    S = AUDIO_SLOTS
    t = torch.zeros(n, AUDIO_DIM)
    spec_on = _bernoulli(n, P_SPECAUG, generator)
    spans = []
    for size, max_width in ((T, TIME_MASK_MAX * T / BASE_T), (F, FREQ_MASK_MAX * F / BASE_F)):
        width = torch.floor(torch.rand(n, generator=generator) * min(max_width, size)).long()
        start = torch.floor(torch.rand(n, generator=generator) * (size - width + 1)).long()
        start = torch.minimum(start, size - width)
        spans.append((start, start + width, size))
    shift = torch.randint(-T, T, (n,), generator=generator)
    for (start, end, size), (s_name, e_name) in zip(spans, (("tmask_start", "tmask_end"),
                                                            ("fmask_start", "fmask_end"))):
        t[:, S[s_name]] = torch.where(spec_on, start.double() / size, 0.0).float()
        t[:, S[e_name]] = torch.where(spec_on, end.double() / size, 0.0).float()
    t[:, S["specaug_on"]] = spec_on.float()
    t[:, S["shift_on"]] = spec_on.float()
    t[:, S["shift"]] = torch.where(spec_on, shift.double() / T, 0.0).float()

    # Time is the crop's height and frequency its width: ratio = freq width / time length.
    # SPEC 8's ratio range is for the 1024 x 128 plane (aspect 1/8); other input sizes
    # keep the same range relative to their own aspect, so the full plane stays allowed.
    rel = (F / T) / (BASE_F / BASE_T)
    ratio = (AUDIO_CROP_RATIO[0] * rel, AUDIO_CROP_RATIO[1] * rel)
    boxes = _sample_crop_boxes(n, generator, T, F, CROP_SCALE, ratio)
    _write_crop(t, S, AUDIO_CROP, boxes, T, F)
    _write_color_jitter(t, S, *_sample_color_jitter(n, generator))
    _write_blur_and_flip(t, S, generator)
    return t


def sample_visual_vectors(B, S, generator, H=224, W=224):
    """S vectors per sample for the centroid (SPEC 6), never applied: (B, S, 18) on CPU."""
    return sample_visual_params(B * S, generator, H, W).view(B, S, VISUAL_DIM)


def sample_audio_vectors(B, S, generator, T=1024, F=128):
    """S vectors per sample for the centroid (SPEC 6), never applied: (B, S, 24) on CPU."""
    return sample_audio_params(B * S, generator, T, F).view(B, S, AUDIO_DIM)


# ---------------------------------------------------------------------------
# Application building blocks (any device)
#
# Every decision -- which samples, which boxes, which kernel sizes -- is read from a
# CPU copy of t, so on a GPU nothing here waits for queued work (no host-device
# sync); the device only receives small tensors (factors, sample indices, kernels).
# The steps are plain per-sample torch where that costs nothing measurable; two are
# fused because bench.py showed the plain form slower on the CPU at the base sizes
# (batch 16), and their docstrings state the plain expression they equal (tests
# compare them with torchvision's ops):
# - colour jitter (_color_jitter_): brightness, contrast and saturation are all
#   clamp(f x + (1 - f) g) with g = 0, the mean grey or the grey image, so each of the
#   four rounds is one in-place pass in which every sample applies the op it drew
#   (f = 1: unchanged); only hue runs on its subset. Per-op subsets: apply_visual
#   15-25 % slower.
# - Gaussian blur (_blur_axis): separable, as shifted multiply-adds; a depthwise
#   conv2d: apply_audio 40 % and apply_visual 10 % slower.
# Geometry flips ahead of colour and blur because they commute with it: per-pixel
# ops, a global mean, symmetric kernels with reflect padding.
# ---------------------------------------------------------------------------

def _host(t):
    """t -> float32 CPU copy (a device sync only when the caller hands over a GPU t)."""
    return t.detach().to("cpu", torch.float32)


def to_device(x, device):
    """Small CPU tensor -> device without waiting for queued GPU work (pinned, non-blocking)."""
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _apply_to_(x, on, fn):
    """Apply fn in place to the samples of x where on (B,) CPU bool is set (computed on that subset only)."""
    idx = on.nonzero().squeeze(1)
    if idx.numel() > 0:
        idx = to_device(idx, x.device)
        x.index_copy_(0, idx, fn(x[idx]))
    return x


def _decode_int(value, size):
    """Stored value (x / size) -> the integer x. Exact: float32 keeps 24 bits."""
    return torch.round(value.double() * size).long()


def _decode_boxes(tc, slots, names, H, W):
    """Crop boxes (top, left, height, width) from CPU t as lists of ints, clamped into
    the (H, W) plane so that any t decodes to a valid crop; the full plane where the
    crop is off. names: the on, top, left, height and width slot names."""
    on = tc[:, slots[names[0]]] > 0.5
    top, left, h, w = (torch.where(on, _decode_int(tc[:, slots[name]], size), default)
                       for name, size, default in zip(names[1:], (H, W, H, W), (0, 0, H, W)))
    h, w = h.clamp(1, H), w.clamp(1, W)
    top = torch.minimum(top.clamp(min=0), H - h)
    left = torch.minimum(left.clamp(min=0), W - w)
    return top.tolist(), left.tolist(), h.tolist(), w.tolist()


def _resize(win, H, W):
    """(..., h, w) window -> (..., H, W), torchvision resized_crop's bilinear resize."""
    if tuple(win.shape[-2:]) == (H, W):
        return win
    lead = win.shape[:-2]
    y = torch.nn.functional.interpolate(win.reshape(1, -1, *win.shape[-2:]), size=(H, W),
                                        mode="bilinear", align_corners=False, antialias=False)
    return y.view(*lead, H, W)


def _audio_geometry(spec, tc):
    """SpecAugment masks -> circular time shift -> random resized crop -> frequency flip
    (SPEC 8), per sample, into a new (B, T, F) tensor. (A fused variant that copied
    only the crop window, zeroing the masks inside it, saved 4 % of apply_audio on the
    CPU at the base size, within bench.py's run-to-run spread; this is the plain form.)"""
    B, T, F = spec.shape
    S = AUDIO_SLOTS
    top, left, h, w = _decode_boxes(tc, S, AUDIO_CROP, T, F)
    masked = (tc[:, S["specaug_on"]] > 0.5).tolist()
    ts, te, fs, fe = (_decode_int(tc[:, S[name]], size).tolist() for name, size in
                      (("tmask_start", T), ("tmask_end", T), ("fmask_start", F), ("fmask_end", F)))
    shift = torch.where(tc[:, S["shift_on"]] > 0.5, _decode_int(tc[:, S["shift"]], T), 0).tolist()
    flip = (tc[:, S["flip_on"]] > 0.5).tolist()
    out = torch.empty_like(spec)
    for b in range(B):
        x = spec[b]                                             # (T, F)
        if masked[b]:
            x = x.clone()
            x[ts[b]:te[b], :] = 0.0                             # time mask: frames
            x[:, fs[b]:fe[b]] = 0.0                             # frequency mask: bins
        if shift[b]:
            x = torch.roll(x, shift[b], dims=0)                 # along time
        win = _resize(x[top[b]:top[b] + h[b], left[b]:left[b] + w[b]], T, F)
        out[b] = win.flip(1) if flip[b] else win                # frequency is axis 1 here
    return out


def _visual_geometry(img, tc):
    """Random resized crop -> horizontal flip (SPEC 8; the flip moved forward, see the
    section comment), one copy per sample into a new (B, 3, H, W) tensor."""
    B, _, H, W = img.shape
    S = VISUAL_SLOTS
    top, left, h, w = _decode_boxes(tc, S, VISUAL_CROP, H, W)
    flip = (tc[:, S["flip_on"]] > 0.5).tolist()
    out = torch.empty_like(img)
    for b in range(B):
        win = _resize(img[b, :, top[b]:top[b] + h[b], left[b]:left[b] + w[b]], H, W)
        out[b] = win.flip(2) if flip[b] else win                # flip width
    return out


def _blur_axis(y, k, dim):
    """Blur y (n, C, H, W) along `dim` (2: rows, 3: columns) with one 1-D kernel per
    sample, k (n, 2R+1), reflect padding: out_i = sum_d k_d y_(i+d), as 2R+1 in-place
    multiply-adds over whole shifted slabs. Equals the depthwise convolution
    F.conv2d(F.pad(y, R along dim, mode="reflect").view(1, n C, ...), k per channel as a
    (2R+1) x 1 (or 1 x (2R+1)) kernel, groups=n C), which bench.py measured slower on
    the CPU (see the section comment)."""
    n, L, R = y.shape[0], y.shape[dim], (k.shape[1] - 1) // 2
    yp = torch.nn.functional.pad(y, (0, 0, R, R) if dim == 2 else (R, R, 0, 0), mode="reflect")
    taps = k.view(n, 1, 1, 1, -1)
    out = yp.narrow(dim, 0, L) * taps[..., 0]
    for d in range(1, 2 * R + 1):
        out.addcmul_(yp.narrow(dim, d, L), taps[..., d])
    return out


def _gaussian_blur_(x, on, sigma, radius):
    """Per-sample Gaussian blur with reflect padding, in place for the samples with `on`.
    x (B, C, H, W); on, sigma, radius (B,) on the CPU.

    Kernel taps exp(-d^2 / 2 sigma^2) for |d| <= radius, normalized: torchvision's
    gaussian_blur with kernel size 2 radius + 1, whose 2-D kernel is the outer product
    of this 1-D kernel with itself -- so the blur is separable, a pass along rows then
    one along columns (2K instead of K^2 multiply-adds per pixel; equal up to rounding).
    Samples are grouped by kernel size (radius <= 6 for sigma <= 2).
    """
    _, C, H, W = x.shape
    on = on & (radius > 0)   # radius 0 is the 1-tap identity
    for R in torch.unique(radius[on]).tolist():
        if R >= min(H, W):
            raise ValueError(f"blur radius {R} needs an input larger than {H}x{W} (reflect padding)")
        idx = (on & (radius == R)).nonzero().squeeze(1)
        d = torch.arange(-R, R + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (d / sigma[idx, None]) ** 2)
        k = to_device(k / k.sum(dim=1, keepdim=True), x.device).to(x.dtype)   # (n, 2R+1)
        idx = to_device(idx, x.device)
        x.index_copy_(0, idx, _blur_axis(_blur_axis(x[idx], k, 2), k, 3))
    return x


def _luma(x):
    """(B, 3, H, W) -> (B, 1, H, W) with torchvision's grayscale weights."""
    return x[:, 0].mul(_LUMA[0]).add(x[:, 1], alpha=_LUMA[1]).add(x[:, 2], alpha=_LUMA[2]).unsqueeze(1)


def _rotate_hue(x, hue):
    """Shift the HSV hue of (n, 3, H, W) images in [0, 1] by hue (n,) (torchvision adjust_hue).

    The value (max) and chroma (max - min) are kept; RGB is rebuilt from the rotated
    hue h with the hexcone formula c_j = max - chroma * clamp(min(k_j, 4 - k_j), 0, 1),
    k_j = (m_j + 6 h) mod 6, m = (5, 3, 1) for (r, g, b); with min(k, 4 - k) = 2 - |k - 2|
    this is c_j = min + chroma * clamp(|k_j - 2| - 1, 0, 1).
    """
    r, g, b = x.unbind(dim=1)                                        # (n, H, W) each
    maxc, minc = x.amax(dim=1), x.amin(dim=1)
    chroma = maxc - minc
    # Hue in sextants [0, 6): (g - b)/chroma if r is the max, (b - r)/chroma + 2 if g, (r - g)/chroma + 4 if b.
    is_r = r == maxc
    is_g = g == maxc   # only used where r is not the max
    num = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    offset = (~is_r).to(x.dtype).mul_(2.0).add_(~(is_r | is_g), alpha=2.0)   # 0, 2 or 4
    h6 = (num / chroma.clamp(min=torch.finfo(x.dtype).tiny)).add_(offset)  # grey pixels: num = 0
    h6.add_(6.0 * hue.to(x.dtype).view(-1, 1, 1)).remainder_(6.0)
    m = torch.tensor((5.0, 3.0, 1.0), device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = (h6.unsqueeze(1) + m).remainder_(6.0)                       # (n, 3, H, W)
    k.sub_(2.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    return k.mul_(chroma.unsqueeze(1)).add_(minc.unsqueeze(1))


def _decode_color_jitter(tc, slots):
    """CPU t -> order (B, 4) op indices applied 1st..4th (-1: off), factors (B, 4):
    brightness, contrast, saturation factors and the hue shift."""
    on = tc[:, slots["cj_on"]] > 0.5
    order = torch.stack([_decode_int(tc[:, slots[name]], 3) for name in _ORDER_NAMES], dim=1)
    order = torch.where(on[:, None], order.clamp(0, 3), -1)
    factors = torch.stack([1.0 + tc[:, slots[name]] for name in _FACTOR_NAMES[:3]]
                          + [tc[:, slots["cj_hue"]]], dim=1)
    return order, factors


def _color_jitter_(x, order, factors):
    """Per-sample colour jitter of (B, 3, H, W) images in [0, 1], in place, in per-sample
    op order (torchvision semantics, each op clamped to [0, 1]). order (B, 4), factors
    (B, 4) on the CPU, from _decode_color_jitter.

    Round r applies every sample's r-th op. Brightness, contrast and saturation are
    torchvision's blend clamp(f x + (1 - f) g) with g = 0, the mean grey of the image
    or the grey image, computed for all samples at once: g = grey * a + mean * c with
    per-sample a, c in {0, 1 - f}, and f = 1, a = c = 0 (x unchanged, exactly) for
    samples whose r-th op is hue or off. Hue runs on its subset. The plain form it
    equals: for each round and op, x[idx] = adjust_op(x[idx], f[idx]) on the samples
    idx that drew that op (TF.adjust_brightness / contrast / saturation / hue).
    """
    B = x.shape[0]
    rows = torch.arange(B)
    for r in range(4):
        op = order[:, r]
        blend = (op >= 0) & (op != HUE)
        if bool(blend.any()):
            f = torch.where(blend, factors[rows, op.clamp(min=0)], 1.0).to(x.dtype)
            a = torch.where(op == SATURATION, 1.0 - f, 0.0)
            c = torch.where(op == CONTRAST, 1.0 - f, 0.0)
            f, a, c = (to_device(v.view(B, 1, 1, 1), x.device) for v in (f, a, c))
            if bool((op == SATURATION).any() or (op == CONTRAST).any()):
                grey = _luma(x)                                              # (B, 1, H, W)
                g = grey.mean(dim=(1, 2, 3), keepdim=True).mul_(c)           # (B, 1, 1, 1)
                x.mul_(f).add_(grey.mul_(a).add_(g))
            else:
                x.mul_(f)
            x.clamp_(0, 1)
        hue = (op == HUE).nonzero().squeeze(1)
        if hue.numel() > 0:
            shift = to_device(factors[hue, HUE], x.device)
            idx = to_device(hue, x.device)
            x.index_copy_(0, idx, _rotate_hue(x[idx], shift))
    return x


def _jitter_spectrogram_(x, order, factors):
    """Colour jitter of (B, T, F) spectrograms, in place, without clamping: brightness b
    multiplies, contrast c blends with the per-sample mean m; saturation and hue change
    nothing on one channel (as torchvision). Unclamped, the two remaining ops commute:
    either order gives b (c x + (1 - c) m), so the recorded order cannot change the result
    and one affine pass per sample does it. Off samples get b = c = 1 (x unchanged).
    order, factors on the CPU."""
    on = order[:, 0] >= 0
    if not bool(on.any()):
        return x
    b = torch.where(on, factors[:, BRIGHTNESS], 1.0).to(x.dtype).view(-1, 1, 1)
    c = torch.where(on, factors[:, CONTRAST], 1.0).to(x.dtype).view(-1, 1, 1)
    scale, offset = to_device(b * c, x.device), to_device(b * (1 - c), x.device)
    mean = x.mean(dim=(1, 2), keepdim=True)                     # (B, 1, 1) over time and frequency
    return x.mul_(scale).add_(offset * mean)


def _check_inputs(x, t, ndim, dim, what):
    if x.dim() != ndim:
        raise ValueError(f"{what}: expected a {ndim}-D batch, got shape {tuple(x.shape)}")
    if t.shape != (x.shape[0], dim):
        raise ValueError(f"{what}: expected t of shape ({x.shape[0]}, {dim}), got {tuple(t.shape)}")


# ---------------------------------------------------------------------------
# Application (SPEC 8): a pure function of (input, t), whole batch at once
# ---------------------------------------------------------------------------

def apply_visual(img, t):
    """Apply visual augmentations t (B, 18) to img (B, 3, H, W) in [0, 1] -> (B, 3, H, W) in [0, 1].

    Order (SPEC 8): random resized crop (back to H x W, bilinear) -> colour jitter (ops in
    the recorded order) -> Gaussian blur (kernel size 2 ceil(3 sigma) + 1: our choice,
    SPEC does not fix it) -> horizontal flip -> grayscale. torchvision semantics; the
    identity vector returns img unchanged. Runs on img.device; t may be anywhere, but a
    CPU t (as augment_visual passes) keeps a GPU from being synchronized.
    """
    _check_inputs(img, t, 4, VISUAL_DIM, "apply_visual")
    if img.shape[1] != 3:
        raise ValueError(f"apply_visual: expected 3 channels, got shape {tuple(img.shape)}")
    S = VISUAL_SLOTS
    tc = _host(t)
    x = _visual_geometry(img, tc)                          # crop and flip; a new tensor
    _color_jitter_(x, *_decode_color_jitter(tc, S))
    sigma = tc[:, S["blur_sigma"]]
    _gaussian_blur_(x, tc[:, S["blur_on"]] > 0.5, sigma, torch.ceil(3.0 * sigma.double()).long())
    _apply_to_(x, tc[:, S["gray_on"]] > 0.5, lambda y: _luma(y).expand_as(y))
    return x.clamp_(0, 1)


def apply_audio(spec, t):
    """Apply audio augmentations t (B, 24) to the normalized spectrogram spec (B, T, F).

    Axis 1 is time, axis 2 frequency. Order (SPEC 8): SpecAugment masks (set to 0) ->
    circular time shift -> random resized crop of the (T, F) plane back to (T, F) ->
    colour jitter (brightness, contrast; no clamping) -> Gaussian blur (kernel size
    2 ceil(sigma) + 1, reflect padding) -> flip of the frequency axis. Each step is gated
    by its own on-slot. The identity vector returns spec unchanged. Runs on spec.device;
    t may be anywhere, but a CPU t (as augment_audio passes) keeps a GPU from being
    synchronized.
    """
    _check_inputs(spec, t, 3, AUDIO_DIM, "apply_audio")
    S = AUDIO_SLOTS
    tc = _host(t)
    x = _audio_geometry(spec, tc)                          # masks, shift, crop, flip; a new tensor
    _jitter_spectrogram_(x, *_decode_color_jitter(tc, S))
    sigma = tc[:, S["blur_sigma"]]
    _gaussian_blur_(x.unsqueeze(1), tc[:, S["blur_on"]] > 0.5, sigma,
                    torch.ceil(sigma.double()).long())    # (B, 1, T, F) view of x
    return x


# ---------------------------------------------------------------------------
# Sample + apply
# ---------------------------------------------------------------------------

def augment_visual(img, generator):
    """Sample per-sample visual augmentations on CPU and apply them on img.device.
    img (B, 3, H, W) in [0, 1] -> (img_aug (B, 3, H, W) in [0, 1], t (B, 18) on img.device)."""
    t = sample_visual_params(img.shape[0], generator, img.shape[2], img.shape[3])
    return apply_visual(img, t), to_device(t, img.device)


def augment_audio(spec, generator):
    """Sample per-sample audio augmentations on CPU and apply them on spec.device.
    spec (B, T, F) -> (spec_aug (B, T, F), t (B, 24) on spec.device)."""
    t = sample_audio_params(spec.shape[0], generator, spec.shape[1], spec.shape[2])
    return apply_audio(spec, t), to_device(t, spec.device)


def random_time_roll(spec, generator):
    """Input noise on the original spectrogram (SPEC 12): a circular shift along time
    (axis 1) by an integer uniform in [0, T), per sample; not recorded. (B, T, F) -> (B, T, F)."""
    _check_generator(generator)
    B, T = spec.shape[:2]
    shift = torch.randint(0, T, (B,), generator=generator)
    # out[b, i] = spec[b, (i - shift_b) mod T], i.e. torch.roll(spec[b], shift_b, dims=0)
    # for each b: whole frames, so one row gather of (B*T, F) rows does all samples
    src = torch.remainder(torch.arange(T) - shift[:, None], T) + T * torch.arange(B)[:, None]
    rows = spec.reshape(B * T, -1).index_select(0, to_device(src.view(-1), spec.device))
    return rows.view(spec.shape)


# ---------------------------------------------------------------------------
# Baseline only (bench.py, tests): the same augmentations applied one sample at a
# time with torchvision ops, as a data-loader worker would. Not used in training.
# ---------------------------------------------------------------------------

def apply_visual_loop_reference(img, t):
    """BASELINE: apply_visual computed per sample with torchvision.transforms.v2.functional."""
    from torchvision.transforms.v2 import functional as TF
    S = VISUAL_SLOTS
    H, W = img.shape[-2:]
    t = t.detach().double().cpu()
    adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    out = []
    for x, v in zip(img, t):
        v = v.tolist()
        if v[S["rrc_on"]] > 0.5:
            box = [round(v[S[k]] * n) for k, n in (("rrc_top", H), ("rrc_left", W),
                                                   ("rrc_height", H), ("rrc_width", W))]
            x = TF.resized_crop(x, *box, size=[H, W], antialias=False)
        if v[S["cj_on"]] > 0.5:
            for name in _ORDER_NAMES:
                op = round(v[S[name]] * 3)
                value = v[S[_FACTOR_NAMES[op]]]
                x = adjust[op](x, value if op == HUE else 1.0 + value)
        if v[S["blur_on"]] > 0.5:
            sigma = v[S["blur_sigma"]]
            size = 2 * math.ceil(3 * sigma) + 1
            x = TF.gaussian_blur(x, [size, size], [sigma, sigma])
        if v[S["flip_on"]] > 0.5:
            x = TF.horizontal_flip(x)
        if v[S["gray_on"]] > 0.5:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        out.append(x.clamp(0, 1))
    return torch.stack(out)


def apply_audio_loop_reference(spec, t):
    """BASELINE: apply_audio computed per sample with torch / torchvision ops."""
    from torchvision.transforms.v2 import functional as TF
    S = AUDIO_SLOTS
    T, F = spec.shape[-2:]
    t = t.detach().double().cpu()
    out = []
    for x, v in zip(spec, t):
        v = v.tolist()
        if v[S["specaug_on"]] > 0.5:
            x = x.clone()
            x[round(v[S["tmask_start"]] * T):round(v[S["tmask_end"]] * T), :] = 0
            x[:, round(v[S["fmask_start"]] * F):round(v[S["fmask_end"]] * F)] = 0
        if v[S["shift_on"]] > 0.5:
            x = torch.roll(x, round(v[S["shift"]] * T), dims=0)
        if v[S["rrc_on"]] > 0.5:
            box = [round(v[S[k]] * n) for k, n in (("rrc_time_start", T), ("rrc_freq_start", F),
                                                   ("rrc_time_len", T), ("rrc_freq_width", F))]
            x = TF.resized_crop(x[None], *box, size=[T, F], antialias=False)[0]
        if v[S["cj_on"]] > 0.5:
            for name in _ORDER_NAMES:
                op = round(v[S[name]] * 3)
                if op == BRIGHTNESS:
                    x = x * (1.0 + v[S["cj_brightness"]])
                elif op == CONTRAST:
                    c = 1.0 + v[S["cj_contrast"]]
                    x = x * c + x.mean() * (1.0 - c)
        if v[S["blur_on"]] > 0.5:
            sigma = v[S["blur_sigma"]]
            size = 2 * math.ceil(sigma) + 1
            x = TF.gaussian_blur(x[None], [size, size], [sigma, sigma])[0]
        if v[S["flip_on"]] > 0.5:
            x = x.flip(-1)
        out.append(x)
    return torch.stack(out)


def augment_visual_loop_reference(img, generator):
    """BASELINE: augment_visual with a per-sample application loop (same sampled parameters)."""
    t = sample_visual_params(img.shape[0], generator, img.shape[2], img.shape[3])
    return apply_visual_loop_reference(img, t), t


def augment_audio_loop_reference(spec, generator):
    """BASELINE: augment_audio with a per-sample application loop (same sampled parameters)."""
    t = sample_audio_params(spec.shape[0], generator, spec.shape[1], spec.shape[2])
    return apply_audio_loop_reference(spec, t), t
