"""The built-in toy dataset: a synthetic audio-visual world written as real files.

`python toy.py --out DIR` writes it in exactly the layout data.py reads (the
CAV-MAE / EquiAV format: 16 kHz WAVs, 10 JPEG frames per clip, JSON
manifests, class_labels_indices.csv, stats.json), so that every script runs
out of the box on a CPU and the whole pipeline is exercised. The scripts
generate it themselves on first use (`ensure_toy_dataset`).

Every clip shows and sounds one object (two in the multi-label variant). Its design
follows how real audio-visual data behaves under the paper's augmentations (method.md §8),
decided before any model was trained on it (TOY_VERSION 3):
- The class survives every augmentation, as a band-cropped, jittered bark is still a
  bark. Audio classes are a texture (harmonic lines at f0, or a noise band around
  2 f0) times a pulse envelope whose shape is relative to the pulse period (staccato,
  legato, strike, swell): a mel-band crop and stretch, a frequency flip, masks, blur
  and jitter keep both. Visual classes are a shape and a luminance surface pattern
  (plain, stripes, dots, checker, rings, grid) that looks the same mirrored, greyed,
  hue-shifted or blurred, and that a crop through the object still shows.
- The instance cues, shared across the modalities, are what augmentations distort:
    pitch p in [0, 1]:  f0 = 220 * 2^(2p) Hz (two octaves)  <->  hue = 0.83 p
    rate  r in [0, 1]:  1 + 4r pulses/s                      <->  size
  (the band crop moves the pitch, the time crop the rate; hue jitter and greyscale
  move the hue, the visual crop the size).
- Objects are sized like the sounding objects of the localization benchmarks: the
  box covers 4-64 % of the model's crop, log-uniformly in r (VGG-SS: BOX_AREA), at a
  uniformly random place where it fits.
Nuisances: coloured background noise, mains hum and clicks in the audio; a
low-saturation gradient background, grey clutter, sensor noise, a small rotation,
brightness flicker and a slow drift across the 10 frames in the image.
Each manifest entry also carries "objects" (label, pitch, rate), "boxes"
(per frame, per object, [x0, y0, x1, y1] as fractions of the stored frame),
"sounding" (the indices of the objects one hears) and "frame_size" [W, H];
data.box_in_crop maps a box into the model's crop. The test_distractor split
shows two objects of different classes and hues and sounds one of them;
test_distractor_swap is the same frames with the other object's sound, so a
sound-source map can be checked to follow the sound, not the more salient object.
"""

import argparse
import colorsys
import csv
import json
import math
import os
import shutil
import sys
import time
import uuid
import wave
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import audio_io
import augment
import data
import utils


# ===========================================================================
# The world: classes, sounds, pictures
# ===========================================================================

class _Sound(NamedTuple):
    texture: str    # "tone": harmonic lines at f0; "noise": a smooth band around 2 f0
    envelope: str   # the shape of each pulse, relative to its period (see _envelope)


TOY_CLASSES = (  # (mid, display name, sound, shape, surface texture)
    ("/toy/flute", "flute (circle)", _Sound("tone", "legato"), "circle", "plain"),
    ("/toy/clarinet", "clarinet (square)", _Sound("tone", "staccato"), "square", "hstripes"),
    ("/toy/violin", "violin (triangle)", _Sound("tone", "swell"), "triangle", "vstripes"),
    ("/toy/bell", "bell (star)", _Sound("tone", "strike"), "star", "dots"),
    ("/toy/drum", "drum (hexagon)", _Sound("noise", "strike"), "hexagon", "checker"),
    ("/toy/horn", "horn (diamond)", _Sound("noise", "swell"), "diamond", "rings"),
    ("/toy/whistle", "whistle (ring)", _Sound("noise", "legato"), "ring", "plain"),
    ("/toy/buzzer", "buzzer (cross)", _Sound("noise", "staccato"), "cross", "grid"),
)
TOY_DURATION = 2.6            # s: 258 fbank frames, the tiny preset keeps 256
TOY_FRAME_SIZE = (128, 112)   # (W, H): the tiny preset resizes to 109 x 96 and crops 96
TOY_VERSION = 3              # 3: class cues that survive the augmentations, benchmark-sized objects
_TOY_SPLITS = {"train": 0, "test": 1, "train_multilabel": 2, "test_multilabel": 3,
               "test_distractor": 4}
_TOY_ID_PREFIX = {"train": "toy_train", "test": "toy_test", "train_multilabel": "toy_trainml",
                  "test_multilabel": "toy_testml", "test_distractor": "toy_testdis"}
# Box area as a fraction of the model's square crop, log-uniform in rate (an instance
# cue): VGG-SS's boxes (5,156 clips of hche11/Localizing-Visual-Sounds-the-Hard-Way,
# metadata/vggss.json) cover 3.5 / 20.5 / 63.7 % of the frame (10th / 50th / 90th
# percentile); these span 4-64 % (median 16 %); 3-12 % when two objects share a frame.
BOX_AREA, BOX_AREA_MULTI = (0.04, 0.64), (0.03, 0.12)


