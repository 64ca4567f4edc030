"""Small pieces shared by the training and evaluation scripts.

Nothing here is part of the method: command-line configs from dataclasses,
torchrun process-group setup, rank-0 printing, gathering results in dataset
order, per-epoch random streams (what makes resuming exact), the
learning-rate schedule (method.md §12), the optimizer update, mixed precision,
atomic checkpoints and JSON-lines logs.
"""
import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import random
import sys
import typing
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


class UsageError(ValueError):
    """A wrong command line: a bad value, a bad combination of options, a missing file.
    `run_script` answers it as argparse answers `--lr abc`: one line, exit status 2."""


class DataError(Exception):
    """A manifest, label file or media file that cannot be used, with the reason.

    Messages name the manifest, the entry index (and JSON line when known),
    the file and the reason, e.g.
    ``train.json: entry 12 (line 14, video_id abc): /d/abc.wav: zero-length audio``.
    """


# ---------------------------------------------------------------------------
# Configs: one dataclass per script, every field a `--field value` option
# ---------------------------------------------------------------------------

def option(default, help):
    """A config field with a default and its --help text: `lr: float = option(1e-4, "...")`."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class TrainConfig:
    """The options both training scripts share: PretrainConfig and FinetuneConfig
    extend it with their own. They are read by the pieces below (set_lr,
    optimizer_step, autocast_context) and by data.py's loaders. A field left at
    None takes its value from the script's profile (its PROFILES table)."""
    profile: Optional[str] = option(None, "defaults for the fields left at none: 'paper' or "
                                          "'toy'; none -> 'toy' without a training manifest, "
                                          "'paper' with one")
    toy_root: str = option("data/toy", "where the toy dataset lives (or is generated)")
    norm_stats: str = option("auto", "fbank normalization: auto (stats.json next to the training "
                                     "manifest, see `python data.py stats`), audioset, "
                                     "vggsound, or MEAN,STD")
    skip_bad: bool = option(False, "skip unreadable samples (counted in the log) instead of "
                                   "failing on the first one")
    max_bad_fraction: float = option(0.01, "with --skip_bad: fail once more than this fraction "
                                           "of the samples seen was bad")
    num_workers: Optional[int] = option(None, "data-loader processes per rank; none -> the "
                                              "profile's (toy), else the CPUs available, at most 8")
    run_dir: Optional[str] = option(None, "checkpoint.pt (resumed when present) and log.jsonl "
                                          "go here")
    epochs: Optional[int] = option(None, "training epochs")
    batch_size: Optional[int] = option(None, "samples per process per step")
    lr: Optional[float] = option(None, "peak learning rate")
    warmup_epochs: Optional[float] = option(None, "linear warm-up in epochs")
    warmup_start_lr: Optional[float] = option(None, "learning rate at step 0")
    final_lr: float = option(1e-6, "learning rate at the end of the cosine")
    weight_decay: float = option(1e-5, "AdamW weight decay, on all parameters")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    clip_grad: Optional[float] = option(None, "gradient-norm clipping, 0 disables")
    amp: bool = option(True, "mixed precision on CUDA (bf16 where supported, else fp16 with "
                             "a scaler); no effect on CPU")
    seed: int = option(0, "random seed (random streams are offset by rank and epoch)")
    device: Optional[str] = option(None, "cpu or cuda; none -> cuda when available")
    log_every: int = option(20, "steps between log lines (the loop's only host-device syncs)")
    eval_batch_size: int = option(64, "batch size of the evaluation after every epoch")


def apply_profile(cfg, profiles, name):
    """cfg with its None fields taken from profiles[name] (and cfg.profile = name):
    a profile supplies defaults, never overrides an option that was given."""
    if name not in profiles:
        raise UsageError(f"unknown profile {name!r}; choose from {sorted(profiles)}")
    filled = {k: v for k, v in profiles[name].items() if getattr(cfg, k) is None}
    if getattr(cfg, "num_workers", 0) is None and "num_workers" not in filled:
        filled["num_workers"] = default_num_workers()   # no more than the machine has
    return dataclasses.replace(cfg, profile=name, **filled)


