"""toy.py: the synthetic audio-visual world is deterministic, in the real layout,
carries what its documentation says (boxes, shared attributes), and is generated
safely by concurrent callers."""

import colorsys
import json
import multiprocessing
import os
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import data
import toy as toy_module


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread in this module: the concurrency test forks, and a forked child
    can deadlock in a thread pool its parent had started. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------
# Toy dataset
# ---------------------------------------------------------------------------

TOY_SIZES = dict(n_train=16, n_test=8, n_retrieval=4, n_train_multilabel=6, n_test_multilabel=2,
                 n_distractor=3)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "toy"
    toy_module.make_toy_dataset(root, num_workers=0, **TOY_SIZES)
    return toy_module.toy_paths(root)


def _all_files(root):
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_toy_is_deterministic_and_independent_of_workers(toy, tmp_path):
    again = tmp_path / "again"
    toy_module.make_toy_dataset(again, num_workers=2, **TOY_SIZES)
    first, second = _all_files(toy["root"]), _all_files(again)
    assert first.keys() == second.keys()
    # 32 clips of 11 files, 3 distractor clips of 10 frames and 2 WAVs; 7 manifests, csv,
    # stats, toy.json
    assert len(first) == 32 * 11 + 3 * 12 + 10
    for name in first:
        assert first[name] == second[name], name
    other = tmp_path / "other"
    toy_module.make_toy_dataset(other, seed=1, num_workers=0, n_train=2, n_test=1, n_retrieval=1,
                          n_train_multilabel=0, n_test_multilabel=0, n_distractor=0)
    wav = "audio/toy_train_00000.wav"
    assert (other / wav).read_bytes() != first[wav]
    with pytest.raises(FileExistsError):
        toy_module.make_toy_dataset(again, num_workers=0, **TOY_SIZES)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def _hue_of(rgb):
    return colorsys.rgb_to_hsv(*rgb)[0]


def test_toy_manifests_boxes_and_shared_attributes(toy):
    mids, names = data.read_label_csv(toy["label_csv"])
    assert mids == [c[0] for c in toy_module.TOY_CLASSES] and len(mids) == 8
    test = data.read_manifest(toy["test"])
    assert data.read_manifest(toy["retrieval"]) == test[:4]
    train = data.read_manifest(toy["train"])
    multi = data.read_manifest(toy["train_multilabel"])
    w, h = toy_module.TOY_FRAME_SIZE
    root = Path(toy["root"])
    for e in train + multi:
        objs = e["objects"]
        assert e["labels"] == ",".join(o["label"] for o in objs) and e["frame_size"] == [w, h]
        assert len(objs) == (2 if e in multi else 1)
        assert len({o["label"] for o in objs}) == len(objs)
        assert len(e["boxes"]) == data.NUM_FRAMES
        for frame_boxes in e["boxes"]:
            assert len(frame_boxes) == len(objs)
            for x0, y0, x1, y1 in frame_boxes:
                # inside the frame, and inside the centre square that the model's crop keeps
                assert 0 <= y0 < y1 <= 1 and (w - h) / 2 / w <= x0 < x1 <= 1 - (w - h) / 2 / w
        with wave.open(str(root / e["wav"])) as f:
            assert (f.getframerate(), f.getsampwidth(), f.getnchannels()) == (16000, 2, 1)
            assert f.getnframes() == round(toy_module.TOY_DURATION * 16000)
    # pitch <-> hue and rate <-> size, read back from the files
    for e in train:
        obj, box = e["objects"][0], e["boxes"][0][0]
        img = np.asarray(Image.open(root / data.frame_path(e["video_path"], e["video_id"], 0)))
        x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
        patch = img[y0:y1, x0:x1].reshape(-1, 3) / 255.0
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in patch])
        vivid = hsv[hsv[:, 1] > 0.6]
        assert len(vivid) > 20
        hue = np.median(vivid[:, 0])
        want = 0.83 * obj["pitch"]  # the documented mappings, written out
        assert min(abs(hue - want), 1 - abs(hue - want)) < 0.03, e["video_id"]
        if obj["label"] == "/toy/flute":  # circle of the rate's size; harmonics of the pitch's f0
            # VGG-SS-sized: the box covers 4 % (rate 0) to 64 % (rate 1) of the model's
            # crop, log-uniformly; the crop is the frame's central h x h square
            side = h * (0.04 * 16 ** obj["rate"]) ** 0.5
            assert abs((x1 - x0) - side) <= 2 and abs((y1 - y0) - side) <= 2
            with wave.open(str(root / e["wav"])) as f:
                x = np.frombuffer(f.readframes(f.getnframes()), "<i2").astype(np.float64)
            spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
            freqs = np.fft.rfftfreq(len(x), 1 / 16000)
            band = (freqs > 200) & (freqs < 1000)
            peak = freqs[band][np.argmax(spec[band])]
            assert abs(peak - 220 * 2 ** (2 * obj["pitch"])) < 5


