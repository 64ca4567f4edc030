"""Real recordings into the layout data.py reads: segment lists, videos, sound + picture.

    pip install -r requirements-prepare.txt        # PyAV (its wheels bundle FFmpeg)
    python prepare.py --segments vggsound.csv --fetch "yt-dlp ... -o {out} ..." --out data/vgg
    python prepare.py --segments balanced_train_segments.csv,eval_segments.csv \
        --videos /data/audioset/videos --label_csv class_labels_indices.csv --out data/as
    python prepare.py --vggss vggss.json --out data/vgg         # VGG-SS's boxes, its clips
    python prepare.py --videos VIDEO_DIR --labels labels.csv --out data/mine
    python prepare.py --pairs pairs.csv --out data/mine
    python prepare.py --pairs_from FOLDER --out data/mine   # X.ogg + X.png = a clip

Output, the CAV-MAE / EquiAV layout (see data.py):
    OUT/audio/{video_id}.wav                  16 kHz, 16-bit, mono
    OUT/frames/frame_{k}/{video_id}.jpg       k = 0 .. 9, one frame per second
    OUT/{--manifest}                          {"data": [...]}, one entry per clip
    OUT/train.json, OUT/test.json             with --test_fraction: a split by file-name hash
    OUT/class_labels_indices.csv              written from the labels seen, or --label_csv's
    OUT/stats.json                            fbank mean / std of the (training) clips
    OUT/failures.txt                          every input that failed: id, reason, detail

--segments CSV[,CSV]: AudioSet's segment CSVs or VGGSound's vggsound.csv (told apart by
their columns). A clip's video_id is {YTID}_{start}, start in whole seconds with six
digits as VGGSound and VGG-SS name clips (a fractional start adds .mmm). Its video is
the file in --videos whose name starts with the YTID, whatever its suffix (the one named
as the clip or the video if several), else --fetch's command writes it; a video no longer
than the segment is taken as the segment already cut. The clip is [start, end) (VGGSound: 10 s): its
frame k is the frame shown at start + k s, its sound that span at 16 kHz mono. A clip
that cannot be made is recorded with its reason (see REASONS) and skipped by a rerun
(--retry_missing: retried); missing clips are data, the exit status stays 0. Manifests:
VGGSound's train.json / test.json by its split column, AudioSet one per CSV, named as
it. No stats.json: `python data.py stats train.json --write` makes it.
--vggss FILE / --ids FILE: a manifest of those of the listed clips that are in OUT
(VGG-SS's with their boxes), and OUT/{name}_missing.txt of the others.

--videos: a folder (searched recursively) or a text file listing video files. Frame k
is the frame shown at k seconds; a video shorter than 10 s repeats its
last frame (the entry's "frames_repeated" says how many times). Its audio track is
downmixed and resampled to 16 kHz; a video without one fails (never silence).
--pairs CSV (columns audio, image, labels[, video_id]; paths relative to the CSV): a
sound in any format FFmpeg decodes and a still picture become a clip whose 10 frames
are the picture. --pairs_from FOLDER pairs every sound file with the picture of the
same name beside it, labelled by the sub-folder (e.g. animals/mammals).
--labels CSV (video_id, labels): the comma-separated label ids of each video.

A sound whose peak stays below --min_peak_db (a silent placeholder) fails (not in a
segment list, where silence is a class). Every clip
is written into OUT/.partial first and moved into place, then recorded in
OUT/clips/{video_id}.json: a run stopped at any point leaves no half-written clip, and
the same command again skips the recorded clips and redoes the rest. Inputs that
failed are listed with file and reason; then the exit status is 1 and no manifest is
written, unless --allow_failures (a segment list's missing clips never block it).
"""
import csv
import ctypes
import dataclasses
import functools
import hashlib
import json
import multiprocessing
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import wave
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torchaudio
from PIL import Image
from tqdm import tqdm

import audio_io
import data
import utils
from utils import option

# The files a --videos folder is read for (a segment list's search takes any file instead).
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts",
                  ".ogv", ".ogg", ".3gp", ".3g2", ".wmv", ".asf", ".mts", ".m2ts", ".vob")
