"""Helpers shared by the script tests (tests/ is on sys.path under pytest)."""
import json
import os

import torch
import torch.utils._pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode


class StopAfter:
    """A loader that raises KeyboardInterrupt (a killed run) after n batches."""

    def __init__(self, loader, n):
        self.loader, self.n, self.sampler = loader, n, loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if i == self.n:
                raise KeyboardInterrupt
            yield batch


def read_log(run_dir):
    """The records of {run_dir}/log.jsonl."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def step_losses(records):
    """step -> every loss logged for it (a resumed run logs the interrupted steps again)."""
    out = {}
    for r in records:
        if r["type"] == "step":
            out.setdefault(r["step"], []).append(r["loss"])
    return out


class BlockingTransfers:
    """Records every host-to-device transfer that would block a GPU, while code runs on
    the meta device (standing in for CUDA: same dispatch, no data, no GPU needed):
    - a tensor built from Python data on the device (torch.tensor / as_tensor with a
      device, indexing a device tensor with a Python list);
    - a copy to the device without non_blocking=True (.to, .cuda, copy_);
    - an op that hands a CPU tensor (not a 0-d scalar) to a device kernel.
    Reading a device tensor on the host (.item(), .tolist(), bool()) fails on meta
    by itself. Use: `with BlockingTransfers() as rec: ...; assert rec.found == []`.
    (Whether the CPU side is pinned, which CUDA needs for a truly asynchronous
    copy, cannot be seen on meta: utils.to_device pins before every copy.)"""

    def __init__(self):
        self.found = []

    def __enter__(self):
        self._modes = (_FunctionSide(self.found), _DispatchSide(self.found))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def _on_device(x):
    return isinstance(x, torch.Tensor) and x.device.type != "cpu"


class _FunctionSide(torch.overrides.TorchFunctionMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        device = kwargs.get("device")
        if func in (torch.tensor, torch.as_tensor) and device is not None \
                and torch.device(device).type != "cpu":
            self.found.append(f"torch.{name}(<Python data>, device={device})")
        if name in ("__getitem__", "__setitem__", "index_put_") and _on_device(args[0]):
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, list) for i in index):
                self.found.append(f"Tensor.{name} with a Python list index")
        if name in ("to", "cuda", "copy_") and not kwargs.get("non_blocking", False) \
                and not any(a is True for a in args[1:]):
            src = args[1] if name == "copy_" else args[0]
            dst_dev = args[0].device if name == "copy_" else _target_device(args[1:], kwargs)
            if isinstance(src, torch.Tensor) and src.device.type == "cpu" \
                    and dst_dev is not None and dst_dev.type != "cpu":
                self.found.append(f"blocking Tensor.{name} to {dst_dev}")
        return func(*args, **kwargs)


def _target_device(args, kwargs):
    for a in list(args) + [kwargs.get("device")]:
        if isinstance(a, (str, torch.device)):
            return torch.device(a)
        if isinstance(a, torch.Tensor):
            return a.device
    return None


class _DispatchSide(TorchDispatchMode):
    def __init__(self, found):
        super().__init__()
        self.found = found

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        leaves = [x for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)]
        copies = (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default)
        if func not in copies and any(_on_device(x) for x in leaves):
            cpu = [tuple(x.shape) for x in leaves if x.device.type == "cpu" and x.dim() > 0]
            if cpu:
                self.found.append(f"{func} reads CPU tensor(s) {cpu} on the device")
        return func(*args, **kwargs)