def test_toy_loads_with_its_stats(toy):
    ds = data.AudioVisualDataset(toy["train"], toy["label_csv"], audio_length=256, mel_bins=64,
                                 image_size=96, train=False)
    items = [ds[i] for i in range(len(ds))]
    audio = torch.stack([it["audio"] for it in items]).double()
    # stats.json holds the train split's moments: the normalized split has mean 0, std 1
    assert abs(audio.mean().item()) < 1e-4 and abs(audio.std().item() - 1) < 1e-3
    assert all(it["frame"].shape == (3, 96, 96) for it in items)
    classes = [int(it["label"].argmax()) for it in items]
    assert classes == [i % 8 for i in range(len(ds))]
    assert all(it["label"].sum() == 1 for it in items)
    multi = data.AudioVisualDataset(toy["train_multilabel"], toy["label_csv"], audio_length=256,
                                    mel_bins=64, image_size=96, train=True)
    assert all(len(multi.label_indices(i)) == 2 for i in range(len(multi)))
    stats = json.loads(Path(toy["stats"]).read_text())
    again = data.compute_stats(toy["train"], audio_length=256, mel_bins=64)
    assert again["mean"] == pytest.approx(stats["mean"], rel=1e-9)
    assert again["std"] == pytest.approx(stats["std"], rel=1e-9)


def _ensure(root, queue):
    queue.put(toy_module.ensure_toy_dataset(root, num_workers=0, n_train=4, n_test=2, n_retrieval=1,
                                      n_train_multilabel=0, n_test_multilabel=0, n_distractor=0))


def test_ensure_toy_dataset_is_safe_with_concurrent_callers(tmp_path):
    root = tmp_path / "shared" / "toy"
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(str(root), queue)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0]
    results = [queue.get(timeout=5), queue.get(timeout=5)]
    assert results[0] == results[1] == toy_module.toy_paths(root)
    assert sorted(p.name for p in root.parent.iterdir()) == ["toy"]  # no temp folder, no lock
    assert len(data.read_manifest(results[0]["train"])) == 4
    # already there: returned as is; a foreign non-empty folder is refused
    assert toy_module.ensure_toy_dataset(root) == results[0]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "file").write_text("x")
    with pytest.raises(data.DataError, match="not a complete toy dataset"):
        toy_module.ensure_toy_dataset(tmp_path / "junk")
    (tmp_path / "junk" / "toy.json").write_text('{"version": 0}')
    with pytest.raises(data.DataError, match="another version of toy.py"):
        toy_module.ensure_toy_dataset(tmp_path / "junk")


def test_distractor_split_two_objects_one_sounds_and_its_swap(toy, capsys):
    root = Path(toy["root"])
    clips = data.read_manifest(toy["test_distractor"])
    swaps = data.read_manifest(toy["test_distractor_swap"])
    assert len(clips) == len(swaps) == 3
    w, h = toy_module.TOY_FRAME_SIZE
    for e, x in zip(clips, swaps):
        labels = [o["label"] for o in e["objects"]]
        assert len(labels) == 2 and labels[0] != labels[1]                  # two classes
        hues = [0.83 * o["pitch"] for o in e["objects"]]
        assert min(abs(hues[0] - hues[1]), 1 - abs(hues[0] - hues[1])) >= 0.25  # two hues
        # the same frames (video_id) with the other object's sound
        assert x["video_id"] == e["video_id"] and x["wav"] != e["wav"]
        assert sorted(e["sounding"] + x["sounding"]) == [0, 1]
        assert e["labels"] == labels[e["sounding"][0]] and x["labels"] == labels[x["sounding"][0]]
        assert all(len(frame_boxes) == 2 for frame_boxes in e["boxes"]) and x["boxes"] == e["boxes"]
        # each object is drawn in its own box, in the hue of its pitch
        img = np.asarray(Image.open(root / data.frame_path(e["video_path"], e["video_id"], 0)))
        for o, box in zip(e["objects"], e["boxes"][0]):
            x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
            hsv = np.array([colorsys.rgb_to_hsv(*p) for p in img[y0:y1, x0:x1].reshape(-1, 3) / 255])
            hue = np.median(hsv[hsv[:, 1] > 0.6][:, 0])
            want = 0.83 * o["pitch"]
            assert min(abs(hue - want), 1 - abs(hue - want)) < 0.03
        a, b = (np.frombuffer((root / m["wav"]).read_bytes()[44:], "<i2") for m in (e, x))
        assert a.shape == b.shape and not np.array_equal(a, b)
    # a valid manifest: data.py check passes (labels checked against the toy's class CSV)
    for manifest in (toy["test_distractor"], toy["test_distractor_swap"]):
        assert data.main(["check", manifest]) == 0
        assert "labels checked against" in capsys.readouterr().out


