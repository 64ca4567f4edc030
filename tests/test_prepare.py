"""prepare.py on media encoded here with PyAV (CI has no FFmpeg binary and no network):
videos and sound + picture pairs become the layout data.py reads, failures are named,
an interrupted run resumes. Skipped, with the install command, without PyAV."""
import dataclasses
import json
import os
import sys
import wave

import numpy as np
import pytest
import torch
from PIL import Image

import audio_io
import data
import localize
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
    _encode_squares(c, vs, [int(4 + 10 * i / FPS) for i in range(int(seconds * FPS))], 12)
    if with_audio:
        _encode_tone(c, aus, seconds, tone, 44100, "fltp", stereo=True)
    c.close()


def _encode_squares(c, stream, xs, width):
    """One frame per x of xs: black, with a white square `width` px wide at column x."""
    for x in xs:
        img = np.zeros((stream.height, stream.width, 3), np.uint8)
        img[18:30, x:x + width] = 255
        for p in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in stream.encode():
        c.mux(p)


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


# ===========================================================================
# Segment lists (--segments), fetching (--fetch), evaluation subsets (--vggss, --ids)
# ===========================================================================

SW, SH, SR = 96, 48, 16000


def encode_seconds(path, seconds, first=0, with_audio=True, with_video=True):
    """A video whose second k (k = first, first + 1, ...) shows a white square at
    x = 2 + 5 k and sounds a tone of 300 + 100 k Hz: what any second of a cut came from
    can be read off its picture and its sound (MPEG-4 video, AAC sound, in MP4)."""
    encode_container(path, seconds, first, video="mpeg4" if with_video else None,
                     sound="aac" if with_audio else None)


def second_of_frame(path):
    """Which source second a frame shows: its square's position."""
    return round((square_x(path) - 1.5 - 2) / 5)


def tone_hz(x):
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / SR)[spec.argmax()]


def wav_samples(path):
    with wave.open(str(path)) as w:
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(float) / 32768


def assert_seconds(out, video_id, first, n_seconds):
    """The clip's sound second j and frame j are the source's second first + j; a sound
    second's tone changes within 20 ms of where the source's did."""
    x = wav_samples(out / "audio" / f"{video_id}.wav")
    # Matroska keeps the AAC encoder's padding of the last frame: up to 1024 samples more
    assert abs(x.size - n_seconds * SR) < 0.07 * SR
    for j in range(n_seconds):
        assert abs(tone_hz(x[j * SR + 320:(j + 1) * SR - 320]) - (300 + 100 * (first + j))) < 15
        if j:                                  # just before and just after the boundary
            before, after = x[j * SR - 1600:j * SR - 320], x[j * SR + 320:j * SR + 1600]
            assert abs(tone_hz(before) - (200 + 100 * (first + j))) < 40
            assert abs(tone_hz(after) - (300 + 100 * (first + j))) < 40
    shown = [second_of_frame(data.frame_path(out / "frames", video_id, k)) for k in range(10)]
    last = first + n_seconds - 1
    assert shown == [min(first + k, last) for k in range(10)]


