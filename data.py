"""Audio-visual data for EquiAV (SPEC 1, 11): manifests, decoding, loader, toy dataset.

Implements the paper's inputs (SPEC 1: 10 s of audio as a 128-bin Kaldi
log-mel spectrogram; one RGB frame of a clip stored as 10 frames at 1 fps) and
the fine-tuning data options (SPEC 11: multi-hot labels, mixup, class-balanced
sampling), for manifests in the format AudioSet / VGGSound users already have
from CAV-MAE and the authors' code:

    manifest.json   {"data": [{"video_id", "wav", "video_path", "labels"}, ...]}
    class CSV       index,mid,display_name      (labels are comma-separated mids)
    frames          {video_path}/frame_{k}/{video_id}.jpg,  k = 0 .. 9
    weights CSV     one sampling weight per clip (AudioSet-2M class balancing)

Relative paths in a manifest are resolved against the manifest's folder.

Bad input policy (no silent zero-filled samples, STYLE 9): every decoding
failure raises DataError naming the manifest, the entry index (and its line in
the JSON file when it can be found), the file and the reason. With
skip_bad=True the dataset instead returns a BadSample that `collate` drops and
counts in the batch's "skipped"; the training script feeds batches to a
SkipCounter, which fails once more than a set fraction of samples was bad.
`python data.py check MANIFEST` validates every entry up front.

The built-in toy dataset (`python data.py toy --out DIR`) is a synthetic
audio-visual world written as real files in the same layout; see
make_toy_dataset.

CLI:  python data.py toy --out DIR | stats MANIFEST | check MANIFEST [--label_csv CSV]
      | weights MANIFEST --label_csv CSV --out FILE
"""

import argparse
import colorsys
import csv
import functools
import json
import math
import os
import re
import shutil
import struct
import sys
import time
import uuid
import warnings
import wave
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
import torchaudio
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchaudio.compliance import kaldi

# Dataset fbank statistics (SPEC 1): (mean, std) of the 128-bin fbank.
KNOWN_STATS = {"audioset": (-4.346, 4.332), "vggsound": (-4.956, 4.486)}

SAMPLE_RATE = 16000          # SPEC 1: every clip is resampled to 16 kHz
NUM_FRAMES = 10              # frames stored per clip (1 fps)
EVAL_FRAME = 5               # SPEC 1: evaluation takes the middle frame
MIXUP_ALPHA = 10.0           # SPEC 11: lambda ~ Beta(10, 10)
_MIN_SAMPLES = 400           # one 25 ms Kaldi window at 16 kHz


class DataError(Exception):
    """A manifest, label file or media file that cannot be used, with the reason.

    Messages name the manifest, the entry index (and JSON line when known),
    the file and the reason, e.g.
    ``train.json: entry 12 (line 14, video_id abc): /d/abc.wav: zero-length audio``.
    """


# ===========================================================================
# Manifests, class labels, sampling weights
# ===========================================================================

_ENTRY_KEYS = ("video_id", "wav", "video_path")


def resolve_norm_stats(spec, checkpoint_stats=None):
    """A --norm_stats option -> (mean, std), or (None, None) for the stats.json lookup.

    auto: the statistics stored in our pretraining checkpoint (the ones the
    model was trained with) when given, else stats.json next to the manifest;
    audioset / vggsound: KNOWN_STATS; "MEAN,STD": those numbers.
    """
    text = spec.strip().lower()
    if text == "auto":
        return (float(checkpoint_stats[0]), float(checkpoint_stats[1])) if checkpoint_stats \
            else (None, None)
    if text in KNOWN_STATS:
        return KNOWN_STATS[text]
    try:
        mean, std = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--norm_stats must be auto, {', '.join(KNOWN_STATS)} or MEAN,STD; "
                         f"got {spec!r}") from None
    return mean, std


def read_manifest(path):
    """Read a CAV-MAE style manifest; returns the list of entry dicts.

    Whole-file problems raise DataError: missing file, malformed JSON (with
    line and column), not an object with a "data" list, no entries. Per-entry
    problems (missing keys, ...) are left to AudioVisualDataset / check.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise DataError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read manifest ({err})") from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON at line {err.lineno} column {err.colno}: "
                        f"{err.msg}") from err
    if not isinstance(obj, dict) or "data" not in obj:
        raise DataError(f'{path}: expected a JSON object {{"data": [...]}}, '
                        f"got {type(obj).__name__}"
                        + (f" with keys {sorted(obj)[:5]}" if isinstance(obj, dict) else ""))
    data = obj["data"]
    if not isinstance(data, list):
        raise DataError(f'{path}: "data" must be a list of entries, got {type(data).__name__}')
    if not data:
        raise DataError(f"{path}: manifest has no entries")
    return data


def _entry_lines(path, n_entries):
    """Line number (1-based) of every entry's "video_id" key, or None.

    Only computed when an error is reported; valid when the file holds
    exactly one "video_id" key per entry (true of CAV-MAE manifests).
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    return _entry_lines_cached(str(path), n_entries, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _entry_lines_cached(path, n_entries, mtime_ns, size):  # keyed on the file's version
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    starts = [m.start() for m in re.finditer(rb'"video_id"\s*:', raw)]
    if len(starts) != n_entries:
        return None
    newlines = np.flatnonzero(np.frombuffer(raw, np.uint8) == ord("\n"))
    return np.searchsorted(newlines, starts) + 1


def entry_location(manifest, index, n_entries, video_id=None):
    """'manifest: entry i (line L, video_id V)' for error messages."""
    lines = _entry_lines(str(manifest), n_entries)
    extra = []
    if lines is not None:
        extra.append(f"line {int(lines[index])}")
    if video_id:
        extra.append(f"video_id {video_id}")
    return f"{manifest}: entry {index}" + (f" ({', '.join(extra)})" if extra else "")


def read_label_csv(path):
    """Read `index,mid,display_name`; returns (mids, display_names) ordered by index."""
    path = str(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise DataError(f"{path}: label CSV not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read label CSV ({err})") from err
    if not rows or [c.strip() for c in rows[0][:3]] != ["index", "mid", "display_name"]:
        raise DataError(f"{path}: expected the header 'index,mid,display_name'")
    by_index = {}
    for lineno, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) < 3:
            raise DataError(f"{path}: line {lineno}: expected 3 columns, got {len(row)}")
        try:
            idx = int(row[0])
        except ValueError:
            raise DataError(f"{path}: line {lineno}: index {row[0]!r} is not an integer") from None
        if idx in by_index:
            raise DataError(f"{path}: line {lineno}: duplicate index {idx}")
        by_index[idx] = (row[1].strip(), row[2].strip())
    if not by_index:
        raise DataError(f"{path}: label CSV has no classes")
    if sorted(by_index) != list(range(len(by_index))):
        raise DataError(f"{path}: class indices must be 0..{len(by_index) - 1} without gaps")
    mids = [by_index[i][0] for i in range(len(by_index))]
    if len(set(mids)) != len(mids):
        dup = next(m for m in mids if mids.count(m) > 1)
        raise DataError(f"{path}: duplicate mid {dup!r}")
    return mids, [by_index[i][1] for i in range(len(by_index))]


def load_sample_weights(path, num_entries):
    """Per-clip sampling weights (SPEC 11, AudioSet-2M), one per line as in CAV-MAE.

    Returns float64 (num_entries,). Raises DataError when the count does not
    match the manifest, or a weight is negative / not finite, or all are 0.
    """
    path = str(path)
    try:
        with open(path, encoding="utf-8") as f:
            values = [v for line in f for v in line.replace(",", " ").split()]
        weights = np.asarray([float(v) for v in values], dtype=np.float64)
    except FileNotFoundError:
        raise DataError(f"{path}: sampling-weights file not found") from None
    except ValueError as err:
        raise DataError(f"{path}: sampling weights must be numbers ({err})") from err
    if weights.size != num_entries:
        raise DataError(f"{path}: {weights.size} sampling weights for a manifest of "
                        f"{num_entries} entries")
    if not np.all(np.isfinite(weights)) or np.any(weights < 0) or weights.sum() <= 0:
        raise DataError(f"{path}: sampling weights must be finite, >= 0 and not all 0")
    return weights


def class_balanced_weights(label_idx, label_ptr, num_classes):
    """Per-clip weights for class-balanced sampling (the AudioSet-2M convention).

    A class seen c times weighs 1000 / (c + 0.01); a clip weighs the sum over
    its labels. label_idx / label_ptr: flat class indices and CSR offsets.
    """
    counts = np.bincount(label_idx, minlength=num_classes).astype(np.float64)
    class_w = 1000.0 / (counts + 0.01)
    owner = np.repeat(np.arange(len(label_ptr) - 1), np.diff(label_ptr))
    return np.bincount(owner, weights=class_w[label_idx], minlength=len(label_ptr) - 1)


class _StringArray:
    """A list of strings as one numpy byte buffer plus offsets.

    DataLoader workers read the file index on every access; Python lists of
    str would have their refcounts touched and their pages copied in every
    forked worker, numpy buffers are not.
    """

    def __init__(self, strings):
        encoded = [s.encode("utf-8") for s in strings]
        self._offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in encoded], out=self._offsets[1:])
        self._buf = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self):
        return len(self._offsets) - 1

    def __getitem__(self, i):
        return self._buf[self._offsets[i]:self._offsets[i + 1]].tobytes().decode("utf-8")