AUDIO_SUFFIXES = (".wav", ".ogg", ".oga", ".opus", ".mp3", ".flac", ".m4a", ".aac", ".wma")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclasses.dataclass
class PrepareConfig:
    """Every field is a `--field value` option (a bare `--allow_failures` means true)."""
    videos: Optional[str] = option(None, "a folder of videos (recursive) or a text file "
                                         "listing video files, one per line; with --segments, "
                                         "the folder where each clip's video is looked for")
    segments: Optional[str] = option(None, "AudioSet segment CSVs (comma-separated, one manifest "
                                           "each) or VGGSound's vggsound.csv")
    segments_format: str = option("auto", "auto (told by the columns), audioset or vggsound")
    fetch: Optional[str] = option(None, "with --segments: a command run for each clip not in "
                                        "--videos, with {ytid} {start} {end} {out} filled in")
    fetch_timeout: float = option(300.0, "seconds one fetch may take (then killed; one retry)")
    retry_missing: bool = option(False, "with --segments: retry the clips that failed before")
    vggss: Optional[str] = option(None, "VGG-SS's vggss.json: OUT/vggss.json of its clips in "
                                        "OUT, with their boxes")
    ids: Optional[str] = option(None, "a list of clip ids (or YTIDs), one a line: "
                                      "OUT/{its name}.json of those in OUT")
    pairs: Optional[str] = option(None, "CSV with the columns audio, image, labels[, video_id]; "
                                        "paths relative to the CSV's folder")
    pairs_from: Optional[str] = option(None, "a folder: each sound with the picture of the same "
                                             "name beside it is a clip, labelled by its folder")
    labels: Optional[str] = option(None, "with --videos: CSV video_id,labels (label ids, a,b)")
    label_csv: Optional[str] = option(None, "index,mid,display_name file to check the labels "
                                            "against (copied to OUT); none: written from them")
    out: str = option("data/prepared", "output folder")
    manifest: str = option("data.json", "the manifest of every clip, in OUT")
    test_fraction: float = option(0.0, "> 0: also write train.json / test.json, a clip going "
                                       "to test when the hash of its video_id says so")
    workers: int = option(0, "processes that decode (and fetch) clips (0: this one)")
    allow_failures: bool = option(False, "write the manifest of the clips that worked even when "
                                         "some inputs failed")
    min_peak_db: float = option(-60.0, "a sound whose peak is below this level (dBFS) is "
                                       "reported as silent and fails")
    audio_length: int = option(1024, "fbank frames for stats.json (the model's T)")
    mel_bins: int = option(128, "fbank bins for stats.json (the model's F)")
    jpeg_quality: int = option(90, "quality of the written frames")


class Job(NamedTuple):
    """One clip to make: where its sound and picture(s) come from."""
    video_id: str
    kind: str       # "video" or "pair"
    source: str     # the video, or the sound of a pair
    image: str      # the picture of a pair ("" for a video)
    labels: Optional[str]  # None: --labels does not list it


class ClipError(Exception):
    """An input that cannot become a clip; the message names the file and the reason, and
    `reason` is its kind, one of REASONS (the summary of a segment list counts by it)."""

    def __init__(self, message, reason="undecodable"):
        super().__init__(message)
        self.reason = reason


REASONS = ("not found", "ambiguous source", "fetch failed", "fetch timed out", "no audio track",
           "no video track", "too short", "undecodable")


# =============================================================================
# The recipe
# =============================================================================

def main(cfg):
    """Prepare every input of `cfg`; returns (the manifest entries, the failures)."""
    audio_io.import_av()  # fail at once, naming the install command, when PyAV is missing
    out = Path(cfg.out)
    if cfg.segments or cfg.vggss or cfg.ids:
        entries, failures = prepare_segments(cfg) if cfg.segments else ([], {})
        for name, wanted in (("vggss", cfg.vggss and read_vggss(cfg.vggss)),
                             (Path(cfg.ids or ".").stem, cfg.ids and read_ids(cfg.ids))):
            if wanted:
                write_subset(out, name, wanted)
        return entries, failures
    jobs = list_jobs(cfg)
    if not jobs:
        raise data.DataError("no inputs: give --videos, --pairs or --pairs_from (found none)")
    for folder in ("audio", "clips", ".partial", *(f"frames/frame_{k}" for k in range(data.NUM_FRAMES))):
        (out / folder).mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / ".partial", ignore_errors=True)  # what an interrupted run left
    known = set(data.read_label_csv(cfg.label_csv)[0]) if cfg.label_csv else None
    todo = [j for j in jobs if not (out / "clips" / f"{j.video_id}.json").exists()]
    print(f"{len(jobs)} inputs, {len(jobs) - len(todo)} already prepared in {out}")
    failures = dict(run_jobs(todo, cfg, known))
    entries = [json.loads((out / "clips" / f"{j.video_id}.json").read_text())
               for j in jobs if j.video_id not in failures]
    _write_failures(out, failures)
    failures = {vid: detail for vid, (_, detail) in failures.items()}
    report = "".join(f"{vid}: {detail}\n" for vid, detail in failures.items())
    if failures:
        print(f"{len(failures)} of {len(jobs)} inputs failed (also in {out / 'failures.txt'}):\n"
              + report, end="", file=sys.stderr)
        if not cfg.allow_failures:
            print("no manifest written: fix the inputs, or pass --allow_failures to write the "
                  "clips that worked", file=sys.stderr)
            return entries, failures
    if entries:
        write_outputs(cfg, out, entries)
    return entries, failures


def list_jobs(cfg):
    """The clips to make, from --videos, --pairs or --pairs_from (exactly one)."""
    given = [name for name in ("videos", "pairs", "pairs_from") if getattr(cfg, name)]
    if len(given) != 1:
        raise ValueError(f"give exactly one of --videos, --pairs, --pairs_from (got {given})")
    if cfg.videos:
        return _video_jobs(cfg.videos, cfg.labels)
    if cfg.pairs:
        return _pair_jobs(cfg.pairs)
    return _folder_jobs(cfg.pairs_from)


def run_jobs(jobs, cfg, known):
    """(video_id, (reason, detail)) of every job that failed; the others are written
    (prepare_clip)."""
    args = [(job, cfg, known) for job in jobs]
    if cfg.workers > 0:
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            results = list(tqdm(pool.imap_unordered(_run_one, args), total=len(jobs),
                                desc="prepare"))
    else:
        results = [_run_one(a) for a in tqdm(args, desc="prepare")]
    return [(vid, failure) for vid, failure in results if failure is not None]