def test_segment_lists_in_both_published_formats(tmp_path):
    audioset = tmp_path / "balanced_train_segments.csv"
    audioset.write_text("# Segments csv created Sun Mar  5 10:54:31 2017\n"
                        "# num_ytids=2, num_segs=2, num_unique_labels=3, num_positive_labels=3\n"
                        "# YTID, start_seconds, end_seconds, positive_labels\n"
                        '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n'
                        '-0Gj8-vB1q4, 12.500, 20.000, "/m/04rlf"\n')
    fmt, rows = prepare.read_segments(audioset)
    assert fmt == "audioset"
    assert [(s.video_id, s.ytid, s.start, s.end, s.labels) for s in rows] == [
        ("--PJHxphWEs_000030", "--PJHxphWEs", 30.0, 40.0, ("/m/09x0r", "/t/dd00088")),
        ("-0Gj8-vB1q4_000012.500", "-0Gj8-vB1q4", 12.5, 20.0, ("/m/04rlf",))]
    vgg = tmp_path / "vggsound.csv"
    vgg.write_text('---g-f_I2yQ,1,people marching,test\n'
                   '--0PQM4-hqg,30,"female speech, woman speaking",train\n')
    fmt, rows = prepare.read_segments(vgg)
    assert fmt == "vggsound"
    assert [(s.video_id, s.end, s.labels, s.split) for s in rows] == [
        ("---g-f_I2yQ_000001", 11.0, ("people marching",), "test"),
        ("--0PQM4-hqg_000030", 40.0, ("female speech, woman speaking",), "train")]
    labels, classes = prepare.segment_labels(fmt, rows, None)
    assert classes == [(0, "female_speech_woman_speaking", "female speech, woman speaking"),
                       (1, "people_marching", "people marching")]
    assert labels["---g-f_I2yQ_000001"] == "people_marching"
    # a class list given: names are matched to its mids; an unknown one names its row
    (tmp_path / "classes.csv").write_text("index,mid,display_name\n0,/v/0,people marching\n")
    with pytest.raises(data.DataError, match=r"vggsound.csv:2: 'female speech, woman speaking'"):
        prepare.segment_labels(fmt, rows, str(tmp_path / "classes.csv"))
    # a broken row: its file and line
    vgg.write_text('---g-f_I2yQ,1,people marching,test\nabc,x,dog,train\n')
    with pytest.raises(data.DataError, match=r"vggsound.csv:2: expected a YouTube id"):
        prepare.read_segments(vgg)
    vgg.write_text('---g-f_I2yQ,1,people marching,validation\n')
    with pytest.raises(data.DataError, match=r"vggsound.csv:1: the split column"):
        prepare.read_segments(vgg)


def test_segments_are_cut_at_the_right_seconds_from_full_and_precut_videos(tmp_path, capsys):
    videos = tmp_path / "videos"
    videos.mkdir()
    encode_seconds(videos / "AAAAAAAAAAA.mp4", 15)                   # a whole video
    encode_seconds(videos / "BBBBBBBBBBB_000002.mp4", 10, first=2)   # the segment, cut already
    encode_seconds(videos / "CCCCCCCCCCC.mkv", 12)                   # ends before the segment
    encode_seconds(videos / "DDDDDDDDDDD.mp4", 12, with_audio=False)
    encode_seconds(videos / "EEEEEEEEEEE.mp4", 3, with_video=False)
    encode_seconds(videos / "GGGGGGGGGGG.mp4", 12)
    (videos / "HHHHHHHHHHH.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)
    csv_path = tmp_path / "eval_segments.csv"
    csv_path.write_text("# YTID, start_seconds, end_seconds, positive_labels\n"
                        'AAAAAAAAAAA, 3.000, 13.000, "/m/a"\nBBBBBBBBBBB, 2.000, 12.000, "/m/b"\n'
                        'CCCCCCCCCCC, 5.000, 15.000, "/m/a,/m/b"\n'
                        'DDDDDDDDDDD, 0.000, 10.000, "/m/a"\nEEEEEEEEEEE, 0.000, 3.000, "/m/a"\n'
                        'FFFFFFFFFFF, 0.000, 10.000, "/m/a"\nGGGGGGGGGGG, 11.500, 21.500, "/m/a"\n'
                        'HHHHHHHHHHH, 0.000, 10.000, "/m/a"\n')
    out = tmp_path / "out"
    cfg = prepare.PrepareConfig(segments=str(csv_path), videos=str(videos), out=str(out))
    entries, missing = prepare.main(cfg)
    assert [e["video_id"] for e in entries] == ["AAAAAAAAAAA_000003", "BBBBBBBBBBB_000002",
                                                "CCCCCCCCCCC_000005"]
    assert_seconds(out, "AAAAAAAAAAA_000003", 3, 10)
    assert_seconds(out, "BBBBBBBBBBB_000002", 2, 10)      # from its own time 0
    assert_seconds(out, "CCCCCCCCCCC_000005", 5, 7)       # what there is: seconds 5..11
    a, b, c = entries
    assert "source_was_cut" not in a and b["source_was_cut"] and c["short"]
    assert c["frames_repeated"] == 3 and c["labels"] == "/m/a,/m/b"
    assert (a["start"], a["end"], a["frame_size"]) == (3.0, 13.0, [SW, SH])
    assert missing == {"DDDDDDDDDDD_000000": "no audio track",
                       "EEEEEEEEEEE_000000": "no video track", "FFFFFFFFFFF_000000": "not found",
                       "GGGGGGGGGGG_000011.500": "too short",
                       "HHHHHHHHHHH_000000": "undecodable"}
    failures = [line.split("\t") for line in (out / "failures.txt").read_text().splitlines()]
    assert {f[0]: f[1] for f in failures} == missing and all(f[2] for f in failures)
    printed = capsys.readouterr().out
    assert "8 clips asked, 3 written (0 before this run), 5 missing" in printed
    assert "missing, too short: 1" in printed and "written short" in printed
    # the manifest is named after its CSV and passes check against the class CSV written
    assert data.main(["check", str(out / "eval_segments.json")]) == 0
    assert data.read_label_csv(out / "class_labels_indices.csv")[0] == ["/m/a", "/m/b"]
    # a rerun makes nothing again; a CSV row's id with a bare YTID and a clip id as --ids
    (out / "clips" / "AAAAAAAAAAA_000003.json").touch()
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()}
    prepare.main(cfg)
    assert "0 to make" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "clips").iterdir()} == before
    (tmp_path / "subset.txt").write_text("AAAAAAAAAAA\nCCCCCCCCCCC_000005\nDDDDDDDDDDD_000000\n")
    prepare.main(prepare.PrepareConfig(ids=str(tmp_path / "subset.txt"), out=str(out)))
    assert [e["video_id"] for e in data.read_manifest(out / "subset.json")] == [
        "AAAAAAAAAAA_000003", "CCCCCCCCCCC_000005"]
    assert (out / "subset_missing.txt").read_text() == "DDDDDDDDDDD_000000\n"


