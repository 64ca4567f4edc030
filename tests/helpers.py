"""Helpers shared by the script tests (tests/ is on sys.path under pytest)."""
import json
import os


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
