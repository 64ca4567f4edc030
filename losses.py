"""EquiAV's contrastive objectives, the paper's L_inter and L_intra (method.md §7).

Every embedding is L2-normalized first; tau = 0.07; B samples in the (global) batch.

    L_inter   = 1/2 [ CE(z_a z_v^T / tau, diag) + CE(z_v z_a^T / tau, diag) ]
                logits (B, B): row i is audio clip i against every visual clip (and the
                reverse); the positive is on the diagonal.
    L_intra_m = 1/2 (L_q + L_k),  q = z_equi_m (predicted from the original and t),
                                  k = z_aug_m (encoded from the augmented input)
                logits_q (B, 2B): row i is [q_i.k_1 ... q_i.k_B | q_i.q_1 ... q_i.q_B] / tau,
                with q_i.q_i masked out; the positive is column i (k_i). L_k swaps q and k.
    L         = w_inter L_inter + w_a L_intra_a + w_v L_intra_v, each weight 1/3.

Three small pieces, in the manner of open_clip's loss.py: the two losses, each this rank's
rows against the gathered columns of all ranks with targets offset by rank * local_batch;
`gather_with_grad`, the one place that talks to other processes (why N processes compute
what one does is written beside it); `EquiAVLoss`, the weighted total.
"""

import contextlib
import math

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn as nn
import torch.nn.functional as F


# ---- The two losses (method.md §7) ----

def inter_modal_loss(z_a, z_v, temperature):
    """Audio-visual InfoNCE, symmetric (method.md §7, L_inter). z_a, z_v (b, d): this rank's
    L2-normalised inter-modal embeddings; temperature: float or 0-d tensor. Returns
    (loss, acc_a2v, acc_v2a): the mean over local rows of 1/2 [CE(z_a Z_v^T / tau) +
    CE(z_v Z_a^T / tau)], Z the gathered (B, d) columns, targets at rank * b + i; and
    this rank's top-1 retrieval rates (detached)."""
    _check_pair(z_a, z_v, ("z_a", "z_v"))
    with _float32_region(z_a.device):
        z_a, z_v = _upcast(z_a), _upcast(z_v)
        all_a, all_v = gather_with_grad(z_a), gather_with_grad(z_v)  # (B, d)
        targets = _local_targets(z_a.shape[0], z_a.device)
        logits_a2v = z_a @ all_v.T / temperature  # (b, B)
        logits_v2a = z_v @ all_a.T / temperature  # (b, B)
        loss = 0.5 * (F.cross_entropy(logits_a2v, targets)
                      + F.cross_entropy(logits_v2a, targets))
    return loss, _top1(logits_a2v, targets), _top1(logits_v2a, targets)


def _intra_direction(x, all_x, all_y, targets, temperature):
    """Logits of anchors x (b, d): [x_i . y_j for all j | x_i . x_j for j != i] / tau, with
    all_x, all_y (B, d) gathered. The positive is y_i (column targets[i]); the anchor
    itself is no negative: its entry in the second block is -inf."""
    cross = x @ all_y.T / temperature  # (b, B)
    same = x @ all_x.T / temperature   # (b, B)
    columns = torch.arange(all_x.shape[0], device=x.device)
    same = same.masked_fill(columns[None, :] == targets[:, None], float("-inf"))
    return torch.cat([cross, same], dim=1)  # (b, 2B)


def intra_modal_loss(q, k, temperature):
    """Equivariant intra-modal loss of one modality (method.md §7, L_intra_m). q (b, d):
    L2-normalised z_equi_m, predicted from the original and t; k (b, d): z_aug_m, encoded
    from the augmented input. Sample i's positive is (q_i, k_i), its negatives k_j and
    q_j for all j != i of the global batch. loss = 1/2 (L_q + L_k), q or k as anchors,
    each the mean over local rows; acc = 1/2 (top-1 of the q rows + of the k rows)."""
    _check_pair(q, k, ("q", "k"))
    with _float32_region(q.device):
        q, k = _upcast(q), _upcast(k)
        all_q, all_k = gather_with_grad(q), gather_with_grad(k)  # (B, d)
        targets = _local_targets(q.shape[0], q.device)
        logits_q = _intra_direction(q, all_q, all_k, targets, temperature)  # (b, 2B)
        logits_k = _intra_direction(k, all_k, all_q, targets, temperature)  # (b, 2B)
        loss = 0.5 * (F.cross_entropy(logits_q, targets)
                      + F.cross_entropy(logits_k, targets))
    acc = 0.5 * (_top1(logits_q, targets) + _top1(logits_k, targets))
    return loss, acc


# ---- Helpers shared by both losses ----

def _float32_region(device):
    """Disable autocast so logits and cross-entropy run in (at least) float32. Why: the
    logits are cosines / 0.07, up to +-14.3; bf16 spaces numbers in [8, 16) 0.0625 apart, so
    a logit there could be off by 0.03, and the softmax turns that into a 3 % error in a
    column's weight (e^0.03), in the loss and in its gradient."""
    available = torch.amp.is_autocast_available(device.type)   # not on meta, for one
    return torch.autocast(device.type, enabled=False) if available else contextlib.nullcontext()


def _upcast(x):  # bf16/fp16 -> float32; float32 and float64 stay
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _local_targets(local_batch, device):
    """Global column index of each local row: rank * local_batch + i."""
    return torch.arange(local_batch, device=device) + _rank_and_world()[0] * local_batch


def _top1(logits, targets):  # fraction of rows whose arg-max is the target, on the device
    return (logits.detach().argmax(dim=1) == targets).float().mean()


