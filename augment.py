"""Parameterized augmentations and their parameter vectors (SPEC 8).

Every augmentation is sampled per sample, applied to a whole batch at once on
the batch's device, and recorded as a normalized parameter vector t that the
augmentation encoder e_m reads (SPEC 3). The slot layouts below are the single
definition used by sampling, application, encoding and checkpoint conversion.
"""

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
