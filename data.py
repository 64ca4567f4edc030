"""Audio-visual data: manifests, fbanks, frames, datasets and loaders (method.md §1, 11).

Implements the paper's inputs (method.md §1: 10 s of audio as a 128-bin Kaldi
log-mel spectrogram; one RGB frame of a clip stored as 10 frames at 1 fps) and
the fine-tuning data options (method.md §11: multi-hot labels, mixup, class-balanced
sampling), for manifests in the format AudioSet / VGGSound users already have
from CAV-MAE and the authors' code:

    manifest.json   {"data": [{"video_id", "wav", "video_path", "labels"}, ...]}
    class CSV       index,mid,display_name      (labels are comma-separated mids)
    frames          {video_path}/frame_{k}/{video_id}.jpg,  k = 0 .. 9
    weights CSV     one sampling weight per clip (AudioSet-2M class balancing)

Relative paths in a manifest are resolved against the manifest's folder.

Bad input policy (no silent zero-filled samples): every decoding
failure raises DataError naming the manifest, the entry index (and its line in
the JSON file when it can be found), the file and the reason. With
skip_bad=True the dataset instead returns a BadSample that `collate` drops and
counts in the batch's "skipped"; the training scripts pass batches through a
bad_data.BadDataPolicy, which counts them and fails once more than a set
fraction of samples was bad. `python data.py check MANIFEST` validates every
entry up front.

The built-in toy dataset, a synthetic world in this layout, is toy.py's. Small datasets
loaded in-process can keep their fbanks in memory (cache_fbanks, as the toy profile does).

CLI:  python data.py stats MANIFEST | check MANIFEST [--label_csv CSV]
      | weights MANIFEST --label_csv CSV --out FILE
"""

import argparse
import csv
import functools
import json
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from torchaudio.compliance import kaldi

from audio_io import SAMPLE_RATE, load_waveform
import utils
from bad_data import BadSample
from utils import DataError

# Dataset fbank statistics (method.md §1): (mean, std) of the 128-bin fbank.
KNOWN_STATS = {"audioset": (-4.346, 4.332), "vggsound": (-4.956, 4.486)}

NUM_FRAMES = 10              # frames stored per clip (1 fps)
FBANK_CACHE_BYTES = 1 << 30  # the most fbanks kept in memory (cache_fbanks)
EVAL_FRAME = 5               # method.md §1: evaluation takes the middle frame
MIXUP_ALPHA = 10.0           # method.md §11: lambda ~ Beta(10, 10)
LABEL_CSV_NAME = "class_labels_indices.csv"


# ===========================================================================
# Manifests, class labels, sampling weights
# ===========================================================================

_ENTRY_KEYS = ("video_id", "wav", "video_path")


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


def write_manifest(path, entries):
    """Write {"data": [...]} with one entry per line (so errors can cite lines)."""
    body = ",\n".join("  " + json.dumps(e, separators=(", ", ": ")) for e in entries)
    Path(path).write_text('{"data": [\n' + body + "\n]}\n", encoding="utf-8")


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
    extra = [f"line {int(lines[index])}"] if lines is not None else []
    extra += [f"video_id {video_id}"] if video_id else []
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
    """Per-clip sampling weights (method.md §11, AudioSet-2M), one per line as in CAV-MAE.

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
# Audio (method.md §1): file -> waveform is audio_io.py's; here the Kaldi fbank
# ===========================================================================

def waveform_to_fbank(waveform, audio_length, mel_bins):
    """Kaldi log-mel filterbank (method.md §1), cut or zero-padded to audio_length frames.

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
    """Read an audio file and return its (T, F) un-normalized fbank (method.md §1)."""
    return waveform_to_fbank(load_waveform(path), audio_length, mel_bins)


# ===========================================================================
# Frames (method.md §1): any PIL image -> RGB -> resize short side -> centre crop
# ===========================================================================

