"""Tests for data.py: real-format manifests, decoding, labels/mixup, loader, bad input, toy data.

Reference values are computed here independently: waveforms from the integer
samples the test wrote (not from the files), fbanks with torchaudio's
kaldi.fbank, frames with PIL + torchvision transforms.
"""

import json
import os
import struct
import sys
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
from PIL import Image
from torchaudio.compliance import kaldi
from torchvision import transforms

import audio_io
import augment
import data
from bad_data import BadDataPolicy, BadSample
import toy as toy_module

SR = 16000


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Kaldi fbank on tiny inputs is slower with several threads on a shared machine;
    restore the setting for the other test files."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# Writers for the test's own real-format files (independent of data.py)
# ---------------------------------------------------------------------------

def _write_pcm_wav(path, ints, width, rate):
    """ints: (N, C) integer samples in the signed range of `width` bytes (unsigned for 8-bit)."""
    n, c = ints.shape
    if width == 1:
        raw = ints.astype(np.uint8).tobytes()
    elif width == 3:
        v = ints.astype(np.int64) & 0xFFFFFF
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], -1).astype(np.uint8).tobytes()
    else:
        raw = ints.astype({2: "<i2", 4: "<i4"}[width]).tobytes()
    with wave.open(str(path), "wb") as w:
        w.setnchannels(c)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(raw)


def _write_riff(path, fmt_body, payload):
    chunks = b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body
    chunks += b"LIST" + struct.pack("<I", 5) + b"junk!" + b"\x00"  # odd chunk, padded
    chunks += b"data" + struct.pack("<I", len(payload)) + payload
    Path(path).write_bytes(b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks)


def _write_float_wav(path, x, rate):
    """x: (N, C) float32 -> WAVE_FORMAT_IEEE_FLOAT (3), which stdlib `wave` cannot read."""
    n, c = x.shape
    fmt = struct.pack("<HHIIHH", 3, c, rate, rate * 4 * c, 4 * c, 32)
    _write_riff(path, fmt, x.astype("<f4").tobytes())


def _write_extensible_wav(path, ints16, rate):
    n, c = ints16.shape
    guid_pcm = struct.pack("<H", 1) + bytes.fromhex("000000001000800000aa00389b71")
    fmt = struct.pack("<HHIIHHHHI", 0xFFFE, c, rate, rate * 2 * c, 2 * c, 16, 22, 16, 0) + guid_pcm
    _write_riff(path, fmt, ints16.astype("<i2").tobytes())


def _signal(n, rate, seed, channels):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    base = 0.5 * np.sin(2 * np.pi * (300 + 100 * seed) * t) + 0.1 * rng.standard_normal(n)
    chans = [base * (1.0 - 0.3 * k) + 0.05 * np.sin(2 * np.pi * 1000 * (k + 1) * t)
             for k in range(channels)]
    return np.clip(np.stack(chans, -1) * 0.8, -1, 1)  # (N, C) in [-1, 1]


def _reference_fbank(wave_cn, rate, audio_length, mel_bins):
    """Independent method.md §1 pipeline on an (N, C) float waveform."""
    x = torch.tensor(wave_cn.mean(axis=1), dtype=torch.float32)
    if rate != SR:
        x = torchaudio.functional.resample(x, rate, SR)
    x = x - x.mean()
    fb = kaldi.fbank(x[None], htk_compat=True, sample_frequency=SR, use_energy=False,
                     window_type="hanning", num_mel_bins=mel_bins, dither=0.0, frame_shift=10)
    if fb.shape[0] < audio_length:
        fb = torch.cat([fb, torch.zeros(audio_length - fb.shape[0], mel_bins)])
    return fb[:audio_length]