# ===========================================================================
# Audio (SPEC 1): WAV decoding, downmix, resampling, Kaldi fbank
# ===========================================================================

_WAV_PCM, _WAV_FLOAT, _WAV_EXTENSIBLE = 1, 3, 0xFFFE


def read_wav(path):
    """Decode a RIFF/WAVE file; returns (samples (C, N) float32 in [-1, 1], sample_rate).

    Reads 8/16/24/32-bit integer PCM and 32/64-bit float (format 3), plain or
    WAVE_FORMAT_EXTENSIBLE, any channel count and rate. The RIFF chunks are
    parsed here (stdlib `struct` + numpy) because `wave` rejects float files.
    """
    path = str(path)
    with open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 12:
        raise DataError(f"{path}: truncated WAV header ({len(raw)} bytes)")
    riff, _, wave_id = struct.unpack_from("<4sI4s", raw, 0)
    if riff != b"RIFF" or wave_id != b"WAVE":
        raise DataError(f"{path}: not a RIFF/WAVE file")
    fmt, pcm, pos = None, None, 12
    while pos + 8 <= len(raw):
        chunk_id, size = struct.unpack_from("<4sI", raw, pos)
        body = pos + 8
        if chunk_id == b"fmt ":
            if size < 16 or body + 16 > len(raw):
                raise DataError(f"{path}: truncated WAV header (fmt chunk)")
            tag, channels, rate, _, block_align, bits = struct.unpack_from("<HHIIHH", raw, body)
            if tag == _WAV_EXTENSIBLE:
                if size < 40 or body + 26 > len(raw):
                    raise DataError(f"{path}: truncated WAV header (extensible fmt chunk)")
                tag = struct.unpack_from("<H", raw, body + 24)[0]  # SubFormat GUID's first field
            fmt = (tag, channels, rate, block_align, bits)
        elif chunk_id == b"data":
            if fmt is None:
                raise DataError(f"{path}: WAV data chunk comes before the fmt chunk")
            if body + size > len(raw):
                raise DataError(f"{path}: truncated WAV file (data chunk declares {size} bytes, "
                                f"{len(raw) - body} present)")
            pcm = raw[body:body + size]
            break
        pos = body + size + (size & 1)  # chunks are padded to even sizes
    if fmt is None:
        raise DataError(f"{path}: truncated WAV header (no fmt chunk)")
    if pcm is None:
        raise DataError(f"{path}: truncated WAV file (no data chunk)")
    tag, channels, rate, block_align, bits = fmt
    if channels == 0 or rate == 0 or block_align == 0 or block_align % channels:
        raise DataError(f"{path}: invalid WAV header ({channels} channels, {rate} Hz, "
                        f"block align {block_align})")
    width = block_align // channels
    n = len(pcm) // block_align
    if n == 0:
        raise DataError(f"{path}: zero-length audio (no samples)")
    pcm = pcm[:n * block_align]
    if tag == _WAV_PCM and width == 1:
        x = (np.frombuffer(pcm, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif tag == _WAV_PCM and width == 2:
        x = np.frombuffer(pcm, "<i2").astype(np.float32) / 32768.0
    elif tag == _WAV_PCM and width == 3:
        b = np.frombuffer(pcm, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        v = np.where(v >= 1 << 23, v - (1 << 24), v)  # sign-extend 24-bit two's complement
        x = v.astype(np.float32) / float(1 << 23)
    elif tag == _WAV_PCM and width == 4:
        x = (np.frombuffer(pcm, "<i4").astype(np.float64) / float(1 << 31)).astype(np.float32)
    elif tag == _WAV_FLOAT and width in (4, 8):
        x = np.frombuffer(pcm, "<f4" if width == 4 else "<f8").astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise DataError(f"{path}: float WAV contains NaN or infinite samples")
    else:
        raise DataError(f"{path}: unsupported WAV encoding (format tag {tag}, {bits} bits); "
                        f"convert it to PCM, e.g. `ffmpeg -i IN -acodec pcm_s16le OUT.wav`")
    return x.reshape(n, channels).T, rate  # (C, N)


def load_waveform(path):
    """Mono 16 kHz waveform with the mean removed (SPEC 1); returns (N,) float32.

    WAV files (recognized by their RIFF header) are decoded by read_wav; other
    containers go through torchaudio.load, which needs torchcodec.
    """
    path = str(path)
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except FileNotFoundError:
        raise DataError(f"{path}: audio file not found") from None
    except OSError as err:
        raise DataError(f"{path}: cannot read audio file ({err.strerror or err})") from err
    if head[:4] == b"RIFF" or path.lower().endswith(".wav"):
        samples, rate = read_wav(path)
        wav = torch.from_numpy(samples)
    else:
        try:
            wav, rate = torchaudio.load(path)
        except Exception as err:  # torchaudio raises ImportError/RuntimeError/... by backend
            reason = f"{type(err).__name__}: {err}".splitlines()[0][:200]
            raise DataError(
                f"{path}: not a WAV file, and torchaudio could not decode it ({reason}). "
                f"Install torchcodec (`pip install torchcodec`, needs FFmpeg) or convert the "
                f"audio to WAV, e.g. `ffmpeg -i IN -ac 1 -ar 16000 OUT.wav`") from err
        if wav.numel() == 0:
            raise DataError(f"{path}: zero-length audio (no samples)")
    wav = wav.float().mean(dim=0)  # downmix channels, (N,)
    if rate != SAMPLE_RATE:
        wav = torchaudio.functional.resample(wav, int(rate), SAMPLE_RATE)
    if wav.numel() < _MIN_SAMPLES:
        raise DataError(f"{path}: audio too short ({wav.numel()} samples at 16 kHz; one 25 ms "
                        f"window needs {_MIN_SAMPLES})")
    return wav - wav.mean()


def waveform_to_fbank(waveform, audio_length, mel_bins):
    """Kaldi log-mel filterbank (SPEC 1), cut or zero-padded to audio_length frames.

    waveform: (N,) mono 16 kHz, mean removed. Returns (T, F) = (audio_length,
    mel_bins) float32, not normalized. 25 ms Hanning window, 10 ms shift.
    """
    fbank = kaldi.fbank(waveform[None], htk_compat=True, sample_frequency=SAMPLE_RATE,
                        use_energy=False, window_type="hanning", num_mel_bins=mel_bins,
                        dither=0.0, frame_shift=10.0, frame_length=25.0)  # (frames, F)
    n = fbank.shape[0]
    if n < audio_length:
        fbank = F.pad(fbank, (0, 0, 0, audio_length - n))  # zero-pad the time axis at the end
    return fbank[:audio_length]


def load_audio_fbank(path, audio_length=1024, mel_bins=128):
    """Read an audio file and return its (T, F) un-normalized fbank (SPEC 1)."""
    return waveform_to_fbank(load_waveform(path), audio_length, mel_bins)


# ===========================================================================
# Frames (SPEC 1): any PIL image -> RGB -> resize short side -> centre crop
# ===========================================================================

def _to_rgb(img):
    """Convert any PIL mode to 8-bit RGB. 16-bit grayscale is scaled from 0..65535;
    alpha is dropped (the stored colours are kept)."""
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img).astype(np.float64)
        img = Image.fromarray(np.clip(np.round(arr * 255.0), 0, 255).astype(np.uint8), "L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
    return img if img.mode == "RGB" else img.convert("RGB")


def _open_rgb(path):
    """Decode an image file fully and convert it to RGB, or raise DataError."""
    path = str(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            return _to_rgb(img)
    except FileNotFoundError:
        folder = os.path.dirname(path)
        where = "" if os.path.isdir(folder) else f" (folder {folder} does not exist)"
        raise DataError(f"{path}: frame not found{where}") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: cannot decode image ({err})") from err


def resized_size(width, height, image_size):
    """(width, height) after resizing the short side to image_size (torchvision's rule)."""
    if width <= height:
        return image_size, int(image_size * height / width)
    return int(image_size * width / height), image_size


def load_frame(path, image_size=224):
    """One video frame as (3, H, W) = (3, image_size, image_size) float32 in [0, 1].

    SPEC 1: RGB, short side resized to image_size (bicubic), centre crop.
    ImageNet normalization is applied later, after augmentation (augment.py).
    """
    img = _open_rgb(path)
    new_w, new_h = resized_size(img.width, img.height, image_size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    arr = np.asarray(img)[top:top + image_size, left:left + image_size]  # (H, W, 3) uint8
    arr = np.array(arr)  # a copy: PIL's buffer is read-only
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(255.0)  # (3, H, W)


def box_in_crop(box, frame_size, image_size):
    """Map a box [x0, y0, x1, y1] (fractions of the stored frame, as in the toy
    manifests) to fractions of the resized + centre-cropped frame, clipped to [0, 1]."""
    width, height = frame_size
    new_w, new_h = resized_size(width, height, image_size)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    x0, y0, x1, y1 = box
    out = [(x0 * new_w - left) / image_size, (y0 * new_h - top) / image_size,
           (x1 * new_w - left) / image_size, (y1 * new_h - top) / image_size]
    return [min(max(v, 0.0), 1.0) for v in out]


def frame_path(video_path, video_id, k):
    """{video_path}/frame_{k}/{video_id}.jpg"""
    return os.path.join(video_path, f"frame_{k}", f"{video_id}.jpg")


# ===========================================================================
# Dataset
# ===========================================================================

class SampleKey(NamedTuple):
    """What the loader's sampler hands the dataset: the entry and the random state.

    Random choices of a sample (training frame, mixup partner and lambda) come
    from a generator seeded with (seed, epoch, index, draw), so a run is
    reproducible whatever the number of workers. draw separates repeated
    draws of one clip in an epoch (weighted sampling with replacement).
    """
    index: int
    epoch: int = 0
    seed: int = 0
    draw: int = 0


class BadSample(NamedTuple):
    """Returned instead of a sample when skip_bad=True; collate drops and counts it.
    The shapes let collate build empty tensors when a whole batch is bad."""
    index: int
    message: str
    audio_shape: tuple
    frame_shape: tuple
    num_classes: int


def resolve_stats(manifest, norm_mean=None, norm_std=None, audio_length=None, mel_bins=None):
    """(mean, std) for fbank normalization: the given values, else stats.json next to
    the manifest (written by `python data.py stats MANIFEST --write` or the toy)."""
    if norm_mean is not None and norm_std is not None:
        return float(norm_mean), float(norm_std)
    if (norm_mean is None) != (norm_std is None):
        raise DataError("give both norm_mean and norm_std, or neither")
    stats_path = Path(manifest).resolve().parent / "stats.json"
    if not stats_path.exists():
        raise DataError(
            f"{manifest}: no normalization statistics: pass norm_mean/norm_std (data.KNOWN_STATS "
            f"has AudioSet and VGGSound) or run `python data.py stats {manifest} --write` to "
            f"write {stats_path}")
    try:
        stats = json.loads(stats_path.read_text())
        mean, std = float(stats["mean"]), float(stats["std"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{stats_path}: malformed stats file ({err})") from err
    if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
        raise DataError(f"{stats_path}: invalid statistics mean={mean} std={std}")
    for key, want in (("audio_length", audio_length), ("mel_bins", mel_bins)):
        if want is not None and stats.get(key) not in (None, want):
            warnings.warn(f"{stats_path} was computed with {key}={stats[key]}, the dataset uses "
                          f"{want}; rerun `python data.py stats` with --{key} {want} for exact "
                          f"normalization", stacklevel=3)
    return mean, std


class AudioVisualDataset(Dataset):
    """Clips of a manifest as normalized fbanks, [0, 1] frames and label vectors (SPEC 1, 11).

    __getitem__(i or SampleKey) -> dict(
        audio (T, F) normalized fbank, T = audio_length (time), F = mel_bins (frequency),
        frame (3, H, W) in [0, 1], a random frame 0..9 at train, frame 5 at eval,
        label (C,) float multi-hot with label smoothing (C = 0 without a label CSV),
        index int)

    mixup (SPEC 11, fine-tuning only, train only): with probability `mixup`
    the clip is mixed with a random other clip: waveforms (then mean removed
    again), frames and label vectors, with lambda ~ Beta(10, 10).
    label_smoothing eps: y = (1 - eps) * multihot + eps / C.

    Per-entry problems found at construction (missing keys, unknown or no
    labels) and decoding failures raise DataError, or with skip_bad=True
    yield a BadSample that collate counts. The file index is kept in numpy
    buffers so DataLoader workers do not copy it.
    """

    def __init__(self, manifest, label_csv=None, audio_length=1024, mel_bins=128, image_size=224,
                 train=True, norm_mean=None, norm_std=None, mixup=0.0, label_smoothing=0.0,
                 skip_bad=False):
        self.manifest = str(manifest)
        self.label_csv = None if label_csv is None else str(label_csv)
        self.audio_length, self.mel_bins, self.image_size = audio_length, mel_bins, image_size
        self.train, self.skip_bad = train, skip_bad
        if not 0.0 <= mixup <= 1.0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"mixup must be in [0, 1] and label_smoothing in [0, 1), got "
                             f"{mixup}, {label_smoothing}")
        self.mixup, self.label_smoothing = float(mixup), float(label_smoothing)
        self.norm_mean, self.norm_std = resolve_stats(self.manifest, norm_mean, norm_std,
                                                      audio_length, mel_bins)

        if self.label_csv is not None:
            self.class_mids, self.class_names = read_label_csv(self.label_csv)
        else:
            self.class_mids, self.class_names = [], []
        self.num_classes = len(self.class_mids)
        mid_to_index = {m: i for i, m in enumerate(self.class_mids)}

        entries = read_manifest(self.manifest)
        root = os.path.dirname(os.path.abspath(self.manifest))
        n = len(entries)
        video_ids, wavs, video_paths, label_lists = [], [], [], []
        self._entry_errors = {}  # index -> reason, for entries unusable as written
        for i, entry in enumerate(entries):
            reason = None
            if not isinstance(entry, dict):
                reason = f"entry is a {type(entry).__name__}, not an object"
                entry = {}
            missing = [k for k in _ENTRY_KEYS
                       if not isinstance(entry.get(k), str) or not entry.get(k)]
            if reason is None and missing:
                reason = f"missing or empty key(s) {missing}"
            labels = []
            if reason is None and self.num_classes:
                raw = entry.get("labels", "")
                parts = (raw.split(",") if isinstance(raw, str)
                         else raw if isinstance(raw, list) else None)
                if parts is None:
                    reason = f"labels must be a comma-separated string, got {type(raw).__name__}"
                else:
                    parts = [str(p).strip() for p in parts if str(p).strip()]
                    unknown = [p for p in parts if p not in mid_to_index]
                    if unknown:
                        reason = f"unknown label id(s) {unknown} (not in {self.label_csv})"
                    elif not parts:
                        reason = "no labels"
                    else:
                        labels = sorted({mid_to_index[p] for p in parts})
            if reason is not None:
                self._entry_errors[i] = reason
            vid = entry.get("video_id") if isinstance(entry.get("video_id"), str) else ""
            video_ids.append(vid)
            wavs.append(os.path.join(root, entry["wav"]) if reason is None else "")
            video_paths.append(os.path.join(root, entry["video_path"]) if reason is None else "")
            label_lists.append(labels)
        del entries
        self._video_id = _StringArray(video_ids)
        self._wav = _StringArray(wavs)
        self._video_path = _StringArray(video_paths)
        self._label_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(ls) for ls in label_lists], out=self._label_ptr[1:])
        self._label_idx = np.fromiter((c for ls in label_lists for c in ls), dtype=np.int64,
                                      count=int(self._label_ptr[-1]))
        if self._entry_errors and not skip_bad:
            first = min(self._entry_errors)
            raise DataError(f"{self._where(first)}: {self._entry_errors[first]}"
                            + (f" ({len(self._entry_errors)} such entries; "
                               f"run `python data.py check {self.manifest}`)"
                               if len(self._entry_errors) > 1 else ""))

    # -- index helpers ------------------------------------------------------
    def __len__(self):
        return len(self._video_id)

    def video_id(self, i):
        return self._video_id[i]

    def label_indices(self, i):
        """Class indices of entry i (sorted)."""
        return self._label_idx[self._label_ptr[i]:self._label_ptr[i + 1]].tolist()

    def class_balanced_weights(self):
        """Per-clip sampling weights from the label counts (see class_balanced_weights)."""
        if not self.num_classes:
            raise DataError(f"{self.manifest}: class-balanced weights need a label CSV")
        return class_balanced_weights(self._label_idx, self._label_ptr, self.num_classes)

    def _where(self, i):
        return entry_location(self.manifest, i, len(self), self._video_id[i])

    # -- loading ------------------------------------------------------------
    def label_vector(self, i):
        """(C,) float32: (1 - eps) * multihot + eps / C."""
        y = torch.zeros(self.num_classes)
        y[self._label_idx[self._label_ptr[i]:self._label_ptr[i + 1]]] = 1.0
        if self.label_smoothing and self.num_classes:
            y = y * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return y

    def _check_entry(self, i):
        if i in self._entry_errors:
            raise DataError(self._entry_errors[i])

    def load_waveform(self, i):
        """(N,) mono 16 kHz waveform of entry i, mean removed."""
        self._check_entry(i)
        return load_waveform(self._wav[i])

    def load_frame(self, i, k):
        """(3, H, W) frame k of entry i in [0, 1]."""
        self._check_entry(i)
        return load_frame(frame_path(self._video_path[i], self._video_id[i], k), self.image_size)

    def _normalize(self, fbank):
        return (fbank - self.norm_mean) / self.norm_std

    def _load(self, key):
        i = key.index
        rng = np.random.default_rng((key.seed, key.epoch, i, key.draw))
        k = int(rng.integers(NUM_FRAMES)) if self.train else EVAL_FRAME
        wav = self.load_waveform(i)
        frame = self.load_frame(i, k)
        label = self.label_vector(i)
        if self.train and self.mixup > 0 and rng.random() < self.mixup:
            j = int(rng.integers(len(self)))
            lam = float(rng.beta(MIXUP_ALPHA, MIXUP_ALPHA))
            k2 = int(rng.integers(NUM_FRAMES))
            try:
                wav2 = self.load_waveform(j)
                frame2 = self.load_frame(j, k2)
            except DataError as err:
                raise DataError(f"mixup partner {self._where(j)}: {err}") from err
            # cut / zero-pad the partner to this clip's length, as CAV-MAE does
            wav2 = F.pad(wav2, (0, max(0, wav.numel() - wav2.numel())))[:wav.numel()]
            wav = lam * wav + (1.0 - lam) * wav2
            wav = wav - wav.mean()
            frame = lam * frame + (1.0 - lam) * frame2
            label = lam * label + (1.0 - lam) * self.label_vector(j)
        audio = self._normalize(waveform_to_fbank(wav, self.audio_length, self.mel_bins))
        return {"audio": audio, "frame": frame, "label": label, "index": i}

    def __getitem__(self, key):
        if not isinstance(key, SampleKey):
            key = SampleKey(int(key))
        if not 0 <= key.index < len(self):
            raise IndexError(f"index {key.index} out of range for {len(self)} entries")
        try:
            return self._load(key)
        except DataError as err:
            message = f"{self._where(key.index)}: {err}"
            if self.skip_bad:
                return BadSample(key.index, message, (self.audio_length, self.mel_bins),
                                 (3, self.image_size, self.image_size), self.num_classes)
            raise DataError(message) from err


def collate(batch):
    """Stack samples; drop BadSamples and count them.

    Returns dict(audio (B, T, F), frame (B, 3, H, W), label (B, C), index (B,) int64,
    skipped int, errors list[str]); B may be 0 when every sample was bad.
    """
    good = [s for s in batch if not isinstance(s, BadSample)]
    bad = [s for s in batch if isinstance(s, BadSample)]
    if good:
        out = {
            "audio": torch.stack([s["audio"] for s in good]),
            "frame": torch.stack([s["frame"] for s in good]),
            "label": torch.stack([s["label"] for s in good]),
            "index": torch.tensor([s["index"] for s in good], dtype=torch.int64),
        }
    else:
        b = bad[0]
        out = {"audio": torch.zeros((0, *b.audio_shape)), "frame": torch.zeros((0, *b.frame_shape)),
               "label": torch.zeros((0, b.num_classes)), "index": torch.zeros(0, dtype=torch.int64)}
    out["skipped"] = len(bad)
    out["errors"] = [s.message for s in bad]
    return out


class SkipCounter:
    """Counts samples that collate dropped (skip_bad=True) and fails past a fraction.

        counter = SkipCounter(max_fraction=0.01)
        for batch in loader:
            counter.update(batch)          # raises DataError once too many were bad
            if batch["index"].numel() == 0: continue
            ...
        counter.check()                    # end of epoch: the same test without min_samples

    update() only judges after min_samples samples, so that one bad clip early
    in a run does not exceed the fraction by itself.
    """

    def __init__(self, max_fraction=0.01, min_samples=200, keep_errors=10):
        self.max_fraction, self.min_samples = max_fraction, min_samples
        self.keep_errors = keep_errors
        self.seen = 0
        self.skipped = 0
        self.errors = []

    @property
    def fraction(self):
        return self.skipped / max(self.seen, 1)

    def update(self, batch):
        self.seen += int(batch["index"].numel()) + int(batch["skipped"])
        self.skipped += int(batch["skipped"])
        room = self.keep_errors - len(self.errors)
        if room > 0:
            self.errors.extend(batch.get("errors", [])[:room])
        if self.seen >= self.min_samples:
            self.check()

    def check(self):
        if self.skipped and self.fraction > self.max_fraction:
            raise DataError(f"{self.skipped} of {self.seen} samples were bad "
                            f"({100 * self.fraction:.2f}% > {100 * self.max_fraction:.2f}% "
                            f"allowed); "
                            f"first errors:\n  " + "\n  ".join(self.errors))

    def summary(self):
        return f"skipped {self.skipped} of {self.seen} samples as bad"


# ===========================================================================
# Samplers and loader
# ===========================================================================

class WeightedEpochSampler(Sampler):
    """Class-balanced sampling for AudioSet-2M fine-tuning (SPEC 11).

    Every epoch draws num_samples clips with replacement, probability
    proportional to the weights; the draw (seeded by seed + epoch) is the same
    on every rank and rank r takes every world_size-th clip from position r.
    """

    def __init__(self, weights, num_samples=None, seed=0, rank=0, world_size=1):
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float64))
        self.num_samples = len(self.weights) if num_samples is None else int(num_samples)
        self.per_rank = math.ceil(self.num_samples / world_size)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.per_rank * self.world_size, replacement=True,
                                 generator=g)
        return iter(draw[self.rank::self.world_size].tolist())


class EpochKeySampler(Sampler):
    """Wraps an index sampler and yields SampleKeys carrying the epoch and seed.

    The sampler lives in the main process, so set_epoch reaches the random
    state of samples even with persistent workers. set_epoch is forwarded to
    the wrapped sampler (DistributedSampler reshuffles with it).
    """

    def __init__(self, sampler, seed=0, with_replacement=False):
        self.sampler, self.seed, self.epoch = sampler, seed, 0
        self.with_replacement = with_replacement

    def set_epoch(self, epoch):
        self.epoch = epoch
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        for pos, i in enumerate(self.sampler):
            yield SampleKey(int(i), self.epoch, self.seed, pos + 1 if self.with_replacement else 0)


def default_num_workers():
    """Workers per process: the CPUs available to this process, at most 8."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus))


def make_loader(dataset, batch_size, train, num_workers=None, distributed=None, seed=0,
                weights=None, num_samples=None, pin_memory=None):
    """DataLoader over an AudioVisualDataset that keeps a GPU fed.

    batch_size is per process. distributed=None: use a DistributedSampler
    split when a torch.distributed process group is initialized. Train:
    shuffled (reshuffled by loader.sampler.set_epoch(epoch), call it every
    epoch) and drop_last. Eval: in order; with several processes the sampler
    pads the last rank by repeating clips, so deduplicate by batch["index"].
    weights (per-clip, e.g. load_sample_weights) switch to
    WeightedEpochSampler with num_samples draws per epoch. Pinned memory on
    CUDA, persistent workers.
    """
    if distributed is None:
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    world = torch.distributed.get_world_size() if distributed else 1
    if weights is not None:
        if len(weights) != len(dataset):
            raise DataError(f"{len(weights)} sampling weights for {len(dataset)} clips")
        base = WeightedEpochSampler(weights, num_samples, seed=seed, rank=rank, world_size=world)
    else:
        base = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed,
                                  drop_last=train)
    sampler = EpochKeySampler(base, seed=seed, with_replacement=weights is not None)
    if num_workers is None:
        num_workers = default_num_workers()
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate, pin_memory=pin_memory, drop_last=train,
                      persistent_workers=num_workers > 0)


# ===========================================================================
# Statistics and validation
# ===========================================================================

class _FbankMoments(Dataset):
    """Per-clip (sum, sum of squares, count) of the un-normalized fbank, for stats."""

    def __init__(self, dataset, indices):
        self.dataset, self.indices = dataset, indices

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, k):
        i = int(self.indices[k])
        try:
            fbank = waveform_to_fbank(self.dataset.load_waveform(i), self.dataset.audio_length,
                                      self.dataset.mel_bins).double()
        except DataError as err:
            raise DataError(f"{self.dataset._where(i)}: {err}") from err
        return float(fbank.sum()), float((fbank * fbank).sum()), fbank.numel()


def _identity(x):
    return x


def compute_stats(manifest, audio_length=1024, mel_bins=128, max_clips=None, num_workers=0, seed=0):
    """Mean and std of the fbank over a split (SPEC 1: 'measured over its training split').

    Statistics are taken over every time-frequency bin of the cut / padded
    (audio_length, mel_bins) fbank, i.e. what normalization is applied to.
    max_clips: use a seeded random subset of that many clips.
    Returns dict(mean, std, num_clips, audio_length, mel_bins, manifest).
    """
    ds = AudioVisualDataset(manifest, audio_length=audio_length, mel_bins=mel_bins, train=False,
                            norm_mean=0.0, norm_std=1.0)
    indices = np.arange(len(ds))
    if max_clips is not None and max_clips < len(ds):
        indices = np.sort(np.random.default_rng(seed).choice(len(ds), max_clips, replace=False))
    loader = DataLoader(_FbankMoments(ds, indices), batch_size=None, num_workers=num_workers,
                        collate_fn=_identity)
    s = s2 = 0.0
    count = 0
    for a, b, c in loader:
        s, s2, count = s + a, s2 + b, count + c
    mean = s / count
    std = math.sqrt(max(s2 / count - mean * mean, 0.0))
    return {"mean": mean, "std": std, "num_clips": int(len(indices)), "audio_length": audio_length,
            "mel_bins": mel_bins, "manifest": os.path.basename(str(manifest))}


class BadEntry(NamedTuple):
    index: int
    where: str      # 'manifest: entry i (line L, video_id V)'
    reasons: list   # one string per problem, each naming the file


class _EntryCheck(Dataset):
    """Decodes everything of one entry: audio and all NUM_FRAMES frames."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        ds, reasons = self.dataset, []
        if i in ds._entry_errors:
            return i, [ds._entry_errors[i]]
        try:
            ds.load_waveform(i)
        except DataError as err:
            reasons.append(str(err))
        missing = []
        for k in range(NUM_FRAMES):
            path = frame_path(ds._video_path[i], ds._video_id[i], k)
            if not os.path.isfile(path):
                missing.append(path)
                continue
            try:
                _open_rgb(path)
            except DataError as err:
                reasons.append(str(err))
        if len(missing) == NUM_FRAMES:
            reasons.append(f"{ds._video_path[i]}: no frames found (expected frame_0..frame_9/"
                           f"{ds._video_id[i]}.jpg)")
        elif missing:
            for path in missing:
                folder = os.path.dirname(path)
                where = "" if os.path.isdir(folder) else f" (folder {folder} does not exist)"
                reasons.append(f"{path}: frame not found{where}")
        return i, reasons


def check_manifest(manifest, label_csv=None, num_workers=0):
    """Validate every entry: keys, labels known, audio decodes and is not empty,
    all 10 frames present and decodable, video_ids unique.

    Returns (number of entries, list of BadEntry). Whole-manifest problems
    (missing, malformed, empty) raise DataError.
    """
    ds = AudioVisualDataset(manifest, label_csv=label_csv, train=False, norm_mean=0.0,
                            norm_std=1.0, skip_bad=True)
    found = {}
    loader = DataLoader(_EntryCheck(ds), batch_size=None, num_workers=num_workers,
                        collate_fn=_identity)
    for i, reasons in loader:
        if reasons:
            found[i] = list(reasons)
    first_seen = {}
    for i in range(len(ds)):
        vid = ds.video_id(i)
        if vid and vid in first_seen:
            found.setdefault(i, []).append(
                f"duplicate video_id {vid!r} (also entry {first_seen[vid]})")
        first_seen.setdefault(vid, i)
    bad = [BadEntry(i, ds._where(i), found[i]) for i in sorted(found)]
    return len(ds), bad


# ===========================================================================
# Toy dataset: a synthetic audio-visual world in the real layout
# ===========================================================================
#
# Every clip shows and sounds one object (two in the multi-label variant).
# The class sets both the timbre and the shape; two continuous attributes
# are shared across modalities, so that audio->visual retrieval can be right
# at the instance level, not only the class level:
#   pitch p in [0, 1]:  f0 = 220 * 2^(2p) Hz (two octaves)  <->  hue = 0.83 p
#   rate  r in [0, 1]:  1 + 4r pulses/s                      <->  radius 10 + 12r px
# Nuisances that augmentations should not destroy: coloured background noise,
# mains hum and clicks in the audio; a low-saturation gradient background,
# grey clutter, sensor noise, object position, small rotation, brightness
# flicker and a slow drift across the 10 frames in the image.
# Each manifest entry also carries "objects" (label, pitch, rate), "boxes"
# (per frame, per object, [x0, y0, x1, y1] as fractions of the stored frame)
# and "frame_size" [W, H]; box_in_crop maps a box into the model's crop.

class _Timbre(NamedTuple):
    partials: tuple          # (frequency ratio, amplitude)
    vibrato: float = 0.0     # relative depth
    sweep: float = 0.0       # pitch drop at each onset (drums)
    noise: float = 0.0       # breath / skin noise, relative
    attack: float = 0.02     # s, for sustained tones
    decay: float = 0.0       # s, > 0 for struck (percussive) sounds


TOY_CLASSES = (  # (mid, display name, timbre, shape)
    ("/toy/flute", "flute (circle)",
     _Timbre(((1, 1.0), (2, 0.2), (3, 0.05)), vibrato=0.004, noise=0.08, attack=0.03), "circle"),
    ("/toy/clarinet", "clarinet (square)",
     _Timbre(tuple((n, 1.0 / n) for n in (1, 3, 5, 7, 9, 11)), vibrato=0.002), "square"),
    ("/toy/violin", "violin (triangle)",
     _Timbre(tuple((n, 1.0 / n) for n in range(1, 13)), vibrato=0.012, attack=0.04), "triangle"),
    ("/toy/bell", "bell (star)",
     _Timbre(((1, 1.0), (2.76, 0.5), (5.40, 0.35), (8.93, 0.2)), decay=0.35), "star"),
    ("/toy/drum", "drum (hexagon)",
     _Timbre(((1, 1.0), (1.5, 0.3)), sweep=1.0, noise=0.5, decay=0.07), "hexagon"),
    ("/toy/horn", "horn (diamond)",
     _Timbre(((1, 0.5), (2, 1.0), (3, 0.8), (4, 0.55), (5, 0.35), (6, 0.2), (7, 0.1)),
             attack=0.08), "diamond"),
    ("/toy/whistle", "whistle (ring)", _Timbre(((1, 1.0),), vibrato=0.03, attack=0.01), "ring"),
    ("/toy/buzzer", "buzzer (cross)",
     _Timbre(tuple((n, 1.0) for n in range(1, 21)), attack=0.005), "cross"),
)
TOY_DURATION = 2.6            # s: 258 fbank frames, the tiny preset keeps 256
TOY_FRAME_SIZE = (128, 112)   # (W, H): the tiny preset resizes to 109 x 96 and crops 96
TOY_VERSION = 1
_TOY_SPLITS = {"train": 0, "test": 1, "train_multilabel": 2, "test_multilabel": 3}
_TOY_ID_PREFIX = {"train": "toy_train", "test": "toy_test", "train_multilabel": "toy_trainml",
                  "test_multilabel": "toy_testml"}


def toy_pitch_to_f0(pitch):
    return 220.0 * 2.0 ** (2.0 * pitch)


def toy_pitch_to_hue(pitch):
    return 0.83 * pitch


def toy_rate_to_pulses(rate):
    return 1.0 + 4.0 * rate


def toy_rate_to_radius(rate, multi=False):
    """Object radius in stored-frame pixels (smaller when two objects share a frame)."""
    return (8.0 + 9.0 * rate) if multi else (10.0 + 12.0 * rate)


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


def _toy_source(rng, cls, pitch, rate, t):
    """One sounding object: (N,) float32 with unit RMS. t: (N,) float32 seconds."""
    timbre = TOY_CLASSES[cls][2]
    f0 = toy_pitch_to_f0(pitch)
    period = 1.0 / toy_rate_to_pulses(rate)
    beats = (t - np.float32(rng.uniform(0.0, period))) * np.float32(1 / period)
    since = (beats - np.floor(beats)) * np.float32(period)  # time since the last onset
    vib_rate, vib_phase = rng.uniform(4.5, 6.5), rng.uniform(0, 2 * np.pi)
    vib = np.sin(np.float32(2 * np.pi * vib_rate) * t + np.float32(vib_phase))
    freq = np.float32(f0) * (np.float32(1.0) + np.float32(timbre.vibrato) * vib)
    if timbre.sweep:
        drop = np.exp(since * np.float32(-50.0))  # 20 ms pitch drop after each onset
        freq = freq * (np.float32(1.0) + np.float32(timbre.sweep) * drop)
    cycles = np.cumsum(freq, dtype=np.float64) / SAMPLE_RATE  # phase in periods of f0
    audible = [(r, a) for r, a in timbre.partials if r * f0 < 7000.0]  # stay below Nyquist
    harmonic = [(r, a) for r, a in audible if float(r).is_integer()]
    sig = _lookup(_harmonic_table(harmonic, rng), cycles)  # all harmonics in one table
    for ratio, amp in audible:
        if not float(ratio).is_integer():
            sig += np.float32(amp) * _lookup(_harmonic_table([(1, 1.0)], rng), ratio * cycles)
    if timbre.noise:
        level = np.float32(timbre.noise) * np.sqrt(np.mean(sig * sig))
        sig += level * _coloured_noise(rng, t.size, 0.0)
    if timbre.decay:
        env = ((1 - np.exp(since * np.float32(-1 / 0.003)))  # 3 ms attack, then decay
               * np.exp(since * np.float32(-1 / timbre.decay)))
    else:  # sustained note, on for 60% of each period
        env = np.clip(since * np.float32(1 / timbre.attack), 0, 1) * np.clip(
            (np.float32(0.6 * period) - since) * np.float32(50.0), 0, 1)
    return _unit_rms(sig * env)


def _toy_audio(rng, objects):
    """Mix of the objects plus background; returns (N,) int16 at 16 kHz."""
    n = int(round(TOY_DURATION * SAMPLE_RATE))
    t = np.arange(n, dtype=np.float32) / np.float32(SAMPLE_RATE)
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
        background += _lookup(_harmonic_table(hum, rng), mains * np.arange(n) / SAMPLE_RATE)
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
        ys, xs = np.nonzero(alpha[..., 0] > 0.5)
        sprite_box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        sprites.append((start, end, reach, alpha, color * shade[..., None], sprite_box))
    imgs = np.empty((NUM_FRAMES, height, width, 3), dtype=np.float32)
    # sensor noise: each frame reads a random window of one buffer (cheaper than fresh draws)
    pixels = height * width * 3
    noise = rng.standard_normal(pixels + 4096, dtype=np.float32) * np.float32(0.02 * 255.0)
    boxes = []
    for k in range(NUM_FRAMES):
        img = bg.copy()
        frame_boxes = []
        for start, end, reach, alpha, paint, (bx0, by0, bx1, by1) in sprites:
            x, y = np.floor(start + (end - start) * k / (NUM_FRAMES - 1)).astype(int) - reach
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
        split, i = self.jobs[j]
        rng = np.random.default_rng((self.seed, _TOY_SPLITS[split], i))
        if split.endswith("multilabel"):
            c1 = int(rng.integers(len(TOY_CLASSES)))
            classes = [c1, (c1 + int(rng.integers(1, len(TOY_CLASSES)))) % len(TOY_CLASSES)]
        else:
            classes = [i % len(TOY_CLASSES)]
        objects = [{"cls": c, "pitch": round(float(rng.random()), 4),
                    "rate": round(float(rng.random()), 4)} for c in classes]
        vid = f"{_TOY_ID_PREFIX[split]}_{i:05d}"
        pcm = _toy_audio(rng, objects)
        frames, boxes = _toy_frames(rng, objects)
        with wave.open(os.path.join(self.out_dir, "audio", f"{vid}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(pcm.astype("<i2").tobytes())
        for k in range(NUM_FRAMES):
            path = frame_path(os.path.join(self.out_dir, "frames"), vid, k)
            Image.fromarray(frames[k]).save(path, format="JPEG", quality=90)
        moments = None
        if split == "train":  # fbank moments of exactly what the loader will read back
            wav = torch.from_numpy(pcm.astype(np.float32) / 32768.0)
            fbank = waveform_to_fbank(wav - wav.mean(), self.audio_length, self.mel_bins).double()
            moments = (float(fbank.sum()), float((fbank * fbank).sum()), fbank.numel())
        entry = {"video_id": vid, "wav": f"audio/{vid}.wav", "video_path": "frames",
                 "labels": ",".join(TOY_CLASSES[c][0] for c in classes),
                 "objects": [{"label": TOY_CLASSES[o["cls"]][0], "pitch": o["pitch"],
                              "rate": o["rate"]} for o in objects],
                 "boxes": boxes, "frame_size": list(TOY_FRAME_SIZE)}
        return split, entry, moments


def write_manifest(path, entries):
    """Write {"data": [...]} with one entry per line (so errors can cite lines)."""
    body = ",\n".join("  " + json.dumps(e, separators=(", ", ": ")) for e in entries)
    Path(path).write_text('{"data": [\n' + body + "\n]}\n", encoding="utf-8")


def toy_paths(root):
    """Paths of a toy dataset's files (absolute strings)."""
    root = Path(root).resolve()
    out = {name: str(root / f"{name}.json") for name in
           ("train", "test", "retrieval", "train_multilabel", "test_multilabel")}
    out.update(label_csv=str(root / "class_labels_indices.csv"), stats=str(root / "stats.json"),
               root=str(root))
    return out


def make_toy_dataset(out_dir, n_train=2000, n_test=400, n_retrieval=300, n_train_multilabel=400,
                     n_test_multilabel=200, seed=0, num_workers=None, audio_length=256, mel_bins=64,
                     progress=False):
    """Write the toy dataset to out_dir (see the section comment above for its design).

    Files: audio/{id}.wav (16 kHz, 16-bit, mono, 2.6 s), frames/frame_{k}/{id}.jpg
    (128 x 112), train / test / retrieval (first n_retrieval test clips) /
    train_multilabel / test_multilabel .json, class_labels_indices.csv,
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
        for k in range(NUM_FRAMES):
            (tmp / "frames" / f"frame_{k}").mkdir(parents=True)
        sizes = {"train": n_train, "test": n_test, "train_multilabel": n_train_multilabel,
                 "test_multilabel": n_test_multilabel}
        jobs = [(split, i) for split, n in sizes.items() for i in range(n)]
        if num_workers is None:
            num_workers = min(4, default_num_workers()) if len(jobs) > 64 else 0
        loader = DataLoader(_ToyClips(tmp, jobs, seed, audio_length, mel_bins), batch_size=None,
                            num_workers=num_workers, collate_fn=_identity)
        if progress:
            from tqdm import tqdm
            loader = tqdm(loader, total=len(jobs), desc="toy dataset")
        entries = {split: [] for split in sizes}
        s = s2 = 0.0
        count = 0
        for split, entry, moments in loader:
            entries[split].append(entry)
            if moments is not None:
                s, s2, count = s + moments[0], s2 + moments[1], count + moments[2]
        for split, items in entries.items():
            write_manifest(tmp / f"{split}.json", items)
        write_manifest(tmp / "retrieval.json", entries["test"][:n_retrieval])
        with open(tmp / "class_labels_indices.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["index", "mid", "display_name"])
            for c, (mid, name, _, _) in enumerate(TOY_CLASSES):
                writer.writerow([c, mid, name])
        if count:
            mean = s / count
            stats = {"mean": mean, "std": math.sqrt(max(s2 / count - mean * mean, 0.0)),
                     "num_clips": n_train, "audio_length": audio_length, "mel_bins": mel_bins,
                     "manifest": "train.json"}
            (tmp / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        params = {"version": TOY_VERSION, "seed": seed, **sizes, "n_retrieval": n_retrieval,
                  "audio_length": audio_length, "mel_bins": mel_bins, "sample_rate": SAMPLE_RATE,
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


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_toy_dataset(root="data/toy", timeout=900.0, **toy_kwargs):
    """Return toy_paths(root), generating the toy dataset first if it is absent.

    An existing dataset is returned as it is (toy_kwargs only size a new one).

    Safe when several processes (torchrun ranks) call it at once: one takes
    the lock file {root}.lock and generates, the others wait for toy.json; a
    waiter whose lock holder died (or that waited `timeout` s) generates
    itself. Generation renames a finished temporary folder into place, so a
    half-written dataset is never seen. Does not use torch.distributed.
    """
    root = Path(root).resolve()
    marker = root / "toy.json"
    if not marker.exists():
        if root.exists() and any(root.iterdir()):
            raise DataError(f"{root} exists but is not a complete toy dataset (no toy.json); "
                            f"delete it to regenerate")
        root.parent.mkdir(parents=True, exist_ok=True)
        lock = root.with_name(root.name + ".lock")
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            owner = True
        except FileExistsError:
            owner = False
        if owner:
            try:
                _generate_unless_present(root, toy_kwargs)
            finally:
                lock.unlink(missing_ok=True)
        else:
            deadline = time.monotonic() + timeout
            while not marker.exists():
                try:
                    holder = int(lock.read_text() or "0")
                except (FileNotFoundError, ValueError):
                    holder = None
                if holder is None and not marker.exists() and not lock.exists():
                    break  # holder finished (or failed) without us seeing toy.json yet
                if holder and not _pid_alive(holder):
                    lock.unlink(missing_ok=True)  # stale: its owner died
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            if not marker.exists():
                _generate_unless_present(root, toy_kwargs)
    try:
        version = json.loads(marker.read_text()).get("version")
    except ValueError as err:
        raise DataError(f"{marker}: unreadable ({err}); delete {root} to regenerate") from err
    if version != TOY_VERSION:
        raise DataError(f"{root} was generated by another version of data.py (toy version "
                        f"{version}, this is {TOY_VERSION}); delete it to regenerate")
    return toy_paths(root)


def _generate_unless_present(root, toy_kwargs):
    if (root / "toy.json").exists():
        return
    try:
        make_toy_dataset(root, **toy_kwargs)
    except FileExistsError:
        if not (root / "toy.json").exists():
            raise


# ===========================================================================
# CLI
# ===========================================================================

def main(argv=None):
    """`python data.py toy|stats|check|weights ...`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("toy", help="write the toy audio-visual dataset")
    p.add_argument("--out", required=True, help="output folder (must not exist or be empty)")
    p.add_argument("--n_train", type=int, default=2000)
    p.add_argument("--n_test", type=int, default=400)
    p.add_argument("--n_retrieval", type=int, default=300, help="first N test clips")
    p.add_argument("--n_train_multilabel", type=int, default=400)
    p.add_argument("--n_test_multilabel", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="generation processes")

    p = sub.add_parser("stats", help="fbank mean/std of a split (SPEC 1)")
    p.add_argument("manifest")
    p.add_argument("--audio_length", type=int, default=1024)
    p.add_argument("--mel_bins", type=int, default=128)
    p.add_argument("--max_clips", type=int, default=None, help="seeded random subset")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write stats.json next to the manifest")
    p.add_argument("--out", default=None, help="write the statistics to this JSON file")

    p = sub.add_parser("check", help="validate every entry of a manifest")
    p.add_argument("manifest")
    p.add_argument("--label_csv", default=None)
    p.add_argument("--workers", type=int, default=0)

    p = sub.add_parser("weights", help="class-balanced per-clip sampling weights")
    p.add_argument("manifest")
    p.add_argument("--label_csv", required=True)
    p.add_argument("--out", required=True)

    args = parser.parse_args(argv)
    try:
        if args.command == "toy":
            start = time.perf_counter()
            make_toy_dataset(args.out, args.n_train, args.n_test, args.n_retrieval,
                             args.n_train_multilabel, args.n_test_multilabel, seed=args.seed,
                             num_workers=args.workers, progress=True)
            print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s")
            for name, path in toy_paths(args.out).items():
                print(f"  {name:17s} {path}")
        elif args.command == "stats":
            stats = compute_stats(args.manifest, args.audio_length, args.mel_bins, args.max_clips,
                                  num_workers=args.workers)
            print(json.dumps(stats, indent=1))
            targets = [Path(args.out)] if args.out else []
            if args.write:
                targets.append(Path(args.manifest).resolve().parent / "stats.json")
            for target in targets:
                target.write_text(json.dumps(stats, indent=1) + "\n")
                print(f"wrote {target}")
        elif args.command == "check":
            n, bad = check_manifest(args.manifest, args.label_csv, num_workers=args.workers)
            for b in bad:
                print(f"BAD {b.where}:")
                for reason in b.reasons:
                    print(f"    {reason}")
            print(f"{args.manifest}: {n} entries, {len(bad)} bad")
            return 1 if bad else 0
        elif args.command == "weights":
            ds = AudioVisualDataset(args.manifest, label_csv=args.label_csv, norm_mean=0.0,
                                    norm_std=1.0)
            np.savetxt(args.out, ds.class_balanced_weights(), fmt="%.6f")
            print(f"wrote {len(ds)} weights to {args.out}")
    except (DataError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
