"""Tests for augment.py (method.md §8, 12): every recorded vector describes what was done.

Each augmentation is checked alone against reference ops written here (torchvision
functional ops, torch.roll, explicit zeroing), applied one sample at a time from the
decoded vector; then whole pipelines, sampling distributions, reproducibility and devices.
"""
import math

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

import augment as A
import utils
from helpers import BlockingTransfers
from augment import AUDIO_SLOTS as AS
from augment import VISUAL_SLOTS as VS

ORDER = ("cj_order0", "cj_order1", "cj_order2", "cj_order3")
JITTER = ("cj_on",) + ORDER + ("cj_brightness", "cj_contrast", "cj_saturation", "cj_hue")
VISUAL_GROUPS = {
    "rrc": ("rrc_on", "rrc_top", "rrc_left", "rrc_height", "rrc_width"),
    "jitter": JITTER,
    "blur": ("blur_on", "blur_sigma"),
    "flip": ("flip_on",),
    "gray": ("gray_on",),
}
AUDIO_GROUPS = {
    "specaug": ("specaug_on", "tmask_start", "tmask_end", "fmask_start", "fmask_end"),
    "shift": ("shift_on", "shift"),
    "rrc": ("rrc_on", "rrc_time_start", "rrc_freq_start", "rrc_time_len", "rrc_freq_width"),
    "jitter": JITTER,
    "blur": ("blur_on", "blur_sigma"),
    "flip": ("flip_on",),
}


def gen(seed):
    return torch.Generator().manual_seed(seed)


def only(t, slots, names, identity):
    """Identity vectors with only the named slots copied from t: that augmentation alone."""
    v = identity(t.shape[0])
    for name in names:
        v[:, slots[name]] = t[:, slots[name]]
    return v


def images(n, H=32, W=32, seed=0):
    return torch.rand(n, 3, H, W, generator=gen(seed))


def spectrograms(n, T=64, F=32, seed=0):
    # Normalized fbank-like values, well outside [0, 1] and never exactly 0.
    return 2.0 * torch.randn(n, T, F, generator=gen(seed)) + 0.5


def ints(value, size):
    """Decode a stored value x/size to the integer x, asserting that it is one."""
    raw = float(value) * size
    assert abs(raw - round(raw)) < 1e-3, (value, size)
    return round(raw)


def ints_t(values, size):
    """ints() for a tensor of stored values -> int64 tensor."""
    raw = values.double() * size
    assert (raw - raw.round()).abs().max() < 1e-3, size
    return raw.round().long()


# ---------------------------------------------------------------------------
# Reference ops, one sample at a time (independent of augment.py's batched code)
# ---------------------------------------------------------------------------

def ref_visual_crop(x, v):
    H, W = x.shape[-2:]
    if v[VS["rrc_on"]] < 0.5:
        return x
    box = (ints(v[VS["rrc_top"]], H), ints(v[VS["rrc_left"]], W),
           ints(v[VS["rrc_height"]], H), ints(v[VS["rrc_width"]], W))
    return TF.resized_crop(x, *box, size=[H, W], antialias=False)


def ref_visual_jitter(x, v):
    if v[VS["cj_on"]] < 0.5:
        return x
    for name in ORDER:
        op = ints(v[VS[name]], 3)
        if op == 0:
            x = TF.adjust_brightness(x, 1.0 + float(v[VS["cj_brightness"]]))
        elif op == 1:
            x = TF.adjust_contrast(x, 1.0 + float(v[VS["cj_contrast"]]))
        elif op == 2:
            x = TF.adjust_saturation(x, 1.0 + float(v[VS["cj_saturation"]]))
        else:
            x = TF.adjust_hue(x, float(v[VS["cj_hue"]]))
    return x


def ref_blur(x, on, sigma, kernel_size):
    if on < 0.5:
        return x
    sigma = float(sigma)
    k = kernel_size(sigma)
    return TF.gaussian_blur(x, [k, k], [sigma, sigma])


def visual_kernel(sigma):
    return 2 * math.ceil(3 * sigma) + 1


def audio_kernel(sigma):
    return 2 * math.ceil(sigma) + 1


