"""EquiAV's contrastive objectives (SPEC 7; paper eqs. for L_inter and L_intra).

Three small pieces, in the manner of open_clip's loss.py:

- `gather_with_grad`: the one place that talks to other processes. It
  concatenates every rank's embeddings and, unlike the public EquiAV code
  (SPEC 9), lets gradients flow back to the rank that produced them.
- `inter_modal_loss`, `intra_modal_loss`: this rank's rows against the
  gathered columns of all ranks, with targets offset by rank * local_batch.
- `EquiAVLoss`: normalises the six embeddings, applies the temperature and
  the weights, and returns the terms plus top-1 diagnostics.

When the result equals the single-process one
----------------------------------------------
Let N processes each hold b samples (equal local batch sizes), B = N b.
Every per-sample term l_i (sample i's cross-entropy against all B columns)
is then computed exactly as one process with the B samples computes it. The
single-process loss is L = (1/B) sum_i l_i; rank r returns the mean over its
own rows L_r = (1/b) sum_{i in r} l_i, so L = (1/N) sum_r L_r: averaging
the returned loss over ranks (all_reduce / N) gives L. This needs equal b:
with unequal sizes the mean of the local means is not the global mean, and
the label offsets rank * b would point to the wrong columns.

Gradients. Rank r's embeddings z_r enter its own loss L_r through its local
rows and through its slice of the gathered columns, and enter every other
L_s only through the gathered columns. The backward of `gather_with_grad`
SUMS over ranks the gradients all L_s put on the slice z_r, so rank r's
backward computes d(sum_s L_s)/dz_r = N dL/dz_r, i.e. its local mean loss
is differentiated as if it were N times the global mean. Its parameter
gradient is g_r = N (dL/dz_r)(dz_r/dtheta), and DDP's average over ranks
gives (1/N) sum_r g_r = sum_r (dL/dz_r)(dz_r/dtheta) = dL/dtheta, the
single-process gradient (chain rule over all B embeddings). Averaging in the
gather backward instead of summing would make it N times too small, and
stopping gradients at the gather (the public code) drops the terms by which
other ranks' samples act on this rank's embeddings. A learnable temperature
is not gathered: rank r gets dL_r/dtau and the rank average is dL/dtau, so
it must be averaged across ranks like the model parameters (DDP-wrapped or
all-reduced by hand). Equality holds up to floating-point summation order.
"""

import contextlib
import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------------------
# Gathering across processes
# ---------------------------------------------------------------------------

def _rank_and_world():
    """(rank, world_size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather forward; backward sums the gradients over ranks, keeps ours."""

    @staticmethod
    def forward(ctx, x):
        rank, world = _rank_and_world()
        ctx.rank, ctx.local_batch = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x)
        return torch.cat(parts)  # (world * b, d), rank-major

    @staticmethod
    def backward(ctx, grad):
        # Every rank's loss put a gradient on every slice; this rank's inputs
        # are owed the sum of what all ranks put on its slice (see header).
        # Clone: the incoming gradient may be shared and all_reduce is in place.
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.local_batch
        return grad[start:start + ctx.local_batch]


def gather_with_grad(x):
    """Concatenate x over all ranks, keeping the autograd path to every rank.

    x: (b, d), the same b on every rank -> (world * b, d), rank r's rows at
    [r * b, (r + 1) * b). Without an initialised process group, or with world
    size 1, returns x itself and calls no collective. Every rank must call it
    in the same order (it is a collective in forward and in backward).
    """
    _, world = _rank_and_world()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x.contiguous())


# ---------------------------------------------------------------------------
# Helpers shared by both losses
# ---------------------------------------------------------------------------

def _float32_region(device):
    """Disable autocast so logits and cross-entropy run in (at least) float32."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _upcast(x):
    """bf16/fp16 -> float32; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _local_targets(local_batch, device):
    """Global column index of each local row: rank * local_batch + i."""
    rank, _ = _rank_and_world()
    return torch.arange(local_batch, device=device) + rank * local_batch


@torch.no_grad()
def _top1(logits, targets):
    """Fraction of rows whose arg-max is the target; stays on the device (no sync)."""
    return (logits.argmax(dim=1) == targets).float().mean()


def _check_pair(x, y, names):
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(
            f"{names[0]} and {names[1]} must both be (batch, dim) with the same shape, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}")


# ---------------------------------------------------------------------------
# The two losses (SPEC 7)
# ---------------------------------------------------------------------------

