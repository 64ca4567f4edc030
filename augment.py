"""Parameterized augmentations and their parameter vectors (method.md §8, 9).

What the paper does to each input to make its augmented view x', in this order:

    visual, the frame (B, 3, H, W) in [0, 1]:
        resized crop -> colour jitter -> Gaussian blur -> horizontal flip -> grayscale
        (ImageNet normalization comes after all of them: `normalize_image`)
    audio, the normalized spectrogram (B, T, F), time first:
        SpecAugment -> time shift -> resized crop -> colour jitter -> Gaussian blur
        -> frequency flip

An augmentation IS its parameter vector t (what e_m reads, method.md §3): sampling draws t on
the CPU from a torch.Generator, and `apply_visual` / `apply_audio` are pure functions of
(input, t), one function per op above, each reading its slots by name. Every op works on
the whole batch with per-sample parameters held in tensors, so a step issues the same
device ops at any batch size and reads nothing back to the host.
"""

import math

import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

# =============================================================================
# The parameter vectors (method.md §8): one layout, used by sampling, application, the
# augmentation encoder and checkpoint conversion. Slot order follows the public code.
# =============================================================================

JITTER_SLOTS = ("cj_on",
                "cj_order0", "cj_order1", "cj_order2", "cj_order3",   # op index applied r-th, /3
                "cj_brightness", "cj_contrast", "cj_saturation", "cj_hue")   # b-1, c-1, s-1, hue
VISUAL_GROUPS = {                                                        # slots
    "crop": ("rrc_on", "rrc_top", "rrc_left", "rrc_height", "rrc_width"),     # 0-4 /H, /W, /H, /W
    "colour jitter": JITTER_SLOTS,                                            # 5-13
    "blur": ("blur_on", "blur_sigma"),                                        # 14-15
    "flip": ("flip_on",),                                                     # 16 horizontal
    "grayscale": ("gray_on",),                                                # 17
}
AUDIO_GROUPS = {
    "specaugment": ("specaug_on", "tmask_start", "tmask_end", "fmask_start", "fmask_end"),  # 0-4
    "shift": ("shift_on", "shift"),                                           # 5-6   shift / T
    "crop": ("rrc_on", "rrc_time_start", "rrc_freq_start",                    # 7-11  /T, /F,
             "rrc_time_len", "rrc_freq_width"),                               #       /T, /F
    "jitter": JITTER_SLOTS,                                                   # 12-20
    "blur": ("blur_on", "blur_sigma"),                                        # 21-22
    "flip": ("flip_on",),                                                     # 23 frequency
}
VISUAL_LAYOUT = tuple(name for group in VISUAL_GROUPS.values() for name in group)
AUDIO_LAYOUT = tuple(name for group in AUDIO_GROUPS.values() for name in group)
VISUAL_SLOTS = {name: i for i, name in enumerate(VISUAL_LAYOUT)}
AUDIO_SLOTS = {name: i for i, name in enumerate(AUDIO_LAYOUT)}
VISUAL_DIM, AUDIO_DIM = len(VISUAL_LAYOUT), len(AUDIO_LAYOUT)   # 18, 24

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_SCALE = (0.08, 1.0)                     # area fraction, both modalities
VISUAL_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)   # width / height
# freq width / time length, in bins per frame (method.md §8, the authors' values): the range
# brackets the plane's own 128 / 1024 = 1/8, so a crop keeps the spectrogram's long-in-time
# shape (a crop spanning all 128 bins covers 683-1280 frames before the fit to the plane).
AUDIO_CROP_RATIO = (1.0 / 10.0, 1.5 / 8.0)
CROP_ATTEMPTS = 10                           # torchvision's attempts before the fallback
P_SPECAUG = 0.8
P_JITTER = 0.8
P_BLUR = 0.5
P_FLIP = 0.5
P_GRAY = 0.2
JITTER_STRENGTH = 0.4                        # factors U(0.6, 1.4)
HUE_RANGE = 0.1                              # hue U(-0.1, 0.1)
SIGMA_RANGE = (0.1, 2.0)
TIME_MASK_MAX = 192                          # SpecAugment's longest masks at T = 1024, F = 128,
FREQ_MASK_MAX = 48                           # scaled to other plane sizes (our choice)
BASE_T = 1024
BASE_F = 128
# Blur kernels are 2 ceil(k sigma) + 1 wide: visual k = 3 (our choice; torchvision's rule),
# audio k = 1 (the public code's).
VISUAL_BLUR_SIGMAS, AUDIO_BLUR_SIGMAS = 3, 1