def ref_visual(x, v):
    """The whole visual pipeline in method.md §8's order, composed from the references."""
    x = ref_visual_crop(x, v)
    x = ref_visual_jitter(x, v)
    x = ref_blur(x, v[VS["blur_on"]], v[VS["blur_sigma"]], visual_kernel)
    if v[VS["flip_on"]] > 0.5:
        x = TF.hflip(x)
    if v[VS["gray_on"]] > 0.5:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    return x


def ref_masks(x, v):
    T, F = x.shape
    if v[AS["specaug_on"]] < 0.5:
        return x
    x = x.clone()
    x[ints(v[AS["tmask_start"]], T):ints(v[AS["tmask_end"]], T), :] = 0.0   # time is axis 0 here
    x[:, ints(v[AS["fmask_start"]], F):ints(v[AS["fmask_end"]], F)] = 0.0   # frequency axis 1
    return x


def ref_shift(x, v):
    if v[AS["shift_on"]] < 0.5:
        return x
    return torch.roll(x, ints(v[AS["shift"]], x.shape[0]), dims=0)


def ref_audio_crop(x, v):
    T, F = x.shape
    if v[AS["rrc_on"]] < 0.5:
        return x
    box = (ints(v[AS["rrc_time_start"]], T), ints(v[AS["rrc_freq_start"]], F),
           ints(v[AS["rrc_time_len"]], T), ints(v[AS["rrc_freq_width"]], F))
    return TF.resized_crop(x[None], *box, size=[T, F], antialias=False)[0]


def ref_audio_jitter(x, v):
    if v[AS["cj_on"]] < 0.5:
        return x
    for name in ORDER:
        op = ints(v[AS[name]], 3)
        if op == 0:
            x = x * (1.0 + float(v[AS["cj_brightness"]]))
        elif op == 1:
            c = 1.0 + float(v[AS["cj_contrast"]])
            x = c * x + (1.0 - c) * x.mean()
        # saturation and hue: nothing to do on one channel
    return x


def ref_audio(x, v):
    x = ref_masks(x, v)
    x = ref_shift(x, v)
    x = ref_audio_crop(x, v)
    x = ref_audio_jitter(x, v)
    x = ref_blur(x[None], v[AS["blur_on"]], v[AS["blur_sigma"]], audio_kernel)[0]
    if v[AS["flip_on"]] > 0.5:
        x = x.flip(-1)   # (T, F): frequency is the last axis
    return x


def per_sample(ref, x, t):
    return torch.stack([ref(xi, vi) for xi, vi in zip(x, t)])


# ---------------------------------------------------------------------------
# Identity
# ---------------------------------------------------------------------------

def test_identity_vectors_follow_spec():
    for ident, slots, full in ((A.visual_identity(2), VS, ("rrc_on", "rrc_height", "rrc_width")),
                               (A.audio_identity(2), AS, ("rrc_on", "rrc_time_len", "rrc_freq_width"))):
        expected = torch.zeros_like(ident[0])
        for name in full:
            expected[slots[name]] = 1.0
        for k, name in enumerate(ORDER):
            expected[slots[name]] = k / 3
        assert ident.dtype == torch.float32
        torch.testing.assert_close(ident, expected.expand_as(ident), rtol=0, atol=1e-7)


def test_only_keeps_the_named_slots_and_sets_the_rest_to_identity():
    for t, slots, identity in ((A.sample_audio_params(6, gen(40), 64, 32), AS, A.audio_identity),
                               (A.sample_visual_params(6, gen(41), 32, 32), VS, A.visual_identity)):
        for names in ((AUDIO_GROUPS["specaug"] if slots is AS else VISUAL_GROUPS["jitter"]), ()):
            got = A.only(t, names)
            assert torch.equal(got, only(t, slots, names, identity))   # the test's own helper
            keep = [slots[n] for n in names]
            rest = [i for i in range(t.shape[1]) if i not in keep]
            assert torch.equal(got[:, keep], t[:, keep])
            assert torch.equal(got[:, rest], identity(6)[:, rest])


def test_identity_leaves_inputs_unchanged():
    img, spec = images(5, 24, 40), spectrograms(5)
    assert torch.equal(A.apply_visual(img, A.visual_identity(5)), img)
    assert torch.equal(A.apply_audio(spec, A.audio_identity(5)), spec)


