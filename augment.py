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


def _sample_blur(n, generator):
    on = _bernoulli(n, P_BLUR, generator)
    sigma = _uniform(n, *SIGMA_RANGE, generator)
    return on, torch.where(on, sigma, 0.0)


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
    top, left, h, w = _sample_crop_boxes(n, generator, H, W, CROP_SCALE, VISUAL_CROP_RATIO)
    t[:, S["rrc_on"]] = 1.0
    t[:, S["rrc_top"]] = (top.double() / H).float()
    t[:, S["rrc_left"]] = (left.double() / W).float()
    t[:, S["rrc_height"]] = (h.double() / H).float()
    t[:, S["rrc_width"]] = (w.double() / W).float()
    _write_color_jitter(t, S, *_sample_color_jitter(n, generator))
    blur_on, sigma = _sample_blur(n, generator)
    t[:, S["blur_on"]] = blur_on.float()
    t[:, S["blur_sigma"]] = sigma
    t[:, S["flip_on"]] = _bernoulli(n, P_FLIP, generator).float()
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
    top, left, h, w = _sample_crop_boxes(n, generator, T, F, CROP_SCALE, ratio)
    t[:, S["rrc_on"]] = 1.0
    t[:, S["rrc_time_start"]] = (top.double() / T).float()
    t[:, S["rrc_freq_start"]] = (left.double() / F).float()
    t[:, S["rrc_time_len"]] = (h.double() / T).float()
    t[:, S["rrc_freq_width"]] = (w.double() / F).float()
    _write_color_jitter(t, S, *_sample_color_jitter(n, generator))
    blur_on, sigma = _sample_blur(n, generator)
    t[:, S["blur_on"]] = blur_on.float()
    t[:, S["blur_sigma"]] = sigma
    t[:, S["flip_on"]] = _bernoulli(n, P_FLIP, generator).float()
    return t


def sample_visual_vectors(B, S, generator, H=224, W=224):
    """S vectors per sample for the centroid (SPEC 6), never applied: (B, S, 18) on CPU."""
    return sample_visual_params(B * S, generator, H, W).view(B, S, VISUAL_DIM)


def sample_audio_vectors(B, S, generator, T=1024, F=128):
    """S vectors per sample for the centroid (SPEC 6), never applied: (B, S, 24) on CPU."""
    return sample_audio_params(B * S, generator, T, F).view(B, S, AUDIO_DIM)


# ---------------------------------------------------------------------------
# Batched building blocks (any device; per-sample parameters, no per-sample loop)
# ---------------------------------------------------------------------------

def _apply_to_(x, on, fn):
    """Apply fn in place to the samples of x where on (B,) is set (computed on that subset only)."""
    idx = on.nonzero().squeeze(1)
    if idx.numel() > 0:
        x.index_copy_(0, idx, fn(x[idx]))
    return x


def _decode_int(value, size):
    """Stored value (x / size) -> the integer x. Exact: float32 keeps 24 bits."""
    return torch.round(value.double() * size).long()


def _take(x, dim, index):
    """Per-sample selection along `dim`: out[b, ..., j, ...] = x[b, ..., index[b, j], ...].

    x (B, ...); index (B, L) int64. Along the last axis this is a gather; along an
    earlier one every selected slice is a contiguous block of the trailing axes, so we
    copy whole rows with index_select (much faster than an element-wise gather on CPU).
    """
    B, L = index.shape
    if dim == x.dim() - 1:
        view = (B,) + (1,) * (x.dim() - 2) + (L,)
        return x.gather(dim, index.view(view).expand(x.shape[:-1] + (L,)))
    size = x.shape[dim]
    mid = math.prod(x.shape[1:dim])                                  # e.g. channels for (B, C, H, W)
    rows = x.reshape(B * mid * size, -1)                              # (B*mid*size, trailing)
    first = torch.arange(B * mid, device=x.device).view(B, mid, 1) * size
    sel = (first + index.view(B, 1, L)).view(-1)                      # (B*mid*L,) row numbers
    return rows.index_select(0, sel).view(x.shape[:dim] + (L,) + x.shape[dim + 1:])