def _run_one(args):
    job, cfg, known = args
    try:
        prepare_clip(job, cfg, known)
        return job.video_id, None
    except (ClipError, data.DataError) as err:
        return job.video_id, (getattr(err, "reason", "undecodable"), str(err))


def write_outputs(cfg, out, entries):
    """Manifests (and the split), the class CSV and stats.json."""
    data.write_manifest(out / cfg.manifest, entries)
    written = [out / cfg.manifest]
    stats_from = out / cfg.manifest
    if cfg.test_fraction > 0:
        test = [e for e in entries if _hash_fraction(e["video_id"]) < cfg.test_fraction]
        train = [e for e in entries if _hash_fraction(e["video_id"]) >= cfg.test_fraction]
        for name, part in (("train.json", train), ("test.json", test)):
            data.write_manifest(out / name, part)
            written.append(out / name)
        stats_from = out / "train.json"
    label_csv = out / data.LABEL_CSV_NAME
    ids = sorted({x for e in entries for x in e["labels"].split(",") if x})
    if cfg.label_csv:
        if Path(cfg.label_csv).resolve() != label_csv.resolve():
            shutil.copyfile(cfg.label_csv, label_csv)
    elif not ids:   # unlabelled clips (pretraining data): no class list to write
        label_csv = "no class CSV (no clip has labels: an unlabelled set, for pretraining)"
    else:
        with open(label_csv, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(["index", "mid", "display_name"])
            writer.writerows([i, mid, mid] for i, mid in enumerate(ids))
    stats = data.compute_stats(stats_from, cfg.audio_length, cfg.mel_bins)
    (out / "stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"wrote {', '.join(str(p) for p in written)} ({len(entries)} clips), {label_csv}, "
          f"{out / 'stats.json'} (fbank mean {stats['mean']:.3f}, std {stats['std']:.3f})")


def _hash_fraction(video_id):
    """A fixed number in [0, 1) from the video_id, for a split that never changes."""
    return int(hashlib.md5(video_id.encode("utf-8")).hexdigest()[:8], 16) / 2 ** 32


# =============================================================================
# Inputs
# =============================================================================

def _video_jobs(videos, labels_csv):
    if os.path.isdir(videos):
        paths = sorted(str(p) for p in Path(videos).rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
    else:
        root = os.path.dirname(os.path.abspath(videos))
        with open(videos, encoding="utf-8") as f:
            paths = [os.path.join(root, line.strip()) for line in f if line.strip()]
    labels = {}
    if labels_csv:
        for row in _read_rows(labels_csv, ("video_id", "labels")):
            labels[row["video_id"]] = row["labels"]
    # with --labels, a video it does not list gets None: reported, not left unlabelled
    jobs = [Job(Path(p).stem, "video", p, "", labels.get(Path(p).stem, None if labels_csv else ""))
            for p in paths]
    _check_unique(jobs, videos)
    return jobs


def _pair_jobs(pairs_csv):
    root = os.path.dirname(os.path.abspath(pairs_csv))
    jobs = [Job(row.get("video_id") or Path(row["audio"]).stem, "pair",
                os.path.join(root, row["audio"]), os.path.join(root, row["image"]),
                row.get("labels", ""))
            for row in _read_rows(pairs_csv, ("audio", "image"))]
    _check_unique(jobs, pairs_csv)
    return jobs


def _folder_jobs(folder):
    """Every sound beside a picture of the same name; label = its folder relative to
    `folder` (the folder's own name for files directly in it), video_id = its path with
    / as _ (so names may repeat across folders)."""
    root = Path(folder)
    jobs = []
    for sound in sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES):
        image = next((sound.with_suffix(s) for s in IMAGE_SUFFIXES
                      if sound.with_suffix(s).exists()), None)
        if image is not None:
            relative = sound.relative_to(root).with_suffix("")
            jobs.append(Job("_".join(relative.parts), "pair", str(sound), str(image),
                            relative.parent.as_posix() if relative.parent.parts
                            else root.resolve().name))
    return jobs


def _read_rows(path, required):
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in required if rows and c not in rows[0]]
    if not rows or missing:
        raise data.DataError(f"{path}: expected a header with columns {list(required)} and at "
                             f"least one row" + (f"; missing {missing}" if missing else ""))
    return rows


def _check_unique(jobs, where):
    seen = {}
    for job in jobs:
        if job.video_id in seen:
            raise data.DataError(f"{where}: video_id {job.video_id!r} given twice ({seen[job.video_id]} "
                                 f"and {job.source}); pass video_id explicitly")
        seen[job.video_id] = job.source


# =============================================================================
# Segment lists: AudioSet's and VGGSound's published CSVs, fetched or found, cut
# =============================================================================

class Segment(NamedTuple):
    """One row of a published segment list: a clip of a YouTube video."""
    video_id: str       # segment_id(ytid, start)
    ytid: str
    start: float        # seconds into the video
    end: float          # AudioSet: as listed; VGGSound: start + 10
    labels: tuple       # AudioSet: mids; VGGSound: one display name
    split: str          # VGGSound: train / test; AudioSet: the CSV's name
    where: str          # "file:line", for messages


VGGSOUND_SECONDS = 10.0      # a VGGSound clip is the 10 s from its start
MIN_SECONDS = 1.0            # a clip with less sound than this fails as too short
SHORT_TOLERANCE = 0.1        # a clip this much shorter than its segment is recorded as short
PRECUT_TOLERANCE = 1.0       # a source at most this much longer than its segment is that segment