def to_rgb(img):
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
            return to_rgb(img)
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
    """One video frame as (3, H, W) = (3, image_size, image_size) uint8.

    method.md §1: RGB, short side resized to image_size (bicubic), centre crop. Frames stay uint8
    until they are on the training device (a quarter of float32's bytes to move), where
    augment.unit_range scales them to [0, 1]; ImageNet normalization comes after the
    augmentations (augment.py).
    """
    img = _open_rgb(path)
    new_w, new_h = resized_size(img.width, img.height, image_size)
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.BICUBIC)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    arr = np.asarray(img)[top:top + image_size, left:left + image_size]  # (H, W, 3) uint8
    arr = np.array(arr)  # a copy: PIL's buffer is read-only
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()  # (3, H, W) uint8


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


def resolve_norm_stats(option="auto", manifest=None, checkpoint_stats=None, audio_length=None,
                       mel_bins=None):
    """(mean, std) of the fbank normalization for a --norm_stats option (method.md §1).

    "auto": the statistics stored in our pretraining checkpoint (the ones the
    model was trained with) when `checkpoint_stats` is given, else stats.json
    next to `manifest` (written by `python data.py stats MANIFEST --write`, or by
    toy.py); "dataset": that stats.json even when a checkpoint's are given;
    "audioset" / "vggsound": KNOWN_STATS; "MEAN,STD": those numbers.
    audio_length / mel_bins: the dataset's sizes, compared with stats.json's.
    """
    text = option.strip().lower()
    if text in KNOWN_STATS:
        return KNOWN_STATS[text]
    if text == "dataset":  # stats.json next to the manifest, whatever a checkpoint stored
        text, checkpoint_stats = "auto", None
    if text != "auto":
        try:
            mean, std = (float(v) for v in text.split(","))
        except ValueError:
            raise ValueError(f"--norm_stats must be auto, dataset, {', '.join(KNOWN_STATS)} or MEAN,STD; "
                             f"got {option!r}") from None
        return mean, std
    if checkpoint_stats:
        return float(checkpoint_stats[0]), float(checkpoint_stats[1])
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
    """Clips of a manifest as normalized fbanks, [0, 1] frames and label vectors
    (method.md §1, 11).

    __getitem__(i or SampleKey) -> dict(
        audio (T, F) normalized fbank, T = audio_length (time), F = mel_bins (frequency),
        frame (3, H, W) in [0, 1], a random frame 0..9 at train, frame 5 at eval,
        label (C,) float multi-hot with label smoothing (C = 0 without a label CSV),
        index int)

    mixup (method.md §11, fine-tuning only, train only): with probability `mixup`
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
                 skip_bad=False, cache_fbanks=False):
        self.manifest = str(manifest)
        self.label_csv = None if label_csv is None else str(label_csv)
        self.audio_length, self.mel_bins, self.image_size = audio_length, mel_bins, image_size
        self.train, self.skip_bad = train, skip_bad
        if not 0.0 <= mixup <= 1.0 or not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"mixup must be in [0, 1] and label_smoothing in [0, 1), got "
                             f"{mixup}, {label_smoothing}")
        self.mixup, self.label_smoothing = float(mixup), float(label_smoothing)
        if (norm_mean is None) != (norm_std is None):
            raise DataError("give both norm_mean and norm_std, or neither")
        if norm_mean is None:  # stats.json next to the manifest
            norm_mean, norm_std = resolve_norm_stats("auto", self.manifest, None, audio_length,
                                                     mel_bins)
        self.norm_mean, self.norm_std = float(norm_mean), float(norm_std)

        self.class_mids, self.class_names = (read_label_csv(self.label_csv)
                                             if self.label_csv is not None else ([], []))
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
        # cache_fbanks: each clip's fbank (the costliest part of a sample, ~3 ms of 3.6 on the
        # toy) is computed once and kept, when all of them fit in FBANK_CACHE_BYTES: the toy's
        # 2,000 training clips take 131 MB at 256 x 64, and 1 GiB holds 2,048 clips at the
        # base preset's 1024 x 128, so real datasets are not cached. Frames are not kept: a
        # clip shows one of its 10 each epoch. Off with mixup, which mixes waveforms before
        # the fbank. Meant for in-process loading (num_workers 0): each worker would fill a copy.
        fits = n * 4 * audio_length * mel_bins <= FBANK_CACHE_BYTES and not self.mixup
        self._kept = {} if cache_fbanks and fits else None
        self._video_id = _StringArray(video_ids)
        self._wav = _StringArray(wavs)
        self._video_path = _StringArray(video_paths)
        self._label_ptr = np.zeros(n + 1, dtype=np.int64)
        np.cumsum([len(ls) for ls in label_lists], out=self._label_ptr[1:])
        self._label_idx = np.fromiter((c for ls in label_lists for c in ls), dtype=np.int64,
                                      count=int(self._label_ptr[-1]))
        if self.num_classes and n and all(self._entry_errors.get(i) == "no labels" for i in range(n)):
            raise DataError(f"{self.manifest}: no entry has labels (an unlabelled manifest, as "
                            f"prepare.py writes without --labels): fine-tuning against "
                            f"{self.label_csv} needs labelled clips")
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

    def frame_file(self, i, k):
        """The path of frame k of entry i."""
        return frame_path(self._video_path[i], self._video_id[i], k)

    def load_frame(self, i, k):
        """(3, H, W) frame k of entry i: uint8, or float in [0, 1] where mixup may blend
        frames (every sample of such a dataset, so that its batches stack)."""
        self._check_entry(i)
        frame = load_frame(self.frame_file(i, k), self.image_size)
        return frame.float() / 255.0 if self.train and self.mixup > 0 else frame

    def _normalize(self, fbank):
        return (fbank - self.norm_mean) / self.norm_std

    def _load(self, key):
        i = key.index
        rng = np.random.default_rng((key.seed, key.epoch, i, key.draw))
        k = int(rng.integers(NUM_FRAMES)) if self.train else EVAL_FRAME
        if self.train and self.mixup > 0 and rng.random() < self.mixup:
            audio, frame, label = self._mixed(i, k, rng)
        else:
            audio = self._keep(i, lambda: self._normalize(self.fbank(self.load_waveform(i),
                                                                     self._wav[i])))
            frame = self.load_frame(i, k)
            label = self.label_vector(i)
        if not torch.isfinite(frame).all():
            raise DataError(f"{self.frame_file(i, k)}: non-finite pixel values")
        return {"audio": audio, "frame": frame, "label": label, "index": i}

    def _keep(self, key, load):
        """load(), computed once per key and kept when caching fbanks."""
        if self._kept is not None and key not in self._kept:
            self._kept[key] = load()
        return load() if self._kept is None else self._kept[key]

    def _mixed(self, i, k, rng):
        """(fbank, frame, label) of clip i mixed with a random partner (mixup)."""
        wav, frame, label = self.load_waveform(i), self.load_frame(i, k), self.label_vector(i)
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
        return self._normalize(self.fbank(wav, self._wav[i])), frame, label

    def fbank(self, wav, path):
        """(T, F) un-normalized fbank of waveform `wav` (read from `path`), checked to be
        finite: a float WAV's samples may be finite yet so large that their power is not."""
        fbank = waveform_to_fbank(wav, self.audio_length, self.mel_bins)
        if not torch.isfinite(fbank).all():
            raise DataError(f"{path}: non-finite features (float samples up to "
                            f"{wav.abs().max().item():.3g})")
        return fbank

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
        out = {key: torch.stack([s[key] for s in good]) for key in ("audio", "frame", "label")}
        out["index"] = torch.tensor([s["index"] for s in good], dtype=torch.int64)
    else:
        b = bad[0]
        out = {"audio": torch.zeros((0, *b.audio_shape)),
               "frame": torch.zeros((0, *b.frame_shape), dtype=torch.uint8),
               "label": torch.zeros((0, b.num_classes)), "index": torch.zeros(0, dtype=torch.int64)}
    out["skipped"] = len(bad)
    out["errors"] = [s.message for s in bad]
    return out