def _crop_resize_axis(x, dim, start, length):
    """Resample the window [start, start + length) of x along `dim` back to the full size.

    Linear interpolation with torch's align_corners=False rule and the source
    coordinate clamped to the window, i.e. what torch.nn.functional.interpolate(mode="bilinear",
    antialias=False) does on the cropped tensor (torchvision resized_crop), one axis
    at a time. A full window (start 0, length = size) returns x exactly (weight 0).
    x (B, ...); start, length (B,) int64.
    """
    size = x.shape[dim]
    pos = torch.arange(size, device=x.device, dtype=torch.float64)
    scale = (length.float() / size).double()[:, None]        # the float32 scale torch uses
    # One rounding to float32 after multiply-add, as the fused multiply-add in torch's kernel.
    src = ((pos + 0.5) * scale - 0.5).float().clamp(min=0)   # (B, size) in window coordinates
    i0 = src.floor()
    lam = (src - i0).to(x.dtype)
    last = (length - 1)[:, None]
    i0 = torch.minimum(i0.long(), last)
    i1 = torch.minimum(i0 + 1, last)
    view = [x.shape[0]] + [1] * (x.dim() - 1)
    view[dim] = size
    out = _take(x, dim, start[:, None] + i0)
    return out.lerp_(_take(x, dim, start[:, None] + i1), lam.view(view))   # weight 0 keeps x0 exactly


def _resized_crop(x, dim_h, dim_w, top, left, h, w):
    """Per-sample crop boxes resized back to the input size (both axes), any leading dims.
    Boxes are clamped into the plane so that any t decodes to a valid crop."""
    h = h.clamp(1, x.shape[dim_h])
    w = w.clamp(1, x.shape[dim_w])
    top = torch.minimum(top.clamp(min=0), x.shape[dim_h] - h)
    left = torch.minimum(left.clamp(min=0), x.shape[dim_w] - w)
    full = (top == 0) & (left == 0) & (h == x.shape[dim_h]) & (w == x.shape[dim_w])
    if bool(full.all()):
        return x
    x = _crop_resize_axis(x, dim_h, top, h)
    return _crop_resize_axis(x, dim_w, left, w)


def _gaussian_blur_(x, on, sigma, radius):
    """Per-sample Gaussian blur with reflect padding, in place for the samples with `on`.
    x (B, C, H, W); on, sigma, radius (B,).

    Kernel taps exp(-d^2 / 2 sigma^2) for |d| <= radius, normalized, as the outer product
    of the 1-D kernel with itself: torchvision's gaussian_blur with kernel size
    2 radius + 1. Samples are grouped by kernel size (a handful of sizes: radius <= 6
    for sigma <= 2), one depthwise convolution per group with per-sample kernels.
    """
    _, C, H, W = x.shape
    on = on & (radius > 0)   # radius 0 is the 1-tap identity
    if not bool(on.any()):
        return x
    for R in torch.unique(radius[on]).tolist():
        if R >= min(H, W):
            raise ValueError(f"blur radius {R} needs an input larger than {H}x{W} (reflect padding)")
        idx = (on & (radius == R)).nonzero().squeeze(1)
        n = idx.numel()
        d = torch.arange(-R, R + 1, device=x.device, dtype=torch.float32)
        k = torch.exp(-0.5 * (d / sigma[idx, None]) ** 2)
        k = k / k.sum(dim=1, keepdim=True)                              # (n, 2R+1)
        k2 = (k[:, :, None] * k[:, None, :]).to(x.dtype)                # (n, 2R+1, 2R+1) rows x cols
        k2 = k2.repeat_interleave(C, dim=0).unsqueeze(1)                # (n*C, 1, K, K): one per channel
        y = x[idx].reshape(1, n * C, H, W)                              # samples x channels as conv groups
        y = torch.nn.functional.pad(y, (R, R, R, R), mode="reflect")
        y = torch.nn.functional.conv2d(y, k2, groups=n * C)
        x.index_copy_(0, idx, y.view(n, C, H, W))
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


def _decode_color_jitter(t, slots):
    on = t[:, slots["cj_on"]] > 0.5
    order = torch.stack([_decode_int(t[:, slots[name]], 3) for name in _ORDER_NAMES], dim=1)
    order = torch.where(on[:, None], order.clamp(0, 3), -1)                 # -1: nothing this round
    factors = torch.stack([1.0 + t[:, slots[name]] for name in _FACTOR_NAMES[:3]]
                          + [t[:, slots["cj_hue"]]], dim=1)                 # b, c, s factors; hue shift
    return order, factors