# ---------------------------------------------------------------------------
# Visual augmentations, each alone, against torchvision
# ---------------------------------------------------------------------------

def test_visual_crop_matches_torchvision_resized_crop():
    H, W = 32, 48   # not square, so that swapped axes would show
    img = images(16, H, W)
    t = only(A.sample_visual_params(16, gen(1), H, W), VS, VISUAL_GROUPS["rrc"], A.visual_identity)
    assert (t[:, VS["rrc_height"]] * t[:, VS["rrc_width"]] < 0.9).sum() >= 8   # real crops
    out = A.apply_visual(img, t)
    torch.testing.assert_close(out, per_sample(ref_visual_crop, img, t), rtol=0, atol=1e-5)


def test_visual_color_jitter_matches_torchvision_in_recorded_order():
    img = images(32)
    t = only(A.sample_visual_params(32, gen(2), 32, 32), VS, JITTER, A.visual_identity)
    on = t[:, VS["cj_on"]] > 0.5
    assert 0 < on.sum() < 32
    out = A.apply_visual(img, t)
    torch.testing.assert_close(out, per_sample(ref_visual_jitter, img, t), rtol=0, atol=1e-5)
    assert torch.equal(out[~on], img[~on])


def test_visual_color_jitter_order_matters():
    # Bright, saturated pixels and strong factors: clamping and hue make the order visible.
    img = 0.5 + 0.5 * images(1).expand(2, -1, -1, -1)
    t = A.visual_identity(2)
    t[:, VS["cj_on"]] = 1.0
    for name, value in (("cj_brightness", 0.4), ("cj_contrast", -0.4), ("cj_saturation", 0.4), ("cj_hue", 0.1)):
        t[:, VS[name]] = value
    for k, name in enumerate(ORDER):
        t[0, VS[name]] = k / 3          # brightness, contrast, saturation, hue
        t[1, VS[name]] = (3 - k) / 3    # hue, saturation, contrast, brightness
    out = A.apply_visual(img, t)
    torch.testing.assert_close(out, per_sample(ref_visual_jitter, img, t), rtol=0, atol=1e-5)
    assert (out[0] - out[1]).abs().max() > 0.05


def test_hue_handles_grey_tied_and_extreme_pixels():
    img = images(6, 16, 16)
    img[0] = 0.4                                  # grey: no hue
    img[1, 1] = img[1, 0]                         # r == g ties
    img[2, 2] = img[2, 1]                         # g == b ties
    img[3, :, :8] = 0.0                           # black and white blocks
    img[3, :, 8:] = 1.0
    img[4, 0], img[4, 1], img[4, 2] = 1.0, 0.0, 0.0   # pure red
    t = A.visual_identity(6)
    t[:, VS["cj_on"]] = 1.0
    for k, name in enumerate(ORDER):   # hue first; identity factors for the others
        t[:, VS[name]] = (3 - k) / 3
    t[:, VS["cj_hue"]] = torch.tensor([0.1, -0.1, 0.05, 0.1, -0.5, 0.5])
    out = A.apply_visual(img, t)
    torch.testing.assert_close(out, per_sample(ref_visual_jitter, img, t), rtol=0, atol=1e-5)
    torch.testing.assert_close(out[4, :, 0, 0], torch.tensor([0.0, 1.0, 1.0]))   # red + half turn = cyan


def test_inputs_are_not_modified():
    img, spec = images(8), spectrograms(8)
    img0, spec0 = img.clone(), spec.clone()
    for tv in (A.sample_visual_params(8, gen(30), 32, 32), A.visual_identity(8)):
        A.apply_visual(img, tv)
    for ta in (A.sample_audio_params(8, gen(31), 64, 32), A.audio_identity(8)):
        A.apply_audio(spec, ta)
    ta = A.audio_identity(8)
    ta[:, AS["blur_on"]], ta[:, AS["blur_sigma"]], ta[:, AS["flip_on"]] = 1.0, 1.0, 1.0
    A.apply_audio(spec, ta)   # no crop: the in-place steps must work on a copy
    assert torch.equal(img, img0) and torch.equal(spec, spec0)


