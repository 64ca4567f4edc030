"""Bad samples while training (--skip_bad): what the dataset returns in place of a sample
it cannot load, and how the training loops count the ones collate dropped.

Without --skip_bad the first bad sample stops the run (data.py raises DataError naming
the manifest entry, the file and the reason). With it, data.AudioVisualDataset returns a
BadSample, data.collate drops it and counts it in the batch's "skipped" (an empty batch,
never a zero-filled one), and BadDataPolicy counts them over all ranks and fails once
more than a set fraction of the samples seen were bad.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist

from utils import DataError


class BadSample(NamedTuple):
    """Returned instead of a sample when skip_bad=True; collate drops and counts it.
    The shapes let collate build empty tensors when a whole batch is bad."""
    index: int
    message: str
    audio_shape: tuple
    frame_shape: tuple
    num_classes: int


class BadDataPolicy:
    """Counts the samples collate dropped over all ranks, fails once more than
    max_fraction of those seen were bad, and cuts every rank's batch to the smallest one,
    so that all ranks take the same steps (DDP) with equal local batches (the gathered
    contrastive losses need them, losses.py header). The fraction is judged once
    min_samples were seen (one bad clip early in a run does not exceed it alone), and by
    check() at the end of every epoch on whatever was seen. Counts travel over a CPU
    (gloo) group, so no GPU sync is added.

        policy = BadDataPolicy(max_fraction)
        for batch in loader:
            batch = policy.filter(batch)   # None: no sample left on some rank; skip the step
            ...
        policy.check()                     # end of epoch
    """

    def __init__(self, max_fraction=0.01, min_samples=200, keep_errors=10):
        self.max_fraction = max_fraction
        self.min_samples = min_samples
        self.keep_errors = keep_errors   # the first messages, shown when the run fails
        self.seen = 0                    # samples, all ranks
        self.skipped = 0                 # of them bad, all ranks
        self.errors = []
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")

    def filter(self, batch):
        """The batch cut to the smallest one over the ranks, or None when that is empty
        (collective under torchrun: every rank calls it for every batch)."""
        good, bad = int(batch["index"].numel()), int(batch["skipped"])
        n = good
        if self.group is not None:
            counts = torch.tensor([good, bad])
            size = torch.tensor([good])
            dist.all_reduce(counts, group=self.group)
            dist.all_reduce(size, op=dist.ReduceOp.MIN, group=self.group)
            (good, bad), n = counts.tolist(), int(size)
        self.seen += good + bad
        self.skipped += bad
        self.errors += batch["errors"][:max(0, self.keep_errors - len(self.errors))]
        if self.seen >= self.min_samples:
            self.check()
        if n == 0:
            return None
        return {k: v[:n] if torch.is_tensor(v) else v for k, v in batch.items()}

    def check(self):
        """Raise DataError when more than max_fraction of the samples seen were bad."""
        fraction = self.skipped / max(self.seen, 1)
        if self.skipped and fraction > self.max_fraction:
            raise DataError(f"{self.skipped} of {self.seen} samples were bad "
                            f"({100 * fraction:.2f}% > {100 * self.max_fraction:.2f}% allowed); "
                            f"first errors:\n  " + "\n  ".join(self.errors))