def _blend(x, other, f):
    """torchvision's _blend: clamp(x * f + other * (1 - f), 0, 1), per-sample f (n,). x (n, 3, H, W)."""
    f = f.to(x.dtype).view(-1, 1, 1, 1)
    return x.mul(f).add_(other * (1 - f)).clamp_(0, 1)


# Each op maps (images, per-sample factor (n,)) -> images, torchvision semantics.
_RGB_OPS = {   # (n, 3, H, W) in [0, 1], clamped
    BRIGHTNESS: lambda x, f: x.mul(f.to(x.dtype).view(-1, 1, 1, 1)).clamp_(0, 1),
    CONTRAST: lambda x, f: _blend(x, _luma(x).mean(dim=(1, 2, 3), keepdim=True), f),   # mean grey
    SATURATION: lambda x, f: _blend(x, _luma(x), f),                                     # grey image
    HUE: _rotate_hue,
}


def _color_jitter_(x, order, factors):
    """Per-sample colour jitter of (B, 3, H, W) images in [0, 1], in place, in per-sample
    op order: in round r, each op is applied to the samples whose r-th order slot
    selects it (computed on that subset only). order (B, 4) op indices (-1 = off),
    factors (B, 4)."""
    for r in range(4):
        for op, fn in _RGB_OPS.items():
            idx = (order[:, r] == op).nonzero().squeeze(1)
            if idx.numel() > 0:
                x.index_copy_(0, idx, fn(x[idx], factors[idx, op]))
    return x


def _jitter_spectrogram_(x, order, factors):
    """Colour jitter of (B, T, F) spectrograms, in place, without clamping: brightness b
    multiplies, contrast c blends with the per-sample mean m; saturation and hue change
    nothing on one channel (as torchvision). Unclamped, the two remaining ops commute:
    either order gives b (c x + (1 - c) m), so the recorded order cannot change the result
    and one affine pass per sample does it. Off samples get b = c = 1 (x unchanged)."""
    on = order[:, 0] >= 0
    if not bool(on.any()):
        return x
    b = torch.where(on, factors[:, BRIGHTNESS], 1.0).to(x.dtype).view(-1, 1, 1)
    c = torch.where(on, factors[:, CONTRAST], 1.0).to(x.dtype).view(-1, 1, 1)
    mean = x.mean(dim=(1, 2), keepdim=True)                     # (B, 1, 1) over time and frequency
    return x.mul_(b * c).add_(b * (1 - c) * mean)