# ===========================================================================
# Samplers and loader
# ===========================================================================

class WeightedEpochSampler(Sampler):
    """Class-balanced sampling for AudioSet-2M fine-tuning (method.md §11).

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


def make_loader(dataset, batch_size, train, num_workers=None, distributed=None, seed=0,
                weights=None, num_samples=None, pin_memory=False):
    """DataLoader over an AudioVisualDataset that keeps a GPU fed.

    batch_size is per process. distributed=None: use a DistributedSampler
    split when a torch.distributed process group is initialized. Train:
    shuffled (reshuffled by loader.sampler.set_epoch(epoch), call it every
    epoch) and drop_last. Eval: in order; with several processes the sampler
    pads the last rank by repeating clips, so deduplicate by batch["index"].
    weights (per-clip, e.g. load_sample_weights) switch to
    WeightedEpochSampler with num_samples draws per epoch. pin_memory: pass
    True when training on CUDA (never by default: on a CPU run it would open a
    CUDA context on a GPU node). Persistent workers. A training loader without one full batch is an error.
    """
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    if weights is not None:
        if len(weights) != len(dataset):
            raise DataError(f"{len(weights)} sampling weights for {len(dataset)} clips")
        base = WeightedEpochSampler(weights, num_samples, seed=seed, rank=rank, world_size=world)
    else:
        base = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed,
                                  drop_last=train)
    sampler = EpochKeySampler(base, seed=seed, with_replacement=weights is not None)
    if num_workers is None:
        num_workers = utils.default_num_workers()
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        collate_fn=collate, pin_memory=pin_memory, drop_last=train,
                        persistent_workers=num_workers > 0)
    if train and len(loader) == 0:
        raise DataError(f"{getattr(dataset, 'manifest', 'the dataset')}: {len(sampler)} samples "
                        f"per process is less than one batch of {batch_size} ({world} process(es))")
    return loader


# ===========================================================================
# Statistics and validation
# ===========================================================================

def _fbank_moments(ds, i):
    """(sum, sum of squares, count) of entry i's un-normalized fbank, for stats."""
    try:
        fbank = waveform_to_fbank(ds.load_waveform(i), ds.audio_length, ds.mel_bins).double()
    except DataError as err:
        raise DataError(f"{ds._where(i)}: {err}") from err
    return float(fbank.sum()), float((fbank * fbank).sum()), fbank.numel()