# =============================================================================
# Applying a vector: the paper's ops in the paper's order
# =============================================================================

def apply_visual(img, t):
    """The visual augmentations t (B, 18) applied to img (B, 3, H, W) in [0, 1] (method.md §8).
    Runs on img.device, with t there or on the CPU."""
    _check(img, t, 4, VISUAL_DIM, "apply_visual")
    v = read_slots(t, VISUAL_LAYOUT, img.device)
    x = resized_crop(img, v["rrc_on"], v["rrc_top"], v["rrc_left"], v["rrc_height"], v["rrc_width"])
    x = colour_jitter(x, v["cj_on"], jitter_order(v), v["cj_brightness"], v["cj_contrast"],
                      v["cj_saturation"], v["cj_hue"])
    x = gaussian_blur(x, v["blur_on"], v["blur_sigma"], VISUAL_BLUR_SIGMAS)
    x = flip(x, v["flip_on"])                      # width is the last axis: a horizontal flip
    return grayscale(x, v["gray_on"])


def apply_audio(spec, t):
    """The audio augmentations t (B, 24) applied to the normalized spectrogram spec (B, T, F),
    axis 1 time, axis 2 frequency (method.md §8). Runs on spec.device; t as for apply_visual."""
    _check(spec, t, 3, AUDIO_DIM, "apply_audio")
    v = read_slots(t, AUDIO_LAYOUT, spec.device)
    x = spec_augment(spec, v["specaug_on"], v["tmask_start"], v["tmask_end"],
                     v["fmask_start"], v["fmask_end"])
    x = time_shift(x, v["shift_on"], v["shift"])
    x = x.unsqueeze(1)                             # (B, 1, T, F): a one-channel image, rows = time
    x = resized_crop(x, v["rrc_on"], v["rrc_time_start"], v["rrc_freq_start"],
                     v["rrc_time_len"], v["rrc_freq_width"])
    x = spectrogram_jitter(x, v["cj_on"], v["cj_brightness"], v["cj_contrast"])
    x = gaussian_blur(x, v["blur_on"], v["blur_sigma"], AUDIO_BLUR_SIGMAS)
    x = flip(x, v["flip_on"])                      # frequency is the last axis
    return x.squeeze(1)


def spec_augment(x, on, tmask_start, tmask_end, fmask_start, fmask_end):
    """SpecAugment: x (B, T, F) with the frames [tmask_start, tmask_end) T and the mel bins
    [fmask_start, fmask_end) F set to 0 (the start and end slots are fractions of T, F)."""
    B, T, F = x.shape
    frame = torch.arange(T, device=x.device).view(1, T, 1)   # time: rows
    mel = torch.arange(F, device=x.device).view(1, 1, F)     # frequency: columns
    t0 = per_sample(to_index(tmask_start, T), 3)             # (B, 1, 1) first masked frame
    t1 = per_sample(to_index(tmask_end, T), 3)
    f0 = per_sample(to_index(fmask_start, F), 3)             # (B, 1, 1) first masked bin
    f1 = per_sample(to_index(fmask_end, F), 3)
    in_time = (frame >= t0) & (frame < t1)                   # (B, T, 1)
    in_freq = (mel >= f0) & (mel < f1)                       # (B, 1, F)
    return x.masked_fill(per_sample(on, 3) & (in_time | in_freq), 0.0)