def segment_id(ytid, start):
    """The clip's video_id: {YTID}_{start}, start in whole seconds with six digits, as VGGSound
    and VGG-SS name their clips (zpWuikVorYg_000032); a start between whole seconds keeps its
    milliseconds (abc_000012.500)."""
    ms = round(start * 1000)
    return f"{ytid}_{ms // 1000:06d}" + (f".{ms % 1000:03d}" if ms % 1000 else "")


def read_segments(path, fmt="auto"):
    """The rows of an AudioSet segment CSV (`#` comment lines, then `YTID, start_seconds,
    end_seconds, "mid,mid"`) or of VGGSound's vggsound.csv (no header, `YTID,start,display
    name,train|test`), told apart by the third column (a number in AudioSet's); returns
    (format, [Segment]). A row that fits neither raises DataError with its file and line."""
    segments = []
    with open(path, newline="", encoding="utf-8") as f:
        for lineno, row in enumerate(csv.reader(f, skipinitialspace=True), start=1):
            if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                continue
            where = f"{path}:{lineno}"
            if len(row) != 4:
                raise data.DataError(f"{where}: expected 4 columns (YTID, start, end, labels or "
                                     f"YTID, start, label, split), got {len(row)}: {row}")
            ytid, start, third, fourth = (c.strip() for c in row)
            if fmt == "auto":
                fmt = "audioset" if _number(third) is not None else "vggsound"
            start_s = _number(start)
            if fmt == "audioset":
                end_s, labels, split = _number(third), tuple(m.strip() for m in fourth.split(",")
                                                             if m.strip()), Path(path).stem
            else:
                end_s, labels, split = (None if start_s is None else start_s + VGGSOUND_SECONDS,
                                        (third,), fourth)
            if start_s is None or end_s is None or not ytid or not end_s > start_s >= 0:
                raise data.DataError(f"{where}: expected a YouTube id and start < end in seconds "
                                     f"({fmt} format), got {row}")
            if fmt == "vggsound" and split not in ("train", "test"):
                raise data.DataError(f"{where}: the split column must be train or test, got "
                                     f"{split!r}")
            segments.append(Segment(segment_id(ytid, start_s), ytid, start_s, end_s, labels,
                                    split, where))
    if not segments:
        raise data.DataError(f"{path}: no segment rows")
    return fmt, segments


def _number(text):
    try:
        return float(text)
    except ValueError:
        return None


def segment_labels(fmt, segments, label_csv):
    """{video_id: "mid,mid"} and the class rows (index, mid, display_name) for OUT.
    AudioSet's mids are kept and, with --label_csv, checked against it. VGGSound's display
    names become mids: --label_csv's mid of that display name, else the name itself with
    every run of characters other than letters and digits as one _ (commas cannot be in a
    mid), in a class CSV of the names seen, sorted. An unknown label raises DataError
    naming the first rows that carry it."""
    if label_csv:
        mids, names = data.read_label_csv(label_csv)
        rows = list(zip(range(len(mids)), mids, names))
    elif fmt == "audioset":
        mids = sorted({m for s in segments for m in s.labels})
        rows = [(i, m, m) for i, m in enumerate(mids)]
    else:
        names = sorted({s.labels[0] for s in segments})
        rows = [(i, "_".join(re.findall(r"[A-Za-z0-9]+", n)), n) for i, n in enumerate(names)]
        if len({mid for _, mid, _ in rows}) != len(rows):
            raise data.DataError("two VGGSound class names give the same mid; pass --label_csv")
    if fmt == "audioset":
        lookup = {mid: mid for _, mid, _ in rows}
    else:   # VGGSound names, matched as written or without case and punctuation
        lookup = {key: mid for _, mid, name in rows for key in (name, _loose(name), mid)}
    labels, unknown = {}, {}
    for s in segments:
        mids = [lookup.get(x, lookup.get(_loose(x))) for x in s.labels]
        for x, mid in zip(s.labels, mids):
            if mid is None:
                unknown.setdefault(x, s.where)
        labels[s.video_id] = ",".join(m for m in mids if m)
    if unknown:
        first = "; ".join(f"{where}: {x!r}" for x, where in list(unknown.items())[:5])
        raise data.DataError(f"{len(unknown)} labels are not in {label_csv}: {first}")
    return labels, rows


def _loose(name):
    return " ".join(re.findall(r"[a-z0-9]+", name.lower()))


def find_sources(folder):
    """{YTID: [files whose name starts with it]} of a folder, searched recursively (a YouTube
    id is 11 characters). Every file counts, whatever its suffix: PyAV decides whether it holds
    a video, and a file that does not is recorded as the clip's failure with that reason
    (`no video track`, `undecodable`), naming the file. Hidden files are not sources."""
    found = {}
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file() and not p.name.startswith("."):
            found.setdefault(p.name[:11], []).append(p)
    return found


def pick_source(segment, candidates):
    """The file of a segment among those named after its video: the one named as the clip,
    else the one named as the video, else the only one."""
    for name in (segment.video_id, segment.ytid):
        named = [p for p in candidates if p.stem == name]
        if named:
            return named[0]
    if len(candidates) == 1:
        return candidates[0]
    raise ClipError(f"{segment.video_id}: {len(candidates)} files start with {segment.ytid} and "
                    f"none is named {segment.video_id} or {segment.ytid}: "
                    f"{[p.name for p in candidates[:4]]}", "ambiguous source")


