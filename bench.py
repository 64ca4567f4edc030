"""Speed and memory of EquiAV's hot paths, measured on whatever device this runs on.

    python bench.py                       # full run: a few minutes on a 2-core CPU
    python bench.py --quick               # smoke run (CI): well under a minute
    python bench.py --parts step --presets base --precisions bf16 --compile true   # one GPU

Four parts (--parts), each printed as a table and written to one JSON file (--out):

step       pretrain.train_step itself, built by pretrain.build_model for the paper
           profile (method.md §12): random time roll -> batched augmentation on the device
           (method.md §8) -> centroid vectors (method.md §6) -> EquiAV forward -> EquiAVLoss
           (method.md §7) -> backward -> gradient clipping -> AdamW. Samples/s and peak memory
           per preset, precision (fp32 = --amp false; bf16 = --amp true, CUDA only, as
           in pretrain.py) and mode (eager, torch.compile); also the time of the input
           pipeline alone (pretrain.prepare_inputs) as a share of the step, and the
           analytic FLOP count of the step (`step_flops`) over the time, against the
           measured peak of a large matmul of the same dtype (MFU).
augment    augmentation (augment.augment_audio / augment_visual) at the base sizes, on
           CPU and CUDA, and the device ops (kernel launches and copies) of one step's
           input pipeline (pretrain.prepare_inputs), counted on the meta device.
data       data loading from the toy dataset files (tiny sizes), 0 and 2 workers:
           samples over the wall time from creating the iterator to the last batch.
retrieval  retrieval.retrieval_metrics on random unit embeddings of the presets' sizes.
cut        (not run unless asked; needs PyAV) prepare.py's cut of one 10 s segment out of a
           YouTube-like video written here: 60 s of 640x360 H.264 at 25 fps with a
           keyframe every 5 s, AAC 44.1 kHz stereo; decode, resample, 10 frames, WAV and
           JPEGs written. Seconds per clip, in this process.

Every timing: warm-up first, the device synchronized before each clock read,
the median of the repeats. Peak memory is torch.cuda.max_memory_allocated on
CUDA; on CPU it is the rise of the process's peak resident set size (Linux
VmHWM, reset before each measurement) over the resident size before the model
was built -- RSS, not allocator bytes, so it is labelled differently.
"""
import dataclasses
import datetime
import gc
import json
import math
import multiprocessing
import os
import platform
import re
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import audio_io
import augment
import data
import prepare
import pretrain
import retrieval
import toy
import utils
from losses import EquiAVLoss
from model import EquiAV, get_config
from utils import option


# =============================================================================
# Config
# =============================================================================

@dataclasses.dataclass
class BenchConfig:
    """Every field is a `--field value` option (bare `--quick` means `--quick true`).
    Fields left at none take the full or the --quick default (DEFAULTS below)."""
    quick: bool = option(False, "smoke-test sizes: tiny step in fp32 eager only, small batches, "
                                "few repeats, N=1,725 retrieval only")
    parts: str = option("step,augment,data,retrieval", "comma-separated parts to run")
    presets: Optional[str] = option(None, "step part's presets (full: tiny,base; quick: tiny)")
    precisions: Optional[str] = option(None, "fp32 and/or bf16 autocast, which pretrain.py "
                                             "uses on CUDA only (full: fp32,bf16; quick: fp32)")
    compile: Optional[bool] = option(None, "also measure torch.compile (full: true, quick: false)")
    compile_presets: Optional[str] = option(None, "presets measured compiled (none: tiny on CPU, "
                                                  "all on CUDA; base takes minutes on a CPU)")
    batch_tiny: Optional[int] = option(None, "step batch size of tiny (CUDA 64, CPU 32, quick 8)")
    batch_base: Optional[int] = option(None, "step batch size of base (CUDA 16 = the paper's "
                                             "per-GPU batch, CPU 2)")
    S: int = option(16, "centroid vectors per sample (method.md §6)")
    isolate: bool = option(True, "on CPU, measure each step row in a fresh process, so that its "
                                 "peak resident memory is its own (freed memory stays mapped "
                                 "in a process and would hide later rows' peaks)")
    warmup: Optional[int] = option(None, "warm-up iterations per measurement (full 2, quick 1)")
    repeats: Optional[int] = option(None, "timed iterations per measurement (full 5, quick 2)")
    budget_s: float = option(60.0, "time budget per step measurement: fewer repeats (at least "
                                   "1) when the warm-up shows they would not fit")
    aug_batch: Optional[int] = option(None, "batch size of the augmentation part (full 16, quick 4)")
    data_batches: Optional[int] = option(None, "timed batches per data-loading measurement "
                                               "(full 24, quick 2)")
    data_batch_size: int = option(32, "batch size of the data-loading part")
    toy_root: str = option("data/toy", "toy dataset for the data part (full: generated if absent; "
                                       "quick: a small temporary one if absent)")
    retrieval_sizes: Optional[str] = option(None, "clip counts N (full 1725,15000; quick 1725)")
    device: Optional[str] = option(None, "main device: cpu or cuda; none -> cuda when available "
                                         "(augment and retrieval also run on the CPU)")
    out: str = option("bench_results/bench.json", "JSON file written at the end")
    seed: int = option(0, "seed of the random inputs and augmentation streams")