def toy_pitch_to_f0(pitch):
    return 220.0 * 2.0 ** (2.0 * pitch)


def toy_pitch_to_hue(pitch):
    return 0.83 * pitch


def toy_rate_to_pulses(rate):
    return 1.0 + 4.0 * rate


def toy_rate_to_radius(rate, multi=False):
    """Object radius in stored-frame pixels: its box (about 2 radii square) covers
    BOX_AREA of the model's crop, the frame's central H x H square."""
    lo, hi = BOX_AREA_MULTI if multi else BOX_AREA
    area = lo * (hi / lo) ** rate
    return 0.5 * math.sqrt(area) * TOY_FRAME_SIZE[1]


def _unit_rms(x):
    return x / (np.sqrt(np.mean(x * x)) + np.float32(1e-12))


def _coloured_noise(rng, n, tilt):
    """Unit-RMS noise from white (tilt 0) to high-passed brown (tilt 1), (n,) float32."""
    white = rng.standard_normal(n, dtype=np.float32)
    walk = np.cumsum(white, dtype=np.float64)
    c = np.concatenate([[0.0], np.cumsum(walk)])
    w = 400  # subtract a 25 ms moving average: removes the random walk's drift
    lo = np.clip(np.arange(n) - w, 0, n)
    hi = np.clip(np.arange(n) + w + 1, 0, n)
    brown = (walk - (c[hi] - c[lo]) / (hi - lo)).astype(np.float32)
    return _unit_rms(np.float32(1 - tilt) * _unit_rms(white) + np.float32(tilt) * _unit_rms(brown))


_TABLE_SIZE = 4096


def _lookup(table, cycles):
    """Periodic wavetable read at phase `cycles` (in periods), linear interpolation."""
    pos = (cycles - np.floor(cycles)) * _TABLE_SIZE  # np.mod is several times slower
    i = np.minimum(pos.astype(np.int32), _TABLE_SIZE - 1)
    return table[i] + (pos - i).astype(np.float32) * (table[i + 1] - table[i])


def _harmonic_table(partials, rng):
    """One period (plus a wrap-around sample) of a sum of harmonics with random phases."""
    pos = np.arange(_TABLE_SIZE + 1) / _TABLE_SIZE
    table = np.zeros(_TABLE_SIZE + 1)
    for ratio, amp in partials:
        table += amp * np.sin(2 * np.pi * ratio * pos + rng.uniform(0, 2 * np.pi))
    return table.astype(np.float32)


def _envelope(kind, phase):
    """Amplitude at `phase` in [0, 1) of each pulse, a shape relative to the period, so
    that a time stretch changes the pulse rate (the instance cue) but not the shape (the
    class cue): staccato (on for 35 %), legato (on for 90 %), strike (instant attack,
    decay) and swell (rising for 70 %, then cut)."""
    edge = np.float32(40.0)   # 1/40 of a period to switch on or off
    if kind in ("staccato", "legato"):
        on = np.float32(0.35 if kind == "staccato" else 0.9)
        return np.clip(phase * edge, 0, 1) * np.clip((on - phase) * edge, 0, 1)
    if kind == "strike":
        return np.clip(phase * np.float32(200.0), 0, 1) * np.exp(phase * np.float32(-8.0))
    if kind == "swell":
        return np.clip(phase / np.float32(0.7), 0, 1) ** 2 * np.clip((np.float32(0.72) - phase) * edge, 0, 1)
    raise ValueError(kind)


def _toy_source(rng, cls, pitch, rate, t):
    """One sounding object: (N,) float32 with unit RMS. t: (N,) float32 seconds."""
    sound = TOY_CLASSES[cls][2]
    f0 = toy_pitch_to_f0(pitch)
    pulses = toy_rate_to_pulses(rate)
    beats = (t - np.float32(rng.uniform(0.0, 1.0 / pulses))) * np.float32(pulses)
    phase = beats - np.floor(beats)   # position in the current pulse, [0, 1)
    if sound.texture == "tone":       # harmonics 1..6 (1/n), a slight vibrato
        vib = np.sin(np.float32(2 * np.pi * rng.uniform(4.5, 6.5)) * t + np.float32(rng.uniform(0, 6.3)))
        freq = np.float32(f0) * (np.float32(1.0) + np.float32(0.004) * vib)
        cycles = np.cumsum(freq, dtype=np.float64) / audio_io.SAMPLE_RATE
        partials = [(n, 1.0 / n) for n in range(1, 7) if n * f0 < 7000.0]
        sig = _lookup(_harmonic_table(partials, rng), cycles)
    else:                             # white noise band-passed to about two octaves around 2 f0
        spectrum = np.fft.rfft(rng.standard_normal(t.size))
        hz = np.fft.rfftfreq(t.size, 1.0 / audio_io.SAMPLE_RATE)
        octaves = np.log2(np.maximum(hz, 1.0) / (2.0 * f0))
        sig = np.fft.irfft(spectrum * np.exp(-0.5 * (octaves / 0.6) ** 2), t.size).astype(np.float32)
    return _unit_rms(sig * _envelope(sound.envelope, phase))


