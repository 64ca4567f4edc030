"""Parameterized augmentations and their parameter vectors (SPEC 8).

Each augmentation is sampled per sample on the CPU from a torch.Generator, recorded as a
normalized vector t (what e_m reads, SPEC 3) and applied to a batch on its device by
`apply_audio` / `apply_visual`, pure functions of (input, t) that read their decisions from
a CPU copy of t and move only small tensors to the device, pinned and non-blocking, so a GPU
step never waits on them (tests/test_augment.py checks).
"""

import math

import torch
from torchvision.transforms.v2 import functional as TF
from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

# ---- Slot layouts (SPEC 8): the one definition used by sampling, application, the
# augmentation encoder and checkpoint conversion. Order follows the public code. ----

_JITTER = ("cj_on", "cj_order0", "cj_order1", "cj_order2", "cj_order3",   # op index applied 1st..4th, /3
           "cj_brightness", "cj_contrast", "cj_saturation", "cj_hue")      # b-1, c-1, s-1, hue
VISUAL_LAYOUT = (
    "rrc_on", "rrc_top", "rrc_left", "rrc_height", "rrc_width",       # 0-4   top/H, left/W, height/H, width/W
    *_JITTER,                                                         # 5-13
    "blur_on", "blur_sigma", "flip_on", "gray_on")                    # 14-17 sigma, horizontal flip, grayscale
AUDIO_LAYOUT = (
    "specaug_on", "tmask_start", "tmask_end", "fmask_start", "fmask_end",          # 0-4   /T, /T, /F, /F
    "shift_on", "shift",                                                           # 5-6   shift/T
    "rrc_on", "rrc_time_start", "rrc_freq_start", "rrc_time_len", "rrc_freq_width",  # 7-11 /T, /F, /T, /F
    *_JITTER,                                                                      # 12-20
    "blur_on", "blur_sigma", "flip_on")                                            # 21-23 sigma, frequency flip
VISUAL_SLOTS = {name: i for i, name in enumerate(VISUAL_LAYOUT)}
AUDIO_SLOTS = {name: i for i, name in enumerate(AUDIO_LAYOUT)}
VISUAL_DIM, AUDIO_DIM = len(VISUAL_LAYOUT), len(AUDIO_LAYOUT)   # 18, 24
# Each augmentation's slots, named as the paper's figures name them.
VISUAL_GROUPS = {"crop": VISUAL_LAYOUT[0:5], "colour jitter": VISUAL_LAYOUT[5:14],
                 "blur": VISUAL_LAYOUT[14:16], "flip": VISUAL_LAYOUT[16:17],
                 "grayscale": VISUAL_LAYOUT[17:18]}
AUDIO_GROUPS = {"specaugment": AUDIO_LAYOUT[0:5], "shift": AUDIO_LAYOUT[5:7],
                "crop": AUDIO_LAYOUT[7:12], "jitter": AUDIO_LAYOUT[12:21],
                "blur": AUDIO_LAYOUT[21:23], "flip": AUDIO_LAYOUT[23:24]}
# The crop slots as (on, top, left, height, width) of the plane: the image is (H, W);
# the spectrogram (T, F), time as rows and frequency as columns.
VISUAL_CROP, AUDIO_CROP = VISUAL_LAYOUT[0:5], AUDIO_LAYOUT[7:12]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_SCALE = (0.08, 1.0)                     # area fraction, both modalities
VISUAL_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)   # width / height
AUDIO_CROP_RATIO = (1.0 / 10.0, 1.5 / 8.0)   # freq width / time length, at T=1024, F=128
CROP_ATTEMPTS = 10                           # torchvision's attempts before the fallback
P_SPECAUG, P_JITTER, P_BLUR, P_FLIP, P_GRAY = 0.8, 0.8, 0.5, 0.5, 0.2
JITTER_STRENGTH, HUE_RANGE = 0.4, 0.1        # factors U(0.6, 1.4), hue U(-0.1, 0.1)
SIGMA_RANGE = (0.1, 2.0)
TIME_MASK_MAX, FREQ_MASK_MAX, BASE_T, BASE_F = 192, 48, 1024, 128