FAKE_FETCH = '''
import shutil, sys, time
ytid, start, out, source, log = sys.argv[1:]
open(log, "a").write(ytid + " " + start + "\\n")
if ytid.startswith("X"):
    open(out + ".part", "w").write("half")
    sys.exit("ERROR: [youtube] " + ytid + ": Video unavailable")
if ytid.startswith("S"):
    open(out + ".part", "w").write("half")
    time.sleep(60)
shutil.copy(source + "/" + ytid + ".mp4", out)
'''


def test_fetch_runs_the_command_per_clip_and_records_what_fails(tmp_path, capsys):
    source = tmp_path / "youtube"
    source.mkdir()
    for ytid in ("AAAAAAAAAAA", "BBBBBBBBBBB"):
        encode_seconds(source / f"{ytid}.mp4", 12)
    script, log = tmp_path / "fake_fetch.py", tmp_path / "calls.txt"
    script.write_text(FAKE_FETCH)
    template = f"{sys.executable} {script} {{ytid}} {{start}} {{out}} {source} {log}"
    vgg = tmp_path / "vggsound.csv"
    vgg.write_text("AAAAAAAAAAA,1,dog barking,train\nBBBBBBBBBBB,0,cat meowing,test\n"
                   "XXXXXXXXXXX,4,dog barking,train\nSSSSSSSSSSS,0,dog barking,train\n")
    out = tmp_path / "out"
    cfg = prepare.PrepareConfig(segments=str(vgg), fetch=template, fetch_timeout=1.0,
                                out=str(out), workers=2)
    entries, missing = prepare.main(cfg)
    assert sorted(e["video_id"] for e in entries) == ["AAAAAAAAAAA_000001", "BBBBBBBBBBB_000000"]
    assert_seconds(out, "AAAAAAAAAAA_000001", 1, 10)
    assert missing == {"XXXXXXXXXXX_000004": "fetch failed", "SSSSSSSSSSS_000000": "fetch timed out"}
    report = (out / "failures.txt").read_text()
    assert "XXXXXXXXXXX_000004\tfetch failed\t" in report and "Video unavailable" in report
    assert not any((out / ".fetch").iterdir())             # nothing of a failed fetch is left
    calls = log.read_text().split("\n")
    assert sorted(c for c in calls if c.startswith(("X", "S"))) == ["SSSSSSSSSSS 0"] * 2 + [
        "XXXXXXXXXXX 4"] * 2                                 # one retry each
    assert [e["video_id"] for e in data.read_manifest(out / "train.json")] == ["AAAAAAAAAAA_000001"]
    assert data.read_label_csv(out / "class_labels_indices.csv")[0] == ["cat_meowing", "dog_barking"]
    # a rerun fetches nothing again; --retry_missing only the missing
    n_calls = len(log.read_text().splitlines())
    prepare.main(cfg)
    assert len(log.read_text().splitlines()) == n_calls
    assert "2 failed before (--retry_missing retries them), 0 to make" in capsys.readouterr().out
    _, still = prepare.main(dataclasses.replace(cfg, retry_missing=True, fetch_timeout=0.5))
    again = log.read_text().splitlines()[n_calls:]
    assert sorted(again) == ["SSSSSSSSSSS 0"] * 2 + ["XXXXXXXXXXX 4"] * 2 and still == missing
    # a command that is not there stops the run before any clip, naming it
    with pytest.raises(data.DataError, match="command 'no-such-fetcher' not found"):
        prepare.main(dataclasses.replace(cfg, fetch="no-such-fetcher {ytid} {out}"))