def _toy_audio(rng, objects):
    """Mix of the objects plus background; returns (N,) int16 at 16 kHz."""
    n = int(round(TOY_DURATION * audio_io.SAMPLE_RATE))
    t = np.arange(n, dtype=np.float32) / np.float32(audio_io.SAMPLE_RATE)
    mix = np.zeros(n, dtype=np.float32)
    for obj in objects:
        mix += np.float32(rng.uniform(0.6, 1.0)) * _toy_source(rng, obj["cls"], obj["pitch"],
                                                               obj["rate"], t)
    mix = _unit_rms(mix)
    snr_db = rng.uniform(6.0, 20.0)
    background = _coloured_noise(rng, n, rng.uniform(0.0, 1.0))
    if rng.random() < 0.5:  # mains hum with two overtones
        mains = rng.choice([50.0, 60.0])
        hum = [(h, rng.uniform(0, 1.5) / h) for h in (1, 2, 3)]
        background += _lookup(_harmonic_table(hum, rng), mains * np.arange(n) / audio_io.SAMPLE_RATE)
    for _ in range(rng.integers(0, 4)):  # clicks
        start = rng.integers(0, n - 80)
        background[start:start + 80] += (rng.uniform(2, 6) * rng.standard_normal(80)
                                         * np.exp(-np.arange(80) / 15.0)).astype(np.float32)
    x = mix + np.float32(10.0 ** (-snr_db / 20.0)) * _unit_rms(background)
    x *= np.float32(rng.uniform(0.3, 0.9) / (np.max(np.abs(x)) + 1e-12))
    return np.round(x * np.float32(32767.0)).astype(np.int16)


def _shape_sdf(shape, u, v):
    """Signed distance-like field of a unit shape (positive inside), radius units."""
    r = np.hypot(u, v)
    phi = np.arctan2(v, u) + np.pi / 2  # 0 at the top (image y points down)
    if shape == "circle":
        return 1.0 - r
    if shape == "square":
        return 0.8 - np.maximum(np.abs(u), np.abs(v))
    if shape in ("triangle", "hexagon"):
        n = 3 if shape == "triangle" else 6
        sector = 2 * np.pi / n
        rho = np.cos(np.pi / n) / np.cos(np.mod(phi, sector) - np.pi / n)
        return rho - r
    if shape == "star":
        a = np.mod(phi, 2 * np.pi / 5) / (2 * np.pi / 5)
        return 0.42 + 0.58 * np.abs(2 * a - 1) - r
    if shape == "diamond":
        return (1.0 - (np.abs(u) / 0.6 + np.abs(v))) * 0.5
    if shape == "ring":
        return 0.28 - np.abs(r - 0.7)
    if shape == "cross":
        return np.maximum(np.minimum(0.28 - np.abs(u), 1.0 - np.abs(v)),
                          np.minimum(0.28 - np.abs(v), 1.0 - np.abs(u)))
    raise ValueError(shape)


def _surface(kind, u, v, radius):
    """The class's surface pattern, a brightness factor in [0.5, 1] on the object's own
    (rotated) coordinates u, v (radius units). Its period is a fixed share of the object
    but at least 7 px, so that the blur (sigma <= 2 px) and a crop leave it visible;
    every pattern looks the same mirrored, as a horizontal flip leaves a real surface."""
    period = max(7.0 / radius, 0.4)

    def wave(x):   # 1 on the period's lines, 0 between
        return np.float32(0.5) + np.float32(0.5) * np.cos(np.float32(2 * np.pi / period) * x)

    if kind == "plain":
        return np.ones_like(u)
    if kind == "hstripes":
        pattern = wave(v)
    elif kind == "vstripes":
        pattern = wave(u)
    elif kind == "checker":
        pattern = (wave(u) - np.float32(0.5)) * (wave(v) - np.float32(0.5)) * np.float32(4.0) > 0
    elif kind == "dots":
        pattern = np.minimum(wave(u), wave(v)) > np.float32(0.7)
    elif kind == "rings":
        pattern = wave(np.hypot(u, v))
    elif kind == "grid":
        pattern = np.maximum(wave(u), wave(v)) > np.float32(0.93)
    else:
        raise ValueError(kind)
    return np.float32(1.0) - np.float32(0.5) * pattern.astype(np.float32)