def _roll_time(x, shift):
    """Per-sample circular shift along time (axis 1) of (B, T, F); shift (B,) int64."""
    if not bool((shift != 0).any()):
        return x
    T = x.shape[1]
    frames = torch.arange(T, device=x.device)
    src = torch.remainder(frames - shift.to(x.device)[:, None], T)   # (B, T) source frame
    return _take(x, 1, src)


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
    identity vector returns img unchanged. Runs on img.device.
    """
    _check_inputs(img, t, 4, VISUAL_DIM, "apply_visual")
    if img.shape[1] != 3:
        raise ValueError(f"apply_visual: expected 3 channels, got shape {tuple(img.shape)}")
    S = VISUAL_SLOTS
    H, W = img.shape[2:]
    t = t.to(device=img.device, dtype=torch.float32)
    rrc = t[:, S["rrc_on"]] > 0.5
    top = torch.where(rrc, _decode_int(t[:, S["rrc_top"]], H), 0)
    left = torch.where(rrc, _decode_int(t[:, S["rrc_left"]], W), 0)
    h = torch.where(rrc, _decode_int(t[:, S["rrc_height"]], H), H)
    w = torch.where(rrc, _decode_int(t[:, S["rrc_width"]], W), W)
    x = _resized_crop(img, 2, 3, top, left, h, w)
    if x is img:
        x = img.clone()   # the steps below work in place on the samples they change

    _color_jitter_(x, *_decode_color_jitter(t, S))

    sigma = t[:, S["blur_sigma"]]
    radius = torch.ceil(3.0 * sigma.double()).long()
    _gaussian_blur_(x, t[:, S["blur_on"]] > 0.5, sigma, radius)

    _apply_to_(x, t[:, S["flip_on"]] > 0.5, lambda y: y.flip(3))                   # flip width
    _apply_to_(x, t[:, S["gray_on"]] > 0.5, lambda y: _luma(y).expand_as(y))
    return x.clamp_(0, 1)


def apply_audio(spec, t):
    """Apply audio augmentations t (B, 24) to the normalized spectrogram spec (B, T, F).

    Axis 1 is time, axis 2 frequency. Order (SPEC 8): SpecAugment masks (set to 0) ->
    circular time shift -> random resized crop of the (T, F) plane back to (T, F) ->
    colour jitter (brightness, contrast; no clamping) -> Gaussian blur (kernel size
    2 ceil(sigma) + 1, reflect padding) -> flip of the frequency axis. Each step is gated
    by its own on-slot. The identity vector returns spec unchanged. Runs on spec.device.
    """
    _check_inputs(spec, t, 3, AUDIO_DIM, "apply_audio")
    S = AUDIO_SLOTS
    T, F = spec.shape[1:]
    t = t.to(device=spec.device, dtype=torch.float32)
    x = spec

    # SpecAugment: zero the time span [start, end) and the frequency span [start, end).
    spec_on = t[:, S["specaug_on"]] > 0.5
    if bool(spec_on.any()):
        frames = torch.arange(T, device=x.device)
        bins = torch.arange(F, device=x.device)
        in_time = ((frames >= _decode_int(t[:, S["tmask_start"]], T)[:, None])
                   & (frames < _decode_int(t[:, S["tmask_end"]], T)[:, None]))     # (B, T)
        in_freq = ((bins >= _decode_int(t[:, S["fmask_start"]], F)[:, None])
                   & (bins < _decode_int(t[:, S["fmask_end"]], F)[:, None]))      # (B, F)
        on = spec_on[:, None]
        x = x.masked_fill((in_time & on)[:, :, None], 0.0)                           # (B, T, 1)
        x.masked_fill_((in_freq & on)[:, None, :], 0.0)                              # (B, 1, F)

    # Time shift: out[:, i] = x[:, (i - shift) mod T], i.e. torch.roll along time.
    shift = torch.where(t[:, S["shift_on"]] > 0.5, _decode_int(t[:, S["shift"]], T), 0)
    x = _roll_time(x, shift)

    rrc = t[:, S["rrc_on"]] > 0.5
    top = torch.where(rrc, _decode_int(t[:, S["rrc_time_start"]], T), 0)
    left = torch.where(rrc, _decode_int(t[:, S["rrc_freq_start"]], F), 0)
    h = torch.where(rrc, _decode_int(t[:, S["rrc_time_len"]], T), T)
    w = torch.where(rrc, _decode_int(t[:, S["rrc_freq_width"]], F), F)
    x = _resized_crop(x, 1, 2, top, left, h, w)
    if x is spec:
        x = spec.clone()   # the steps below work in place on the samples they change

    _jitter_spectrogram_(x, *_decode_color_jitter(t, S))

    sigma = t[:, S["blur_sigma"]]
    radius = torch.ceil(sigma.double()).long()
    _gaussian_blur_(x.unsqueeze(1), t[:, S["blur_on"]] > 0.5, sigma, radius)   # (B, 1, T, F) view of x

    return _apply_to_(x, t[:, S["flip_on"]] > 0.5, lambda y: y.flip(2))           # flip frequency


# ---------------------------------------------------------------------------
# Sample + apply
# ---------------------------------------------------------------------------

def augment_visual(img, generator):
    """Sample per-sample visual augmentations on CPU and apply them on img.device.
    img (B, 3, H, W) in [0, 1] -> (img_aug (B, 3, H, W) in [0, 1], t (B, 18) on img.device)."""
    t = sample_visual_params(img.shape[0], generator, img.shape[2], img.shape[3]).to(img.device)
    return apply_visual(img, t), t


def augment_audio(spec, generator):
    """Sample per-sample audio augmentations on CPU and apply them on spec.device.
    spec (B, T, F) -> (spec_aug (B, T, F), t (B, 24) on spec.device)."""
    t = sample_audio_params(spec.shape[0], generator, spec.shape[1], spec.shape[2]).to(spec.device)
    return apply_audio(spec, t), t


def random_time_roll(spec, generator):
    """Input noise on the original spectrogram (SPEC 12): a circular shift along time
    (axis 1) by an integer uniform in [0, T), per sample; not recorded. (B, T, F) -> (B, T, F)."""
    _check_generator(generator)
    shift = torch.randint(0, spec.shape[1], (spec.shape[0],), generator=generator)
    return _roll_time(spec, shift.to(spec.device))


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