def test_vggss_boxes_reach_the_manifest_and_score_with_localize(tmp_path):
    videos = tmp_path / "videos"
    videos.mkdir()
    for ytid in ("AAAAAAAAAAA", "BBBBBBBBBBB"):
        encode_seconds(videos / f"{ytid}.mp4", 12)
    vgg = tmp_path / "vggsound.csv"
    vgg.write_text("AAAAAAAAAAA,0,dog barking,test\nBBBBBBBBBBB,2,dog barking,test\n")
    out = tmp_path / "out"
    prepare.main(prepare.PrepareConfig(segments=str(vgg), videos=str(videos), out=str(out)))
    # VGG-SS's format: the box of the square at the middle frame (second start + 5)
    def square_box(second):
        return [(2 + 5 * second) / SW, 18 / SH, (6 + 5 * second) / SW, 30 / SH]
    (tmp_path / "vggss.json").write_text(json.dumps([
        {"file": "AAAAAAAAAAA_000000", "class": "dog barking", "bbox": [square_box(5)]},
        {"file": "BBBBBBBBBBB_000002", "class": "dog barking",
         "bbox": [square_box(7), [-2.9e16, 0.1, -1.0, 0.2]]},
        {"file": "ZZZZZZZZZZZ_000030", "class": "dog barking", "bbox": [[0.1, 0.1, 0.5, 0.5]]}]))
    prepare.main(prepare.PrepareConfig(vggss=str(tmp_path / "vggss.json"), out=str(out)))
    entries = data.read_manifest(out / "vggss.json")
    assert [e["boxes"] for e in entries] == [[square_box(5)], [square_box(7)]]  # one dropped
    assert (out / "vggss_missing.txt").read_text() == "ZZZZZZZZZZZ_000030\n"
    # scored as localize.py scores: a map that is the frame's brightness points into the box
    ds = data.AudioVisualDataset(str(out / "vggss.json"), train=False, norm_mean=0.0,
                                 norm_std=1.0, audio_length=128, mel_bins=32, image_size=48)
    frames = torch.stack([ds[i]["frame"] for i in range(len(ds))]).float().mean(1)   # (B, H, W)
    boxes = [localize.clip_boxes(e, 48, ds.frame_file(i, data.EVAL_FRAME))[0]
             for i, e in enumerate(entries)]
    scores = localize.score_maps(frames, boxes)
    assert scores["pointing_game"] == 100.0
    assert localize.score_maps(frames.flip(-1), boxes)["pointing_game"] == 0.0