def _parse_bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _field_type(field, hints):
    """The argparse `type` for a dataclass field: bool, int, float or str."""
    tp = hints[field.name]
    if typing.get_origin(tp) is typing.Union:  # Optional[X] -> X
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0]
    if tp is bool:
        return _parse_bool
    if tp in (int, float, str):
        return tp
    raise TypeError(f"config field {field.name!r} has unsupported type {tp!r}")


def _own_fields_first(cls):
    """cls's fields, those it declares itself before those it inherits (TrainConfig's)."""
    own = set(vars(cls).get("__annotations__", {}))
    fields = dataclasses.fields(cls)
    return [f for f in fields if f.name in own] + [f for f in fields if f.name not in own]


def parse_config(cls, argv=None, description="", profiles=None):
    """Build an instance of dataclass `cls` from `--field value` options.

    Defaults and help texts come from the dataclass (help from
    `field(metadata={"help": ...})`); --help lists the fields cls declares itself
    first, and names what each profile of `profiles` ({name: {field: value}})
    gives a field. An option given as `none` sets an Optional field to None.
    Unknown options are an error, so a misspelled flag never vanishes silently.
    """
    parser = argparse.ArgumentParser(
        description=description,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(cls)
    for field in _own_fields_first(cls):
        default = field.default
        if default is dataclasses.MISSING and field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        convert = _field_type(field, hints)
        optional = typing.get_origin(hints[field.name]) is typing.Union

        def parse(text, convert=convert, optional=optional):
            if optional and text.strip().lower() == "none":
                return None
            return convert(text)

        text = field.metadata.get("help", " ")
        given = {name: values[field.name] for name, values in (profiles or {}).items()
                 if field.name in values}
        if given:
            text += " [" + "; ".join(f"{name}: {value}" for name, value in given.items()) + "]"
        flag = {"nargs": "?", "const": True} if convert is _parse_bool else {}  # `--x` = `--x true`
        parser.add_argument(f"--{field.name}", type=parse, default=default,
                            metavar=field.name.upper().replace("_", ""), help=text, **flag)
    args = parser.parse_args(argv)
    return cls(**vars(args))


def parse_overrides(text, base):
    """"depth=2,embed_dim=96" -> {"depth": 2, "embed_dim": 96}, each value of the type
    of that field in the dataclass `base` (e.g. --model_overrides on a preset)."""
    out = {}
    for item in filter(None, (text or "").split(",")):
        key, _, value = (s.strip() for s in item.partition("="))
        if not hasattr(base, key):
            fields = ", ".join(f.name for f in dataclasses.fields(base))
            raise UsageError(f"--model_overrides: unknown {type(base).__name__} field {key!r}; "
                             f"valid fields: {fields}")
        kind = type(getattr(base, key))
        try:
            out[key] = kind(value)
        except ValueError:
            raise UsageError(f"--model_overrides: {key}={value!r} is not a valid {kind.__name__} "
                             f"(the type of {type(base).__name__}.{key})") from None
    return out


def wrap_model(net, device, local_rank, compile=False, find_unused_parameters=False):
    """DDP under torchrun, then torch.compile if asked; `net` itself stays what is saved.
    No buffer broadcast: the one buffer (the position embeddings) is constant."""
    model = net
    if get_world_size() > 1:
        model = DistributedDataParallel(
            net, device_ids=[local_rank] if device.type == "cuda" else None,
            broadcast_buffers=False, find_unused_parameters=find_unused_parameters)
        print0(f"DDP: find_unused_parameters={model.find_unused_parameters}")
    return torch.compile(model) if compile else model


def require_at_least_one(cfg, *names):
    """A UsageError naming the first of the config fields `names` that is below 1."""
    for name in names:
        if getattr(cfg, name) < 1:
            raise UsageError(f"--{name} must be at least 1, got {getattr(cfg, name)}")


def require_files(cfg, *names):
    """Fail with a UsageError naming the option when a file given on the command line (the
    config fields `names`; None means not given) does not exist, before anything reads it."""
    for name in names:
        path = getattr(cfg, name)
        if path and not os.path.exists(path):   # None or "": not given
            raise UsageError(f"--{name} {path}: no such file or directory")


def run_script(main, cls, description="", profiles=None, argv=None):
    """A script's entry point: parse `cls` from the command line and call main(cfg).
    A wrong command line (UsageError, a missing file) is answered with one line,
    `<script>: error: <what and what to do>`, and exit status 2; an error found while
    running (a bad sample's DataError, a non-finite loss) with one line and exit status 1.
    No traceback unless EQUIAV_DEBUG=1. Under torchrun every rank exits this way, and
    torchrun stops the others when one fails, so none is left waiting."""
    cfg = parse_config(cls, argv, description, profiles)
    prog = os.path.basename(sys.argv[0]) or "equiav"
    try:
        return main(cfg)
    except (UsageError, FileNotFoundError) as err:
        status = 2
        if os.environ.get("EQUIAV_DEBUG") == "1":
            raise
        message = err
    except (DataError, FloatingPointError) as err:
        status = 1
        if os.environ.get("EQUIAV_DEBUG") == "1":
            raise
        message = err
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def print_config(title, cfg):
    """`title`, then every field of dataclass `cfg` on a line of its own (rank 0)."""
    print0(title)
    for f in _own_fields_first(type(cfg)):
        print0(f"  {f.name:22s} {getattr(cfg, f.name)}")


# ---------------------------------------------------------------------------
# Distributed: torchrun only; a process group exists only when RANK is set
# ---------------------------------------------------------------------------

def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def is_main():
    return get_rank() == 0


def print0(*args, **kwargs):
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def unwrap(model):
    """The module inside a DistributedDataParallel (or torch.compile) wrapper."""
    model = getattr(model, "_orig_mod", model)
    return model.module if hasattr(model, "module") else model


RANK0_WORK_TIMEOUT_S = 3600   # the other ranks' wait for rank-0-only work (toy data, figures)
_CPU_GROUP = None              # a gloo group for barriers with a timeout (NCCL has none of its own)


def barrier(timeout_s=None):
    """Wait for every rank. timeout_s: the wait allowed (e.g. while rank 0 alone writes
    files), past the process group's default of 10 minutes."""
    if not is_distributed():
        return
    if timeout_s is None:
        dist.barrier()
    else:
        dist.monitored_barrier(group=_CPU_GROUP, timeout=datetime.timedelta(seconds=timeout_s))


def init_distributed(device=None):
    """Set up torchrun's process group, if launched by torchrun.

    Returns (rank, world_size, local_rank, device). NCCL on CUDA, gloo on
    CPU. `device` ("cpu"/"cuda") overrides the automatic choice.
    """
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if "RANK" not in os.environ:
        return 0, 1, 0, torch.device("cuda" if use_cuda else "cpu")
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    global _CPU_GROUP
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=dev)
        _CPU_GROUP = dist.new_group(backend="gloo")
    else:
        dev = torch.device("cpu")
        dist.init_process_group("gloo")
        _CPU_GROUP = None   # the default group is gloo
    return rank, world_size, local_rank, dev