def _check_pair(x, y, names):
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(f"{names[0]} and {names[1]} must both be (batch, dim) with the same "
                         f"shape, got {tuple(x.shape)} and {tuple(y.shape)}")


# ---- Gathering across processes ----
#
# When the result equals the single-process one. Let N processes each hold b samples
# (equal local batches), B = N b. Each per-sample term l_i (sample i's cross-entropy
# against all B columns) is computed exactly as one process with the B samples computes
# it. One process returns L = (1/B) sum_i l_i; rank r returns L_r = (1/b) sum_{i in r}
# l_i, so L = (1/N) sum_r L_r: the rank average of the returned loss is L. Unequal b
# would break both this and the label offsets rank * b.
#
# Gradients. Rank r's embeddings z_r enter its own L_r through its rows and its slice
# of the gathered columns, and every other L_s only through the columns. The gather's
# backward SUMS over ranks what all L_s put on the slice z_r, so rank r computes
# d(sum_s L_s)/dz_r = N dL/dz_r and its parameter gradient is g_r = N (dL/dz_r)
# (dz_r/dtheta); DDP's rank average (1/N) sum_r g_r = sum_r (dL/dz_r)(dz_r/dtheta) =
# dL/dtheta is the single-process gradient. Averaging in the gather's backward would
# make it N times too small; stopping gradients at the gather (the public code) drops
# what other ranks' samples do to this rank's embeddings. A learnable temperature is
# not gathered: rank r gets dL_r/dtau, whose rank average is dL/dtau, so it is
# averaged like the model's parameters. Equality holds up to summation order
# (tests/test_losses.py: two gloo processes against one).

def _rank_and_world():
    """(rank, world_size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x):
    """Concatenate x (b, d) over all ranks -> (world * b, d), rank r's rows at
    [r b, (r + 1) b), keeping the autograd path to every rank: torch's all_gather,
    whose backward sums over ranks the gradients put on each rank's slice (see
    above). The same b on every rank; every rank calls it in the same order. Without
    a process group, or with one process, returns x itself and calls no collective."""
    if _rank_and_world()[1] == 1:
        return x
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0)


# ---- The full objective ----

class EquiAVLoss(nn.Module):
    """L = w_inter L_inter + w_a L_intra_a + w_v L_intra_v (method.md §7), tau shared by all
    terms (0.07); learnable_temperature learns log(tau) as the module's only parameter.
    A weight of 0 skips its term (no compute, no gathers; under DDP the heads that only
    feed it get no gradient).

    forward(out), `out` with the six (B, proj_dim) fields of EquiAVOutput (L2-normalised
    here, in float32) -> dict: "loss", this rank's weighted total with grad; "inter",
    "intra_a", "intra_v", the unweighted terms; "acc_a2v", "acc_v2a", "acc_intra_a",
    "acc_intra_v", top-1 diagnostics. All but "loss" are detached and stay on the
    device (reading them is the caller's sync); a skipped term's entries are 0. All
    are this rank's values: their average over ranks is the global one (see above)."""

    def __init__(self, temperature=0.07, learnable_temperature=False,
                 w_inter=1 / 3, w_a=1 / 3, w_v=1 / 3):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.weights = {"inter": float(w_inter), "intra_a": float(w_a), "intra_v": float(w_v)}
        for name, w in self.weights.items():
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"loss weight for {name!r} must be finite and >= 0, got {w}")
        if not any(self.weights.values()):
            raise ValueError("all loss weights are 0: nothing to optimise")
        self.learnable_temperature = bool(learnable_temperature)
        if self.learnable_temperature:
            self.log_temperature = nn.Parameter(torch.tensor(math.log(temperature)))
        else:
            self.fixed_temperature = float(temperature)

    @property
    def temperature(self):
        """tau: a float, or a 0-d tensor with grad when learnable."""
        if self.learnable_temperature:
            return _upcast(self.log_temperature).exp()
        return self.fixed_temperature

    def extra_repr(self):
        tau = float(self.temperature)
        w = ", ".join(f"w_{n}={v:.4g}" for n, v in self.weights.items())
        return f"temperature={tau:.4g}, learnable={self.learnable_temperature}, {w}"

    def forward(self, out):
        device, w = out.z_inter_a.device, self.weights
        result = dict.fromkeys(("inter", "intra_a", "intra_v", "acc_a2v", "acc_v2a",
                                "acc_intra_a", "acc_intra_v"), torch.zeros((), device=device))
        with _float32_region(device):
            tau = self.temperature   # a learnable one in the embeddings' dtype (float64 in tests)
            tau = tau.to(_upcast(out.z_inter_a).dtype) if self.learnable_temperature else tau

            def unit(z):
                return F.normalize(_upcast(z), dim=-1)

            terms = {}
            if w["inter"]:
                terms["inter"], result["acc_a2v"], result["acc_v2a"] = inter_modal_loss(
                    unit(out.z_inter_a), unit(out.z_inter_v), tau)
            if w["intra_a"]:
                terms["intra_a"], result["acc_intra_a"] = intra_modal_loss(
                    unit(out.z_equi_a), unit(out.z_aug_a), tau)
            if w["intra_v"]:
                terms["intra_v"], result["acc_intra_v"] = intra_modal_loss(
                    unit(out.z_equi_v), unit(out.z_aug_v), tau)
            result["loss"] = sum(w[name] * loss for name, loss in terms.items())
        return {**result, **{name: loss.detach() for name, loss in terms.items()}}