def _toy_background(rng, width, height):
    """Static scene: low-saturation gradient and grey clutter, (H, W, 3) float32."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c1, c2 = (np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.3),
                                           rng.uniform(0.25, 0.75)),
                       dtype=np.float32) for _ in range(2))
    angle = rng.uniform(0, 2 * np.pi)
    g = np.cos(angle) * xx / width + np.sin(angle) * yy / height
    g = (g - g.min()) / (g.max() - g.min() + 1e-6)
    img = c1 + g[..., None] * (c2 - c1)
    for _ in range(rng.integers(3, 8)):
        w, h = rng.integers(3, 18, size=2)
        if rng.random() < 0.3:  # thin line
            w, h = (w * 3, 1) if rng.random() < 0.5 else (1, h * 3)
        x0, y0 = rng.integers(0, width - 1), rng.integers(0, height - 1)
        grey = np.array(colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, 0.25),
                                            rng.uniform(0.1, 0.9)),
                        dtype=np.float32)
        img[y0:y0 + h, x0:x0 + w] = grey
    return img


def _toy_frames(rng, objects):
    """10 frames (10, H, W, 3) uint8 and boxes [frame][object] = [x0, y0, x1, y1] fractions."""
    width, height = TOY_FRAME_SIZE
    margin_x = (width - height) // 2  # keep objects inside the centre square the crop keeps
    multi = len(objects) > 1
    bg = _toy_background(rng, width, height)
    sides = rng.permutation(len(objects))
    sprites = []
    for o, obj in enumerate(objects):
        radius = toy_rate_to_radius(obj["rate"], multi)
        reach = int(math.ceil(1.15 * radius + 2))  # every shape lies within 1.15 radii
        lo_x, hi_x = margin_x + reach + 1, width - margin_x - reach - 1
        if multi:  # one object per half so they do not overlap
            mid = width / 2
            lo_x, hi_x = (lo_x, mid - reach - 1) if sides[o] == 0 else (mid + reach + 1, hi_x)
        lo_y, hi_y = reach + 1, height - reach - 1
        start = np.array([rng.uniform(lo_x, hi_x), rng.uniform(lo_y, hi_y)])
        end = np.clip(start + rng.uniform(-10, 10, size=2), [lo_x, lo_y], [hi_x, hi_y])
        hsv = (toy_pitch_to_hue(obj["pitch"]), rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))
        color = np.array(colorsys.hsv_to_rgb(*hsv), dtype=np.float32)
        angle = rng.uniform(-0.25, 0.25)
        # render the object once (a sprite with alpha, with the start's sub-pixel offset) and
        # move it by whole pixels across the frames: the slow drift of a real clip
        grid = np.arange(-reach, reach + 1, dtype=np.float32)
        fx, fy = start - np.floor(start)
        dx = (grid[None, :] + np.float32(0.5 - fx)) / np.float32(radius)
        dy = (grid[:, None] + np.float32(0.5 - fy)) / np.float32(radius)
        u = np.float32(math.cos(angle)) * dx + np.float32(math.sin(angle)) * dy
        v = np.float32(-math.sin(angle)) * dx + np.float32(math.cos(angle)) * dy
        alpha = np.clip(_shape_sdf(TOY_CLASSES[obj["cls"]][3], u, v) * np.float32(radius)
                        + np.float32(0.5), 0, 1)[..., None]
        shade = np.float32(1.0) - np.float32(0.2) * np.minimum(np.hypot(u, v), np.float32(1.0))
        shade = shade * _surface(TOY_CLASSES[obj["cls"]][4], u, v, radius)
        ys, xs = np.nonzero(alpha[..., 0] > 0.5)
        sprite_box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        sprites.append((start, end, reach, alpha, color * shade[..., None], sprite_box))
    imgs = np.empty((data.NUM_FRAMES, height, width, 3), dtype=np.float32)
    # sensor noise: each frame reads a random window of one buffer (cheaper than fresh draws)
    pixels = height * width * 3
    noise = rng.standard_normal(pixels + 4096, dtype=np.float32) * np.float32(0.02 * 255.0)
    boxes = []
    for k in range(data.NUM_FRAMES):
        img = bg.copy()
        frame_boxes = []
        for start, end, reach, alpha, paint, (bx0, by0, bx1, by1) in sprites:
            x, y = np.floor(start + (end - start) * k / (data.NUM_FRAMES - 1)).astype(int) - reach
            window = img[y:y + alpha.shape[0], x:x + alpha.shape[1]]  # inside by construction
            window += alpha * (paint - window)
            frame_boxes.append([round((x + bx0) / width, 4), round((y + by0) / height, 4),
                                round((x + bx1) / width, 4), round((y + by1) / height, 4)])
        flicker = np.float32(255.0 * (1.0 + rng.uniform(-0.04, 0.04)))
        np.multiply(img, flicker, out=imgs[k])
        offset = int(rng.integers(4096))
        imgs[k] += noise[offset:offset + pixels].reshape(height, width, 3)
        boxes.append(frame_boxes)
    imgs += np.float32(0.5)
    np.clip(imgs, 0, 255, out=imgs)
    frames = imgs.astype(np.uint8)
    return frames, boxes


# ===========================================================================
# Writing the dataset
# ===========================================================================

class _ToyClips(Dataset):
    """Generates and writes toy clip j (a DataLoader parallelizes it over workers).

    Each clip's randomness comes from (seed, split, index) only, so the result
    does not depend on the number of workers.
    """

    def __init__(self, out_dir, jobs, seed, audio_length, mel_bins):
        self.out_dir, self.jobs, self.seed = str(out_dir), jobs, seed
        self.audio_length, self.mel_bins = audio_length, mel_bins

    def __len__(self):
        return len(self.jobs)

    def __getitem__(self, j):
        """-> ([(manifest name, entry), ...], fbank moments of a training clip or None)."""
        split, i = self.jobs[j]
        rng = np.random.default_rng((self.seed, _TOY_SPLITS[split], i))
        if split == "test_distractor":
            return self._distractor(rng, i), None
        if split.endswith("multilabel"):
            classes = self._two_classes(rng)
        else:
            classes = [i % len(TOY_CLASSES)]
        objects = [{"cls": c, "pitch": round(float(rng.random()), 4),
                    "rate": round(float(rng.random()), 4)} for c in classes]
        vid = f"{_TOY_ID_PREFIX[split]}_{i:05d}"
        pcm = _toy_audio(rng, objects)
        frames, boxes = _toy_frames(rng, objects)
        self._write_wav(f"audio/{vid}.wav", pcm)
        self._write_frames(vid, frames)
        moments = None
        if split == "train":  # fbank moments of exactly what the loader will read back
            wav = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
            fbank = data.waveform_to_fbank(wav - wav.mean(), self.audio_length, self.mel_bins).double()
            moments = (float(fbank.sum()), float((fbank * fbank).sum()), fbank.numel())
        return [(split, _entry(vid, f"audio/{vid}.wav", objects, boxes, list(range(len(objects)))))], \
            moments

    def _distractor(self, rng, i):
        """Two objects of different classes and hues in every frame, the sound of one of
        them only: the entry for the clip, and its twin with the other object's sound
        (the same frames, the same video_id)."""
        classes = self._two_classes(rng)
        pitch = float(rng.random())
        pitches = [pitch, (pitch + float(rng.uniform(0.3, 0.7))) % 1.0]  # hues >= 0.25 apart
        objects = [{"cls": c, "pitch": round(p, 4), "rate": round(float(rng.random()), 4)}
                   for c, p in zip(classes, pitches)]
        sounding = int(rng.integers(2))
        frames, boxes = _toy_frames(rng, objects)
        vid = f"{_TOY_ID_PREFIX['test_distractor']}_{i:05d}"
        self._write_frames(vid, frames)
        out = []
        for name, who in (("test_distractor", sounding), ("test_distractor_swap", 1 - sounding)):
            sound_rng = np.random.default_rng((self.seed, _TOY_SPLITS["test_distractor"], i, who))
            wav = f"audio/{vid}_{who}.wav"
            self._write_wav(wav, _toy_audio(sound_rng, [objects[who]]))
            out.append((name, _entry(vid, wav, objects, boxes, [who])))
        return out

    @staticmethod
    def _two_classes(rng):
        c1 = int(rng.integers(len(TOY_CLASSES)))
        return [c1, (c1 + int(rng.integers(1, len(TOY_CLASSES)))) % len(TOY_CLASSES)]

    def _write_wav(self, relative, pcm):
        with wave.open(os.path.join(self.out_dir, relative), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(audio_io.SAMPLE_RATE)
            w.writeframes(pcm.astype("<i2").tobytes())

    def _write_frames(self, vid, frames):
        for k in range(data.NUM_FRAMES):
            path = data.frame_path(os.path.join(self.out_dir, "frames"), vid, k)
            Image.fromarray(frames[k]).save(path, format="JPEG", quality=90)


# ===========================================================================
# Negative sounds for localization: the test frames paired with audio that the
# frame does not make. The rules, fixed before any map was scored:
#   silence    digital silence (zeros) as long as a toy clip;
#   noise      white Gaussian noise with the RMS of the clip's own sound (seeded by clip);
#   offscreen  the sound of the next test clip, in manifest order and wrapping around,
#              none of whose labels is an object in this frame: a real sound, not here.
# ===========================================================================

NEGATIVES = ("silence", "noise", "offscreen")


def negative_manifests(root, split="retrieval"):
    """{kind: manifest} of `split`'s clips with each negative sound, written once beside the
    split as {split}_{kind}.json (the sounds under root/negatives/; the toy's own clips and
    world are untouched). split "test_heldout": the test clips not in the retrieval split,
    written as test_heldout.json first (for choosing a map without the scored clips)."""
    paths = toy_paths(root)
    if split == "test_heldout":
        heldout = os.path.join(paths["root"], "test_heldout.json")
        if not os.path.exists(heldout):
            n = len(data.read_manifest(paths["retrieval"]))
            data.write_manifest(heldout, data.read_manifest(paths["test"])[n:])
        paths[split] = heldout
    manifests = {kind: os.path.join(paths["root"], f"{split}_{kind}.json") for kind in NEGATIVES}
    if all(os.path.exists(p) for p in manifests.values()):
        return manifests
    entries = data.read_manifest(paths[split])
    os.makedirs(os.path.join(paths["root"], "negatives"), exist_ok=True)
    n = int(round(TOY_DURATION * audio_io.SAMPLE_RATE))
    _write_pcm(os.path.join(paths["root"], "negatives", "silence.wav"), np.zeros(n))
    in_frame = [{o["label"] for o in e["objects"]} for e in entries]
    written = {kind: [] for kind in NEGATIVES}
    for i, entry in enumerate(entries):
        own = audio_io.load_waveform(os.path.join(paths["root"], entry["wav"])).numpy()
        noise = f"negatives/noise_{entry['video_id']}.wav"
        rng = np.random.default_rng([7, int(entry["video_id"].rsplit("_", 1)[-1])])
        _write_pcm(os.path.join(paths["root"], noise),
                   rng.standard_normal(n) * float(np.sqrt(np.mean(own ** 2))))
        j = next(k % len(entries) for k in range(i + 1, i + len(entries))
                 if not set(entries[k % len(entries)]["labels"].split(",")) & in_frame[i])
        for kind, wav in (("silence", "negatives/silence.wav"), ("noise", noise),
                          ("offscreen", entries[j]["wav"])):
            written[kind].append({**entry, "wav": wav, "labels": "", "negative": kind})
    for kind, items in written.items():
        data.write_manifest(manifests[kind], items)
    return manifests


def _write_pcm(path, samples):
    """float samples in [-1, 1] -> a 16 kHz 16-bit mono WAV."""
    pcm = np.clip(np.round(samples * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(audio_io.SAMPLE_RATE)
        w.writeframes(pcm.tobytes())


def _entry(vid, wav, objects, boxes, sounding):
    """A manifest entry: labels of the sounding objects, and every object's box per frame."""
    return {"video_id": vid, "wav": wav, "video_path": "frames",
            "labels": ",".join(TOY_CLASSES[objects[k]["cls"]][0] for k in sounding),
            "objects": [{"label": TOY_CLASSES[o["cls"]][0], "pitch": o["pitch"],
                         "rate": o["rate"]} for o in objects],
            "boxes": boxes, "sounding": sounding, "frame_size": list(TOY_FRAME_SIZE)}