def time_shift(x, on, shift):
    """Circular shift of x (B, T, F) along time by shift T frames (method.md §9: the public code's
    shift rolled a channel copy and moved nothing)."""
    frames = torch.where(on, torch.round(shift * x.shape[1]), 0.0)
    return roll_time(x, frames)


def resized_crop(x, on, top, left, height, width):
    """Random resized crop, resized back to the plane's size: x (B, C, H, W), the box given
    as fractions of H (top, height) and W (left, width). torchvision's resized_crop
    (bilinear, no antialias) for every sample in one grid_sample: each output pixel reads
    the point that interpolate's rule maps it to (`_crop_positions`). A sample whose box is
    the whole plane (or whose crop is off) is returned as it is."""
    B, C, H, W = x.shape
    top, height = to_index(top, H).to(x.dtype), to_index(height, H).to(x.dtype)
    left, width = to_index(left, W).to(x.dtype), to_index(width, W).to(x.dtype)
    whole = ~on | ((height == H) & (width == W))
    top, left = torch.where(whole, 0.0, top), torch.where(whole, 0.0, left)
    height, width = torch.where(whole, H, height), torch.where(whole, W, width)
    # grid_sample's coordinates: -1 and 1 are the centres of the first and last pixels.
    rows = _crop_positions(top, height, H) * (2 / (H - 1)) - 1                  # (B, H)
    cols = _crop_positions(left, width, W) * (2 / (W - 1)) - 1                  # (B, W)
    grid = torch.stack([cols.unsqueeze(1).expand(B, H, W), rows.unsqueeze(2).expand(B, H, W)],
                       dim=-1)                                                  # (B, H, W, xy)
    crops = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return torch.where(per_sample(whole, 4), x, crops)


def colour_jitter(x, on, order, brightness, contrast, saturation, hue):
    """torchvision's colour jitter with each sample's factors and op order: brightness
    (a blend with black), contrast (with the mean grey), saturation (with the grey image),
    each clamped to [0, 1], and hue (a turn in HSV). x (B, 3, H, W) in [0, 1]; order (B, 4):
    the op index (0 b, 1 c, 2 s, 3 hue) applied 1st..4th; factors b, c, s are 1 + the slot.
    The blends run in rounds over the whole batch (`_blend`; factor 1 leaves a sample as it
    is). Hue, by far the costliest op, runs once: first the blends that come before each
    sample's hue, then the hue, then the blends after it."""
    no_blend = torch.ones_like(hue)                                             # hue's place
    factor = torch.stack([1 + brightness, 1 + contrast, 1 + saturation, no_blend], dim=1)
    factor = factor.gather(1, order)                          # (B, 4): of the op applied r-th
    place = torch.arange(4, device=x.device)
    hue_place = (order == 3).int().argmax(dim=1, keepdim=True)                  # (B, 1)
    before = torch.where(on.unsqueeze(1) & (place < hue_place), factor, 1.0)    # (B, 4)
    after = torch.where(on.unsqueeze(1) & (place > hue_place), factor, 1.0)
    for r in range(3):
        x = _blend(x, order[:, r], before[:, r])
    x = torch.where(per_sample(on, 4), adjust_hue(x, hue), x)
    for r in range(1, 4):
        x = _blend(x, order[:, r], after[:, r])
    return x


def spectrogram_jitter(x, on, brightness, contrast):
    """Colour jitter on the spectrogram x (B, 1, T, F): brightness scales it, contrast blends
    it with its mean, neither clamped (method.md §9); saturation and hue change nothing on one
    channel. Unclamped, brightness and contrast commute (b (c x + (1 - c) m) = c (b x) +
    (1 - c) (b m), m the mean), so the four order slots carry no information here."""
    b = per_sample(torch.where(on, 1 + brightness, 1.0), 4)
    c = per_sample(torch.where(on, 1 + contrast, 1.0), 4)
    return b * (c * x + (1 - c) * x.mean(dim=(1, 2, 3), keepdim=True))