def die_with_parent(parent):
    """On Linux, have this process killed when `parent`, the process that started it, dies
    (prctl PR_SET_PDEATHSIG): a run killed with SIGKILL leaves no worker or fetch command
    behind to write a clip beside its rerun. Elsewhere nothing is done."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)   # 1: PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            return
        if os.getppid() != parent:   # it died before the prctl: nobody will signal us
            os._exit(1)


def fetch(template, segment, dest, timeout):
    """Run the --fetch command for one segment, retried once: its placeholders {ytid},
    {start}, {end} (seconds) and {out} (= dest) filled in, each word on its own (no shell).
    A command that fails, times out (its whole process group is killed) or writes nothing
    raises ClipError with its last stderr line; the caller removes what it left."""
    def seconds(x):   # 30 -> "30", 12.5 -> "12.5", never an exponent
        return f"{x:.3f}".rstrip("0").rstrip(".")
    words = [w.replace("{ytid}", segment.ytid).replace("{start}", seconds(segment.start))
             .replace("{end}", seconds(segment.end)).replace("{out}", str(dest))
             for w in shlex.split(template)]
    for _ in range(2):   # a try and one retry
        try:
            proc = subprocess.Popen(words, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    start_new_session=True,
                                    preexec_fn=functools.partial(die_with_parent, os.getpid()))
        except OSError as err:   # the command vanished or may not be run
            raise ClipError(f"{segment.video_id}: fetch failed: cannot run {words[0]} ({err})",
                            "fetch failed") from err
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            failure = ClipError(f"{segment.video_id}: fetch timed out after {timeout:g} s",
                                "fetch timed out")
        else:
            last = ([line for line in err.decode("utf-8", "replace").splitlines()
                     if line.strip()] or ["(nothing on stderr)"])[-1].strip()
            if proc.returncode == 0 and dest.exists() and dest.stat().st_size > 0:
                return dest
            failure = ClipError(f"{segment.video_id}: fetch failed (exit {proc.returncode}"
                                + (", no file written" if proc.returncode == 0 else "")
                                + f"): {last}", "fetch failed")
        for p in dest.parent.iterdir():           # a retry starts from nothing
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    raise failure


def cut_segment(path, start, end):
    """Decode [start, end) of a video: (16 kHz mono waveform (N,) float32, 10 frames as PIL
    images, info). Frame k is the frame shown at start + k seconds (the last one whose
    time is at or before it); frames past the end of the segment or of the video repeat the
    last one shown. A source no longer than the segment (+ PRECUT_TOLERANCE) is taken to be
    that segment already cut, from its own time 0, and info says so. Times are counted from
    the container's start time, which keeps the sound and the picture in sync."""
    av = audio_io.import_av()
    try:
        with av.open(str(path)) as c:
            _check_tracks(c, path)
            origin = (c.start_time or 0) / av.time_base
            duration = c.duration / av.time_base if c.duration else None
            length = end - start
            precut = start > 0 and duration is not None and duration <= length + PRECUT_TOLERANCE
            t0 = origin + (0.0 if precut else start)
            t1 = t0 + length
            sound = _read_sound(c, t0, t1, path)
            sound_ends = t0 + sound.numel() / audio_io.SAMPLE_RATE
            frames, repeated = _read_shown_frames(c, [t0 + k for k in range(data.NUM_FRAMES)],
                                                  min(t1, sound_ends), path)
    except av.FFmpegError as err:
        raise ClipError(f"{path}: cannot decode ({err})", "undecodable") from err
    info = {"source_was_cut": True} if precut else {}
    if repeated:
        info["frames_repeated"] = repeated
    return sound, frames, info


def _check_tracks(container, path):
    if not container.streams.video:
        raise ClipError(f"{path}: no video track", "no video track")
    if not container.streams.audio:
        raise ClipError(f"{path}: no audio track (a clip needs its sound)", "no audio track")


def _read_sound(c, t0, t1, path):
    """The sound of [t0, t1) (container times) at 16 kHz mono; it stops early where the
    track does. Decoded at the track's own rate from a second before t0, placed by the
    first decoded frame's time, then resampled and cut."""
    c.seek(max(0, int((t0 - 1.0) * 1e6)), any_frame=False, backward=True)
    chunks, first, rate = [], None, None
    for frame in c.decode(audio=0):
        if frame.time is None or frame.time + frame.samples / frame.sample_rate <= t0:
            continue
        if frame.time >= t1:
            break
        if first is None:
            first, rate = frame.time, frame.sample_rate
            mono = audio_io.import_av().AudioResampler(format="flt", layout="mono", rate=rate)
        chunks += [f.to_ndarray().reshape(-1) for f in mono.resample(frame)]
    if first is None:
        raise ClipError(f"{path}: no sound in the segment (the track ends before it)", "too short")
    chunks += [f.to_ndarray().reshape(-1) for f in mono.resample(None)]
    if first > t0 + SHORT_TOLERANCE:
        raise ClipError(f"{path}: the sound track starts {first - t0:.2f} s into the segment",
                        "undecodable")
    wave_src = torch.from_numpy(np.concatenate(chunks).astype(np.float32))
    wave_16k = torchaudio.functional.resample(wave_src, rate, audio_io.SAMPLE_RATE)
    skip = round((t0 - first) * audio_io.SAMPLE_RATE)
    return wave_16k[max(skip, 0):skip + round((t1 - t0) * audio_io.SAMPLE_RATE)].contiguous()