def test_visual_blur_matches_torchvision_with_mixed_kernel_sizes():
    img = images(8)
    t = A.visual_identity(8)
    t[:, VS["blur_on"]] = torch.tensor([1, 1, 1, 0, 1, 1, 1, 1.0])
    t[:, VS["blur_sigma"]] = torch.tensor([0.1, 0.3, 0.7, 1.5, 1.0, 1.34, 1.7, 2.0])   # kernels 3..13
    out = A.apply_visual(img, t)
    torch.testing.assert_close(out, per_sample(
        lambda x, v: ref_blur(x, v[VS["blur_on"]], v[VS["blur_sigma"]], visual_kernel), img, t),
        rtol=0, atol=1e-6)
    assert torch.equal(out[3], img[3])
    assert (out[7] - img[7]).abs().max() > 0.1


def test_visual_flip_and_grayscale_match_torchvision():
    img = images(12, 16, 24)
    t = A.sample_visual_params(12, gen(3), 16, 24)
    flip = only(t, VS, ("flip_on",), A.visual_identity)
    gray = only(t, VS, ("gray_on",), A.visual_identity)
    assert 0 < flip[:, VS["flip_on"]].sum() < 12 and gray[:, VS["gray_on"]].sum() > 0
    ref_flip = per_sample(lambda x, v: TF.hflip(x) if v[VS["flip_on"]] > 0.5 else x, img, flip)
    ref_gray = per_sample(lambda x, v: TF.rgb_to_grayscale(x, num_output_channels=3)
                          if v[VS["gray_on"]] > 0.5 else x, img, gray)
    assert torch.equal(A.apply_visual(img, flip), ref_flip)
    torch.testing.assert_close(A.apply_visual(img, gray), ref_gray, rtol=0, atol=1e-6)


def test_visual_pipeline_matches_composition_and_stays_in_unit_range():
    img = images(24)
    t = A.sample_visual_params(24, gen(4), 32, 32)
    out = A.apply_visual(img, t)
    torch.testing.assert_close(out, per_sample(ref_visual, img, t), rtol=0, atol=1e-5)
    torch.testing.assert_close(A.apply_visual(img.double(), t), per_sample(ref_visual, img.double(), t),
                               rtol=0, atol=1e-6)   # our factors are float32 slots, the reference's doubles
    assert out.min() >= 0 and out.max() <= 1
    strong = A.apply_visual(images(64, seed=5), A.sample_visual_params(64, gen(5), 32, 32))
    assert strong.min() >= 0 and strong.max() <= 1


def test_normalize_image():
    img = images(2)
    torch.testing.assert_close(A.normalize_image(img),
                               TF.normalize(img, list(A.IMAGENET_MEAN), list(A.IMAGENET_STD)))


# ---------------------------------------------------------------------------
# Audio augmentations, each alone
# ---------------------------------------------------------------------------

def test_specaugment_zeroes_exactly_the_recorded_spans():
    T, F = 64, 32
    spec = spectrograms(32, T, F)
    assert (spec != 0).all()
    t = only(A.sample_audio_params(32, gen(6), T, F), AS, AUDIO_GROUPS["specaug"], A.audio_identity)
    out = A.apply_audio(spec, t)
    assert torch.equal(out, per_sample(ref_masks, spec, t))   # zeros exactly there, nothing else
    on = t[:, AS["specaug_on"]] > 0.5
    assert 0 < on.sum() < 32 and torch.equal(out[~on], spec[~on])
    zeroed = (out == 0).sum(dim=(1, 2))
    assert (zeroed[on] > 0).any()


def test_time_shift_moves_frames():
    T, F = 64, 8
    frames = torch.arange(T, dtype=torch.float32)[None, :, None].expand(6, T, F)   # (B, T, F): frame i holds i
    t = A.audio_identity(6)
    t[:, AS["shift_on"]] = 1.0
    shifts = [5, -5, 63, -64, 0, 17]
    t[:, AS["shift"]] = torch.tensor(shifts, dtype=torch.float32) / T
    out = A.apply_audio(frames, t)
    for b, s in enumerate(shifts):
        marker = 3   # frame 3 ends up at (3 + s) mod T
        assert (out[b, (marker + s) % T] == marker).all()
        assert torch.equal(out[b], torch.roll(frames[b], s, dims=0))
    # Sampled shifts do the same, and really move frames.
    spec = spectrograms(16, T, F)
    sampled = only(A.sample_audio_params(16, gen(7), T, F), AS, AUDIO_GROUPS["shift"], A.audio_identity)
    out = A.apply_audio(spec, sampled)
    assert torch.equal(out, per_sample(ref_shift, spec, sampled))
    assert (out != spec).any(dim=(1, 2)).sum() >= 8