def to_device(x, device):
    """Small CPU tensor -> device without waiting for queued GPU work (pinned, non-blocking)."""
    return (x.pin_memory() if device.type == "cuda" else x).to(device, non_blocking=True)


def normalize_image(img):
    """ImageNet normalization, the last visual step (SPEC 1). img (B, 3, H, W) in [0, 1].
    (TF.normalize builds its mean on the device from Python floats: a blocking copy.)"""
    stats = to_device(torch.tensor([IMAGENET_MEAN, IMAGENET_STD], dtype=img.dtype), img.device)
    return (img - stats[0].view(1, 3, 1, 1)) / stats[1].view(1, 3, 1, 1)


def visual_identity(n, device=None):
    """(n, 18) vector of "no augmentation" (SPEC 8): full crop, order (0, 1/3, 2/3, 1), else 0."""
    return _identity(n, VISUAL_SLOTS, ("rrc_on", "rrc_height", "rrc_width"), device)


def audio_identity(n, device=None):
    """(n, 24) vector of "no augmentation" (SPEC 8)."""
    return _identity(n, AUDIO_SLOTS, ("rrc_on", "rrc_time_len", "rrc_freq_width"), device)


def only(t, names):
    """t (n, d_t) with every slot outside `names` at the identity: those augmentations alone."""
    audio = t.shape[1] == AUDIO_DIM
    out = (audio_identity if audio else visual_identity)(t.shape[0])
    keep = [(AUDIO_SLOTS if audio else VISUAL_SLOTS)[name] for name in names]
    out[:, keep] = t[:, keep]
    return out


def _identity(n, slots, full, device):
    t = torch.zeros(n, len(slots))                                # built on the CPU: no sync
    t[:, [slots[name] for name in full]] = 1.0                    # the crop is the whole plane
    t[:, slots["cj_order0"]:slots["cj_order3"] + 1] = torch.arange(4) / 3.0   # jitter order 0..3
    return t if device is None else to_device(t, torch.device(device))


# ---- Sampling (on the CPU, vectorized over samples) ----

def _uniform(shape, lo, hi, generator, dtype=torch.float32):
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


def _coin(n, p, generator):
    return torch.rand(n, generator=generator) < p