def _read_shown_frames(c, times, stop, path):
    """The frame shown at each time (container times); a time at or after `stop` (the end of
    the clip's sound) or after the video's last frame repeats the last frame taken."""
    c.seek(max(0, int(times[0] * 1e6)), any_frame=False, backward=True)
    shown, previous = [], None
    wanted = [t for t in times if t < stop] or times[:1]
    for frame in c.decode(video=0):
        if frame.time is None:
            continue
        while len(shown) < len(wanted) and frame.time > wanted[len(shown)] + 1e-6:
            shown.append((previous or frame).to_image().convert("RGB"))
        if len(shown) == len(wanted):
            break
        previous = frame
    if previous is not None and len(shown) < len(wanted):
        last = previous.time + float(previous.duration * previous.time_base
                                     if previous.duration else 0.04)
        while len(shown) < len(wanted) and wanted[len(shown)] < last:
            shown.append(previous.to_image().convert("RGB"))
    if not shown:
        raise ClipError(f"{path}: no video frame in the span read (the picture ends before "
                        f"it)", "too short")
    repeated = data.NUM_FRAMES - len(shown)
    return shown + [shown[-1]] * repeated, repeated


def prepare_segments(cfg):
    """--segments: every listed clip found in --videos or fetched with --fetch, cut and
    written; those that cannot be are recorded in OUT/failed/ with their reason, and a rerun
    skips both (--retry_missing: not the failed). Then the manifests of the clips that
    exist: VGGSound's train.json / test.json, one per AudioSet CSV. Returns (the entries
    written into the manifests, {video_id: reason} of every listed clip that is missing)."""
    out = Path(cfg.out)
    if cfg.segments_format not in ("auto", "audioset", "vggsound"):
        raise data.DataError(f"--segments_format must be auto, audioset or vggsound, got "
                             f"{cfg.segments_format!r}")
    fmt, segments = None, []
    for path in cfg.segments.split(","):
        kind, rows = read_segments(path.strip(), cfg.segments_format)
        if fmt not in (None, kind):
            raise data.DataError(f"{path}: a {kind} list among {fmt} lists; prepare them apart")
        fmt, segments = kind, segments + rows
    unique, seen = [], set()   # each clip once, where it is first listed
    for s in segments:
        if s.video_id not in seen:
            seen.add(s.video_id)
            unique.append(s)
    if len(unique) < len(segments):
        print(f"{len(segments) - len(unique)} rows list a clip listed before: each clip once")
    labels, classes = segment_labels(fmt, unique, cfg.label_csv)
    if not (cfg.videos or cfg.fetch):
        raise data.DataError("--segments needs where the videos are: --videos DIR, --fetch "
                             "TEMPLATE, or both (the folder first)")
    if cfg.fetch and not shutil.which(shlex.split(cfg.fetch)[0]):
        raise data.DataError(f"--fetch: command {shlex.split(cfg.fetch)[0]!r} not found")
    sources = find_sources(cfg.videos) if cfg.videos else {}
    frame_folders = [f"frames/frame_{k}" for k in range(data.NUM_FRAMES)]
    for folder in ("audio", "clips", "failed", *frame_folders):
        (out / folder).mkdir(parents=True, exist_ok=True)
    for scratch in (".partial", ".fetch"):   # what an interrupted run left
        shutil.rmtree(out / scratch, ignore_errors=True)
    done = {p.stem for p in (out / "clips").glob("*.json")}
    failed = {p.stem for p in (out / "failed").glob("*.json")}
    todo = [s for s in unique if s.video_id not in done
            and (cfg.retry_missing or s.video_id not in failed)]
    before = sum(1 for s in unique if s.video_id in done)
    print(f"{len(unique)} clips listed ({fmt}): {before} already written, "
          f"{len(unique) - before - len(todo)} failed before (--retry_missing retries them), "
          f"{len(todo)} to make")
    args = [(s, labels[s.video_id], sources.get(s.ytid, []), cfg) for s in todo]
    if cfg.workers > 0:
        with multiprocessing.get_context("spawn").Pool(
                cfg.workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
            list(tqdm(pool.imap_unordered(_segment_one, args), total=len(args), desc="clips"))
    else:
        for a in tqdm(args, desc="clips"):
            _segment_one(a)
    written = {s.video_id: json.loads((out / "clips" / f"{s.video_id}.json").read_text())
               for s in unique if (out / "clips" / f"{s.video_id}.json").exists()}
    missing = {s.video_id: json.loads((out / "failed" / f"{s.video_id}.json").read_text())
               for s in unique if s.video_id not in written
               and (out / "failed" / f"{s.video_id}.json").exists()}
    _write_classes(out, cfg.label_csv, classes)
    stems = [Path(path.strip()).stem for path in cfg.segments.split(",")]   # AudioSet's splits
    groups = ([("train.json", "train"), ("test.json", "test")] if fmt == "vggsound" else
              [(f"{stem}.json", stem) for stem in stems])
    entries = []
    for name, split in groups:
        part = [written[s.video_id] for s in unique if s.split == split and s.video_id in written]
        if part:
            data.write_manifest(out / name, part)
        print(f"{out / name}: {len(part)} clips" + ("" if part else " (none: not written)"))
        entries += part
    _write_failures(out, {vid: (r["reason"], r["detail"]) for vid, r in missing.items()})
    print(summary(len(unique), before, written, missing, out))
    return entries, {vid: r["reason"] for vid, r in missing.items()}


def _segment_one(args):
    """Find or fetch one segment's video and cut it; a failure is recorded in OUT/failed/
    (so that a rerun skips it) and nothing it made is left behind."""
    segment, labels, candidates, cfg = args
    out = Path(cfg.out)
    scratch = out / ".fetch" / segment.video_id
    try:
        if candidates:
            source = pick_source(segment, candidates)
        elif cfg.fetch:
            scratch.mkdir(parents=True)
            source = fetch(cfg.fetch, segment, scratch / f"{segment.video_id}.mp4",
                           cfg.fetch_timeout)
        else:
            raise ClipError(f"{segment.video_id}: no file in {cfg.videos} starts with "
                            f"{segment.ytid}", "not found")
        sound, frames, info = cut_segment(source, segment.start, segment.end)
        seconds = sound.numel() / audio_io.SAMPLE_RATE
        if seconds < MIN_SECONDS:
            raise ClipError(f"{source}: {seconds:.2f} s of sound in [{segment.start:g}, "
                            f"{segment.end:g}) s (at least {MIN_SECONDS:g} s needed)", "too short")
        entry = {"video_id": segment.video_id, "wav": f"audio/{segment.video_id}.wav",
                 "video_path": "frames", "labels": labels, "ytid": segment.ytid,
                 "start": segment.start, "end": segment.end,
                 "source": "fetched" if not candidates else str(source), **info}
        if seconds < segment.end - segment.start - SHORT_TOLERANCE:
            entry["short"] = True
        write_clip(out, entry, sound, frames, cfg.jpeg_quality)
        (out / "failed" / f"{segment.video_id}.json").unlink(missing_ok=True)
    except (ClipError, data.DataError) as err:
        shutil.rmtree(out / ".partial" / segment.video_id, ignore_errors=True)
        _write_json(out / "failed" / f"{segment.video_id}.json",
                    {"video_id": segment.video_id, "reason": getattr(err, "reason", "undecodable"),
                     "detail": str(err)})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def summary(asked, before, written, missing, out):
    """The end of a run: asked, written, missing by reason."""
    counts = {}
    for record in missing.values():
        counts[record["reason"]] = counts.get(record["reason"], 0) + 1
    short = sum(1 for e in written.values() if e.get("short"))
    cut = sum(1 for e in written.values() if e.get("source_was_cut"))
    lines = [f"{asked} clips asked, {len(written)} written ({before} before this run), "
             f"{len(missing)} missing" + (f" (in {out / 'failures.txt'})" if missing else "")]
    by_count = sorted(counts.items(), key=lambda item: -item[1])
    lines += [f"  missing, {reason}: {n}" for reason, n in by_count]
    if short:
        lines.append(f"  written short (the source ends before the segment does): {short}")
    if cut:
        lines.append(f"  sources taken as the segment already cut (by their duration): {cut}")
    return "\n".join(lines)


def _write_failures(out, failures):
    """OUT/failures.txt: video_id, reason and detail of every failure, tab-separated."""
    (out / "failures.txt").write_text("".join(f"{vid}\t{reason}\t{detail}\n"
                                              for vid, (reason, detail) in failures.items()))


def _write_classes(out, label_csv, rows):
    target = out / data.LABEL_CSV_NAME
    if label_csv and Path(label_csv).resolve() == target.resolve():
        return
    with open(target, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["index", "mid", "display_name"])
        writer.writerows(rows)


# =============================================================================
# Evaluation subsets of the prepared clips
# =============================================================================

def write_subset(out, name, wanted):
    """OUT/{name}.json: the clips of `wanted` ({video_id or YTID: extra entry keys}) that
    exist in OUT (a bare YTID stands for its only clip), and OUT/{name}_missing.txt the
    others. Returns (entries, missing ids)."""
    records = {p.stem: p for p in (out / "clips").glob("*.json")}
    by_ytid = {}
    for vid in records:
        by_ytid.setdefault(vid.rsplit("_", 1)[0], []).append(vid)
    entries, missing = [], []
    for key, extra in wanted.items():
        vid = key if key in records else None
        if vid is None and len(by_ytid.get(key, [])) == 1:
            vid = by_ytid[key][0]
        if vid is None:
            missing.append(key)
            continue
        entries.append({**json.loads(records[vid].read_text()), **extra})
    if entries:
        data.write_manifest(out / f"{name}.json", entries)
    (out / f"{name}_missing.txt").write_text("".join(f"{m}\n" for m in missing))
    print(f"{out / (name + '.json')}: {len(entries)} of {len(wanted)} clips"
          + (f", {len(missing)} missing (in {out / (name + '_missing.txt')})" if missing else ""))
    return entries, missing


def read_vggss(path):
    """VGG-SS's annotation file (metadata/vggss.json of hche11/Localizing-Visual-Sounds-the-
    Hard-Way: a list of {"file": "{YTID}_{start:06d}", "class", "bbox": [[x0, y0, x1, y1],
    ...]}, fractions of the frame at the clip's middle, data.EVAL_FRAME) as {video_id:
    {"boxes": [...]}}. Coordinates are clipped to [0, 1] (a few lie far outside) and boxes
    left with no area are dropped; a clip left with none is not kept."""
    with open(path, encoding="utf-8") as f:
        clips = json.load(f)
    wanted, dropped = {}, 0
    for i, clip in enumerate(clips):
        match = re.fullmatch(r"(.+)_(\d+)", str(clip.get("file", "")))
        if not match or not isinstance(clip.get("bbox"), list):
            raise data.DataError(f"{path}: item {i}: expected a file YTID_SSSSSS and a bbox "
                                 f"list, got {str(clip)[:120]}")
        boxes = [[min(max(float(v), 0.0), 1.0) for v in box] for box in clip["bbox"]]
        kept = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
        dropped += len(boxes) - len(kept)
        if kept:
            wanted[segment_id(match.group(1), int(match.group(2)))] = {"boxes": kept}
    if dropped:
        print(f"{path}: {dropped} boxes with no area inside the frame dropped")
    return wanted


def read_ids(path):
    """One id a line (a clip's video_id, or a bare YTID); blank and # lines skipped."""
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    return {i: {} for i in ids}


# =============================================================================
# One clip
# =============================================================================

def prepare_clip(job, cfg, known):
    """Decode job's inputs, write its WAV and 10 frames under OUT/.partial, move them into
    place, then record the entry in OUT/clips/{video_id}.json. Raises ClipError."""
    out = Path(cfg.out)
    if job.labels is None:
        raise ClipError(f"{job.source}: video_id {job.video_id!r} is not in {cfg.labels}")
    labels = ",".join(x.strip() for x in job.labels.split(",") if x.strip())
    if known is not None and any(x not in known for x in labels.split(",") if x):
        unknown = [x for x in labels.split(",") if x and x not in known]
        raise ClipError(f"{job.source}: labels {unknown} are not in {cfg.label_csv}")
    if job.kind == "video":
        frames, repeated = read_video_frames(job.source)
    else:
        frames, repeated = [_read_image(job.image)] * data.NUM_FRAMES, 0
    wave_16k = audio_io.decode_audio(job.source)                       # (N,) float32, 16 kHz
    peak = float(np.abs(wave_16k.numpy()).max())
    peak_db = 20 * np.log10(peak) if peak > 0 else -np.inf
    if peak_db < cfg.min_peak_db:
        raise ClipError(f"{job.source}: silent audio (peak {peak_db:.1f} dBFS, below "
                        f"--min_peak_db {cfg.min_peak_db:g})")
    entry = {"video_id": job.video_id, "wav": f"audio/{job.video_id}.wav", "video_path": "frames",
             "labels": labels, "source": job.source}
    if job.kind == "pair":
        entry["image"] = job.image
    if repeated:
        entry["frames_repeated"] = repeated
    write_clip(out, entry, wave_16k, frames, cfg.jpeg_quality)


def write_clip(out, entry, wave_16k, frames, jpeg_quality=90):
    """Write a clip's WAV (16 kHz, 16-bit, mono) and 10 frames under OUT/.partial, move them
    into place, then record `entry` (with its duration and frame size) in
    OUT/clips/{video_id}.json: the clip exists once its record does."""
    video_id = entry["video_id"]
    partial = out / ".partial" / video_id
    partial.mkdir(parents=True)
    pcm = np.round(np.clip(wave_16k.numpy(), -1, 1) * 32767).astype("<i2")
    with wave.open(str(partial / "audio.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(audio_io.SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    for k, img in enumerate(frames):
        img.save(partial / f"frame_{k}.jpg", format="JPEG", quality=jpeg_quality)
    for k in range(data.NUM_FRAMES):
        os.replace(partial / f"frame_{k}.jpg", data.frame_path(out / "frames", video_id, k))
    os.replace(partial / "audio.wav", out / "audio" / f"{video_id}.wav")
    partial.rmdir()
    entry = {**entry, "duration": round(pcm.size / audio_io.SAMPLE_RATE, 3),
             "frame_size": list(frames[0].size)}
    _write_json(out / "clips" / f"{video_id}.json", entry)


def _write_json(path, obj):
    """One JSON line, written atomically (temporary file + rename)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj) + "\n")
    os.replace(tmp, path)


def read_video_frames(path):
    """Frame k = the frame shown at k seconds, k = 0 .. 9 (the rule of a segment's cut), as
    RGB PIL images; a shorter video repeats its last frame. Returns (frames, repeats)."""
    av = audio_io.import_av()
    try:
        with av.open(str(path)) as c:
            _check_tracks(c, path)
            origin = (c.start_time or 0) / av.time_base
            return _read_shown_frames(c, [origin + k for k in range(data.NUM_FRAMES)],
                                      float("inf"), path)
    except av.FFmpegError as err:
        raise ClipError(f"{path}: cannot decode video ({err})") from err


def _read_image(path):
    """A picture as RGB; a transparent one (a cut-out) is laid over white, because the
    colours stored under transparent pixels are arbitrary and JPEG keeps no alpha."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
            return data.to_rgb(img)
    except (OSError, ValueError, SyntaxError) as err:
        raise ClipError(f"{path}: cannot read the picture ({err})") from err


if __name__ == "__main__":
    config = utils.parse_config(PrepareConfig, description=__doc__.splitlines()[0])
    try:
        _, failed = main(config)
    except (data.DataError, ValueError, OSError) as error:
        print(f"prepare.py: error: {error}", file=sys.stderr)
        sys.exit(2)
    # a segment list's missing clips are data (failures.txt), not a failed run
    segments = config.segments or config.vggss or config.ids
    sys.exit(1 if failed and not config.allow_failures and not segments else 0)