def encode_container(path, seconds, first=0, video="mpeg4", sound="aac", fmt=None):
    """encode_seconds' picture and tone in any container and codecs; video or sound None:
    no such track."""
    c = av.open(str(path), "w", format=fmt)
    vs = c.add_stream(video, rate=FPS) if video else None
    s = c.add_stream(sound, rate=SR) if sound else None
    channels = 2 if sound == "vorbis" else 1       # FFmpeg's own Vorbis encoder: stereo only
    if s is not None:
        s.layout = "stereo" if channels == 2 else "mono"
    if sound == "vorbis":
        s.codec_context.options = {"strict": "experimental"}
    if vs is not None:
        vs.width, vs.height, vs.pix_fmt = SW, SH, "yuv420p"
        _encode_squares(c, vs, [2 + 5 * (first + i // FPS) for i in range(int(seconds * FPS))], 4)
    if s is not None:
        t = np.arange(int(seconds * SR)) / SR
        hz = 300 + 100 * (first + np.floor(t))
        x = (0.5 * np.sin(2 * np.pi * np.cumsum(hz) / SR)).astype(np.float32)
        step = s.codec_context.frame_size or 1024
        for start in range(0, x.size, step):
            f = av.AudioFrame.from_ndarray(np.repeat(x[None, start:start + step], channels, 0),
                                           format="fltp", layout=s.layout.name)
            f.sample_rate, f.pts = SR, start
            for p in s.encode(f):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    c.close()


def test_a_source_is_any_file_named_after_its_video_and_pyav_decides(tmp_path):
    """Ogg (VP8 video and Vorbis sound: PyAV's wheels carry a Theora decoder but no Theora
    encoder), 3GP and Matroska under a suffix no list names are read; a sound-only file and a
    file that is not media with the video's name are recorded with their own reasons, naming
    the file; `not found` is left for a video that no file is named after."""
    videos = tmp_path / "videos"
    videos.mkdir()
    encode_container(videos / "OOOOOOOOOOO.ogg", 12, video="libvpx", sound="vorbis")
    encode_container(videos / "TTTTTTTTTTT.3gp", 12)
    encode_container(videos / "MMMMMMMMMMM.video", 12, video="libvpx", fmt="matroska")
    encode_container(videos / "AAAAAAAAAAA.mka", 12, video=None)             # sound only
    (videos / "NNNNNNNNNNN.txt").write_text("a note, not a video\n")
    (videos / ".OOOOOOOOOOO.mp4").write_bytes(b"hidden: never a source")
    with av.open(str(videos / "OOOOOOOOOOO.ogg")) as c:                       # the real thing
        assert (c.format.name, [s.codec_context.name for s in c.streams]) == ("ogg", ["vp8", "vorbis"])
    with av.open(str(videos / "TTTTTTTTTTT.3gp")) as c:
        assert "3gp" in c.format.name
    csv_path = tmp_path / "segments.csv"
    csv_path.write_text("# YTID, start_seconds, end_seconds, positive_labels\n" + "".join(
        f'{y * 11}, 1.000, 11.000, "/m/a"\n' for y in "OTMANF"))
    out = tmp_path / "out"
    entries, missing = prepare.main(prepare.PrepareConfig(segments=str(csv_path),
                                                          videos=str(videos), out=str(out)))
    assert sorted(e["video_id"] for e in entries) == [
        "MMMMMMMMMMM_000001", "OOOOOOOOOOO_000001", "TTTTTTTTTTT_000001"]
    for e in entries:
        shown = [second_of_frame(data.frame_path(out / "frames", e["video_id"], k)) for k in range(10)]
        assert shown == [1 + k for k in range(10)], e["source"]
        x = wav_samples(out / "audio" / f"{e['video_id']}.wav")
        assert abs(tone_hz(x[2 * SR + 320:3 * SR - 320]) - 600) < 15, e["source"]   # second 3
    assert missing == {"AAAAAAAAAAA_000001": "no video track", "NNNNNNNNNNN_000001": "undecodable",
                       "FFFFFFFFFFF_000001": "not found"}
    detail = {line.split("\t")[0]: line.split("\t")[2]
              for line in (out / "failures.txt").read_text().splitlines()}
    assert "AAAAAAAAAAA.mka: no video track" in detail["AAAAAAAAAAA_000001"]
    assert "NNNNNNNNNNN.txt: cannot decode" in detail["NNNNNNNNNNN_000001"]
    assert "no file in" in detail["FFFFFFFFFFF_000001"]


SLOW_FETCH = '''
import shutil, sys, time
ytid, out, source, log = sys.argv[1:]
open(log, "a").write(ytid + "\\n")
if ytid.startswith("X"):
    sys.exit("ERROR: [youtube] " + ytid + ": Video unavailable")
open(out + ".part", "w").write("half")      # a download in progress
time.sleep(0.8)
shutil.copy(source + "/" + ytid + ".mp4", out)
'''


def test_a_segments_run_killed_with_sigkill_resumes_to_each_clip_once(tmp_path):
    import re
    import signal
    import subprocess
    import time
    source = tmp_path / "youtube"
    source.mkdir()
    good = [c * 11 for c in "ABCDEFGH"]
    for ytid in good:
        encode_seconds(source / f"{ytid}.mp4", 11)
    script, log = tmp_path / "slow_fetch.py", tmp_path / "calls.txt"
    script.write_text(SLOW_FETCH)
    vgg = tmp_path / "vggsound.csv"
    vgg.write_text("".join(f"{y},0,dog barking,train\n" for y in good[:4])
                   + "XXXXXXXXXXX,0,dog barking,train\n"
                   + "".join(f"{y},0,cat meowing,test\n" for y in good[4:]))
    out = tmp_path / "out"
    command = [sys.executable, os.path.join(os.path.dirname(prepare.__file__), "prepare.py"),
               "--segments", str(vgg), "--out", str(out), "--workers", "2", "--fetch",
               f"{sys.executable} {script} {{ytid}} {{out}} {source} {log}"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((out / "clips").glob("*.json"))) < 3:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)                 # in the middle of the next fetches
    run.wait()
    time.sleep(0.5)             # a system call in flight in a child at the kill completes
    before = {p.name: p.stat().st_mtime_ns for p in (out / "clips").glob("*.json")}
    fetched_before = log.read_text().split()
    time.sleep(1.5)             # no worker or fetch command of the killed run goes on
    assert {p.name: p.stat().st_mtime_ns for p in (out / "clips").glob("*.json")} == before
    assert log.read_text().split() == fetched_before
    assert 3 <= len(before) < len(good)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    clips = {p.name: p.stat().st_mtime_ns for p in (out / "clips").glob("*.json")}
    assert sorted(clips) == sorted(f"{y}_000000.json" for y in good)
    assert all(clips[name] == t for name, t in before.items())      # not written again
    fetched = log.read_text().split()
    for name in before:                                              # nor fetched again
        assert fetched.count(name[:11]) == fetched_before.count(name[:11]) == 1, name
    leftovers = [p for p in out.rglob("*") if p.is_file() and (
        p.suffix in (".tmp", ".part") or ".partial" in p.parts or ".fetch" in p.parts)]
    assert leftovers == []
    failures = (out / "failures.txt").read_text().splitlines()
    assert [line.split("\t")[:2] for line in failures] == [["XXXXXXXXXXX_000000", "fetch failed"]]
    counts = re.search(r"(\d+) clips asked, (\d+) written \((\d+) before this run\), (\d+) missing",
                       done.stdout)
    asked, written, kept, missing = map(int, counts.groups())
    assert (asked, written, kept, missing) == (9, len(clips), len(before), len(failures))
    manifests = data.read_manifest(out / "train.json") + data.read_manifest(out / "test.json")
    assert sorted(e["video_id"] for e in manifests) == sorted(n[:-5] for n in clips)
    for e in manifests:
        assert len(wav_samples(out / "audio" / f"{e['video_id']}.wav")) == 10 * SR