DEFAULTS = {
    "full": dict(presets="tiny,base", precisions="fp32,bf16", compile=True, warmup=2, repeats=5,
                 aug_batch=16, data_batches=24, retrieval_sizes="1725,15000"),
    "quick": dict(presets="tiny", precisions="fp32", compile=False, warmup=1, repeats=2,
                  aug_batch=4, data_batches=2, retrieval_sizes="1725"),
}
PARTS = ("step", "augment", "data", "retrieval", "cut")


def resolve_config(cfg):
    defaults = DEFAULTS["quick" if cfg.quick else "full"]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})
    for name, allowed in (("parts", PARTS), ("precisions", ("fp32", "bf16"))):
        unknown = set(_items(getattr(cfg, name))) - set(allowed)
        if unknown:
            raise utils.UsageError(f"--{name}: unknown {sorted(unknown)}; choose from {list(allowed)}")
    for preset in _items(cfg.presets):
        try:
            get_config(preset)
        except ValueError as err:
            raise utils.UsageError(f"--presets: {err}") from None
    return cfg


def _items(text):
    return [s.strip() for s in (text or "").split(",") if s.strip()]


# =============================================================================
# Clocks and memory
# =============================================================================

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup, repeats):
    """Median and all wall times (s) of `repeats` calls of fn after `warmup` calls; the
    device is synchronized before each clock read."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def _rss_kib(field):
    with open("/proc/self/status") as f:
        match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    return int(match.group(1))


class PeakMemory:
    """Peak memory of what runs between start() and stop(), in MiB.

    CUDA: torch.cuda.max_memory_allocated (reset at start): every tensor torch
    allocated, model, gradients and optimizer state included. CPU (Linux): the
    process's peak resident set size VmHWM, reset at start through
    /proc/self/clear_refs, minus the resident size at start; where the reset is
    not allowed, the growth of getrusage's ru_maxrss (0 when an earlier
    measurement already reached a higher peak). `kind` says which one.
    """

    def __init__(self, device):
        self.device = device
        self.kind = "cuda_max_allocated"
        if device.type != "cuda":
            self.kind = "cpu_peak_rss_delta" if self._can_reset() else "cpu_maxrss_growth"

    @staticmethod
    def _can_reset():
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _rss_kib("VmHWM")
            return True
        except (OSError, AttributeError):
            return False

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.kind == "cpu_peak_rss_delta":
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            self.base = _rss_kib("VmRSS")
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self):
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.kind == "cpu_peak_rss_delta":
            return (_rss_kib("VmHWM") - self.base) / 1024
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024


# =============================================================================
# FLOPs of one pretraining step, and the measured matmul peak
# =============================================================================

def step_flops(cfg, B, S):
    """Analytic matmul FLOPs of one EquiAV training step (method.md §2-6), default flags.

    A matmul of (n, a) by (a, b) is 2 n a b FLOPs forward; backward computes the
    input and the weight gradients, twice that, so training = 3 x forward (the
    usual 6 x tokens x parameters rule) -- except the patch embedding, whose input
    (the data) needs no gradient: 2 x forward. Per modality m with N_m tokens,
    C_m input channels, p the patch size, D the width, r the MLP ratio, L the depth:

      encoder, on 2B inputs (B originals, B augmented views; method.md §2, 6):
        2 (2B) N_m [C_m p^2 D + L (4 + 2r) D^2]      patch embedding, qkv + proj, MLP
        + L (2B) 4 N_m^2 D                           attention scores q k^T and a v
      transformation predictor on Q = 1 + S queries in two calls (t_m; the S centroid
      vectors; method.md §3, 4) with aug width A, inner width I = heads x head_dim:
        2 B Q [d_t A + 2 A^2 + A I + I D + 2 r D^2]  aug encoder, to_q, to_out, MLP
        + 2 x 2 B N_m (2 D I) + 4 B Q N_m I          to_k, to_v (each call); cross-attention
      projection heads (method.md §5), g_inter on B rows, g_intra on 2B rows, hidden H, out P:
        2 (3B) [D H + H^2 + H P]

    step = 3 x (sum over both modalities) - (patch embedding forward). Not counted:
    elementwise work (norms, GELU, softmax), the losses' B x B similarities
    (< 0.1 %), augmentation, AdamW. tests/test_bench.py checks the count against
    torch's FlopCounterMode on a real step.
    """
    D, r, L, p = cfg.embed_dim, cfg.mlp_ratio, cfg.depth, cfg.patch_size
    A, I, H, P = cfg.aug_hidden, cfg.pred_heads * cfg.pred_head_dim, cfg.proj_hidden, cfg.proj_dim
    Q = 1 + S
    total, patch = 0.0, 0.0
    for n_tokens, chans, d_t in ((math.prod(cfg.audio_grid), 1, augment.AUDIO_DIM),
                                 (math.prod(cfg.visual_grid), 3, augment.VISUAL_DIM)):
        patch += 2 * (2 * B) * n_tokens * chans * p * p * D
        enc = 2 * (2 * B) * n_tokens * (chans * p * p * D + L * (4 + 2 * r) * D * D)
        enc += L * (2 * B) * 4 * n_tokens ** 2 * D
        pred = 2 * B * Q * (d_t * A + 2 * A * A + A * I + I * D + 2 * r * D * D)
        pred += 2 * (2 * B * n_tokens * 2 * D * I) + 4 * B * Q * n_tokens * I
        heads = 2 * (3 * B) * (D * H + H * H + H * P)
        total += enc + pred + heads
    return 3 * total - patch


def matmul_peak(device, dtype, quick):
    """Measured FLOP/s of a large square matmul, the fastest of the repeats (the MFU denominator)."""
    if device.type == "cuda":
        n, reps = 8192, (3 if quick else 10)
    else:
        n, reps = (1024 if quick or dtype != torch.float32 else 2048), (3 if quick else 8)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    _, times = timed(lambda: a @ b, device, warmup=1, repeats=reps)
    # the fastest repeat: a peak, not a typical time (on a shared machine the median
    # can be slower than the step's own matmuls and put MFU above 100 %)
    return {"dtype": str(dtype).replace("torch.", ""), "n": n, "flops_per_s": 2 * n ** 3 / min(times)}


# =============================================================================
# Part 1: the pretraining step
# =============================================================================

class StepSetup:
    """One pretraining step exactly as pretrain.py runs it: model, loss, AdamW and
    scaler from pretrain.build_model for the paper profile (method.md §12: AdamW beta
    0.9/0.95, weight decay 1e-5, clipping 0.01) at the given preset and batch, and
    the step pretrain.train_step, on a fixed loader-like batch of CPU tensors (pinned
    on CUDA) that every step copies to the device."""

    def __init__(self, preset, B, S, device, precision, compiled, seed):
        self.cfg = pretrain.resolve_config(pretrain.PretrainConfig(
            data="(bench)", profile="paper", preset=preset, batch_size=B, S=S, seed=seed,
            amp=precision == "bf16", compile=compiled, device=device.type))
        self.mcfg = pretrain.model_config(self.cfg)
        self.device = device
        self.net, self.criterion, self.optimizer, self.scaler = pretrain.build_model(
            self.cfg, self.mcfg, device)
        self.model = utils.wrap_model(self.net, device, 0, self.cfg.compile)
        self.gen = torch.Generator().manual_seed(seed)
        cpu_gen = torch.Generator().manual_seed(seed)
        c = self.mcfg
        self.batch = {"audio": torch.randn(B, c.audio_length, c.mel_bins, generator=cpu_gen),
                      "frame": torch.randint(0, 256, (B, 3, c.image_size, c.image_size),
                                             generator=cpu_gen, dtype=torch.uint8),
                      "index": torch.arange(B)}
        if device.type == "cuda":
            self.batch = {k: v.pin_memory() for k, v in self.batch.items()}

    def inputs(self):
        """The step's input pipeline alone (pretrain.prepare_inputs)."""
        return pretrain.prepare_inputs(self.batch, self.gen, self.mcfg, self.cfg.S, self.device,
                                       self.cfg.time_roll)

    def step(self):
        return pretrain.train_step(self.model, self.criterion, self.optimizer, self.scaler,
                                   self.batch, self.gen, self.cfg, self.mcfg, self.device)


