"""prepare.py on media encoded here with PyAV (CI has no FFmpeg binary and no network):
videos and sound + picture pairs become the layout data.py reads, failures are named,
an interrupted run resumes. Skipped, with the install command, without PyAV."""
import json
import os
import wave

import numpy as np
import pytest
from PIL import Image

import audio_io
import data
import prepare

av = pytest.importorskip("av", reason=f"PyAV is an optional extra: {audio_io.PYAV_INSTALL}")

FPS, W, H = 10, 64, 48


def encode_video(path, seconds=3.0, tone=440.0, with_audio=True):
    """A white square moving 10 px per second to the right, and a tone (stereo, 44.1 kHz)."""
    c = av.open(str(path), "w")
    vs = c.add_stream("mpeg4", rate=FPS)
    vs.width, vs.height, vs.pix_fmt = W, H, "yuv420p"
    if with_audio:
        aus = c.add_stream("aac", rate=44100)
        aus.layout = "stereo"
    for i in range(int(seconds * FPS)):
        img = np.zeros((H, W, 3), np.uint8)
        x = int(4 + 10 * i / FPS)
        img[18:30, x:x + 12] = 255
        for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in vs.encode():
        c.mux(p)
    if with_audio:
        _encode_tone(c, aus, seconds, tone, 44100, "fltp", stereo=True)
    c.close()


def _encode_tone(c, stream, seconds, tone, rate, fmt, stereo):
    n = int(seconds * rate)
    x = (0.5 * np.sin(2 * np.pi * tone * np.arange(n) / rate)).astype(np.float32)
    step = stream.codec_context.frame_size or 1024
    for start in range(0, n, step):
        chunk = x[start:start + step]
        if fmt.startswith("s16"):
            chunk = (chunk * 32767).astype(np.int16)
        elif fmt.startswith("s32"):
            chunk = (chunk * 2147483647).astype(np.int32)
        planes = np.stack([chunk] * (2 if stereo else 1))
        f = av.AudioFrame.from_ndarray(np.ascontiguousarray(planes), format=fmt,
                                       layout="stereo" if stereo else "mono")
        f.sample_rate, f.pts = rate, start
        for p in stream.encode(f):
            c.mux(p)
    for p in stream.encode():
        c.mux(p)


def encode_sound(path, codec, seconds=1.5, tone=660.0, rate=44100, silent=False):
    c = av.open(str(path), "w")
    s = c.add_stream(codec, rate=rate)
    s.layout = "mono"
    fmt = s.codec_context.format.name
    _encode_tone(c, s, seconds, 0.0 if silent else tone, rate, fmt, stereo=False)
    c.close()


def square_x(path):
    """The column of the bright square's centre in a frame."""
    img = np.asarray(Image.open(path).convert("L")).astype(float)
    cols = np.nonzero(img.max(axis=0) > 128)[0]
    return (cols[0] + cols[-1]) / 2


def peak_hz(path):
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        x = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(float)
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / 16000)[spec.argmax()], len(x)


def test_videos_become_clips_frames_at_1_fps_and_a_16k_mono_wav(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    encode_video(videos / "moving.mp4")
    (tmp_path / "labels.csv").write_text("video_id,labels\nmoving,/m/tone\n")
    cfg = prepare.PrepareConfig(videos=str(videos), labels=str(tmp_path / "labels.csv"),
                                out=str(tmp_path / "out"), audio_length=128, mel_bins=32)
    entries, failures = prepare.main(cfg)
    assert failures == {} and len(entries) == 1
    e = entries[0]
    out = tmp_path / "out"
    assert e["labels"] == "/m/tone" and e["frames_repeated"] == 7    # 3 s: frames 3..9 repeat
    xs = [square_x(data.frame_path(out / "frames", "moving", k)) for k in range(data.NUM_FRAMES)]
    # frame k is the frame at k seconds: the square moved 10 px per second, then stays
    assert [round(x - xs[0]) for x in xs[:3]] == [0, 10, 20] and xs[3:] == [xs[2]] * 7
    hz, n = peak_hz(out / e["wav"])
    assert abs(hz - 440) < 3 and abs(n - 3 * 16000) < 0.05 * 16000
    assert e["duration"] == pytest.approx(n / 16000, abs=1e-3)
    # the manifest passes data.py check (labels against the written class CSV); stats.json
    assert data.main(["check", str(out / "data.json")]) == 0
    assert "labels checked against" in capsys.readouterr().out
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["audio_length"], stats["mel_bins"], stats["num_clips"]) == (128, 32, 1)