def gaussian_blur(x, on, sigma, sigmas):
    """torchvision's gaussian_blur (reflect padding) with each sample's sigma and kernel size
    2 ceil(sigmas sigma) + 1, for the whole batch: every kernel is padded with zeros to the
    largest one the sampler can draw (sigma < 2), and a Gaussian is separable, so the blur is
    two grouped convolutions, down the rows and then along the columns. x (B, C, H, W). A
    sample with blur off gets the kernel (..., 0, 1, 0, ...), which returns it exactly."""
    B, C, H, W = x.shape
    R = math.ceil(sigmas * SIGMA_RANGE[1])
    offset = torch.arange(-R, R + 1, device=x.device, dtype=x.dtype)                 # (2R + 1,)
    sigma = torch.where(on, sigma, 1.0).unsqueeze(1)                                 # (B, 1)
    kernel = torch.exp(-0.5 * (offset / sigma) ** 2) * (offset.abs() <= torch.ceil(sigmas * sigma))
    kernel = torch.where(per_sample(on, 2), kernel / kernel.sum(dim=1, keepdim=True),
                         (offset == 0).to(x.dtype))                                   # (B, 2R + 1)
    kernel = kernel.repeat_interleave(C, dim=0)                  # one per channel: (B C, 2R + 1)
    y = F.pad(x.reshape(1, B * C, H, W), (R, R, R, R), mode="reflect")
    y = F.conv2d(y, kernel.view(B * C, 1, 2 * R + 1, 1), groups=B * C)   # down the rows
    y = F.conv2d(y, kernel.view(B * C, 1, 1, 2 * R + 1), groups=B * C)   # along the columns
    return y.view(B, C, H, W)


def flip(x, on):
    """Reverse the last axis (B, C, H, W) where `on` is set: a horizontal flip of a frame, a
    flip of the frequency axis of a spectrogram."""
    return torch.where(per_sample(on, 4), x.flip(-1), x)


def grayscale(x, on):
    """torchvision's grayscale with 3 equal channels where `on` is set: x (B, 3, H, W)."""
    return torch.where(per_sample(on, 4), TF.rgb_to_grayscale(x, num_output_channels=3), x)


def unit_range(frames):
    """Frames as the loader gives them, uint8 0-255 (a quarter of float32's bytes to move to
    the device) or float in [0, 1] (mixed-up frames), -> float32 in [0, 1] on their device."""
    return frames.float().div_(255.0) if frames.dtype == torch.uint8 else frames


def frames_to(device, frames):
    """A loader batch's frames on `device` in [0, 1], copied there as they are (uint8)."""
    return unit_range(frames.to(device, non_blocking=True))


def normalize_image(img):
    """ImageNet normalization, the last visual step (method.md §1), after the colour augmentations,
    which are defined on [0, 1] colours. img (B, 3, H, W) in [0, 1]. One channel at a time
    with Python floats (TF.normalize copies its mean to the device, which waits for the GPU)."""
    channels = [(img[:, c] - m) / s for c, (m, s) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD))]
    return torch.stack(channels, dim=1)


def augment_visual(img, generator):
    """img (B, 3, H, W) in [0, 1] -> (its augmented view, t (B, 18) on img.device)."""
    t = sample_visual_params(img.shape[0], generator, img.shape[2], img.shape[3])
    t = t.to(img.device, non_blocking=True)
    return apply_visual(img, t), t


def augment_audio(spec, generator):
    """spec (B, T, F) -> (its augmented view, t (B, 24) on spec.device)."""
    t = sample_audio_params(spec.shape[0], generator, spec.shape[1], spec.shape[2])
    t = t.to(spec.device, non_blocking=True)
    return apply_audio(spec, t), t


# =============================================================================
# Sampling (on the CPU, vectorized over samples)
# =============================================================================

def sample_visual_params(n, generator, H=224, W=224):
    """n visual augmentations (method.md §8) -> (n, 18) float32 on the CPU."""
    t = torch.zeros(n, VISUAL_DIM)
    boxes = _crop_boxes(n, generator, H, W, VISUAL_CROP_RATIO)
    _sample_common(t, VISUAL_SLOTS, VISUAL_GROUPS["crop"], boxes, (H, W), generator)
    t[:, VISUAL_SLOTS["gray_on"]] = _coin(n, P_GRAY, generator).float()
    return t