def bench_step(cfg, device, notes):
    rows = []
    peaks = {}
    compile_presets = (_items(cfg.compile_presets) if cfg.compile_presets is not None
                       else (_items(cfg.presets) if device.type == "cuda" else ["tiny"]))
    for preset in _items(cfg.presets):
        B = _batch(cfg, preset, device)
        for precision in _items(cfg.precisions):
            if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
                notes.append(f"step {preset} bf16: skipped, this GPU has no bf16")
                continue
            if precision == "bf16" and device.type != "cuda":
                _note_once(notes, "step bf16: not measured on the CPU, where pretrain.py "
                                  "ignores --amp and trains in fp32")
                continue
            modes = ["eager"] + (["compile"] if cfg.compile and preset in compile_presets else [])
            if cfg.compile and preset not in compile_presets:
                notes.append(f"step {preset}: torch.compile not measured here (--compile_presets)")
            for mode in modes:
                row = {"preset": preset, "precision": precision, "mode": mode, "batch": B,
                       "S": cfg.S, "device": device.type}
                try:
                    args = (cfg, preset, B, device, precision, mode == "compile")
                    if device.type == "cpu" and cfg.isolate:
                        row.update(_in_fresh_process(_measure_step, args))
                    else:
                        row.update(_measure_step(*args))
                    key = "bfloat16" if precision == "bf16" else "float32"
                    if key not in peaks:
                        peaks[key] = matmul_peak(device, getattr(torch, key), cfg.quick)
                    row["mfu"] = row["flops_per_s"] / peaks[key]["flops_per_s"]
                except Exception as err:  # compile failures etc.: recorded, the run goes on
                    row["error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
                    notes.append(f"step {preset} {precision} {mode} failed: {row['error']}")
                    traceback.print_exc()
                rows.append(row)
                _print_row(row)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows, peaks


def _note_once(notes, text):
    if text not in notes:
        notes.append(text)


def _in_fresh_process(fn, args):
    """fn(*args) in a new Python process (spawned, so nothing is inherited) -> its result."""
    pool = multiprocessing.get_context("spawn").Pool(1)
    try:
        return pool.apply(fn, args)
    finally:
        pool.close()  # close + join, not terminate: no leaked semaphores at exit
        pool.join()


def _batch(cfg, preset, device):
    given = {"tiny": cfg.batch_tiny, "base": cfg.batch_base}.get(preset)
    if given is not None:
        return given
    if cfg.quick:
        return {"tiny": 8}.get(preset, 1)
    if device.type == "cuda":
        return {"tiny": 64, "base": 16}.get(preset, 16)
    return {"tiny": 32, "base": 2}.get(preset, 2)


def _measure_step(cfg, preset, B, device, precision, compiled):
    mem = PeakMemory(device)
    mem.start()
    setup = StepSetup(preset, B, cfg.S, device, precision, compiled, cfg.seed)
    t0 = time.perf_counter()
    setup.step()  # first step: compilation happens here
    sync(device)
    first_s = time.perf_counter() - t0
    warm = max(cfg.warmup - 1, 0)
    # A quick look at one more step decides how many repeats fit into the budget.
    probe, _ = timed(setup.step, device, warmup=warm, repeats=1)
    repeats = max(1, min(cfg.repeats, int(cfg.budget_s / max(probe, 1e-9))))
    median, times = timed(setup.step, device, warmup=0, repeats=repeats)
    times = [probe] + times
    median = statistics.median(times)
    peak = mem.stop()
    # The input pipeline alone (roll, augmentation, centroid vectors), same batch.
    inputs_s, _ = timed(setup.inputs, device, warmup=1, repeats=max(3, cfg.repeats))
    flops = step_flops(setup.mcfg, B, cfg.S)
    n_params = sum(p.numel() for p in setup.net.parameters())
    del setup
    return {"step_ms": 1e3 * median, "samples_per_s": B / median, "first_step_s": first_s,
            "repeats": len(times), "times_ms": [1e3 * t for t in times],
            "peak_mem_mib": peak, "peak_mem_kind": mem.kind,
            "inputs_ms": 1e3 * inputs_s, "inputs_share": inputs_s / median,
            "step_gflop": flops / 1e9, "flops_per_s": flops / median, "params_m": n_params / 1e6}


# =============================================================================
# Part 2: augmentation (augment.py's one implementation) and its kernel launches
# =============================================================================

class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that run on a non-CPU device, views and allocations left out:
    on CUDA each is one kernel launch or one copy. Run the code on the meta device to
    count without a GPU (the same dispatch, no data). `uploads` counts the copies from
    the CPU to the device among them."""

    FREE = {"empty", "empty_like", "empty_strided", "detach", "lift_fresh", "alias"}

    def __init__(self):
        super().__init__()
        self.count, self.uploads, self.ops = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        leaves = [x for x in pytree.tree_leaves((args, kwargs, out)) if isinstance(x, torch.Tensor)]
        name = func.overloadpacket.__name__
        if any(x.device.type != "cpu" for x in leaves) and not func.is_view and name not in self.FREE:
            self.count += 1
            self.ops[name] = self.ops.get(name, 0) + 1
            inputs = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
            if name in ("_to_copy", "copy_") and any(x.device.type == "cpu" and x.dim() > 0
                                                      for x in inputs):
                self.uploads += 1
        return out


def _base_batch(B, seed=0):
    """A loader batch at the base sizes: normalized fbanks and uint8 frames, on the CPU."""
    base, g = get_config("base"), torch.Generator().manual_seed(seed)
    return {"audio": torch.randn(B, base.audio_length, base.mel_bins, generator=g),
            "frame": torch.randint(0, 256, (B, 3, base.image_size, base.image_size), generator=g,
                                   dtype=torch.uint8)}


def augment_launches(B, seed=0, S=16):
    """Device ops of one step's input pipeline (pretrain.prepare_inputs: the time roll,
    both views, ImageNet normalization of both frames, the copies of every draw) at the
    base sizes, batch B, counted on the meta device: (total, {op: count}, uploads)."""
    with LaunchCounter() as counter:
        pretrain.prepare_inputs(_base_batch(B, seed), torch.Generator().manual_seed(seed),
                                get_config("base"), S, torch.device("meta"))
    return counter.count, counter.ops, counter.uploads


def model_launches(preset="base", B=16, S=16, seed=0):
    """Device ops of the model's part of an eager step (pretrain.train_step after the
    inputs: EquiAV forward, EquiAVLoss, backward), counted on the meta device: (total,
    {op: count}). Clipping and the fused AdamW add a few multi-tensor kernels on CUDA,
    which meta cannot run (its foreach paths are CUDA's), so they are not counted."""
    cfg = get_config(preset)
    inputs = pretrain.prepare_inputs(_base_batch(B, seed) if preset == "base" else {
        "audio": torch.randn(B, cfg.audio_length, cfg.mel_bins),
        "frame": torch.zeros(B, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8)},
        torch.Generator().manual_seed(seed), cfg, S, torch.device("meta"))
    net, criterion = EquiAV(cfg).to("meta"), EquiAVLoss()
    with LaunchCounter() as counter:
        criterion(net(*inputs))["loss"].backward()
    return counter.count, counter.ops


def host_bound(B=16, S=16, us_per_launch=(5.0, 10.0), mfu=0.4, peak_tflops=989.0):
    """The eager base step's host time (device ops x microseconds per launch) beside its
    GPU compute time (step_flops at `mfu` of an H100's dense bf16 peak, 989 TFLOP/s)."""
    ops = augment_launches(B, S=S)[0] + model_launches("base", B, S)[0]
    flops = step_flops(get_config("base"), B, S)
    return {"batch": B, "ops_per_step": ops,
            "host_ms": {f"{us:g}us": ops * us / 1e3 for us in us_per_launch},
            "gpu_ms": flops / (mfu * peak_tflops * 1e12) * 1e3, "mfu": mfu,
            "step_tflop": flops / 1e12}


def bench_augment(cfg, devices):
    """Per-sample time of augment_audio, augment_visual and the whole input pipeline of a
    step (pretrain.prepare_inputs: time roll, both views, the centroid vectors, ImageNet
    normalization) at the base sizes; device ops per step at this batch and at 128."""
    base = get_config("base")
    B = cfg.aug_batch
    rows = []
    gen = torch.Generator().manual_seed(cfg.seed)
    launches, ops, uploads = augment_launches(B, cfg.seed)
    at_128 = augment_launches(128, cfg.seed)[0]
    top = ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: -kv[1])[:6])
    print(f"  device ops per step's inputs at batch {B} (meta count): {launches} ({top}, ...), "
          f"{uploads} host-to-device copies; at batch 128: {at_128}", flush=True)
    for device in devices:
        batch = _base_batch(B, cfg.seed)
        x_a, x_v = batch["audio"].to(device), batch["frame"].to(device).float() / 255
        inputs = {
            "audio": lambda: augment.augment_audio(x_a, gen),
            "visual": lambda: augment.augment_visual(x_v, gen),
            "step inputs": lambda: pretrain.prepare_inputs(batch, gen, base, cfg.S, device),
        }
        for name, fn in inputs.items():
            t, _ = timed(fn, device, cfg.warmup, max(3, cfg.repeats))
            rows.append({"device": device.type, "input": name, "batch": B, "samples_per_s": B / t,
                         "ms_per_sample": 1e3 * t / B, "step_launches": launches,
                         "step_launches_b128": at_128, "step_uploads": uploads})
            _print_row(rows[-1])
    return rows