def test_pairs_from_encoded_sounds_and_pictures(tmp_path):
    (tmp_path / "media").mkdir()
    encode_sound(tmp_path / "media" / "horn.mp3", "libmp3lame", tone=660.0)
    encode_sound(tmp_path / "media" / "bell.ogg", "libopus", tone=880.0, rate=48000)
    rgba = np.zeros((40, 30, 4), np.uint8)
    rgba[10:20, 5:15] = [200, 30, 30, 255]                  # an opaque red patch, the rest clear
    Image.fromarray(rgba, "RGBA").save(tmp_path / "media" / "horn.png")
    Image.new("RGB", (50, 50), (20, 200, 20)).save(tmp_path / "media" / "bell.png")
    (tmp_path / "pairs.csv").write_text("audio,image,labels\nmedia/horn.mp3,media/horn.png,brass\n"
                                        "media/bell.ogg,media/bell.png,\"metal,bells\"\n")
    out = tmp_path / "out"
    entries, failures = prepare.main(prepare.PrepareConfig(pairs=str(tmp_path / "pairs.csv"),
                                                           out=str(out), test_fraction=0.5))
    assert failures == {} and [e["video_id"] for e in entries] == ["horn", "bell"]
    for e, tone in zip(entries, (660, 880)):
        hz, n = peak_hz(out / e["wav"])
        assert abs(hz - tone) < 4 and abs(n - 1.5 * 16000) < 0.1 * 16000
        first = np.asarray(Image.open(data.frame_path(out / "frames", e["video_id"], 0)))
        last = np.asarray(Image.open(data.frame_path(out / "frames", e["video_id"], 9)))
        assert np.array_equal(first, last)                  # ten copies of the picture
    horn = np.asarray(Image.open(data.frame_path(out / "frames", "horn", 0))).astype(int)
    assert horn[15, 10, 0] > 150 and horn[15, 10, 1] < 80   # the red patch
    assert horn[2, 2].min() > 235                           # transparency laid over white
    assert entries[1]["labels"] == "metal,bells"
    mids, _ = data.read_label_csv(out / "class_labels_indices.csv")
    assert mids == ["bells", "brass", "metal"]
    split = [len(data.read_manifest(out / n)) for n in ("train.json", "test.json")]
    assert sum(split) == 2
    # the loader reads non-WAV audio through PyAV too: the same samples prepare wrote
    wav = audio_io.load_waveform(out / "audio" / "horn.wav")
    direct = audio_io.load_waveform(tmp_path / "media" / "horn.mp3")
    assert abs(wav.numel() - direct.numel()) <= 1
    assert np.corrcoef(wav[:8000].numpy(), direct[:8000].numpy())[0, 1] > 0.99