def compute_stats(manifest, audio_length=1024, mel_bins=128, max_clips=None, num_workers=0, seed=0):
    """Mean and std of the fbank over a split (method.md §1: 'measured over its training split').

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
    # one clip per item, in worker processes: a list of indices is the dataset
    loader = DataLoader(indices.tolist(), batch_size=None, num_workers=num_workers,
                        collate_fn=functools.partial(_fbank_moments, ds))
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


def _entry_problems(ds, i):
    """(i, every problem of entry i): its audio decoded to the fbank, all NUM_FRAMES frames."""
    if i in ds._entry_errors:
        return i, [ds._entry_errors[i]]
    reasons, frames = [], []
    try:
        ds.fbank(ds.load_waveform(i), ds._wav[i])
    except DataError as err:
        reasons.append(str(err))
    for k in range(NUM_FRAMES):
        try:
            _open_rgb(ds.frame_file(i, k))
        except DataError as err:
            frames.append(str(err))
    if len(frames) == NUM_FRAMES and all(": frame not found" in r for r in frames):
        frames = [f"{ds._video_path[i]}: no frames found (expected frame_0..frame_9/"
                  f"{ds._video_id[i]}.jpg)"]
    return i, reasons + frames


def find_label_csv(manifest):
    """The class_labels_indices.csv next to a manifest (where toy.py and CAV-MAE put
    it, as stats.json is found), or None."""
    path = Path(manifest).resolve().parent / LABEL_CSV_NAME
    return str(path) if path.is_file() else None


def check_manifest(manifest, label_csv=None, num_workers=0):
    """Validate every entry: keys, labels known, audio decodes and is not empty,
    all 10 frames present and decodable, video_ids unique.

    Labels are checked against `label_csv`, else against the class CSV next to
    the manifest (find_label_csv); with neither they are not checked.
    Returns (number of entries, list of BadEntry, the label CSV used or None).
    Whole-manifest problems (missing, malformed, empty) raise DataError.
    """
    given = label_csv
    label_csv = label_csv or find_label_csv(manifest)
    if given is None and not any(isinstance(e, dict) and e.get("labels")
                                 for e in read_manifest(manifest)):
        label_csv = None   # an unlabelled manifest (pretraining data): nothing to check against
    ds = AudioVisualDataset(manifest, label_csv=label_csv, train=False, norm_mean=0.0,
                            norm_std=1.0, skip_bad=True)
    found = {}
    loader = DataLoader(range(len(ds)), batch_size=None, num_workers=num_workers,
                        collate_fn=functools.partial(_entry_problems, ds))
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
    return len(ds), bad, label_csv


# ===========================================================================
# CLI
# ===========================================================================

def main(argv=None):
    """`python data.py stats|check|weights ...`; returns the exit code."""
    parser = argparse.ArgumentParser(prog="data.py", description=__doc__.split("\n")[0],
                                     epilog="The toy dataset: python toy.py --out DIR")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("stats", help="fbank mean/std of a split (method.md §1)")
    p.add_argument("manifest")
    p.add_argument("--audio_length", type=int, default=1024)
    p.add_argument("--mel_bins", type=int, default=128)
    p.add_argument("--max_clips", type=int, default=None, help="seeded random subset")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--write", action="store_true", help="write stats.json next to the manifest")
    p.add_argument("--out", default=None, help="write the statistics to this JSON file")

    p = sub.add_parser("check", help="validate every entry of a manifest")
    p.add_argument("manifest")
    p.add_argument("--label_csv", default=None,
                   help=f"class list to check labels against (default: {LABEL_CSV_NAME} next to "
                        f"the manifest, if there is one)")
    p.add_argument("--workers", type=int, default=0)

    p = sub.add_parser("weights", help="class-balanced per-clip sampling weights")
    p.add_argument("manifest")
    p.add_argument("--label_csv", required=True)
    p.add_argument("--out", required=True)

    args = parser.parse_args(argv)
    try:
        if args.command == "stats":
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
            n, bad, label_csv = check_manifest(args.manifest, args.label_csv,
                                               num_workers=args.workers)
            for b in bad:
                print(f"BAD {b.where}:")
                for reason in b.reasons:
                    print(f"    {reason}")
            unlabelled = not any(isinstance(e, dict) and e.get("labels")
                                 for e in read_manifest(args.manifest))
            print(f"labels checked against {label_csv}" if label_csv else
                  "labels NOT checked: no entry has labels (an unlabelled manifest: fine for "
                  "pretraining; fine-tuning needs labels)" if unlabelled else
                  f"labels NOT checked: no --label_csv given and no {LABEL_CSV_NAME} next to "
                  f"the manifest")
            print(f"{args.manifest}: {n} entries, {len(bad)} bad")
            return 1 if bad else 0
        elif args.command == "weights":
            ds = AudioVisualDataset(args.manifest, label_csv=args.label_csv, norm_mean=0.0,
                                    norm_std=1.0)
            np.savetxt(args.out, ds.class_balanced_weights(), fmt="%.6f")
            print(f"wrote {len(ds)} weights to {args.out}")
    except (DataError, ValueError) as err:
        print(f"data.py: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