# =============================================================================
# Part 3: data loading from the toy dataset files
# =============================================================================

def _toy_manifest(cfg, notes):
    """The toy training manifest; in --quick a small temporary one if data/toy is absent."""
    marker = os.path.join(cfg.toy_root, "toy.json")
    if cfg.quick and not os.path.exists(marker):
        root = os.path.join(tempfile.mkdtemp(prefix="equiav_bench_"), "toy")
        toy.make_toy_dataset(root, n_train=64, n_test=4, n_retrieval=0, n_train_multilabel=0,
                              n_test_multilabel=0, n_distractor=0, num_workers=0)
        notes.append(f"data: {cfg.toy_root} absent, used a 64-clip toy dataset in {root}")
        return toy.toy_paths(root)["train"]
    t0 = time.perf_counter()
    paths = toy.ensure_toy_dataset(cfg.toy_root)
    if time.perf_counter() - t0 > 5:
        notes.append(f"data: generated the toy dataset in {time.perf_counter() - t0:.0f} s")
    return paths["train"]


def bench_data(cfg, device, notes):
    tiny = get_config("tiny")
    manifest = _toy_manifest(cfg, notes)
    dataset = data.AudioVisualDataset(manifest, train=True, audio_length=tiny.audio_length,
                                      mel_bins=tiny.mel_bins, image_size=tiny.image_size)
    bs = min(cfg.data_batch_size, len(dataset))
    rows = []
    for workers in (0, 2):
        loader = data.make_loader(dataset, bs, train=True, num_workers=workers,
                                  distributed=False, seed=cfg.seed,
                                  pin_memory=device.type == "cuda")
        n_batches = min(cfg.data_batches, len(loader))
        # From creating the iterator to the last batch, worker start-up included: with
        # workers, batches are prefetched, so timing batches one at a time after the
        # first would count prefetched ones as free.
        t0 = time.perf_counter()
        it = iter(loader)
        next(it)
        first = time.perf_counter() - t0
        for _ in range(n_batches - 1):
            next(it)
        total = time.perf_counter() - t0
        del it, loader
        row = {"workers": workers, "batch": bs, "batches": n_batches,
               "samples_per_s": bs * n_batches / total,
               "ms_per_batch": 1e3 * total / n_batches, "first_batch_s": first,
               "sizes": f"audio {tiny.audio_length}x{tiny.mel_bins}, frame {tiny.image_size}"}
        rows.append(row)
        _print_row(row)
    return rows