def inter_modal_loss(z_a, z_v, temperature):
    """Audio-visual InfoNCE, symmetric (SPEC 7, L_inter).

    z_a, z_v: (b, d) this rank's L2-normalised inter-modal embeddings.
    temperature: float or 0-d tensor.
    Returns (loss, acc_a2v, acc_v2a): the loss is the mean over local rows of
    1/2 [CE(z_a Z_v^T / tau) + CE(z_v Z_a^T / tau)] with Z the gathered
    (B, d) columns and targets at rank * b + i; the accuracies are this rank's
    top-1 retrieval rates (detached tensors). Average all three over ranks for
    the global values (see the module docstring for when they are exact).
    """
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
    """Logits of anchors x: [x_i . y_j for all j | x_i . x_j for j != i] / tau.

    x: (b, d) local anchors; all_x, all_y: (B, d) gathered. The positive is
    y_i (column targets[i] of the first block); the anchor's own view x_i is
    not a negative, so its entry in the second block is masked to -inf.
    """
    cross = x @ all_y.T / temperature  # (b, B)
    same = x @ all_x.T / temperature   # (b, B)
    columns = torch.arange(all_x.shape[0], device=x.device)
    same = same.masked_fill(columns[None, :] == targets[:, None], float("-inf"))
    return torch.cat([cross, same], dim=1)  # (b, 2B)


def intra_modal_loss(q, k, temperature):
    """Equivariant intra-modal contrastive loss of one modality (SPEC 7, L_intra_m).

    q: (b, d) L2-normalised z_equi_m (predicted from the original input and t);
    k: (b, d) L2-normalised z_aug_m (encoded from the augmented input).
    For sample i the positive is (q_i, k_i) and the negatives are k_j and q_j
    for all j != i, over the global batch. L_q uses q as anchors, L_k swaps the
    roles; loss = 1/2 (L_q + L_k), each the mean over local rows.
    Returns (loss, acc) with acc = 1/2 (top-1 of the q rows + top-1 of the k
    rows), a detached tensor local to this rank.
    """
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


# ---------------------------------------------------------------------------
# The full objective
# ---------------------------------------------------------------------------

class EquiAVLoss(nn.Module):
    """L = w_inter L_inter + w_a L_intra_a + w_v L_intra_v (SPEC 7).

    temperature: tau shared by all terms (0.07). learnable_temperature: learn
    log(tau) as the module's only parameter (positivity for free); otherwise
    tau is a plain float and the module has no parameters or buffers.
    A weight of 0 skips its term entirely (no compute, no gathers, no graph
    to those embeddings; under DDP the heads that only feed it then need
    find_unused_parameters=True).

    forward(out): `out` has the six (B, proj_dim) attributes of EquiAVOutput
    (not normalised; L2-normalised here in float32). Returns a dict:
      "loss": scalar with grad, this rank's weighted total;
      "inter", "intra_a", "intra_v": the unweighted terms (detached);
      "acc_a2v", "acc_v2a", "acc_intra_a", "acc_intra_v": top-1 diagnostics
      (detached float tensors, left on the device so logging them costs no
      host-device sync until the caller asks).
    A skipped term's entries are zero tensors. All values are this rank's;
    their average over ranks is the global value (module docstring).
    """

    def __init__(self, temperature=0.07, learnable_temperature=False,
                 w_inter=1 / 3, w_a=1 / 3, w_v=1 / 3):
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        weights = {"inter": float(w_inter), "intra_a": float(w_a), "intra_v": float(w_v)}
        for name, w in weights.items():
            if not (w >= 0 and math.isfinite(w)):
                raise ValueError(f"loss weight for {name!r} must be finite and >= 0, got {w}")
        if not any(weights.values()):
            raise ValueError("all loss weights are 0: nothing to optimise")
        self.weights = weights
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
        tau = self.log_temperature.exp().item() if self.learnable_temperature else self.fixed_temperature
        w = ", ".join(f"w_{n}={v:.4g}" for n, v in self.weights.items())
        return f"temperature={tau:.4g}, learnable={self.learnable_temperature}, {w}"

    def forward(self, out):
        device = out.z_inter_a.device
        result = {key: torch.zeros((), device=device)
                  for key in ("inter", "intra_a", "intra_v", "acc_a2v", "acc_v2a",
                              "acc_intra_a", "acc_intra_v")}
        with _float32_region(device):
            tau = self.temperature
            if self.learnable_temperature:
                # Match the embeddings' compute dtype (float32, or float64 in tests).
                tau = tau.to(_upcast(out.z_inter_a).dtype)

            def unit(z):
                return F.normalize(_upcast(z), dim=-1)

            terms = []
            if self.weights["inter"]:
                loss, result["acc_a2v"], result["acc_v2a"] = inter_modal_loss(
                    unit(out.z_inter_a), unit(out.z_inter_v), tau)
                terms.append(("inter", loss))
            if self.weights["intra_a"]:
                loss, result["acc_intra_a"] = intra_modal_loss(
                    unit(out.z_equi_a), unit(out.z_aug_a), tau)
                terms.append(("intra_a", loss))
            if self.weights["intra_v"]:
                loss, result["acc_intra_v"] = intra_modal_loss(
                    unit(out.z_equi_v), unit(out.z_aug_v), tau)
                terms.append(("intra_v", loss))

            total = sum(self.weights[name] * loss for name, loss in terms)
        for name, loss in terms:
            result[name] = loss.detach()
        result["loss"] = total
        return result