def test_audio_crop_matches_torchvision_resized_crop():
    T, F = 128, 16   # F/T = 1/8 as at the base size, so crops are not all the fallback
    spec = spectrograms(16, T, F)
    t = only(A.sample_audio_params(16, gen(8), T, F), AS, AUDIO_GROUPS["rrc"], A.audio_identity)
    assert (t[:, AS["rrc_time_len"]] * t[:, AS["rrc_freq_width"]] < 0.9).sum() >= 8
    out = A.apply_audio(spec, t)
    # The sampling rule is torchvision's: in float64 the two agree to rounding.
    torch.testing.assert_close(A.apply_audio(spec.double(), t),
                               per_sample(ref_audio_crop, spec.double(), t), rtol=0, atol=1e-9)
    # In float32 each computes its sampling positions with its own rounding (about 1e-5 of
    # a frame near frame 128); spectrogram values change by up to ~6 between neighbours,
    # so the outputs differ by up to ~6e-5 (README, "Augmentation on the GPU").
    torch.testing.assert_close(out, per_sample(ref_audio_crop, spec, t), rtol=0, atol=1e-4)


def test_audio_color_jitter_in_recorded_order_without_clamping():
    spec = spectrograms(32)
    t = only(A.sample_audio_params(32, gen(9), 64, 32), AS, JITTER, A.audio_identity)
    on = t[:, AS["cj_on"]] > 0.5
    assert 0 < on.sum() < 32
    out = A.apply_audio(spec, t)
    torch.testing.assert_close(out, per_sample(ref_audio_jitter, spec, t), rtol=0, atol=1e-5)
    assert torch.equal(out[~on], spec[~on])
    assert out.min() < -1 and out.max() > 2   # normalized spectrograms are not clamped
    # Saturation and hue are recorded but change nothing on one channel.
    assert (t[on, AS["cj_saturation"]] != 0).all() and (t[on, AS["cj_hue"]] != 0).all()
    t2 = t.clone()
    t2[:, AS["cj_saturation"]] = 0.3
    t2[:, AS["cj_hue"]] = -0.05
    assert torch.equal(A.apply_audio(spec, t2), out)


def test_audio_blur_matches_torchvision():
    spec = spectrograms(6)
    t = A.audio_identity(6)
    t[:, AS["blur_on"]] = torch.tensor([1, 1, 0, 1, 1, 1.0])
    t[:, AS["blur_sigma"]] = torch.tensor([0.1, 0.9, 1.5, 1.2, 1.99, 2.0])   # kernels 3 and 5
    out = A.apply_audio(spec, t)
    torch.testing.assert_close(out, per_sample(
        lambda x, v: ref_blur(x[None], v[AS["blur_on"]], v[AS["blur_sigma"]], audio_kernel)[0], spec, t),
        rtol=0, atol=1e-5)
    assert torch.equal(out[2], spec[2])


def test_audio_flip_reverses_frequency():
    spec = spectrograms(10)
    t = only(A.sample_audio_params(10, gen(10), 64, 32), AS, ("flip_on",), A.audio_identity)
    out = A.apply_audio(spec, t)
    flipped = t[:, AS["flip_on"]] > 0.5
    assert 0 < flipped.sum() < 10
    assert torch.equal(out[flipped], spec[flipped].flip(2))   # (B, T, F): axis 2 is frequency
    assert torch.equal(out[~flipped], spec[~flipped])