def test_class_survives_every_augmentation_without_training(tmp_path_factory):
    """The toy's premise (method.md §8 distorts the pairing, not the class): fixed class features
    with a nearest-centroid classifier, fitted on clean training clips, keep most of their
    clean accuracy on test clips under each augmentation group and under all together."""
    root = tmp_path_factory.mktemp("cue") / "toy"
    toy_module.make_toy_dataset(root, n_train=160, n_test=80, n_retrieval=0, n_train_multilabel=0,
                                n_test_multilabel=0, n_distractor=0, num_workers=0)
    result = toy_module.cue_check(root)
    audio, visual = result["audio"], result["visual"]
    assert set(audio) == {"clean", "all", *toy_module.augment.AUDIO_GROUPS}
    assert audio["clean"] >= 80 and visual["clean"] >= 30          # chance 12.5
    for group, acc in audio.items():
        assert acc >= (0.6 if group == "all" else 0.75) * audio["clean"], (group, audio)
    for group, acc in visual.items():
        assert acc >= 0.5 * visual["clean"], (group, visual)
    # the features see the class, not the instance: a shuffled fit scores near chance
    paths = toy_module.toy_paths(root)
    ds = data.AudioVisualDataset(paths["train"], paths["label_csv"], audio_length=256, mel_bins=64,
                                 image_size=96, train=False)
    x = torch.stack([ds[i]["audio"] for i in range(len(ds))])
    y = torch.tensor([ds.label_indices(i)[0] for i in range(len(ds))])
    f = toy_module.audio_cue_features(x)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert toy_module.nearest_centroid_accuracy(f, shuffled, f, y) < 40


def test_negative_sound_manifests_follow_their_rules(tmp_path):
    """silence is zeros; noise has the clip's own RMS; the off-screen sound is another test
    clip's, none of whose labels is an object of this frame; the frames are the split's."""
    import audio_io
    root = tmp_path / "toy"
    toy_module.make_toy_dataset(root, n_train=0, n_test=6, n_retrieval=6, n_train_multilabel=0,
                         n_test_multilabel=0, n_distractor=0, num_workers=0)
    paths = toy_module.toy_paths(root)
    manifests = toy_module.negative_manifests(root, "retrieval")
    split = data.read_manifest(paths["retrieval"])
    for kind, path in manifests.items():
        entries = data.read_manifest(path)
        assert [e["video_id"] for e in entries] == [e["video_id"] for e in split]
        assert all(e["negative"] == kind and e["boxes"] == s["boxes"] for e, s in zip(entries, split))
    raw = {}
    for kind in toy_module.NEGATIVES:
        raw[kind] = [audio_io.read_wav(os.path.join(paths["root"], e["wav"]))[0][0]
                     for e in data.read_manifest(manifests[kind])]
    assert all((w == 0).all() for w in raw["silence"])
    for e, w in zip(split, raw["noise"]):
        own = audio_io.load_waveform(os.path.join(paths["root"], e["wav"])).numpy()
        assert np.sqrt(np.mean(w ** 2)) == pytest.approx(np.sqrt(np.mean(own ** 2)), rel=0.05)
    wavs = {e["wav"]: e for e in split}
    for e, o in zip(split, data.read_manifest(manifests["offscreen"])):
        other = wavs[o["wav"]]
        assert other is not e
        assert not set(other["labels"].split(",")) & {x["label"] for x in e["objects"]}
    assert toy_module.negative_manifests(root, "retrieval") == manifests   # written once