def _crop_boxes(n, generator, H, W, ratio):
    """torchvision's RandomResizedCrop.get_params for n samples (our choice of sampler): the first
    of 10 (area, log-uniform aspect w/h) draws that fits the (H, W) plane, else the centred plane
    with the ratio clamped. Returns integer (top, left, height, width), each (n,)."""
    target = H * W * _uniform((n, CROP_ATTEMPTS), *CROP_SCALE, generator, torch.float64)
    aspect = torch.exp(_uniform((n, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]),
                                generator, torch.float64))
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first, found = fits.int().argmax(dim=1, keepdim=True), fits.any(dim=1)
    h, w = h.gather(1, first).squeeze(1).long(), w.gather(1, first).squeeze(1).long()
    u_top, u_left = (torch.rand(n, generator=generator, dtype=torch.float64) for _ in range(2))
    fw, fh = min(W, round(H * ratio[1])), min(H, round(W / ratio[0]))   # the fallback
    h, w = torch.where(found, h, fh), torch.where(found, w, fw)
    top = torch.floor(u_top * (H - h + 1)).long().clamp(max=H - h)   # uniform in [0, H - h]
    left = torch.floor(u_left * (W - w + 1)).long().clamp(max=W - w)
    return (torch.where(found, top, (H - fh) // 2), torch.where(found, left, (W - fw) // 2), h, w)


def _sample_common(t, slots, crop, boxes, size, generator):
    """Write the slots both modalities share: the crop boxes (normalized by the plane `size`,
    rows and cols), colour jitter (p 0.8), Gaussian blur (p 0.5, sigma U(0.1, 2)), flip (p 0.5)."""
    n = t.shape[0]
    t[:, slots[crop[0]]] = 1.0
    for name, value, length in zip(crop[1:], boxes, size * 2):
        t[:, slots[name]] = (value.double() / length).float()
    on = _coin(n, P_JITTER, generator)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)   # a uniform permutation
    values = torch.cat([_uniform((n, 3), -JITTER_STRENGTH, JITTER_STRENGTH, generator),
                        _uniform((n, 1), -HUE_RANGE, HUE_RANGE, generator)], dim=1)
    j = slots["cj_on"]
    t[:, j] = on.float()
    t[:, j + 1:j + 5] = torch.where(on[:, None], order, torch.arange(4)).float() / 3.0
    t[:, j + 5:j + 9] = torch.where(on[:, None], values, 0.0)
    blur, sigma = _coin(n, P_BLUR, generator), _uniform(n, *SIGMA_RANGE, generator)
    t[:, slots["blur_on"]] = blur.float()
    t[:, slots["blur_sigma"]] = torch.where(blur, sigma, 0.0)
    t[:, slots["flip_on"]] = _coin(n, P_FLIP, generator).float()
    return t


def sample_visual_params(n, generator, H=224, W=224):
    """n visual augmentations (SPEC 8) -> (n, 18) float32 on the CPU."""
    t = torch.zeros(n, VISUAL_DIM)
    boxes = _crop_boxes(n, generator, H, W, VISUAL_CROP_RATIO)
    _sample_common(t, VISUAL_SLOTS, VISUAL_CROP, boxes, (H, W), generator)
    t[:, VISUAL_SLOTS["gray_on"]] = _coin(n, P_GRAY, generator).float()
    return t


def sample_audio_params(n, generator, T=1024, F=128):
    """n audio augmentations (SPEC 8) -> (n, 24) float32 on the CPU. SpecAugment (p 0.8): time
    and frequency masks of width floor(U(0, 192 T/1024)) frames and floor(U(0, 48 F/128)) bins
    (scaled with the input size: our choice) at uniform integer starts (end exclusive); the
    time shift, on exactly when SpecAugment is, uniform in [-T, T); the crop's height is time."""
    t = torch.zeros(n, AUDIO_DIM)
    on = _coin(n, P_SPECAUG, generator)
    for axis, size, widest in (("tmask", T, TIME_MASK_MAX * T / BASE_T), ("fmask", F, FREQ_MASK_MAX * F / BASE_F)):
        width = torch.floor(torch.rand(n, generator=generator) * min(widest, size)).long()
        start = torch.floor(torch.rand(n, generator=generator) * (size - width + 1)).long()
        start = torch.minimum(start, size - width)
        t[:, AUDIO_SLOTS[axis + "_start"]] = torch.where(on, start.double() / size, 0.0).float()
        t[:, AUDIO_SLOTS[axis + "_end"]] = torch.where(on, (start + width).double() / size, 0.0).float()
    shift = torch.randint(-T, T, (n,), generator=generator)
    t[:, AUDIO_SLOTS["specaug_on"]] = t[:, AUDIO_SLOTS["shift_on"]] = on.float()
    t[:, AUDIO_SLOTS["shift"]] = torch.where(on, shift.double() / T, 0.0).float()
    # SPEC 8's ratio range is for the 1024 x 128 plane; other sizes keep it relative
    # to their own aspect, so that the full plane stays allowed.
    rel = (F / T) / (BASE_F / BASE_T)
    boxes = _crop_boxes(n, generator, T, F, (AUDIO_CROP_RATIO[0] * rel, AUDIO_CROP_RATIO[1] * rel))
    return _sample_common(t, AUDIO_SLOTS, AUDIO_CROP, boxes, (T, F), generator)


def sample_visual_vectors(B, S, generator, H=224, W=224):
    """S vectors per sample for the centroid (SPEC 6), never applied: (B, S, 18) on the CPU."""
    return sample_visual_params(B * S, generator, H, W).view(B, S, VISUAL_DIM)


def sample_audio_vectors(B, S, generator, T=1024, F=128):
    """S vectors per sample for the centroid (SPEC 6), never applied: (B, S, 24) on the CPU."""
    return sample_audio_params(B * S, generator, T, F).view(B, S, AUDIO_DIM)


# ---- Application (SPEC 8): the paper's ops in the paper's order, from torchvision ----

def _crop(x, tc, slots, names):
    """Random resized crop back to the size of x (B, C, H, W), per sample (resized_crop, no antialias)."""
    H, W = x.shape[-2:]
    on = (tc[:, slots[names[0]]] > 0.5).tolist()
    ints = (torch.round(tc[:, slots[n]].double() * s).long().tolist()   # stored x / size -> x
            for n, s in zip(names[1:], (H, W, H, W)))
    boxes = zip(on, *ints)
    return torch.stack([TF.resized_crop(xb, *box, size=[H, W], antialias=False) if o else xb
                        for xb, (o, *box) in zip(x, boxes)])


def _blend(x, other, f):   # torchvision's blend of colour ops: f x + (1 - f) other, in [0, 1]
    return (f * x + (1 - f) * other).clamp(0, 1)


def _adjust_hue(x, shift):   # torchvision's adjust_hue, one shift per sample
    h, s, v = _rgb_to_hsv(x).unbind(dim=1)
    return _hsv_to_rgb(torch.stack([(h + shift.view(-1, 1, 1)) % 1.0, s, v], dim=1))


VISUAL_JITTER_OPS = (                        # brightness, contrast, saturation, hue
    lambda x, f: _blend(x, 0.0, f),
    lambda x, f: _blend(x, TF.rgb_to_grayscale(x).mean(dim=(1, 2, 3), keepdim=True), f),
    lambda x, f: _blend(x, TF.rgb_to_grayscale(x), f),
    _adjust_hue)
AUDIO_JITTER_OPS = (                         # SPEC 9: no clamping; one channel: no saturation, hue
    lambda x, f: f * x,
    lambda x, f: f * x + (1 - f) * x.mean(dim=(1, 2, 3), keepdim=True),
    None, None)


def _color_jitter(x, tc, slots, ops):
    """Each sample's four ops in its recorded order: round r applies every op to the samples
    that drew it r-th (one call per op and round). x (B, C, H, W), our copy: changed in place."""
    j = slots["cj_on"]
    on = tc[:, j] > 0.5
    order = torch.round(tc[:, j + 1:j + 5] * 3).long()                # (B, 4) op indices
    factors = tc[:, j + 5:j + 9] + torch.tensor([1.0, 1.0, 1.0, 0.0])  # b, c, s factors; hue shift
    for r in range(4):
        for k, op in enumerate(ops):
            idx = (on & (order[:, r] == k)).nonzero().squeeze(1)
            if op is not None and len(idx):
                f = to_device(factors[idx, k].to(x.dtype).view(-1, 1, 1, 1), x.device)
                i = to_device(idx, x.device)
                x.index_copy_(0, i, op(x.index_select(0, i), f))
    return x


def _gaussian_blur(x, tc, slots, radius):
    """torchvision's Gaussian blur (reflect padding), one sample at a time, with kernel
    size 2 radius(sigma) + 1. x (B, C, H, W), our own copy: blurred in place."""
    on, sigma = (tc[:, slots["blur_on"]] > 0.5).tolist(), tc[:, slots["blur_sigma"]].tolist()
    for b in [b for b, o in enumerate(on) if o]:
        k = 2 * radius(sigma[b]) + 1
        x[b] = TF.gaussian_blur(x[b], [k, k], [sigma[b], sigma[b]])
    return x


def _where(tc, slot, a, b):   # per sample: a where the on-slot is set, else b (B, C, H, W)
    on = to_device(tc[:, slot] > 0.5, a.device).view(-1, 1, 1, 1)
    return torch.where(on, a, b)


def roll_time(spec, shift):
    """out[b, i] = spec[b, (i - shift[b]) mod T]: spec (B, T, F), shift (B,) integers on the CPU."""
    B, T, F = spec.shape
    src = torch.remainder(torch.arange(T) - shift.view(-1, 1), T)            # (B, T) source frames
    return spec.gather(1, to_device(src, spec.device).unsqueeze(2).expand(B, T, F))


def _check(x, t, ndim, dim, what):
    if x.dim() != ndim or (ndim == 4 and x.shape[1] != 3):
        raise ValueError(f"{what}: expected a {ndim}-D batch" + (" with 3 channels" if ndim == 4 else "")
                         + f", got shape {tuple(x.shape)}")
    if t.shape != (x.shape[0], dim):
        raise ValueError(f"{what}: expected t of shape ({x.shape[0]}, {dim}), got {tuple(t.shape)}")


def apply_visual(img, t):
    """Visual augmentations t (B, 18) applied to img (B, 3, H, W) in [0, 1] (SPEC 8):
    random resized crop -> colour jitter (the recorded op order) -> Gaussian blur (kernel
    2 ceil(3 sigma) + 1, our choice) -> horizontal flip -> grayscale. Runs on img.device;
    pass t on the CPU (as augment_visual does) so that reading it costs a GPU nothing."""
    _check(img, t, 4, VISUAL_DIM, "apply_visual")
    S, tc = VISUAL_SLOTS, t.detach().to("cpu", torch.float32)
    x = _crop(img, tc, S, VISUAL_CROP)
    x = _color_jitter(x, tc, S, VISUAL_JITTER_OPS)
    x = _gaussian_blur(x, tc, S, lambda sigma: math.ceil(3 * sigma))
    x = _where(tc, S["flip_on"], x.flip(-1), x)
    return _where(tc, S["gray_on"], TF.rgb_to_grayscale(x, num_output_channels=3), x)


def apply_audio(spec, t):
    """Audio augmentations t (B, 24) applied to the normalized spectrogram spec (B, T, F),
    axis 1 time, axis 2 frequency (SPEC 8): SpecAugment masks (set to 0) -> circular
    time shift -> random resized crop of the (T, F) plane -> colour jitter (brightness,
    contrast; unclamped, SPEC 9) -> Gaussian blur (kernel 2 ceil(sigma) + 1) -> frequency flip."""
    _check(spec, t, 3, AUDIO_DIM, "apply_audio")
    S, tc = AUDIO_SLOTS, t.detach().to("cpu", torch.float32)
    B, T, F = spec.shape
    spans = torch.round(tc[:, S["tmask_start"]:S["fmask_end"] + 1].double()
                        * torch.tensor([T, T, F, F])).long()                # (B, 4) frames, bins
    spans[tc[:, S["specaug_on"]] < 0.5] = 0                                 # off: empty spans
    ts, te, fs, fe = to_device(spans, spec.device).T.reshape(4, B, 1, 1)  # (B, 1, 1) each
    frame = torch.arange(T, device=spec.device).view(T, 1)                 # time: rows
    mel = torch.arange(F, device=spec.device)                              # frequency: columns
    masked = (frame >= ts) & (frame < te) | (mel >= fs) & (mel < fe)       # (B, T, F)
    x = spec.masked_fill(masked, 0.0)
    shift = torch.round(tc[:, S["shift"]].double() * T).long()
    x = roll_time(x, torch.where(tc[:, S["shift_on"]] > 0.5, shift, 0))
    x = _crop(x.unsqueeze(1), tc, S, AUDIO_CROP)                            # (B, 1, T, F) image
    x = _color_jitter(x, tc, S, AUDIO_JITTER_OPS)
    x = _gaussian_blur(x, tc, S, math.ceil)
    return _where(tc, S["flip_on"], x.flip(-1), x).squeeze(1)               # flip frequency


def augment_visual(img, generator):
    """img (B, 3, H, W) in [0, 1] -> (its augmented view, t (B, 18) on img.device)."""
    t = sample_visual_params(img.shape[0], generator, img.shape[2], img.shape[3])
    return apply_visual(img, t), to_device(t, img.device)


def augment_audio(spec, generator):
    """spec (B, T, F) -> (its augmented view, t (B, 24) on spec.device)."""
    t = sample_audio_params(spec.shape[0], generator, spec.shape[1], spec.shape[2])
    return apply_audio(spec, t), to_device(t, spec.device)


def random_time_roll(spec, generator):
    """Input noise on the original spectrogram (SPEC 12): a circular shift along time by
    an integer uniform in [0, T) per sample, not recorded. (B, T, F) -> (B, T, F)."""
    return roll_time(spec, torch.randint(0, spec.shape[1], (spec.shape[0],), generator=generator))