def test_audio_pipeline_matches_composition():
    T, F = 128, 16
    spec = spectrograms(24, T, F)
    t = A.sample_audio_params(24, gen(11), T, F)
    torch.testing.assert_close(A.apply_audio(spec, t), per_sample(ref_audio, spec, t), rtol=0, atol=1e-4)
    torch.testing.assert_close(A.apply_audio(spec.double(), t), per_sample(ref_audio, spec.double(), t),
                               rtol=0, atol=1e-6)


def test_random_time_roll_shifts_each_sample_circularly():
    B, T, F = 8, 64, 4
    spec = torch.arange(T * F, dtype=torch.float32).view(1, T, F).repeat(B, 1, 1)   # every value unique
    out = A.roll_time(spec, A.sample_time_roll(B, T, gen(14)))
    shifts = []
    for b in range(B):
        s = (-int(out[b, 0, 0]) // F) % T     # frame 0 now holds the original frame -s
        assert torch.equal(out[b], torch.roll(spec[b], s, dims=0))
        shifts.append(s)
    assert len(set(shifts)) > 1
    assert torch.equal(A.roll_time(spec, A.sample_time_roll(B, T, gen(14))), out)


# ---------------------------------------------------------------------------
# Sampling: reproducibility and distributions
# ---------------------------------------------------------------------------

def test_same_seed_same_output_different_seed_different():
    img, spec = images(4), spectrograms(4)
    a1, ta1 = A.augment_audio(spec, gen(0))
    a2, ta2 = A.augment_audio(spec, gen(0))
    a3, ta3 = A.augment_audio(spec, gen(1))
    assert torch.equal(a1, a2) and torch.equal(ta1, ta2)
    assert not torch.equal(ta1, ta3) and not torch.equal(a1, a3)
    v1, tv1 = A.augment_visual(img, gen(0))
    v2, tv2 = A.augment_visual(img, gen(0))
    v3, tv3 = A.augment_visual(img, gen(1))
    assert torch.equal(v1, v2) and torch.equal(tv1, tv2)
    assert not torch.equal(tv1, tv3) and not torch.equal(v1, v3)


def check_jitter_distribution(t, slots):
    on = t[:, slots["cj_on"]] > 0.5
    assert abs(on.float().mean() - 0.8) < 0.02
    order = torch.round(t[:, [slots[n] for n in ORDER]] * 3)
    assert torch.equal(order[on].sort(dim=1).values, torch.arange(4.0).expand(int(on.sum()), 4))
    assert torch.equal(order[~on], torch.arange(4.0).expand(int((~on).sum()), 4))
    first_is_hue = (order[on, 0] == 3).float().mean()
    assert abs(first_is_hue - 0.25) < 0.03
    for name, bound in (("cj_brightness", 0.4), ("cj_contrast", 0.4), ("cj_saturation", 0.4), ("cj_hue", 0.1)):
        v = t[:, slots[name]]
        assert (v[~on] == 0).all() and v[on].abs().max() <= bound and v[on].abs().max() > 0.9 * bound
    blur = t[:, slots["blur_on"]] > 0.5
    sigma = t[:, slots["blur_sigma"]]
    assert abs(blur.float().mean() - 0.5) < 0.02
    assert (sigma[~blur] == 0).all() and sigma[blur].min() >= 0.1 and sigma[blur].max() <= 2.0
    assert abs((t[:, slots["flip_on"]] > 0.5).float().mean() - 0.5) < 0.02


def check_crop_distribution(h, w, H, W, ratio):
    """h, w: crop sides in pixels of an (H, W) plane; ratio: bounds of w / h in pixels."""
    area = h * w / (H * W)
    assert area.min() >= 0.07 and area.max() <= 1.0   # U(0.08, 1), up to rounding the sides
    assert 0.4 < area.mean() < 0.65
    aspect = w / h
    assert aspect.min() >= ratio[0] * 0.97 and aspect.max() <= ratio[1] * 1.03


def test_visual_sampling_distributions():
    n, H, W = 20000, 224, 224
    t = A.sample_visual_params(n, gen(15), H, W)
    assert t.shape == (n, A.VISUAL_DIM) and t.dtype == torch.float32 and t.device.type == "cpu"
    assert (t[:, VS["rrc_on"]] == 1).all()
    top, left, h, w = (ints_t(t[:, VS[k]], s).double()
                       for k, s in (("rrc_top", H), ("rrc_left", W), ("rrc_height", H), ("rrc_width", W)))
    assert (top >= 0).all() and (top + h <= H).all() and (left >= 0).all() and (left + w <= W).all()
    check_crop_distribution(h, w, H, W, (3 / 4, 4 / 3))
    check_jitter_distribution(t, VS)
    assert abs((t[:, VS["gray_on"]] > 0.5).float().mean() - 0.2) < 0.02


def test_audio_sampling_distributions():
    n, T, F = 20000, 1024, 128
    t = A.sample_audio_params(n, gen(16), T, F)
    assert t.shape == (n, A.AUDIO_DIM) and t.dtype == torch.float32
    on = t[:, AS["specaug_on"]] > 0.5
    assert abs(on.float().mean() - 0.8) < 0.02
    assert torch.equal(t[:, AS["shift_on"]], t[:, AS["specaug_on"]])
    decoded = {k: ints_t(t[:, AS[k]], s) for k, s in (
        ("tmask_start", T), ("tmask_end", T), ("fmask_start", F), ("fmask_end", F), ("shift", T),
        ("rrc_time_start", T), ("rrc_freq_start", F), ("rrc_time_len", T), ("rrc_freq_width", F))}
    t_width = decoded["tmask_end"] - decoded["tmask_start"]
    f_width = decoded["fmask_end"] - decoded["fmask_start"]
    assert t_width.min() >= 0 and t_width.max() < 192 and t_width[on].max() > 185
    assert f_width.min() >= 0 and f_width.max() < 48 and f_width[on].max() > 44
    assert decoded["tmask_end"].max() <= T and decoded["fmask_end"].max() <= F
    assert abs(t_width[on].float().mean() - 95.5) < 3   # floor(U(0, 192))
    shift = decoded["shift"]
    assert (shift[~on] == 0).all() and shift.min() >= -T and shift.max() < T
    assert shift[on].min() < -0.95 * T and shift[on].max() > 0.95 * T
    ts, fs, tl, fw = (decoded[k].double() for k in ("rrc_time_start", "rrc_freq_start",
                                                     "rrc_time_len", "rrc_freq_width"))
    assert (ts + tl <= T).all() and (fs + fw <= F).all() and (ts >= 0).all() and (fs >= 0).all()
    check_crop_distribution(tl, fw, T, F, (1 / 10, 1.5 / 8))   # freq width / time length
    check_jitter_distribution(t, AS)


def test_mask_widths_scale_with_input_size():
    T, F = 256, 64
    t = A.sample_audio_params(5000, gen(17), T, F)
    t_width = torch.round((t[:, AS["tmask_end"]] - t[:, AS["tmask_start"]]) * T)
    f_width = torch.round((t[:, AS["fmask_end"]] - t[:, AS["fmask_start"]]) * F)
    assert t_width.max() < 48 and t_width.max() >= 45     # 192 * 256 / 1024
    assert f_width.max() < 24 and f_width.max() >= 22     # 48 * 64 / 128


def test_centroid_vectors_come_from_the_same_distribution():
    va = A.sample_audio_vectors(64, 16, gen(18), T=64, F=32)
    vv = A.sample_visual_vectors(64, 16, gen(18), H=32, W=32)
    assert va.shape == (64, 16, A.AUDIO_DIM) and vv.shape == (64, 16, A.VISUAL_DIM)
    assert torch.equal(va.reshape(-1, A.AUDIO_DIM), A.sample_audio_params(1024, gen(18), 64, 32))
    assert torch.equal(vv.reshape(-1, A.VISUAL_DIM), A.sample_visual_params(1024, gen(18), 32, 32))
    assert abs((va[..., AS["cj_on"]] > 0.5).float().mean() - 0.8) < 0.05
    assert not torch.equal(va[:, 0], va[:, 1])


# ---------------------------------------------------------------------------
# Errors and devices
# ---------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"t of shape \(2, 24\)"):
        A.apply_audio(spectrograms(2), A.visual_identity(2))
    with pytest.raises(ValueError, match="3-D batch"):
        A.apply_audio(spectrograms(2)[0], A.audio_identity(2))
    with pytest.raises(ValueError, match="3 channels"):
        A.apply_visual(images(2)[:, :1], A.visual_identity(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    img, spec = images(16, 64, 64), spectrograms(16, 128, 16)
    out, t = A.augment_visual(img.cuda(), gen(19))
    assert out.device.type == "cuda" and t.device.type == "cuda"
    assert torch.equal(t.cpu(), A.sample_visual_params(16, gen(19), 64, 64))
    # float32 on CUDA may run the blur convolution in TF32 (cuDNN's default): loose check;
    # float64 runs the same code without TF32: tight check.
    torch.testing.assert_close(out.cpu(), A.apply_visual(img, t.cpu()), rtol=0, atol=5e-3)
    torch.testing.assert_close(A.apply_visual(img.double().cuda(), t).cpu(),
                               A.apply_visual(img.double(), t.cpu()), rtol=0, atol=1e-6)
    out, t = A.augment_audio(spec.cuda(), gen(20))
    assert out.device.type == "cuda" and t.device.type == "cuda"
    torch.testing.assert_close(out.cpu(), A.apply_audio(spec, t.cpu()), rtol=0, atol=5e-2)
    torch.testing.assert_close(A.apply_audio(spec.double().cuda(), t).cpu(),
                               A.apply_audio(spec.double(), t.cpu()), rtol=0, atol=1e-6)
    assert torch.equal(A.apply_visual(img.cuda(), A.visual_identity(16).cuda()).cpu(), img)
    assert torch.equal(A.apply_audio(spec.cuda(), A.audio_identity(16).cuda()).cpu(), spec)
    shift = A.sample_time_roll(16, 128, gen(21))
    rolled = A.roll_time(spec.cuda(), utils.to_device(shift, torch.device("cuda")))
    assert torch.equal(rolled.cpu(), A.roll_time(spec, shift))


def test_audio_crop_ratio_is_relative_to_the_plane():
    # method.md §8's ratio range is for the 1024 x 128 plane; at T=256, F=64 the plane's
    # aspect (F/T) is twice as large, so the allowed range doubles with it.
    T, F = 256, 64
    t = A.sample_audio_params(20000, gen(18), T, F)
    tl = ints_t(t[:, AS["rrc_time_len"]], T).double()
    fw = ints_t(t[:, AS["rrc_freq_width"]], F).double()
    check_crop_distribution(tl, fw, T, F, (2 / 10, 2 * 1.5 / 8))
    assert (fw == F).any()   # full-width crops remain possible


# ---------------------------------------------------------------------------
# Fit for the GPU step: no blocking host-to-device transfer (meta stands in for CUDA)
# ---------------------------------------------------------------------------

def test_blocking_transfer_recorder_sees_each_kind():
    x = torch.zeros(4, 3, device="meta")
    for blocking in (lambda: torch.tensor([1.0, 2.0], device="meta"),
                     lambda: torch.ones(3).to("meta"),
                     lambda: x[[0, 1]],
                     lambda: x.index_select(0, torch.tensor([0, 1])),
                     lambda: TF.normalize(torch.zeros(2, 3, 4, 4, device="meta"),
                                          list(A.IMAGENET_MEAN), list(A.IMAGENET_STD))):
        with BlockingTransfers() as rec:
            blocking()
        assert rec.found, blocking
    with BlockingTransfers() as rec:
        utils.to_device(torch.ones(3), torch.device("meta"))
        x * torch.tensor(2.0)          # a 0-d CPU scalar is passed by value
    assert rec.found == []


def test_training_input_pipelines_never_block_on_the_device():
    import finetune
    import pretrain
    from model import get_config
    mcfg = get_config("tiny", audio_length=64, mel_bins=32, image_size=32)
    meta = torch.device("meta")
    batch = {"audio": spectrograms(6, 64, 32), "frame": images(6), "label": torch.ones(6, 3)}
    with BlockingTransfers() as rec:
        inputs = pretrain.prepare_inputs(batch, gen(0), mcfg, 4, meta)
        x_a, x_v = finetune._inputs(batch, "multimodal", meta)
        finetune.finetune_specaugment(x_a, gen(1))
    assert all(x.device == meta for x in inputs) and x_v.device == meta
    assert rec.found == []