def _frame_image(k, seed, size, mode):
    """Frame k of a clip: a gradient + a bright square whose position depends on k."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 // w), (yy * 255 // h), np.full_like(xx, (37 * seed) % 256)], -1)
    arr[2 + k:8 + k, 3:9] = [250, 20 * k, 5]
    arr = arr.astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode == "L":
        return img.convert("L")
    if mode == "I;16":
        gray = np.asarray(img.convert("L")).astype(np.uint16) * 257
        return Image.fromarray(gray)  # 16-bit grayscale
    if mode == "RGBA":
        rgba = np.concatenate([arr, np.full((h, w, 1), 90, np.uint8)], -1)
        return Image.fromarray(rgba, "RGBA")
    if mode == "P":
        return img.quantize(colors=64)
    if mode == "CMYK":
        return img.convert("CMYK")
    return img


def _save_frame(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fmt = "JPEG" if img.mode in ("RGB", "CMYK") else "PNG"  # named .jpg as in the real layout
    img.save(path, format=fmt, quality=92)


def _reference_frame(path, image_size):
    img = Image.open(path)
    if img.mode == "I;16":
        img = Image.fromarray(np.round(np.asarray(img) / 257.0).astype(np.uint8), "L")
    img = img.convert("RGB")
    tf = transforms.Compose([transforms.Resize(image_size, transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(image_size), transforms.ToTensor()])
    return tf(img)


def _write_manifest(path, entries):
    # one entry per line, as data.write_manifest does, so error lines are predictable
    body = ",\n".join("  " + json.dumps(e) for e in entries)
    Path(path).write_text('{"data": [\n' + body + "\n]}\n")


CLASSES = ["/m/dog", "/m/cat", "/m/car", "/m/bird"]


def _write_label_csv(path, mids=CLASSES):
    lines = ["index,mid,display_name"] + [f'{i},{m},"Name, {m[3:]}"' for i, m in enumerate(mids)]
    Path(path).write_text("\n".join(lines) + "\n")


# (video_id, audio kind, channels, rate, seconds, frame mode, frame size, labels)
CLIPS = [
    ("u8", "pcm1", 1, 16000, 0.6, "RGB", (40, 30), "/m/dog"),
    ("s16", "pcm2", 2, 44100, 1.2, "L", (30, 40), "/m/cat,/m/dog"),
    ("s24", "pcm3", 1, 22050, 0.9, "RGBA", (36, 36), "/m/car"),
    ("s32", "pcm4", 2, 48000, 1.0, "P", (44, 28), "/m/bird"),
    ("f32", "float", 1, 16000, 1.1, "CMYK", (40, 30), "/m/cat"),
    ("ext", "ext16", 3, 8000, 0.7, "I;16", (40, 30), "/m/car, /m/bird"),
]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """A real-format dataset: WAVs of every supported encoding, frames of many modes."""
    root = tmp_path_factory.mktemp("real")
    entries, waves = [], {}
    for seed, (vid, kind, ch, rate, sec, mode, size, labels) in enumerate(CLIPS):
        x = _signal(int(sec * rate), rate, seed, ch)
        wav = root / "audio" / f"{vid}.wav"
        wav.parent.mkdir(exist_ok=True)
        if kind == "pcm1":
            ints = np.round(x * 127 + 128).astype(np.int64)
            _write_pcm_wav(wav, ints, 1, rate)
            decoded = (ints - 128) / 128.0
        elif kind in ("pcm2", "pcm3", "pcm4", "ext16"):
            bits = {"pcm2": 16, "pcm3": 24, "pcm4": 32, "ext16": 16}[kind]
            ints = np.round(x * (2 ** (bits - 1) - 1)).astype(np.int64)
            if kind == "ext16":
                _write_extensible_wav(wav, ints, rate)
            else:
                _write_pcm_wav(wav, ints, bits // 8, rate)
            decoded = ints / 2.0 ** (bits - 1)
        else:
            _write_float_wav(wav, x.astype(np.float32), rate)
            decoded = x.astype(np.float32).astype(np.float64)
        waves[vid] = (decoded, rate)
        for k in range(data.NUM_FRAMES):
            path = data.frame_path(str(root / "frames"), vid, k)
            _save_frame(_frame_image(k, seed, size, mode), path)
        # relative paths resolve against the manifest's folder
        entries.append({"video_id": vid, "wav": f"audio/{vid}.wav", "video_path": "frames",
                        "labels": labels})
    _write_manifest(root / "m.json", entries)
    _write_label_csv(root / "labels.csv")
    return root, waves


def _dataset(root, name="m.json", **kw):
    args = dict(label_csv=root / "labels.csv", audio_length=100, mel_bins=32, image_size=24,
                train=False, norm_mean=-3.0, norm_std=4.0)
    args.update(kw)
    return data.AudioVisualDataset(root / name, **args)


# ---------------------------------------------------------------------------
# Real-format manifest
# ---------------------------------------------------------------------------

def test_real_manifest_audio_matches_independent_fbank(real):
    root, waves = real
    ds = _dataset(root)
    assert len(ds) == len(CLIPS) and ds.num_classes == 4
    for i, (vid, *_rest) in enumerate(CLIPS):
        decoded, rate = waves[vid]
        ref = (_reference_fbank(decoded, rate, 100, 32) - (-3.0)) / 4.0
        got = ds[i]["audio"]
        assert got.shape == (100, 32)
        torch.testing.assert_close(got, ref, atol=2e-4, rtol=1e-4, msg=f"clip {vid}")
    # 0.6 s at 16 kHz = 58 frames: the rest is zero-padding (normalized zeros)
    pad = ds[0]["audio"][58:]
    assert torch.allclose(pad, torch.full_like(pad, 3.0 / 4.0))
    # read_wav gives the decoded samples themselves, channels first
    samples, rate = audio_io.read_wav(root / "audio" / "s24.wav")
    assert rate == 22050 and samples.shape == (1, waves["s24"][0].shape[0])
    np.testing.assert_allclose(samples.T, waves["s24"][0], atol=1e-7)


def test_real_manifest_frames_labels_and_eval_frame(real):
    root, _ = real
    ds = _dataset(root)
    for i, (vid, *_rest) in enumerate(CLIPS):
        item = ds[i]
        ref5 = _reference_frame(data.frame_path(str(root / "frames"), vid, data.EVAL_FRAME), 24)
        ref4 = _reference_frame(data.frame_path(str(root / "frames"), vid, 4), 24)
        assert item["frame"].shape == (3, 24, 24)
        assert item["frame"].dtype == torch.uint8   # scaled on the training device (augment.unit_range)
        torch.testing.assert_close(augment.unit_range(item["frame"]), ref5, atol=1e-6, rtol=0, msg=f"clip {vid}")
        assert (augment.unit_range(item["frame"]) - ref4).abs().max() > 0.05  # it is frame 5, not a neighbour
        assert item["index"] == i
    labels = torch.stack([ds[i]["label"] for i in range(len(ds))])
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [0, 1, 0, 0],
                             [0, 0, 1, 1]], dtype=torch.float32)
    assert torch.equal(labels, expected)
    eps = 0.1
    smooth = _dataset(root, label_smoothing=eps)
    assert torch.allclose(smooth[1]["label"], expected[1] * (1 - eps) + eps / 4)
    assert smooth.class_names[0] == "Name, dog"  # quoted CSV field with a comma


def test_training_frames_are_random_but_reproducible(real):
    root, _ = real
    ds = _dataset(root, train=True)
    refs = [_reference_frame(data.frame_path(str(root / "frames"), "u8", k), 24) for k in range(10)]
    picked = []
    for epoch in range(8):
        key = data.SampleKey(0, epoch, seed=5)
        a, b = (augment.unit_range(ds[key]["frame"]) for _ in range(2))
        assert torch.equal(a, b)
        matches = [k for k in range(10) if torch.allclose(a, refs[k], atol=1e-6)]
        assert len(matches) == 1
        picked.append(matches[0])
    assert len(set(picked)) > 2


def test_cached_fbanks_give_the_same_samples_and_are_computed_once(real, monkeypatch):
    root, _ = real
    plain, cached = _dataset(root, train=True), _dataset(root, train=True, cache_fbanks=True)
    reads = []
    real_fbank = cached.fbank
    monkeypatch.setattr(cached, "fbank", lambda wav, path: reads.append(path) or real_fbank(wav, path))
    for epoch in range(3):
        for i in range(len(plain)):
            key = data.SampleKey(i, epoch, seed=1)
            a, b = plain[key], cached[key]
            for name in ("audio", "frame", "label"):
                assert torch.equal(a[name], b[name]), (epoch, i, name)
    assert sorted(reads) == sorted(set(reads)) and len(reads) == len(plain)   # once per clip
    # off with mixup (waveforms are mixed before the fbank) and beyond the memory line
    assert _dataset(root, train=True, cache_fbanks=True, mixup=0.5)._kept is None
    monkeypatch.setattr(data, "FBANK_CACHE_BYTES", 4 * 100 * 32 * len(plain) - 1)
    assert _dataset(root, train=True, cache_fbanks=True)._kept is None
    monkeypatch.setattr(data, "FBANK_CACHE_BYTES", 4 * 100 * 32 * len(plain))
    assert _dataset(root, train=True, cache_fbanks=True)._kept == {}


def test_mixup_mixes_waveforms_frames_and_labels(tmp_path):
    # four one-class clips with constant-colour frames, so lambda and the partner are
    # readable from the label vector
    rates = [16000, 16000, 16000, 16000]
    lengths = [8000, 12000, 9000, 16000]
    colors = [(200, 10, 10), (10, 200, 10), (10, 10, 200), (120, 120, 120)]
    entries, waves = [], []
    for i in range(4):
        x = _signal(lengths[i], rates[i], i, 1)
        ints = np.round(x * 32767).astype(np.int64)
        _write_pcm_wav(tmp_path / f"c{i}.wav", ints, 2, rates[i])
        waves.append(ints[:, 0] / 32768.0)
        for k in range(10):
            path = data.frame_path(str(tmp_path / "f"), f"c{i}", k)
            _save_frame(Image.new("RGB", (30, 30), colors[i]), path)
        entries.append({"video_id": f"c{i}", "wav": f"c{i}.wav", "video_path": "f",
                        "labels": CLASSES[i]})
    _write_manifest(tmp_path / "m.json", entries)
    _write_label_csv(tmp_path / "labels.csv")
    ds = _dataset(tmp_path, train=True, mixup=1.0, audio_length=80)
    seen_lams = []
    for epoch in range(6):
        item = ds[data.SampleKey(1, epoch)]
        y = item["label"]
        assert y.sum().item() == pytest.approx(1.0, abs=1e-6)
        lam = y[1].item()
        if lam > 0.999:  # partner was the clip itself
            continue
        j = int(np.argmax(np.where(np.arange(4) == 1, -1, y.numpy())))
        seen_lams.append(lam)
        assert 0.1 < lam < 0.9
        want = torch.tensor(colors[1]) / 255 * lam + torch.tensor(colors[j]) / 255 * (1 - lam)
        assert torch.allclose(item["frame"][:, 5, 5], want, atol=2 / 255)
        a = torch.tensor(waves[1], dtype=torch.float32)
        a = a - a.mean()
        b = torch.tensor(waves[j], dtype=torch.float32)
        b = b - b.mean()
        b = torch.cat([b, torch.zeros(max(0, len(a) - len(b)))])[:len(a)]  # partner cut / padded
        mix = lam * a + (1 - lam) * b
        ref = _reference_fbank((mix - mix.mean()).numpy()[:, None].astype(np.float64), SR, 80, 32)
        torch.testing.assert_close(item["audio"], (ref + 3.0) / 4.0, atol=3e-4, rtol=1e-4)
    assert seen_lams
    # evaluation never mixes
    ev = _dataset(tmp_path, train=False, mixup=1.0, audio_length=80)
    assert torch.equal(ev[1]["label"], torch.tensor([0.0, 1.0, 0.0, 0.0]))


def test_box_in_crop_follows_the_resize_and_crop(tmp_path):
    w, h, size = 128, 112, 96
    arr = np.zeros((h, w, 3), np.uint8)
    box_px = (100, 30, 118, 50)  # x0, y0, x1, y1 near the right edge of the centre square
    arr[box_px[1]:box_px[3], box_px[0]:box_px[2]] = 255
    Image.fromarray(arr).save(tmp_path / "f.png")
    frame = augment.unit_range(data.load_frame(tmp_path / "f.png", size))
    box = data.box_in_crop([box_px[0] / w, box_px[1] / h, box_px[2] / w, box_px[3] / h], (w, h),
                           size)
    x0, y0, x1, y1 = [round(v * size) for v in box]
    inside = frame[0, y0 + 1:y1 - 1, x0 + 1:x1 - 1]
    assert inside.min() > 0.8
    outside = frame[0].clone()
    outside[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = 0
    assert outside.max() < 0.2


# ---------------------------------------------------------------------------
# Loader
# ---------------------------------------------------------------------------

def _batches(loader, epoch):
    loader.sampler.set_epoch(epoch)
    return [(b["index"].clone(), b["frame"].clone(), b["audio"].clone()) for b in loader]


def test_loader_is_reproducible_whatever_the_workers(real):
    root, _ = real
    ds = _dataset(root, train=True)
    serial = data.make_loader(ds, 4, train=True, num_workers=0, seed=3)
    parallel = data.make_loader(ds, 4, train=True, num_workers=2, seed=3)
    assert len(serial) == 1  # 6 clips, batch 4: drop_last at train
    e0, e1 = _batches(serial, 0), _batches(serial, 1)
    for a, b in zip(e0 + e1, _batches(parallel, 0) + _batches(parallel, 1)):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
    assert not torch.equal(e0[0][0], e1[0][0])  # reshuffled by set_epoch
    # set_epoch also reaches each sample's random state (here: which frame clip 0 shows)
    loader = data.make_loader(ds, 3, train=True, num_workers=0, seed=3)
    frames_of_clip0 = set()
    for epoch in range(5):
        for index, frame, _ in _batches(loader, epoch):
            frames_of_clip0.update(f.sum().item() for i, f in zip(index.tolist(), frame) if i == 0)
    assert len(frames_of_clip0) > 1
    ev = data.make_loader(_dataset(root), 4, train=False, num_workers=0)
    idx = torch.cat([b["index"] for b in ev])
    assert idx.tolist() == list(range(6))  # every clip, in order, at evaluation
    assert all(b["skipped"] == 0 and b["errors"] == [] for b in ev)


def test_training_loader_without_a_full_batch_is_an_error(real):
    root, _ = real
    with pytest.raises(data.DataError, match=r"m.json: 6 samples per process is less than one "
                                             r"batch of 8 \(1 process\(es\)\)"):
        data.make_loader(_dataset(root, train=True), 8, train=True, num_workers=0)
    assert len(data.make_loader(_dataset(root), 8, train=False, num_workers=0)) == 1  # eval: fine


def test_weighted_sampling_and_weight_files(tmp_path, real):
    root, _ = real
    ds = _dataset(root)
    w = ds.class_balanced_weights()
    counts = np.array([2, 2, 2, 2])  # dog, cat, car, bird each appear twice
    cw = 1000.0 / (counts + 0.01)
    np.testing.assert_allclose(w, [cw[0], cw[0] + cw[1], cw[2], cw[3], cw[1], cw[2] + cw[3]])
    sampler = data.WeightedEpochSampler([0, 1, 0, 3, 0, 0], num_samples=4000, seed=1)
    draws = np.array(list(sampler))
    assert set(draws.tolist()) == {1, 3} and 0.2 < np.mean(draws == 1) < 0.3
    (tmp_path / "w.csv").write_text("1.0\n2.0\n3.0\n")
    with pytest.raises(data.DataError, match="3 sampling weights for a manifest of 6"):
        data.load_sample_weights(tmp_path / "w.csv", 6)
    (tmp_path / "w.csv").write_text("\n".join(["0"] * 5 + ["2.5"]) + "\n")
    loader = data.make_loader(ds, 3, train=True, num_workers=0,
                              weights=data.load_sample_weights(tmp_path / "w.csv", 6))
    assert set(torch.cat([b["index"] for b in loader]).tolist()) == {5}


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ('{"data": []}', "manifest has no entries"),
    ('{"data": [\n  {"video_id": "a",\n  "wav": }\n]}', "malformed JSON at line 3"),
    ('[{"video_id": "a"}]', 'expected a JSON object {"data": [...]}'),
    ('{"data": {"video_id": "a"}}', '"data" must be a list'),
])
def test_empty_or_malformed_manifest(tmp_path, text, message):
    (tmp_path / "m.json").write_text(text)
    pattern = f"m.json: .*{message}".replace("[", r"\[").replace("{", r"\{")
    with pytest.raises(data.DataError, match=pattern):
        data.AudioVisualDataset(tmp_path / "m.json", norm_mean=0.0, norm_std=1.0)
    with pytest.raises(data.DataError, match="manifest not found"):
        data.read_manifest(tmp_path / "missing.json")


def _bad_copy(real_root, tmp_path, edit):
    """A copy of the real manifest with entry 2 edited; returns the manifest path."""
    entries = data.read_manifest(real_root / "m.json")
    for e in entries:
        e["wav"] = str(real_root / e["wav"])
        e["video_path"] = str(real_root / e["video_path"])
    edit(entries[2], tmp_path)
    _write_manifest(tmp_path / "bad.json", entries)
    _write_label_csv(tmp_path / "labels.csv")
    return tmp_path / "bad.json"


def test_unknown_label_fails_fast_or_is_skipped(tmp_path, real):
    root, _ = real
    _bad_copy(root, tmp_path, lambda e, d: e.update(labels="/m/car,/m/unicorn"))
    with pytest.raises(data.DataError) as err:
        _dataset(tmp_path, "bad.json")
    msg = str(err.value)
    assert "bad.json: entry 2 (line 4, video_id s24)" in msg and "/m/unicorn" in msg
    ds = _dataset(tmp_path, "bad.json", skip_bad=True)
    assert isinstance(ds[2], BadSample) and "/m/unicorn" in ds[2].message
    batch = data.collate([ds[i] for i in range(len(ds))])
    assert batch["skipped"] == 1 and batch["index"].tolist() == [0, 1, 3, 4, 5]
    assert batch["audio"].shape == (5, 100, 32) and "entry 2" in batch["errors"][0]


def test_zero_length_audio(tmp_path, real):
    root, _ = real

    def edit(e, d):
        _write_pcm_wav(d / "empty.wav", np.zeros((0, 1), np.int64), 2, 16000)
        e["wav"] = str(d / "empty.wav")
    _bad_copy(root, tmp_path, edit)
    ds = _dataset(tmp_path, "bad.json")
    with pytest.raises(data.DataError, match=r"bad.json: entry 2 \(line 4, video_id s24\): "
                                             r".*empty.wav: zero-length audio"):
        ds[2]
    tiny = tmp_path / "short.wav"
    _write_pcm_wav(tiny, np.zeros((100, 1), np.int64), 2, 16000)
    with pytest.raises(data.DataError, match="short.wav: audio too short"):
        data.load_audio_fbank(tiny, 100, 32)


def test_truncated_wav(tmp_path, real):
    root, _ = real
    full = (root / "audio" / "s16.wav").read_bytes()
    (tmp_path / "head.wav").write_bytes(full[:20])
    with pytest.raises(data.DataError, match="head.wav: truncated WAV header"):
        data.load_audio_fbank(tmp_path / "head.wav", 100, 32)
    (tmp_path / "cut.wav").write_bytes(full[:len(full) // 2])
    with pytest.raises(data.DataError, match=r"cut.wav: truncated WAV file \(data chunk declares"):
        data.load_audio_fbank(tmp_path / "cut.wav", 100, 32)
    (tmp_path / "tiny.wav").write_bytes(full[:6])
    with pytest.raises(data.DataError, match="tiny.wav: truncated WAV header"):
        audio_io.read_wav(tmp_path / "tiny.wav")


def test_missing_frame_folder_and_corrupt_frame(tmp_path, real):
    root, _ = real

    def edit(e, d):
        e["video_path"] = str(d / "nowhere")
    _bad_copy(root, tmp_path, edit)
    with pytest.raises(data.DataError, match=r"entry 2 .*nowhere/frame_5/s24.jpg: frame not found "
                                             r"\(folder .*nowhere/frame_5 does not exist\)"):
        _dataset(tmp_path, "bad.json")[2]
    good = (root / "frames" / "frame_5" / "u8.jpg").read_bytes()
    (tmp_path / "broken.jpg").write_bytes(good[:len(good) // 2])
    with pytest.raises(data.DataError, match="broken.jpg: cannot decode image"):
        data.load_frame(tmp_path / "broken.jpg", 24)


def test_other_containers_go_through_pyav(tmp_path, monkeypatch):
    (tmp_path / "a.flac").write_bytes(b"fLaC" + bytes(64))
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "av", None)  # as if PyAV were not installed
        with pytest.raises(data.DataError, match=r"a.flac: not a WAV file; reading it needs PyAV, "
                                                 r"and it is not installed: `pip install -r "
                                                 r"requirements-prepare.txt`"):
            audio_io.load_waveform(tmp_path / "a.flac")
    (tmp_path / "x.wav").write_bytes(b"ID3" + bytes(64))
    with pytest.raises(data.DataError, match="x.wav: not a RIFF/WAVE file"):
        audio_io.load_waveform(tmp_path / "x.wav")
    pytest.importorskip("av", reason=f"PyAV is an optional extra: {audio_io.PYAV_INSTALL}")
    with pytest.raises(data.DataError, match="a.flac: cannot decode audio"):
        audio_io.load_waveform(tmp_path / "a.flac")  # garbage after the magic bytes


def test_skip_bad_loader_and_bad_data_policy(tmp_path, real):
    root, _ = real

    def edit(e, d):
        e["video_path"] = str(d / "nowhere")
    _bad_copy(root, tmp_path, edit)
    ds = _dataset(tmp_path, "bad.json", skip_bad=True)
    loader = data.make_loader(ds, 3, train=False, num_workers=0)
    policy = BadDataPolicy(max_fraction=0.2, min_samples=100)
    batches = list(loader)
    kept = [policy.filter(b) for b in batches]  # 1 of 6 bad: below min_samples, not judged
    assert policy.skipped == 1 and policy.seen == 6
    assert [b["skipped"] for b in batches] == [1, 0]
    assert [k["index"].numel() for k in kept] == [2, 3]
    assert "nowhere" in policy.errors[0]
    with pytest.raises(data.DataError, match=r"1 of 3 samples were bad \(33.33% > 10.00% "):
        BadDataPolicy(max_fraction=0.1, min_samples=1).filter(batches[0])
    with pytest.raises(data.DataError, match=r"1 of 6 samples were bad \(16.67% > 10.00% "):
        policy.max_fraction = 0.1
        policy.check()  # the end-of-epoch test ignores min_samples
    ok = BadDataPolicy(max_fraction=0.5, min_samples=1)
    for b in batches:
        ok.filter(b)
    ok.check()
    # a batch made only of bad samples is empty, not zero-filled
    empty = data.collate([ds[2]])
    assert empty["index"].numel() == 0 and empty["audio"].shape == (0, 100, 32)
    assert empty["skipped"] == 1


def test_check_cli_reports_every_bad_entry(tmp_path, real, capsys):
    root, _ = real

    def edit(e, d):
        _write_pcm_wav(d / "empty.wav", np.zeros((0, 2), np.int64), 2, 44100)
        e["wav"] = str(d / "empty.wav")
        e["video_path"] = str(d / "nowhere")
    manifest = _bad_copy(root, tmp_path, edit)
    entries = data.read_manifest(manifest)
    entries[4]["labels"] = "/m/unicorn"
    entries.append(dict(entries[0]))  # duplicate video_id
    _write_manifest(manifest, entries)
    rc = data.main(["check", str(manifest), "--label_csv", str(tmp_path / "labels.csv")])
    out = capsys.readouterr().out
    assert rc == 1
    assert "BAD " in out and "entry 2 (line 4, video_id s24)" in out
    assert "empty.wav: zero-length audio" in out and "no frames found" in out
    assert "entry 4 (line 6, video_id f32)" in out and "/m/unicorn" in out
    assert "entry 6" in out and "duplicate video_id 'u8' (also entry 0)" in out
    assert "7 entries, 3 bad" in out
    assert data.main(["check", str(root / "m.json"), "--label_csv", str(root / "labels.csv")]) == 0
    assert "6 entries, 0 bad" in capsys.readouterr().out
    assert data.main(["check", str(tmp_path / "missing.json")]) == 2
    assert "manifest not found" in capsys.readouterr().err


def test_check_finds_the_label_csv_or_says_labels_were_not_checked(tmp_path, real, capsys):
    root, _ = real
    manifest = _bad_copy(root, tmp_path, lambda e, d: e.update(labels="/m/unicorn"))
    # no class CSV under the standard name: the unknown label passes, and check says so
    assert data.main(["check", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "labels NOT checked" in out and "6 entries, 0 bad" in out
    # class_labels_indices.csv next to the manifest is found, as stats.json is
    _write_label_csv(tmp_path / "class_labels_indices.csv")
    assert data.main(["check", str(manifest)]) == 1
    out = capsys.readouterr().out
    assert f"labels checked against {tmp_path / 'class_labels_indices.csv'}" in out
    assert "entry 2 (line 4, video_id s24)" in out and "/m/unicorn" in out
    assert "6 entries, 1 bad" in out


def test_missing_stats_error_tells_how_to_fix(real):
    root, _ = real
    with pytest.raises(data.DataError, match=r"python data.py stats .*m.json --write"):
        data.AudioVisualDataset(root / "m.json")


# ---------------------------------------------------------------------------
# Statistics and normalization options
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "toy"
    toy_module.make_toy_dataset(root, num_workers=0, n_train=16, n_test=8, n_retrieval=4,
                                n_train_multilabel=0, n_test_multilabel=0, n_distractor=0)
    return toy_module.toy_paths(root)


def test_stats_cli_writes_json(toy, tmp_path, capsys):
    out = tmp_path / "s.json"
    assert data.main(["stats", toy["test"], "--audio_length", "256", "--mel_bins", "64",
                      "--out", str(out)]) == 0
    stats = json.loads(out.read_text())
    ds = data.AudioVisualDataset(toy["test"], audio_length=256, mel_bins=64, image_size=96,
                                 train=False, norm_mean=0.0, norm_std=1.0)
    fb = torch.stack([ds[i]["audio"] for i in range(len(ds))]).double()
    assert stats["mean"] == pytest.approx(fb.mean().item(), rel=1e-6)
    assert stats["std"] == pytest.approx(fb.std(unbiased=False).item(), rel=1e-6)
    assert stats["num_clips"] == 8 and '"mean"' in capsys.readouterr().out


def test_resolve_norm_stats_options(toy):
    # auto: the checkpoint's statistics when given, else stats.json next to the manifest
    stats = json.loads(Path(toy["stats"]).read_text())
    assert data.resolve_norm_stats("auto", toy["train"]) == (stats["mean"], stats["std"])
    assert data.resolve_norm_stats("auto", toy["train"], [-3.0, 2.5]) == (-3.0, 2.5)
    assert data.resolve_norm_stats("AudioSet") == data.KNOWN_STATS["audioset"]
    assert data.resolve_norm_stats(" -4.5, 3 ") == (-4.5, 3.0)
    assert data.resolve_norm_stats("dataset", toy["train"], [-3.0, 2.5]) == (stats["mean"], stats["std"])
    with pytest.raises(ValueError, match="--norm_stats must be auto, dataset, audioset, vggsound or MEAN,STD"):
        data.resolve_norm_stats("imagenet")
    with pytest.warns(UserWarning, match="computed with mel_bins=64, the dataset uses 128"):
        data.resolve_norm_stats("auto", toy["train"], None, audio_length=256, mel_bins=128)


# ---------------------------------------------------------------------------
# Unlabelled manifests, non-finite features, loader workers
# ---------------------------------------------------------------------------

def test_unlabelled_manifest_passes_check_and_fails_finetuning_with_the_reason(tmp_path, real, capsys):
    root, _ = real
    manifest = _bad_copy(root, tmp_path, lambda e, d: None)
    entries = data.read_manifest(manifest)
    for e in entries:
        e["labels"] = ""                     # prepare.py without --labels
    _write_manifest(manifest, entries)
    # a header-only class CSV beside it, as earlier prepare.py versions wrote one
    (tmp_path / data.LABEL_CSV_NAME).write_text("index,mid,display_name\n")
    n, bad, label_csv = data.check_manifest(manifest)
    assert (n, bad, label_csv) == (6, [], None)
    assert data.main(["check", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "labels NOT checked: no entry has labels (an unlabelled manifest" in out
    assert "6 entries, 0 bad" in out
    assert len(_dataset(tmp_path, "bad.json", label_csv=None)) == 6   # pretraining reads it
    with pytest.raises(data.DataError, match=r"bad.json: no entry has labels .*needs labelled"):
        _dataset(tmp_path, "bad.json", label_csv=root / "labels.csv", skip_bad=True)


def test_huge_float_samples_are_a_named_bad_sample(tmp_path, real):
    root, _ = real

    def edit(e, d):   # finite samples whose power overflows float32: an unnormalised export
        tone = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)[:, None]
        _write_float_wav(d / "loud.wav", (1e30 * tone).astype(np.float32), 16000)
        e["wav"] = str(d / "loud.wav")
    manifest = _bad_copy(root, tmp_path, edit)
    assert np.isfinite(audio_io.read_wav(tmp_path / "loud.wav")[0]).all()
    with pytest.raises(data.DataError, match=r"bad.json: entry 2 \(line 4, video_id s24\): "
                                             r".*loud.wav: non-finite features \(float samples "
                                             r"up to 1e\+30\)"):
        _dataset(tmp_path, "bad.json")[2]
    skipped = _dataset(tmp_path, "bad.json", skip_bad=True)[2]
    assert isinstance(skipped, BadSample) and "non-finite features" in skipped.message
    assert torch.isfinite(_dataset(tmp_path, "bad.json")[1]["audio"]).all()   # the others load
    _, bad, _ = data.check_manifest(manifest, root / "labels.csv")
    assert [b.index for b in bad] == [2] and "non-finite features" in bad[0].reasons[0]


def test_non_finite_frame_is_a_named_bad_sample(real, monkeypatch):
    root, _ = real
    ds = _dataset(root)
    monkeypatch.setattr(data, "load_frame", lambda path, size: torch.full((3, size, size), float("nan")))
    with pytest.raises(data.DataError, match=r"entry 0 .*frame_5.*: non-finite pixel values"):
        ds[0]


def test_default_workers_fit_the_machine(monkeypatch):
    import finetune
    import pretrain
    import utils
    monkeypatch.setattr(utils, "available_cores", lambda: 3)
    assert pretrain.resolve_config(pretrain.PretrainConfig(data="x.json")).num_workers == 3
    assert finetune.resolve_config(finetune.FinetuneConfig(
        train="a.json", test="b.json", init="c.pt")).num_workers == 3
    monkeypatch.setattr(utils, "available_cores", lambda: 64)
    assert pretrain.resolve_config(pretrain.PretrainConfig(data="x.json")).num_workers == 8
    toy = pretrain.resolve_config(pretrain.PretrainConfig())   # the toy loads in-process, and
    assert (toy.num_workers, toy.cpu_threads) == (0, 0)        # its threads take every core
    assert pretrain.resolve_config(pretrain.PretrainConfig(data="x.json", num_workers=0)).num_workers == 0