def sample_audio_params(n, generator, T=1024, F=128):
    """n audio augmentations (method.md §8) -> (n, 24) float32 on the CPU. SpecAugment (p 0.8):
    time and frequency masks of width floor(U(0, 192 T/1024)) frames and floor(U(0, 48 F/128)) bins
    (scaled with the input size: our choice) at uniform integer starts (end exclusive); the
    time shift, on exactly when SpecAugment is, uniform in [-T, T); the crop's height is time."""
    t = torch.zeros(n, AUDIO_DIM)
    slots = AUDIO_SLOTS
    on = _coin(n, P_SPECAUG, generator)
    masks = (("tmask", T, TIME_MASK_MAX * T / BASE_T), ("fmask", F, FREQ_MASK_MAX * F / BASE_F))
    for axis, size, widest in masks:
        width = torch.floor(torch.rand(n, generator=generator) * min(widest, size)).long()
        start = torch.floor(torch.rand(n, generator=generator) * (size - width + 1)).long()
        start = torch.minimum(start, size - width)
        t[:, slots[axis + "_start"]] = torch.where(on, start.double() / size, 0.0).float()
        t[:, slots[axis + "_end"]] = torch.where(on, (start + width).double() / size, 0.0).float()
    shift = torch.randint(-T, T, (n,), generator=generator)
    t[:, slots["specaug_on"]] = on.float()
    t[:, slots["shift_on"]] = on.float()
    t[:, slots["shift"]] = torch.where(on, shift.double() / T, 0.0).float()
    # method.md §8's ratio range is for the 1024 x 128 plane; other sizes keep it relative
    # to their own aspect, so that the full plane stays allowed.
    rel = (F / T) / (BASE_F / BASE_T)
    ratio = (AUDIO_CROP_RATIO[0] * rel, AUDIO_CROP_RATIO[1] * rel)
    boxes = _crop_boxes(n, generator, T, F, ratio)
    return _sample_common(t, slots, AUDIO_GROUPS["crop"], boxes, (T, F), generator)


def sample_visual_vectors(B, S, generator, H=224, W=224):
    """S vectors per sample for a centroid (method.md §6), never applied: (B, S, 18), CPU."""
    return sample_visual_params(B * S, generator, H, W).view(B, S, VISUAL_DIM)


def sample_audio_vectors(B, S, generator, T=1024, F=128):
    """S vectors per sample for a centroid (method.md §6), never applied: (B, S, 24), CPU."""
    return sample_audio_params(B * S, generator, T, F).view(B, S, AUDIO_DIM)


def sample_time_roll(B, T, generator):
    """Input noise on the original spectrogram (method.md §12): a circular shift along time by an
    integer uniform in [0, T) per sample, not recorded. (B,) frames, float32 on the CPU
    (for `roll_time`)."""
    return torch.randint(0, T, (B,), generator=generator).float()