# =============================================================================
# Part 4: retrieval metrics
# =============================================================================

def bench_retrieval(cfg, devices):
    rows = []
    dims = sorted({get_config(p).proj_dim for p in ("tiny", "base")})
    gen = torch.Generator().manual_seed(cfg.seed)
    for device in devices:
        for n in (int(s) for s in _items(cfg.retrieval_sizes)):
            for d in dims:
                z_a = F.normalize(torch.randn(n, d, generator=gen), dim=-1).to(device)
                z_v = F.normalize(torch.randn(n, d, generator=gen), dim=-1).to(device)
                repeats = 3 if n <= 2000 or device.type == "cuda" else (1 if cfg.quick else 2)
                t, _ = timed(lambda: retrieval.retrieval_metrics(z_a, z_v), device,
                             warmup=1, repeats=repeats)
                row = {"device": device.type, "N": n, "dim": d, "seconds": t}
                rows.append(row)
                _print_row(row)
    return rows


# =============================================================================
# Part 5: cutting a segment out of a video (prepare.py --segments)
# =============================================================================

def bench_cut(cfg):
    av = audio_io.import_av("the cut part writes and decodes a video with PyAV")
    seconds, (w, h) = (12, (320, 180)) if cfg.quick else (60, (640, 360))
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        with av.open(path, "w") as c:
            vs, aus = c.add_stream(codec, rate=25), c.add_stream("aac", rate=44100)
            vs.width, vs.height, vs.pix_fmt = w, h, "yuv420p"
            vs.codec_context.gop_size, aus.layout = 125, "stereo"
            noise = torch.Generator().manual_seed(cfg.seed)
            for i in range(seconds * 25):   # moving noise, so that frames cost what real ones do
                img = torch.randint(0, 256, (h, w, 3), generator=noise, dtype=torch.uint8)
                c.mux(vs.encode(av.VideoFrame.from_ndarray(img.numpy(), format="rgb24")))
            c.mux(vs.encode())
            sound = (0.1 * torch.randn(2, seconds * 44100, generator=noise)).numpy()
            for start in range(0, sound.shape[1], 1024):
                frame = av.AudioFrame.from_ndarray(sound[:, start:start + 1024].copy(),
                                                   format="fltp", layout="stereo")
                frame.sample_rate, frame.pts = 44100, start
                c.mux(aus.encode(frame))
            c.mux(aus.encode())
        out = Path(tmp) / "out"
        for folder in ("audio", "clips", *(f"frames/frame_{k}" for k in range(data.NUM_FRAMES))):
            (out / folder).mkdir(parents=True)
        start = seconds // 2
        clips = iter(range(1000))

        def cut_and_write():
            wave_16k, frames, _ = prepare.cut_segment(path, start, start + 10)
            prepare.write_clip(out, {"video_id": f"clip{next(clips)}"}, wave_16k, frames)

        t, _ = timed(cut_and_write, torch.device("cpu"), warmup=1, repeats=3 if cfg.quick else 7)
    row = {"video": f"{seconds} s {w}x{h} {codec} 25 fps, AAC 44.1 kHz stereo",
           "segment": f"[{start}, {start + 10}) s", "seconds_per_clip": t}
    _print_row(row)
    return [row]


