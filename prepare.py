"""Real recordings in: videos, or sound + picture pairs, in the layout data.py reads.

    pip install -r requirements-prepare.txt        # PyAV (its wheels bundle FFmpeg)
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
    OUT/failures.txt                          every input that failed, with the reason

--videos: a folder (searched recursively) or a text file listing video files. Frame k
is the first frame shown at or after k seconds; a video shorter than 10 s repeats its
last frame (the entry's "frames_repeated" says how many times). Its audio track is
downmixed and resampled to 16 kHz; a video without one fails (never silence).
--pairs CSV (columns audio, image, labels[, video_id]; paths relative to the CSV): a
sound in any format FFmpeg decodes and a still picture become a clip whose 10 frames
are the picture. --pairs_from FOLDER pairs every sound file with the picture of the
same name beside it, labelled by the sub-folder (e.g. animals/mammals).
--labels CSV (video_id, labels): the comma-separated label ids of each video.

A sound whose peak stays below --min_peak_db (a silent placeholder) fails. Every clip
is written into OUT/.partial first and moved into place, then recorded in
OUT/clips/{video_id}.json: a run stopped at any point leaves no half-written clip, and
the same command again skips the recorded clips and redoes the rest. Inputs that
failed are listed with file and reason; then the exit status is 1 and no manifest is
written, unless --allow_failures.
"""
import csv
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import wave
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
from PIL import Image
from tqdm import tqdm

import audio_io
import data
import utils
from utils import option

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts")
AUDIO_SUFFIXES = (".wav", ".ogg", ".oga", ".opus", ".mp3", ".flac", ".m4a", ".aac", ".wma")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")


@dataclasses.dataclass
class PrepareConfig:
    """Every field is a `--field value` option (a bare `--allow_failures` means true)."""
    videos: Optional[str] = option(None, "a folder of videos (recursive) or a text file "
                                         "listing video files, one per line")
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
    workers: int = option(0, "decoding processes (0: this one)")
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
    """An input that cannot become a clip; the message names the file and the reason."""


# =============================================================================
# The recipe
# =============================================================================

def main(cfg):
    """Prepare every input of `cfg`; returns (the manifest entries, the failures)."""
    audio_io.import_av()  # fail at once, naming the install command, when PyAV is missing
    out = Path(cfg.out)
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
    report = "".join(f"{vid}: {reason}\n" for vid, reason in failures.items())
    (out / "failures.txt").write_text(report)
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
    """(video_id, reason) of every job that failed; the others are written (prepare_clip)."""
    args = [(job, cfg, known) for job in jobs]
    if cfg.workers > 0:
        with multiprocessing.get_context("spawn").Pool(cfg.workers) as pool:
            results = list(tqdm(pool.imap_unordered(_run_one, args), total=len(jobs),
                                desc="prepare"))
    else:
        results = [_run_one(a) for a in tqdm(args, desc="prepare")]
    return [(vid, reason) for vid, reason in results if reason is not None]


def _run_one(args):
    job, cfg, known = args
    try:
        prepare_clip(job, cfg, known)
        return job.video_id, None
    except (ClipError, data.DataError) as err:
        return job.video_id, str(err)


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
    partial = out / ".partial" / job.video_id
    partial.mkdir(parents=True)
    pcm = np.round(np.clip(wave_16k.numpy(), -1, 1) * 32767).astype("<i2")
    with wave.open(str(partial / "audio.wav"), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(audio_io.SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    for k, img in enumerate(frames):
        img.save(partial / f"frame_{k}.jpg", format="JPEG", quality=cfg.jpeg_quality)
    for k in range(data.NUM_FRAMES):
        os.replace(partial / f"frame_{k}.jpg", data.frame_path(out / "frames", job.video_id, k))
    os.replace(partial / "audio.wav", out / "audio" / f"{job.video_id}.wav")
    partial.rmdir()
    entry = {"video_id": job.video_id, "wav": f"audio/{job.video_id}.wav", "video_path": "frames",
             "labels": labels, "source": job.source, "duration": round(pcm.size / audio_io.SAMPLE_RATE, 3)}
    if job.kind == "pair":
        entry["image"] = job.image
    if repeated:
        entry["frames_repeated"] = repeated
    record = out / "clips" / f"{job.video_id}.json"
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry) + "\n")
    os.replace(tmp, record)  # the clip is done once its record exists


def read_video_frames(path):
    """Frame k = the first frame shown at or after k seconds, k = 0 .. 9, as RGB PIL
    images; a shorter video repeats its last frame. Returns (frames, repeats)."""
    av = audio_io.import_av()
    frames = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ClipError(f"{path}: no video track")
            if not container.streams.audio:
                raise ClipError(f"{path}: no audio track (a clip needs its sound)")
            for frame in container.decode(video=0):
                if frame.time is None:
                    continue
                while len(frames) < data.NUM_FRAMES and frame.time >= len(frames) - 1e-6:
                    frames.append(frame.to_image().convert("RGB"))
                if len(frames) == data.NUM_FRAMES:
                    break
    except av.FFmpegError as err:
        raise ClipError(f"{path}: cannot decode video ({err})") from err
    if not frames:
        raise ClipError(f"{path}: no decodable video frame")
    repeated = data.NUM_FRAMES - len(frames)
    return frames + [frames[-1]] * repeated, repeated


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
    sys.exit(1 if failed and not config.allow_failures else 0)