def _crop_boxes(n, generator, H, W, ratio):
    """torchvision's RandomResizedCrop.get_params for n samples: the first of 10 draws of
    (area, log-uniform aspect w/h) that fits the (H, W) plane. When none fits, the fallback
    is the whole plane cut to the nearest allowed aspect ratio, centred. Returns integer
    (top, left, height, width), each (n,)."""
    target = H * W * _uniform((n, CROP_ATTEMPTS), *CROP_SCALE, generator, torch.float64)
    aspect = torch.exp(_uniform((n, CROP_ATTEMPTS), math.log(ratio[0]), math.log(ratio[1]),
                                generator, torch.float64))
    w, h = torch.round(torch.sqrt(target * aspect)), torch.round(torch.sqrt(target / aspect))
    fits = (w > 0) & (w <= W) & (h > 0) & (h <= H)
    first, found = fits.int().argmax(dim=1, keepdim=True), fits.any(dim=1)
    h, w = h.gather(1, first).squeeze(1).long(), w.gather(1, first).squeeze(1).long()
    u_top = torch.rand(n, generator=generator, dtype=torch.float64)
    u_left = torch.rand(n, generator=generator, dtype=torch.float64)
    fallback_w = min(W, round(H * ratio[1]))
    fallback_h = min(H, round(W / ratio[0]))
    h, w = torch.where(found, h, fallback_h), torch.where(found, w, fallback_w)
    top = torch.floor(u_top * (H - h + 1)).long().clamp(max=H - h)   # uniform in [0, H - h]
    left = torch.floor(u_left * (W - w + 1)).long().clamp(max=W - w)
    top = torch.where(found, top, (H - fallback_h) // 2)
    left = torch.where(found, left, (W - fallback_w) // 2)
    return top, left, h, w


def _sample_common(t, slots, crop, boxes, size, generator):
    """Write the slots both modalities share: the crop box (normalized by the plane `size`,
    rows and cols), colour jitter (p 0.8), Gaussian blur (p 0.5, sigma U(0.1, 2)), flip (p 0.5).
    The stored fractions are float32; times the size and rounded they give back the integers
    exactly (float32 holds every integer below 2^24)."""
    n = t.shape[0]
    t[:, slots[crop[0]]] = 1.0
    rows, cols = size
    for name, value, length in zip(crop[1:], boxes, (rows, cols, rows, cols)):   # top left h w
        t[:, slots[name]] = (value.double() / length).float()
    on = _coin(n, P_JITTER, generator)
    order = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)   # a uniform permutation
    values = torch.cat([_uniform((n, 3), -JITTER_STRENGTH, JITTER_STRENGTH, generator),
                        _uniform((n, 1), -HUE_RANGE, HUE_RANGE, generator)], dim=1)
    t[:, slots["cj_on"]] = on.float()
    for r in range(4):   # when off, the order slots hold the identity order 0, 1/3, 2/3, 1
        t[:, slots[f"cj_order{r}"]] = torch.where(on, order[:, r], r).float() / 3.0
    for k, name in enumerate(("cj_brightness", "cj_contrast", "cj_saturation", "cj_hue")):
        t[:, slots[name]] = torch.where(on, values[:, k], 0.0)
    blur, sigma = _coin(n, P_BLUR, generator), _uniform(n, *SIGMA_RANGE, generator)
    t[:, slots["blur_on"]] = blur.float()
    t[:, slots["blur_sigma"]] = torch.where(blur, sigma, 0.0)
    t[:, slots["flip_on"]] = _coin(n, P_FLIP, generator).float()
    return t


def _uniform(shape, lo, hi, generator, dtype=torch.float32):
    return lo + (hi - lo) * torch.rand(shape, generator=generator, dtype=dtype)


def _coin(n, p, generator):
    return torch.rand(n, generator=generator) < p


# =============================================================================
# Identity vectors and small helpers
# =============================================================================

def visual_identity(n):
    """(n, 18) "no augmentation" (method.md §8): the crop is the whole plane, the jitter order is
    (0, 1/3, 2/3, 1), everything else 0. apply_visual returns its input unchanged."""
    return _identity(n, VISUAL_SLOTS, ("rrc_on", "rrc_height", "rrc_width"))


def audio_identity(n):
    """(n, 24) "no augmentation" (method.md §8); apply_audio returns its input unchanged."""
    return _identity(n, AUDIO_SLOTS, ("rrc_on", "rrc_time_len", "rrc_freq_width"))


def _identity(n, slots, whole_plane):   # on the CPU, like every vector sampled here
    t = torch.zeros(n, len(slots))
    t[:, [slots[name] for name in whole_plane]] = 1.0
    for r in range(4):
        t[:, slots[f"cj_order{r}"]] = r / 3.0
    return t


def only(t, names):
    """t (n, d_t) with every slot outside `names` at the identity: those augmentations alone."""
    audio = t.shape[1] == AUDIO_DIM
    out = (audio_identity if audio else visual_identity)(t.shape[0])
    keep = [(AUDIO_SLOTS if audio else VISUAL_SLOTS)[name] for name in names]
    out[:, keep] = t[:, keep]
    return out


def read_slots(t, layout, device):
    """t (B, d_t) -> {slot name: (B,) column on `device`}: the slots by name, float32, and
    the on/off slots (names ending in _on) as bools. The training step hands t over already on
    the device (utils.to_device_together); a CPU t is copied here."""
    columns = t.to(device, torch.float32, non_blocking=True).unbind(dim=1)
    return {name: column > 0.5 if name.endswith("_on") else column
            for name, column in zip(layout, columns)}


def jitter_order(v):
    """The four order slots -> (B, 4) op indices (0 b, 1 c, 2 s, 3 hue) applied 1st..4th."""
    return torch.stack([to_index(v[f"cj_order{r}"], 3) for r in range(4)], dim=1).long()


def to_index(fraction, size):
    """A stored fraction x / size -> the integer x, as a float tensor (exact: see
    _sample_common)."""
    return torch.round(fraction * size)


def per_sample(values, ndim):
    """(B,) values -> (B, 1, ..., 1) with `ndim` dims, to broadcast over each sample."""
    return values.view(-1, *([1] * (ndim - 1)))


def _crop_positions(start, length, size):
    """Where the `size` output pixels of one axis read in each sample's crop [start, start +
    length), by interpolate's bilinear rule (align_corners=False): output pixel i reads crop
    coordinate (i + 0.5) length / size - 0.5, held inside the crop (its edge pixels repeat).
    start, length (B,) -> (B, size) pixel coordinates of the whole plane."""
    i = torch.arange(size, device=start.device, dtype=start.dtype)
    source = (i + 0.5) * (length / size).unsqueeze(1) - 0.5
    source = torch.minimum(source.clamp(min=0), (length - 1).unsqueeze(1))
    return start.unsqueeze(1) + source


def _blend(x, op, f):
    """One blend per sample, as torchvision blends: f x + (1 - f) other, clamped to [0, 1],
    with op (B,) 0 brightness (other = black), 1 contrast (the mean grey), 2 saturation (the
    grey image). f = 1 returns x exactly."""
    grey = TF.rgb_to_grayscale(x)                                         # (B, 1, H, W)
    op, f = per_sample(op, 4), per_sample(f, 4)
    other = torch.where(op == 2, grey,
                        torch.where(op == 1, grey.mean(dim=(1, 2, 3), keepdim=True), 0.0))
    return (f * x + (1 - f) * other).clamp(0, 1)


def adjust_hue(x, shift):
    """torchvision's adjust_hue with one shift per sample: x (B, 3, H, W) in [0, 1], shift (B,)
    in turns. The public TF.adjust_hue takes one shift for a whole batch, so this calls the
    HSV conversions behind it, which are torchvision's private helpers (tests/test_augment.py
    fails loudly if torchvision moves them)."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv
    h, s, v = _rgb_to_hsv(x).unbind(dim=1)
    return _hsv_to_rgb(torch.stack([(h + per_sample(shift, 3)) % 1.0, s, v], dim=1))


def roll_time(spec, frames):
    """out[b, i] = spec[b, (i - frames[b]) mod T]: spec (B, T, F), frames (B,) whole numbers
    (float or int) on spec's device."""
    B, T, F = spec.shape
    frame = torch.arange(T, device=spec.device)
    source = torch.remainder(frame - frames.long().view(B, 1), T)             # (B, T)
    return spec.gather(1, source.unsqueeze(2).expand(B, T, F))


def _check(x, t, ndim, dim, what):
    if x.dim() != ndim or (ndim == 4 and x.shape[1] != 3):
        channels = " with 3 channels" if ndim == 4 else ""
        raise ValueError(f"{what}: expected a {ndim}-D batch{channels}, got shape {tuple(x.shape)}")
    if t.shape != (x.shape[0], dim):
        raise ValueError(f"{what}: expected t of shape ({x.shape[0]}, {dim}), got {tuple(t.shape)}")