# =============================================================================
# Tables
# =============================================================================

def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:.3g}"
    return str(v)


def _print_row(row):
    shown = {k: v for k, v in row.items() if k != "times_ms"}
    print("  " + "  ".join(f"{k}={_fmt(v)}" for k, v in shown.items()), flush=True)


TABLES = {
    "step": [("preset", "preset"), ("prec", "precision"), ("mode", "mode"), ("B", "batch"),
             ("samples/s", "samples_per_s"), ("step ms", "step_ms"),
             ("peak MiB", "peak_mem_mib"), ("inputs %", "inputs_share"),
             ("GFLOP/step", "step_gflop"), ("TFLOP/s", "flops_per_s"), ("MFU %", "mfu")],
    "augment": [("device", "device"), ("input", "input"), ("B", "batch"),
                ("samples/s", "samples_per_s"), ("ms/sample", "ms_per_sample"),
                ("launches/step", "step_launches"), ("at B=128", "step_launches_b128")],
    "data": [("workers", "workers"), ("B", "batch"), ("samples/s", "samples_per_s"),
             ("ms/batch", "ms_per_batch"), ("first batch s", "first_batch_s")],
    "retrieval": [("device", "device"), ("N", "N"), ("dim", "dim"), ("seconds", "seconds")],
    "cut": [("video", "video"), ("segment", "segment"), ("s/clip", "seconds_per_clip")],
}
_SCALE = {"inputs_share": 100, "mfu": 100, "flops_per_s": 1e-12}