@contextlib.contextmanager
def cpu_threads(device, threads, num_workers, world):
    """On the CPU, run with `threads` torch threads per process (0: the cores left after
    the loader workers, at least 1, since oversubscribed cores run several times slower;
    None: torch's default), then restore the old count (main() may be called in-process:
    tests, notebooks)."""
    before = torch.get_num_threads()
    if device.type == "cpu" and threads is not None:
        torch.set_num_threads(threads or max(1, available_cores() // world - num_workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def default_num_workers():
    """Loader workers per process: the CPUs available to this process, at most 8."""
    return max(1, min(8, available_cores()))


def available_cores():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cleanup_distributed():
    if is_distributed():
        dist.destroy_process_group()


def sum_over_ranks(x):
    """x (a tensor) summed over all ranks (collective); x itself in one process."""
    if get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def mean_over_ranks(x):
    """x (a float tensor) averaged over all ranks (collective)."""
    return sum_over_ranks(x) / get_world_size()


def gather_in_dataset_order(index, *tensors):
    """Collect per-rank results into dataset order (collective under torchrun).

    index: (n,) long dataset indices of this rank's rows; tensors: (n, ...).
    Returns (index, *tensors) concatenated over all ranks, sorted by index,
    with repeated indices (DistributedSampler pads the last ranks with
    repeated samples) kept once. Without a process group: just the sort.
    """
    world = get_world_size()
    if world > 1:
        size = torch.tensor([index.shape[0]], device=index.device)
        sizes = [torch.zeros_like(size) for _ in range(world)]
        dist.all_gather(sizes, size)
        sizes = [int(s) for s in sizes]

        def gather(x):
            x = torch.cat([x, x.new_zeros((max(sizes) - x.shape[0],) + x.shape[1:])])
            parts = [torch.empty_like(x) for _ in range(world)]
            dist.all_gather(parts, x.contiguous())
            return torch.cat([p[:s] for p, s in zip(parts, sizes)])

        index, tensors = gather(index), [gather(t) for t in tensors]
    order = torch.argsort(index, stable=True)
    index = index[order]
    keep = torch.ones_like(index, dtype=torch.bool)
    keep[1:] = index[1:] != index[:-1]
    return (index[keep],) + tuple(t[order][keep] for t in tensors)


def to_device(x, device):
    """A small CPU tensor -> device without waiting for queued GPU work (pinned on CUDA,
    non-blocking); a tensor already there is returned as it is."""
    return to_device_together([x], device)[0]


def to_device_together(tensors, device):
    """Small CPU tensors -> `device` in ONE copy: packed into one float32 buffer (exact for
    the whole numbers in them, all below 2^24), pinned on CUDA so that the copy does not wait
    for queued GPU work, and split there. Returns float32 views, each of its tensor's shape."""
    device = torch.device(device)
    if all(x.device == device for x in tensors):
        return [x.float() for x in tensors]
    flat = torch.cat([x.detach().reshape(-1).float().cpu() for x in tensors])
    if device.type == "cuda":
        flat = flat.pin_memory()
    flat = flat.to(device, non_blocking=True)
    parts = flat.split([x.numel() for x in tensors])
    return [part.view(x.shape) for part, x in zip(parts, tensors)]


# ---------------------------------------------------------------------------
# Random streams: a function of (seed, epoch, rank), so resuming is exact
# ---------------------------------------------------------------------------

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_epoch(seed, epoch, rank):
    """The random stream of one epoch on one rank, and torch's global seed with it.

    Returns a CPU torch.Generator seeded from (seed, epoch, rank) through numpy's
    SeedSequence (well-mixed, distinct streams for neighbouring values), after
    seeding torch's global generator (drop path, loader worker seeds) from it.
    Everything random in an epoch comes from these two, so an epoch-granular
    resume draws exactly what the uninterrupted run would have, whatever the
    number of processes before.
    """
    mixed = np.random.SeedSequence([seed, epoch, rank]).generate_state(2, dtype=np.uint64)
    torch.manual_seed(int(mixed[1]))
    return torch.Generator().manual_seed(int(mixed[0]))


# ---------------------------------------------------------------------------
# Learning rate (method.md §12): linear warm-up, then cosine, stepped per iteration
# ---------------------------------------------------------------------------

def cosine_lr(step, total_steps, warmup_steps, base_lr, warmup_start_lr=0.0, final_lr=0.0):
    """Learning rate at iteration `step` (0-based).

    Linear from `warmup_start_lr` to `base_lr` over `warmup_steps`, then a
    half cosine from `base_lr` down to `final_lr` at `total_steps`.
    """
    if step < warmup_steps:
        return warmup_start_lr + (base_lr - warmup_start_lr) * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return final_lr + 0.5 * (base_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer, step, total_steps, warmup_steps, cfg):
    """The learning rate of iteration `step` (cosine_lr from cfg.lr, cfg.warmup_start_lr
    and cfg.final_lr), written into every parameter group times the group's
    "lr_scale" (1 when absent); returns the base rate."""
    lr = cosine_lr(step, total_steps, warmup_steps, cfg.lr, cfg.warmup_start_lr, cfg.final_lr)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def average_grads(params):
    """All-reduce the gradients of parameters that live outside DDP (a learnable tau)."""
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= get_world_size()


def optimizer_step(optimizer, scaler, loss, clip_grad=0.0, after_backward=None):
    """One update, the one pretrain.py and finetune.py both make: zero the gradients,
    backward through the (fp16-)scaled loss, call `after_backward` (e.g. averaging
    gradients DDP does not see), unscale and clip the global gradient norm when
    clip_grad > 0, step, update the scaler."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()        # the scaler only scales under fp16 autocast
    if after_backward is not None:
        after_backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)       # clip the true gradients, not the scaled ones
        params = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, clip_grad)
    scaler.step(optimizer)               # skips the step if fp16 gradients overflowed
    scaler.update()


# ---------------------------------------------------------------------------
# A metric two scripts share
# ---------------------------------------------------------------------------

def roc_auc(scores, targets):
    """ROC AUC per class of scores (N, C) against targets (N, C) (positive where > 0.5):
    the chance that a random positive scores above a random negative, a tie counting one
    half (the Mann-Whitney statistic with average ranks). (C,) float64; NaN for a class
    lacking positives or negatives. finetune.py's mAUC, localize.py's confidence."""
    s = scores.double().T.contiguous()                            # (C, N)
    y = (torch.as_tensor(targets) > 0.5).double().T
    s_asc = torch.sort(s, dim=1).values
    below = torch.searchsorted(s_asc, s, side="left")
    at_or_below = torch.searchsorted(s_asc, s, side="right")
    avg_rank = (below + at_or_below + 1) / 2.0                    # 1-based, ties averaged
    n_pos = y.sum(1)
    n_neg = y.shape[1] - n_pos
    auc = ((avg_rank * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = math.nan
    return auc



# ---------------------------------------------------------------------------
# Mixed precision: bf16 where supported, fp16 with a scaler otherwise, off on CPU
# ---------------------------------------------------------------------------

def amp_dtype(device, amp):
    """The autocast dtype for `device`, or None when AMP is off: bf16 where the GPU has
    it natively (compute capability 8.0 and up), fp16 with a scaler where bf16 would
    only be emulated (V100, T4: is_bf16_supported() alone counts emulation)."""
    device = torch.device(device)
    if not amp or device.type != "cuda":
        return None
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native else torch.float16


def autocast_context(device, amp):
    dtype = amp_dtype(device, amp)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def make_grad_scaler(device, amp):
    """A GradScaler that is only enabled for fp16 autocast."""
    return torch.amp.GradScaler("cuda", enabled=amp_dtype(device, amp) == torch.float16)


def load_scaler_state(scaler, state, path):
    """Restore a GradScaler only when both runs used one: a run resumed on another kind
    of GPU (bf16 <-> fp16) or on the CPU starts with a fresh scale instead of failing on
    the other run's empty (or unusable) state."""
    if scaler.is_enabled() and state:
        scaler.load_state_dict(state)
    elif scaler.is_enabled() != bool(state):
        print0(f"{path}: the saved run {'used' if state else 'had no'} fp16 loss scaling and "
               f"this one {'does not' if not scaler.is_enabled() else 'does'}: the scaler "
               f"starts afresh")


# ---------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------

def save_checkpoint(obj, path):
    """Write `obj` with torch.save atomically: a temp file, then a rename.

    A run killed mid-write leaves the previous checkpoint intact. Call on
    rank 0 only. `obj` must hold only tensors and plain Python values so that
    `torch.load(weights_only=True)` accepts it.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


class JsonLogger:
    """Appends one JSON object per line to `path` (rank 0 only)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        if is_main():
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)

    def log(self, record):
        if not is_main():
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