def test_every_failure_is_named_and_blocks_the_manifest(tmp_path, capsys):
    media = tmp_path / "media"
    media.mkdir()
    encode_video(media / "good.mp4", seconds=1.2)
    encode_video(media / "mute.mp4", seconds=1.2, with_audio=False)
    (media / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    out = tmp_path / "out"
    cfg = prepare.PrepareConfig(videos=str(media), out=str(out))
    entries, failures = prepare.main(cfg)
    assert sorted(failures) == ["broken", "mute"]
    # with --labels, a video it does not list is reported too
    (tmp_path / "labels.csv").write_text("video_id,labels\nmute,x\nbroken,x\n")
    _, listed = prepare.main(prepare.PrepareConfig(videos=str(media), out=str(tmp_path / "l"),
                                                   labels=str(tmp_path / "labels.csv")))
    assert "good.mp4: video_id 'good' is not in" in listed["good"]
    assert "broken.mp4: cannot decode" in failures["broken"]
    assert "mute.mp4: no audio track" in failures["mute"]
    report = capsys.readouterr().err
    assert "2 of 3 inputs failed" in report and "no manifest written" in report
    assert not (out / "data.json").exists() and "mute" in (out / "failures.txt").read_text()
    # pictures that do not decode, and silent placeholders, in pairs
    encode_sound(media / "quiet.ogg", "libopus", silent=True, rate=48000)
    encode_sound(media / "ok.ogg", "libopus", rate=48000)
    (media / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    Image.new("RGB", (8, 8)).save(media / "fine.png")
    (tmp_path / "pairs.csv").write_text("audio,image,labels\nmedia/ok.ogg,media/bad.png,a\n"
                                        "media/quiet.ogg,media/fine.png,a\n"
                                        "media/good.mp4,media/fine.png,a\n")
    entries, failures = prepare.main(prepare.PrepareConfig(pairs=str(tmp_path / "pairs.csv"),
                                                           out=str(tmp_path / "p"),
                                                           allow_failures=True))
    assert "bad.png: cannot read the picture" in failures["ok"]
    assert "quiet.ogg: silent audio (peak" in failures["quiet"]
    assert [e["video_id"] for e in entries] == ["good"]      # a video's sound with a picture
    assert len(data.read_manifest(tmp_path / "p" / "data.json")) == 1  # --allow_failures


def test_resume_after_a_kill_keeps_finished_clips_and_redoes_the_unfinished(tmp_path,
                                                                             monkeypatch):
    media = tmp_path / "media"
    media.mkdir()
    for name in ("a", "b", "c"):
        encode_video(media / f"{name}.mp4", seconds=1.0)
    cfg = prepare.PrepareConfig(videos=str(media), out=str(tmp_path / "out"))
    replace = prepare.os.replace

    def killed_moving_b_wav(src, dst):
        if str(dst).endswith("b.wav"):   # b's frames are in place, its WAV and record not yet
            raise KeyboardInterrupt
        return replace(src, dst)

    monkeypatch.setattr(prepare.os, "replace", killed_moving_b_wav)
    with pytest.raises(KeyboardInterrupt):
        prepare.main(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "clips").iterdir()) == ["a.json"]
    assert os.path.exists(data.frame_path(out / "frames", "b", 9))
    assert not (out / "audio" / "b.wav").exists() and (out / ".partial" / "b").exists()
    done_a = (out / "clips" / "a.json").stat().st_mtime_ns
    monkeypatch.setattr(prepare.os, "replace", replace)
    original, calls = prepare.audio_io.decode_audio, []
    monkeypatch.setattr(prepare.audio_io, "decode_audio",
                        lambda path, *a, **kw: calls.append(path) or original(path, *a, **kw))
    entries, failures = prepare.main(cfg)
    assert failures == {} and [e["video_id"] for e in entries] == ["a", "b", "c"]
    assert [p.rsplit("/", 1)[-1] for p in calls] == ["b.mp4", "c.mp4"]   # a was kept
    assert (out / "clips" / "a.json").stat().st_mtime_ns == done_a
    assert not (out / ".partial").exists() or not any((out / ".partial").iterdir())


def test_videos_without_labels_are_an_unlabelled_set_that_passes_check(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    encode_video(videos / "a.mp4", seconds=2.0)
    encode_video(videos / "b.mp4", seconds=2.0, tone=660.0)
    out = tmp_path / "out"
    entries, failures = prepare.main(prepare.PrepareConfig(videos=str(videos), out=str(out),
                                                           audio_length=128, mel_bins=32))
    assert failures == {} and [e["labels"] for e in entries] == ["", ""]
    assert not (out / data.LABEL_CSV_NAME).exists()          # no class list without classes
    assert "no class CSV" in capsys.readouterr().out
    assert data.main(["check", str(out / "data.json")]) == 0
    printed = capsys.readouterr().out
    assert "labels NOT checked: no entry has labels" in printed and "2 entries, 0 bad" in printed