def format_table(part, rows):
    cols = TABLES[part]
    cells = [[h for h, _ in cols]]
    for row in rows:
        if "error" in row:
            cells.append([_fmt(row.get(k, "")) for _, k in cols[:4]] + [row["error"][:60]])
            continue
        cells.append([_fmt(row[k] * _SCALE.get(k, 1)) if isinstance(row.get(k), float)
                      else _fmt(row.get(k, "")) for _, k in cols])
    widths = [max(len(r[i]) for r in cells if i < len(r)) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(widths[i]) for i, c in enumerate(r)) for r in cells]
    return "\n".join([lines[0], "-" * len(lines[0])] + lines[1:])


# =============================================================================
# Main
# =============================================================================

def machine_info(device):
    info = {"torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "device": str(device)}
    try:
        with open("/proc/cpuinfo") as f:
            model = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        info["cpu"] = model.group(1) if model else platform.processor()
    except OSError:
        info["cpu"] = platform.processor()
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["load_avg_1min_at_start"] = os.getloadavg()[0]
    return info


def main(cfg):
    cfg = resolve_config(cfg)
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    t_start = time.perf_counter()
    results = {"meta": {**machine_info(device), "command": " ".join([sys.executable] + sys.argv),
                        "date": datetime.datetime.now().isoformat(timespec="seconds"),
                        "config": dataclasses.asdict(cfg)},
               "notes": []}
    notes = results["notes"]
    if device.type != "cuda":
        notes.append("no CUDA device: everything ran on the CPU; MFU is against the measured "
                     "CPU matmul peak of the same dtype")
    print(f"EquiAV bench on {device} ({results['meta'].get('gpu', results['meta']['cpu'])}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads"
          + (" [quick]" if cfg.quick else ""), flush=True)
    runners = {
        "step": lambda: bench_step(cfg, device, notes),
        "augment": lambda: bench_augment(cfg, devices),
        "data": lambda: bench_data(cfg, device, notes),
        "retrieval": lambda: bench_retrieval(cfg, devices),
        "cut": lambda: bench_cut(cfg),
    }
    for part in PARTS:
        if part not in _items(cfg.parts):
            continue
        print(f"\n== {part} ==", flush=True)
        t0 = time.perf_counter()
        out = runners[part]()
        if part == "step":
            out, results["matmul_peak"] = out
        results[part] = out
        results.setdefault("part_seconds", {})[part] = time.perf_counter() - t0
    results["total_seconds"] = time.perf_counter() - t_start

    print()
    for part in PARTS:
        if part in results:
            print(f"{part}:\n{format_table(part, results[part])}\n")
    for peak in results.get("matmul_peak", {}).values():
        print(f"matmul peak {peak['dtype']} n={peak['n']}: {peak['flops_per_s'] / 1e12:.3g} TFLOP/s")
    for note in notes:
        print(f"note: {note}")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    with open(cfg.out, "w") as f:
        json.dump(results, f, indent=1, allow_nan=False)
    print(f"wrote {cfg.out} ({results['total_seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    utils.run_script(main, BenchConfig, __doc__.splitlines()[0])
