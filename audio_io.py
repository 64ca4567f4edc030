"""Audio files -> mono 16 kHz waveforms (method.md §1): a dependency-free WAV reader, and
every other format (mp3, flac, a video's sound track, ...) through PyAV, an optional
extra (requirements-prepare.txt) imported only where it is needed.

Every failure raises utils.DataError naming the file and the reason; data.py adds
the manifest entry.
"""
import struct

import numpy as np
import torch
import torchaudio

from utils import DataError

SAMPLE_RATE = 16000          # method.md §1: every clip is resampled to 16 kHz
_MIN_SAMPLES = 400           # one 25 ms Kaldi window at 16 kHz

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


PYAV_INSTALL = "pip install -r requirements-prepare.txt"  # PyAV: FFmpeg's decoders in a wheel


def import_av(why="PyAV is needed"):
    """The PyAV module, or a DataError saying `why` and the command that installs it."""
    try:
        import av  # an optional extra: only non-WAV audio and prepare.py need it
    except ImportError:
        raise DataError(f"{why}, and it is not installed: `{PYAV_INSTALL}` (or `pip install av`; "
                        f"its wheels bundle FFmpeg, no system FFmpeg is needed)") from None
    return av


def decode_audio(path, sample_rate=SAMPLE_RATE):
    """Any audio FFmpeg decodes (the first audio stream of a file: mp3, ogg, flac, m4a,
    a video's track) through PyAV, downmixed to mono and resampled to `sample_rate` by
    FFmpeg's libswresample: (N,) float32 in [-1, 1]. Raises DataError on failure."""
    av = import_av(f"{path}: not a WAV file; reading it needs PyAV")
    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise DataError(f"{path}: no audio track")
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            chunks = []
            for frame in container.decode(audio=0):
                chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(frame)]
            chunks += [f.to_ndarray().reshape(-1) for f in resampler.resample(None)]  # flush
    except av.FFmpegError as err:
        raise DataError(f"{path}: cannot decode audio ({err})") from err
    if not chunks or sum(c.size for c in chunks) == 0:
        raise DataError(f"{path}: zero-length audio (no samples)")
    return torch.from_numpy(np.concatenate(chunks).astype(np.float32))


def load_waveform(path):
    """Mono 16 kHz waveform with the mean removed (method.md §1); returns (N,) float32.

    WAV files (recognized by their RIFF header) are decoded by read_wav, with no
    dependency; other formats through PyAV (decode_audio), an optional extra.
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
        wav = torch.from_numpy(samples).mean(dim=0)  # downmix channels, (N,)
        if rate != SAMPLE_RATE:
            wav = torchaudio.functional.resample(wav, int(rate), SAMPLE_RATE)
    else:
        wav = decode_audio(path)
    if wav.numel() < _MIN_SAMPLES:
        raise DataError(f"{path}: audio too short ({wav.numel()} samples at 16 kHz; one 25 ms "
                        f"window needs {_MIN_SAMPLES})")
    return wav - wav.mean()