def _as_is(x):
    return x


def toy_paths(root):
    """Paths of a toy dataset's files (absolute strings)."""
    root = Path(root).resolve()
    out = {name: str(root / f"{name}.json") for name in
           ("train", "test", "retrieval", "train_multilabel", "test_multilabel",
            "test_distractor", "test_distractor_swap")}
    out.update(label_csv=str(root / "class_labels_indices.csv"), stats=str(root / "stats.json"),
               root=str(root))
    return out


def make_toy_dataset(out_dir, n_train=2000, n_test=400, n_retrieval=300, n_train_multilabel=400,
                     n_test_multilabel=200, n_distractor=200, seed=0, num_workers=None,
                     audio_length=256, mel_bins=64, progress=False):
    """Write the toy dataset to out_dir (see the section comment above for its design).

    Files: audio/{id}.wav (16 kHz, 16-bit, mono, 2.6 s), frames/frame_{k}/{id}.jpg
    (128 x 112), train / test / retrieval (first n_retrieval test clips) /
    train_multilabel / test_multilabel / test_distractor / test_distractor_swap
    .json (the distractor clips show two objects and sound one: "sounding" names
    it; the swap split has the same frames with the other object's sound),
    class_labels_indices.csv,
    stats.json (fbank mean/std of train at audio_length x mel_bins, the tiny
    preset), toy.json (parameters; written last, marks completion).
    The same seed gives byte-identical files whatever num_workers.
    Generated in a temporary sibling folder and renamed into place, so
    out_dir is either absent or complete; raises FileExistsError if out_dir
    exists and is not empty.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not empty")
    if not 0 <= n_retrieval <= n_test:
        raise ValueError(f"n_retrieval ({n_retrieval}) must be between 0 and n_test ({n_test})")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "audio").mkdir(parents=True)
        for k in range(data.NUM_FRAMES):
            (tmp / "frames" / f"frame_{k}").mkdir(parents=True)
        sizes = {"train": n_train, "test": n_test, "train_multilabel": n_train_multilabel,
                 "test_multilabel": n_test_multilabel, "test_distractor": n_distractor}
        jobs = [(split, i) for split, n in sizes.items() for i in range(n)]
        if num_workers is None:
            num_workers = min(4, utils.default_num_workers()) if len(jobs) > 64 else 0
        loader = DataLoader(_ToyClips(tmp, jobs, seed, audio_length, mel_bins), batch_size=None,
                            num_workers=num_workers, collate_fn=_as_is)
        if progress:
            loader = tqdm(loader, total=len(jobs), desc="toy dataset")
        entries = {split: [] for split in list(sizes) + ["test_distractor_swap"]}
        s = s2 = 0.0
        count = 0
        for written, moments in loader:
            for split, entry in written:
                entries[split].append(entry)
            if moments is not None:
                s, s2, count = s + moments[0], s2 + moments[1], count + moments[2]
        for split, items in entries.items():
            data.write_manifest(tmp / f"{split}.json", items)
        data.write_manifest(tmp / "retrieval.json", entries["test"][:n_retrieval])
        with open(tmp / "class_labels_indices.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["index", "mid", "display_name"])
            for c, (mid, name, *_) in enumerate(TOY_CLASSES):
                writer.writerow([c, mid, name])
        if count:
            mean = s / count
            stats = {"mean": mean, "std": math.sqrt(max(s2 / count - mean * mean, 0.0)),
                     "num_clips": n_train, "audio_length": audio_length, "mel_bins": mel_bins,
                     "manifest": "train.json"}
            (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        params = {"version": TOY_VERSION, "seed": seed, **sizes, "n_retrieval": n_retrieval,
                  "audio_length": audio_length, "mel_bins": mel_bins, "sample_rate": audio_io.SAMPLE_RATE,
                  "duration": TOY_DURATION, "frame_size": list(TOY_FRAME_SIZE),
                  "classes": [c[0] for c in TOY_CLASSES]}
        (tmp / "toy.json").write_text(json.dumps(params, indent=1) + "\n")
        try:
            os.rename(tmp, out_dir)  # atomic; replaces out_dir only if it is an empty folder
        except OSError as err:
            raise FileExistsError(f"{out_dir} appeared while generating ({err})") from err
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def ensure_toy_dataset(root="data/toy", **toy_kwargs):
    """Return toy_paths(root), generating the toy dataset first if it is absent.

    An existing dataset is returned as it is (toy_kwargs only size a new one).
    Under torchrun rank 0 generates while the other ranks wait at a barrier, so
    every rank must call it (a collective call). Independent processes calling
    it at once are safe too: each generates into a temporary folder that is
    renamed into place, the first rename wins and the others keep its result,
    so a half-written dataset is never seen.
    """
    root = Path(root).resolve()
    marker = root / "toy.json"
    if utils.is_main() and not marker.exists():
        if root.exists() and any(root.iterdir()):
            raise data.DataError(f"{root} exists but is not a complete toy dataset (no toy.json); "
                                 f"delete it to regenerate")
        try:
            make_toy_dataset(root, **toy_kwargs)
        except FileExistsError:
            if not marker.exists():  # not another process's finished dataset
                raise
    utils.barrier(utils.RANK0_WORK_TIMEOUT_S)   # rank 0 may have generated the toy set
    try:
        version = json.loads(marker.read_text()).get("version")
    except (OSError, ValueError) as err:
        raise data.DataError(f"{marker}: unreadable ({err}); delete {root} to regenerate") from err
    if version != TOY_VERSION:
        raise data.DataError(f"{root} was generated by another version of toy.py (toy version "
                             f"{version}, this is {TOY_VERSION}); delete it to regenerate")
    return toy_paths(root)


# ===========================================================================
# Does the class survive the augmentations? (no training: fixed features)
# ===========================================================================

def audio_cue_features(x):
    """Fixed class features of normalized fbanks x (B, T, F), built on what the toy's
    classes are made of and blind to what an augmentation may change: the duty cycle
    and the skew of the rises and falls of the frame level (its 5-95 % range scaled
    to [0, 1]), and the roughness along frequency over that along time on loud frames
    (harmonic lines against noise). -> (B, 3)."""
    level = x.mean(dim=2)                                                       # (B, T)
    q = torch.quantile(level, torch.tensor([0.05, 0.95]), dim=1)
    z = ((level - q[0][:, None]) / (q[1] - q[0]).clamp_min(1e-6)[:, None]).clamp(0, 1)
    duty = (z > 0.5).float().mean(1)
    d = z.diff(dim=1)
    skew = (d ** 3).mean(1) / d.std(1).clamp_min(1e-6) ** 3
    loud = (z[:, 1:-1] > 0.5).float()
    along_f = (x[:, 1:-1, 2:] - 2 * x[:, 1:-1, 1:-1] + x[:, 1:-1, :-2]).abs().mean(2)
    along_t = (x[:, 2:] - 2 * x[:, 1:-1] + x[:, :-2]).abs().mean(2)
    texture = ((along_f * loud).sum(1) / (along_t * loud).sum(1).clamp_min(1e-6)).log()
    return torch.stack([duty, skew, texture], 1)


def visual_cue_features(v):
    """Fixed class features of frames v (B, 3, H, W) in [0, 1], from luminance only and
    the same mirrored: the share of gradient energy that is horizontal, diagonal and
    vertical, and the share of spectral power in four bands of spatial frequency. -> (B, 7)."""
    gray = 0.299 * v[:, 0] + 0.587 * v[:, 1] + 0.114 * v[:, 2]                 # (B, H, W)
    gx = gray[:, 1:-1, 2:] - gray[:, 1:-1, :-2]
    gy = gray[:, 2:, 1:-1] - gray[:, :-2, 1:-1]
    magnitude, angle = torch.hypot(gx, gy), torch.atan2(gy, gx).abs()
    angle = torch.minimum(angle, math.pi - angle)                               # a flip maps a to pi - a
    edges = torch.stack([(magnitude * ((angle >= lo) & (angle < hi))).sum((1, 2))
                         for lo, hi in ((0.0, 0.4), (0.4, 1.17), (1.17, 1.6))], 1)
    power = torch.fft.rfft2(gray - gray.mean((1, 2), keepdim=True)).abs() ** 2
    radius = torch.hypot(torch.fft.fftfreq(gray.shape[1])[:, None], torch.fft.rfftfreq(gray.shape[2])[None])
    bands = torch.stack([(power * ((radius >= lo) & (radius < hi))).sum((1, 2))
                         for lo, hi in ((0.02, 0.06), (0.06, 0.12), (0.12, 0.2), (0.2, 0.5))], 1)
    return torch.cat([edges / edges.sum(1, keepdim=True).clamp_min(1e-6),
                      bands / bands.sum(1, keepdim=True).clamp_min(1e-9)], 1)


def nearest_centroid_accuracy(f_fit, y_fit, f_test, y_test):
    """% of test rows whose nearest class centroid (features standardised on the fit
    rows) is their class."""
    mu, sd = f_fit.mean(0), f_fit.std(0).clamp_min(1e-6)
    f_fit, f_test = (f_fit - mu) / sd, (f_test - mu) / sd
    classes = y_fit.unique()
    centroids = torch.stack([f_fit[y_fit == c].mean(0) for c in classes])
    return 100.0 * (classes[torch.cdist(f_test, centroids).argmin(1)] == y_test).float().mean().item()


def cue_check(root, audio_length=256, mel_bins=64, image_size=96, seed=0):
    """Nearest-centroid class accuracy of the fixed cue features, fitted on the clean
    training clips of the toy dataset at `root` and scored on its test clips: clean,
    under each method.md §8 augmentation group alone (sampled as training samples them, the
    other slots left at the identity) and under all of them. {"audio": {...}, "visual": {...}}."""
    paths = toy_paths(root)
    mean, std = data.resolve_norm_stats("auto", paths["train"], None, audio_length, mel_bins)
    clips = {}
    for split in ("train", "test"):
        ds = data.AudioVisualDataset(paths[split], audio_length=audio_length, mel_bins=mel_bins,
                                     image_size=image_size, train=False, norm_mean=mean,
                                     norm_std=std, label_csv=paths["label_csv"])
        items = [ds[i] for i in range(len(ds))]
        audio, frame, label = (torch.stack([it[k] for it in items]) for k in ("audio", "frame", "label"))
        clips[split] = [audio, augment.unit_range(frame), label]
    gen = torch.Generator().manual_seed(seed)
    n = len(clips["test"][0])
    out = {}
    for m, (k, feats, groups, layout, params) in {
            "audio": (0, audio_cue_features, augment.AUDIO_GROUPS, augment.AUDIO_LAYOUT,
                      augment.sample_audio_params(n, gen, audio_length, mel_bins)),
            "visual": (1, visual_cue_features, augment.VISUAL_GROUPS, augment.VISUAL_LAYOUT,
                       augment.sample_visual_params(n, gen, image_size, image_size))}.items():
        apply = augment.apply_audio if m == "audio" else augment.apply_visual
        fit = feats(clips["train"][k]), clips["train"][2].argmax(1)
        x, y = clips["test"][k], clips["test"][2].argmax(1)
        row = {"clean": nearest_centroid_accuracy(*fit, feats(x), y)}
        for group, names in list(groups.items()) + [("all", layout)]:
            row[group] = nearest_centroid_accuracy(*fit, feats(apply(x, augment.only(params, names))), y)
        out[m] = row
    return out


# ===========================================================================
# CLI
# ===========================================================================

def main(argv=None):
    """`python toy.py --out DIR [sizes]`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="toy.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--n_train", type=int, default=2000)
    parser.add_argument("--n_test", type=int, default=400)
    parser.add_argument("--n_retrieval", type=int, default=300, help="first N test clips")
    parser.add_argument("--n_train_multilabel", type=int, default=400)
    parser.add_argument("--n_test_multilabel", type=int, default=200)
    parser.add_argument("--n_distractor", type=int, default=200,
                        help="test_distractor clips (two objects, one sounds)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=None, help="generation processes")
    parser.add_argument("--cue_check", action="store_true",
                        help="do not generate: print how well a fixed-feature classifier keeps "
                             "the class of the toy set at --out under each augmentation")
    args = parser.parse_args(argv)
    if args.cue_check:
        for m, row in cue_check(args.out).items():
            print(f"{m:6s} " + "  ".join(f"{k} {v:.1f}" for k, v in row.items()))
        return 0
    start = time.perf_counter()
    try:
        make_toy_dataset(args.out, args.n_train, args.n_test, args.n_retrieval,
                         args.n_train_multilabel, args.n_test_multilabel, args.n_distractor,
                         seed=args.seed,
                         num_workers=args.workers, progress=True)
    except (FileExistsError, ValueError) as err:
        print(f"toy.py: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
    for name, path in toy_paths(args.out).items():
        print(f"  {name:17s} {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
