"""Tests for losses.py (method.md §7): values and gradients against loop-based
references, hand-computed accuracies, float32 under autocast, and two gloo
processes against one process on the concatenated batch."""

import math
import os
from collections import namedtuple
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import losses
from losses import EquiAVLoss, gather_with_grad, inter_modal_loss, intra_modal_loss

FIELDS = ("z_inter_a", "z_inter_v", "z_equi_a", "z_equi_v", "z_aug_a", "z_aug_v")
Out = namedtuple("Out", FIELDS)  # stands in for model.EquiAVOutput
KEYS = ("loss", "inter", "intra_a", "intra_v", "acc_a2v", "acc_v2a", "acc_intra_a", "acc_intra_v")


# ---------------------------------------------------------------------------
# Naive references: explicit loops over anchors i and columns j (float64)
# ---------------------------------------------------------------------------

def _nll(scores, pos):
    """-log softmax(scores)[pos] from a Python list of 0-d tensors."""
    return torch.logsumexp(torch.stack(scores), 0) - scores[pos]


def naive_inter(za, zv, tau):
    B = len(za)
    total, hits_a, hits_v = 0.0, 0, 0
    for i in range(B):
        s_a = [torch.dot(za[i], zv[j]) / tau for j in range(B)]
        s_v = [torch.dot(zv[i], za[j]) / tau for j in range(B)]
        total = total + _nll(s_a, i) + _nll(s_v, i)
        hits_a += int(torch.stack(s_a).argmax()) == i
        hits_v += int(torch.stack(s_v).argmax()) == i
    return total / (2 * B), hits_a / B, hits_v / B


def naive_intra(q, k, tau):
    B = len(q)
    total, hits = 0.0, 0
    for anchor, other in ((q, k), (k, q)):
        for i in range(B):
            scores = [torch.dot(anchor[i], other[j]) / tau for j in range(B)]   # positive at i
            scores += [torch.dot(anchor[i], anchor[j]) / tau for j in range(B) if j != i]
            total = total + _nll(scores, i)
            hits += int(torch.stack(scores).argmax()) == i
    return total / (2 * B), hits / (2 * B)


def _unit(z):
    return z / z.norm(dim=1, keepdim=True)


def _random_out(B, d=8, seed=0, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return Out(*[(3 * torch.randn(B, d, generator=g, dtype=dtype)).requires_grad_(requires_grad)
                 for _ in FIELDS])


# ---------------------------------------------------------------------------
# Single-process values and gradients
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("B", [1, 2, 5, 9])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_inter_modal_matches_loop(B, tau):
    out = _random_out(B, seed=B, requires_grad=True)
    za, zv = _unit(out.z_inter_a), _unit(out.z_inter_v)
    loss, acc_a2v, acc_v2a = inter_modal_loss(za, zv, tau)
    ref, ref_a2v, ref_v2a = naive_inter(za, zv, tau)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert acc_a2v.item() == pytest.approx(ref_a2v) and acc_v2a.item() == pytest.approx(ref_v2a)
    assert not acc_a2v.requires_grad
    g = torch.autograd.grad(loss, [out.z_inter_a, out.z_inter_v], retain_graph=True)
    g_ref = torch.autograd.grad(ref, [out.z_inter_a, out.z_inter_v])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # float32 inputs agree with the float64 loop to float32 precision
    loss32, _, _ = inter_modal_loss(za.float(), zv.float(), tau)
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("B", [1, 2, 5, 9])
@pytest.mark.parametrize("tau", [0.07, 0.5])
def test_intra_modal_matches_loop(B, tau):
    out = _random_out(B, seed=100 + B, requires_grad=True)
    q, k = _unit(out.z_equi_a), _unit(out.z_aug_a)
    loss, acc = intra_modal_loss(q, k, tau)
    ref, ref_acc = naive_intra(q, k, tau)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    assert acc.item() == pytest.approx(ref_acc)
    g = torch.autograd.grad(loss, [out.z_equi_a, out.z_aug_a], retain_graph=True)
    g_ref = torch.autograd.grad(ref, [out.z_equi_a, out.z_aug_a])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_intra_self_similarity_is_masked():
    # With q == k the unmasked q_i.q_i entry would tie the positive (both 1/tau)
    # and add e^(1/tau) to every denominator; the loop reference has no such entry.
    q = _unit(torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3)))
    loss, _ = intra_modal_loss(q, q.clone(), 0.07)
    ref, _ = naive_intra(q, q.clone(), 0.07)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    unmasked = 0.0
    for i in range(6):  # the same loss with the self entry kept
        scores = [q[i] @ q[j] / 0.07 for j in range(6)] + [q[i] @ q[j] / 0.07 for j in range(6)]
        unmasked += _nll(scores, i)
    assert abs(loss.item() - unmasked.item() / 6) > 0.5


def test_total_with_weights_matches_loop():
    out = _random_out(7, seed=11, requires_grad=True)
    crit = EquiAVLoss(temperature=0.1, w_inter=0.5, w_a=0.2, w_v=0.3)
    res = crit(out)
    u = {n: _unit(getattr(out, n)) for n in FIELDS}
    inter, a2v, v2a = naive_inter(u["z_inter_a"], u["z_inter_v"], 0.1)
    intra_a, acc_a = naive_intra(u["z_equi_a"], u["z_aug_a"], 0.1)
    intra_v, acc_v = naive_intra(u["z_equi_v"], u["z_aug_v"], 0.1)
    ref = 0.5 * inter + 0.2 * intra_a + 0.3 * intra_v
    torch.testing.assert_close(res["loss"], ref, rtol=1e-12, atol=1e-12)
    for key, val in (("inter", inter), ("intra_a", intra_a), ("intra_v", intra_v)):
        torch.testing.assert_close(res[key], val.detach(), rtol=1e-12, atol=1e-12)
        assert not res[key].requires_grad
    for key, val in (("acc_a2v", a2v), ("acc_v2a", v2a), ("acc_intra_a", acc_a), ("acc_intra_v", acc_v)):
        assert res[key].item() == pytest.approx(val)
    g = torch.autograd.grad(res["loss"], list(out))
    g_ref = torch.autograd.grad(ref, list(out))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # The defaults are 1/3 each.
    res_default = EquiAVLoss(temperature=0.1)(out)
    torch.testing.assert_close(res_default["loss"], (inter + intra_a + intra_v) / 3,
                               rtol=1e-12, atol=1e-12)


def test_zero_weight_skips_term(monkeypatch):
    out = _random_out(5, seed=4, requires_grad=True)
    full = EquiAVLoss(w_inter=0.4, w_a=0.6, w_v=0.3)(out)

    def not_called(*args, **kwargs):
        raise AssertionError("a term with weight 0 was computed")

    monkeypatch.setattr(losses, "inter_modal_loss", not_called)
    res = EquiAVLoss(w_inter=0.0, w_a=0.6, w_v=0.3)(out)
    for key in ("inter", "acc_a2v", "acc_v2a"):
        assert res[key].item() == 0.0
    torch.testing.assert_close(res["loss"], 0.6 * full["intra_a"] + 0.3 * full["intra_v"])
    res["loss"].backward()
    # No graph to the skipped term's embeddings at all (not merely zero gradient).
    assert out.z_inter_a.grad is None and out.z_inter_v.grad is None
    assert out.z_equi_a.grad is not None and out.z_aug_v.grad is not None

    monkeypatch.undo()
    res = EquiAVLoss(w_inter=1.0, w_a=0.0, w_v=0.0)(out)
    torch.testing.assert_close(res["loss"], full["inter"])
    assert res["intra_a"].item() == 0.0 and res["acc_intra_v"].item() == 0.0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="temperature must be positive"):
        EquiAVLoss(temperature=0.0)
    with pytest.raises(ValueError, match="'intra_v' must be finite and >= 0"):
        EquiAVLoss(w_v=-0.1)
    with pytest.raises(ValueError, match="all loss weights are 0"):
        EquiAVLoss(w_inter=0, w_a=0, w_v=0)
    with pytest.raises(ValueError, match=r"z_a and z_v .* got \(4, 8\) and \(3, 8\)"):
        inter_modal_loss(torch.randn(4, 8), torch.randn(3, 8), 0.07)
    with pytest.raises(ValueError, match="q and k"):
        intra_modal_loss(torch.randn(4, 8), torch.randn(4, 7), 0.07)


# ---------------------------------------------------------------------------
# Accuracy diagnostics, hand-computed
# ---------------------------------------------------------------------------

def _at(*degrees):
    rad = torch.tensor(degrees, dtype=torch.float32) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1)  # unit vectors in the plane


def test_accuracy_hand_computed():
    # a at 0, 90, 180, 270 deg; v at 10, 80, 200, 95 deg.
    # a->v: a0 -> v0 ok; a1 -> v3 (5 deg away beats 10) wrong; a2 -> v2 ok;
    #       a3 -> v2 (70 deg, the closest) wrong: 2/4.
    # v->a: v0 -> a0, v1 -> a1, v2 -> a2 ok; v3 -> a1 wrong: 3/4.
    _, acc_a2v, acc_v2a = inter_modal_loss(_at(0, 90, 180, 270), _at(10, 80, 200, 95), 0.07)
    assert acc_a2v.item() == 0.5 and acc_v2a.item() == 0.75
    assert acc_a2v.dtype == torch.float32

    # q at 0, 90 deg; k at 20, 180 deg.
    # q rows: q0 -> k0 (cos 20) beats k1 (-1) and q1 (0): ok. q1 -> k0 (cos 70)
    #   beats its positive k1 (0): wrong. 1/2 (q0 only counts as right because
    #   its own q0.q0 = 1 is masked).
    # k rows: k0 -> q0 (cos 20) beats q1 (cos 70) and k1 (cos 160): ok.
    #   k1 -> q1 (0) beats q0 (-1) and k0 (cos 160): ok. 2/2.
    _, acc = intra_modal_loss(_at(0, 90), _at(20, 180), 0.07)
    assert acc.item() == 0.75
    # Through the module: same values, embeddings rescaled (normalised inside).
    out = Out(3 * _at(0, 90), 0.5 * _at(20, 180), 2 * _at(0, 90), _at(20, 180),
              7 * _at(20, 180), _at(0, 90))
    res = EquiAVLoss()(out)
    # inter: a = (0, 90), v = (20, 180): a0 -> v0 ok, a1 -> v0 wrong; v0 -> a0 ok, v1 -> a1 ok.
    assert res["acc_a2v"].item() == 0.5 and res["acc_v2a"].item() == 1.0
    assert res["acc_intra_a"].item() == 0.75
    # intra_v swaps q and k of the case above, so the rows trade places: still 3/4.
    assert res["acc_intra_v"].item() == 0.75


# ---------------------------------------------------------------------------
# Mixed precision and the temperature
# ---------------------------------------------------------------------------

def test_float32_under_autocast():
    torch.manual_seed(0)
    layer = nn.Linear(16, 32 * 6)
    x = torch.randn(8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = layer(x)
        assert z.dtype == torch.bfloat16
        out = Out(*z.chunk(6, dim=1))
        res = EquiAVLoss()(out)
    assert res["loss"].dtype == torch.float32
    # Same bf16 embeddings, everything after them in float32 outside autocast.
    ref = EquiAVLoss()(Out(*[t.float() for t in out]))
    torch.testing.assert_close(res["loss"], ref["loss"], rtol=1e-6, atol=1e-6)
    # Had the logits been taken in bf16 (8 mantissa bits) the loss would be off.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        za, zv = (F.normalize(t.float(), dim=1) for t in out[:2])
        bf16_logits = za @ zv.T / 0.07
    assert bf16_logits.dtype == torch.bfloat16
    inter_bf16 = 0.5 * (F.cross_entropy(bf16_logits.float(), torch.arange(8))
                        + F.cross_entropy(bf16_logits.float().T, torch.arange(8)))
    assert abs(inter_bf16.item() - ref["inter"].item()) > 1e-4
    res["loss"].backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_learnable_temperature_gets_gradient():
    out = _random_out(6, seed=5, dtype=torch.float32)
    crit = EquiAVLoss(temperature=0.07, learnable_temperature=True)
    params = list(crit.parameters())
    assert len(params) == 1 and params[0] is crit.log_temperature
    assert crit.temperature.item() == pytest.approx(0.07)
    res = crit(out)
    res["loss"].backward()
    assert crit.log_temperature.grad is not None and crit.log_temperature.grad.abs() > 0
    # d loss / d log tau against a central finite difference of the fixed-tau loss.
    eps = 1e-3
    out64 = Out(*[t.double() for t in out])
    plus = EquiAVLoss(temperature=0.07 * math.exp(eps))(out64)["loss"]
    minus = EquiAVLoss(temperature=0.07 * math.exp(-eps))(out64)["loss"]
    fd = (plus - minus).item() / (2 * eps)
    assert crit.log_temperature.grad.item() == pytest.approx(fd, rel=1e-3)
    # The learned value is the one used.
    with torch.no_grad():
        crit.log_temperature.fill_(math.log(0.3))
    torch.testing.assert_close(crit(out)["loss"], EquiAVLoss(temperature=0.3)(out)["loss"])


def test_fixed_temperature_has_no_parameter():
    crit = EquiAVLoss(temperature=0.07)
    assert list(crit.parameters()) == [] and crit.state_dict() == {}
    assert crit.temperature == 0.07
    out = _random_out(4, seed=6, dtype=torch.float32, requires_grad=True)
    crit(out)["loss"].backward()
    assert list(crit.parameters()) == []


# ---------------------------------------------------------------------------
# Distributed
# ---------------------------------------------------------------------------

def _forbid_collectives(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective was called in a single-process setting")
    for name in ("all_gather", "all_gather_into_tensor", "all_reduce", "reduce_scatter",
                 "reduce_scatter_tensor", "broadcast"):
        monkeypatch.setattr(dist, name, forbidden, raising=False)


def test_single_process_calls_no_collective(monkeypatch):
    assert not dist.is_initialized()
    _forbid_collectives(monkeypatch)
    x = torch.randn(5, 4, requires_grad=True)
    assert gather_with_grad(x) is x
    res = EquiAVLoss(learnable_temperature=True)(_random_out(5, seed=7, requires_grad=True))
    res["loss"].backward()


def test_world_size_one_group_calls_no_collective(monkeypatch, tmp_path):
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init1'}",
                            rank=0, world_size=1, timeout=timedelta(seconds=30))
    try:
        _forbid_collectives(monkeypatch)
        x = torch.randn(5, 4, requires_grad=True)
        assert gather_with_grad(x) is x
        out = _random_out(5, seed=8, requires_grad=True)
        single = EquiAVLoss()(out)
        single["loss"].backward()
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()
    ref = EquiAVLoss()(out)
    torch.testing.assert_close(single["loss"], ref["loss"])


WORLD, GLOBAL_B, D_IN, D_OUT = 2, 8, 6, 5
WEIGHTS = dict(w_inter=0.5, w_a=0.3, w_v=0.2)


class SixHeads(nn.Module):
    """Stand-in for EquiAV: one small MLP per embedding, same seed on every rank."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(D_IN, 7), nn.Tanh(), nn.Linear(7, D_OUT)) for _ in FIELDS)

    def forward(self, x):
        return Out(*[head(x) for head in self.heads])


def _setup(dtype):
    torch.manual_seed(0)
    model = SixHeads().to(dtype)
    crit = EquiAVLoss(learnable_temperature=True, **WEIGHTS).to(dtype)
    x = torch.randn(GLOBAL_B, D_IN, generator=torch.Generator().manual_seed(1)).to(dtype)
    return model, crit, x


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=timedelta(seconds=60))
    try:
        results = {}
        b = GLOBAL_B // WORLD
        # gather_with_grad on its own: forward concatenates, backward sums over ranks.
        x = torch.full((b, 3), float(rank + 1), requires_grad=True)
        y = gather_with_grad(x)
        w = torch.arange(GLOBAL_B * 3, dtype=torch.float32).reshape(GLOBAL_B, 3)
        (y * w * (rank + 1)).sum().backward()  # rank s puts (s+1) * w on every slice
        results["gathered"] = y.detach()
        results["gather_grad"] = x.grad
        for dtype in (torch.float64, torch.float32):
            model, crit, xs = _setup(dtype)
            ddp = DDP(model)
            res = crit(ddp(xs[rank * b:(rank + 1) * b]))
            res["loss"].backward()
            # The temperature lives outside DDP: average its gradient as DDP would.
            dist.all_reduce(crit.log_temperature.grad)
            crit.log_temperature.grad /= WORLD
            stats = torch.stack([res[k].detach().to(dtype) for k in KEYS])
            dist.all_reduce(stats)
            results[str(dtype)] = {
                "stats": stats / WORLD,
                "grads": [p.grad.clone() for p in model.parameters()],
                "tau_grad": crit.log_temperature.grad.clone(),
            }
        # Same run with a broken gather backward, to show the test would notice.
        real_gather = losses.gather_with_grad

        def stop_gather(x):  # the public code: only this rank's own loss reaches its inputs
            parts = [torch.empty_like(x) for _ in range(WORLD)]
            dist.all_gather(parts, x.detach())
            parts[rank] = x
            return torch.cat(parts)

        def mean_gather(x):  # averaging over ranks in the backward instead of summing
            y = real_gather(x)
            y.register_hook(lambda g: g / WORLD)
            return y

        for mutant, gather in (("stop", stop_gather), ("mean", mean_gather)):
            losses.gather_with_grad = gather
            model, crit, xs = _setup(torch.float64)
            ddp = DDP(model)
            crit(ddp(xs[rank * b:(rank + 1) * b]))["loss"].backward()
            results[mutant] = [p.grad.clone() for p in model.parameters()]
        losses.gather_with_grad = real_gather
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()  # neither rank closes its connections while the other still reads
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    b = GLOBAL_B // WORLD

    w = torch.arange(GLOBAL_B * 3, dtype=torch.float32).reshape(GLOBAL_B, 3)
    expected_gather = torch.cat([torch.full((b, 3), float(r + 1)) for r in range(WORLD)])
    for r, res in enumerate(ranks):
        torch.testing.assert_close(res["gathered"], expected_gather, rtol=0, atol=0)
        # sum over ranks s of (s + 1) * w, this rank's rows
        torch.testing.assert_close(res["gather_grad"], 3 * w[r * b:(r + 1) * b], rtol=0, atol=0)

    for dtype in (torch.float64, torch.float32):
        model, crit, x = _setup(dtype)
        res = crit(model(x))
        res["loss"].backward()
        single_stats = torch.stack([res[k].detach().to(dtype) for k in KEYS])
        # float64: within 1e-6 absolute (in fact ~1e-15, summation order only);
        # float32: gradients reach ~3, so allow 1e-6 relative on top.
        rtol = 0.0 if dtype == torch.float64 else 1e-6
        for r in range(WORLD):
            got = ranks[r][str(dtype)]
            torch.testing.assert_close(got["stats"], single_stats, rtol=rtol, atol=1e-6)
            assert len(got["grads"]) == len(list(model.parameters()))
            for g, p in zip(got["grads"], model.parameters()):
                torch.testing.assert_close(g, p.grad, rtol=rtol, atol=1e-6)
            torch.testing.assert_close(got["tau_grad"], crit.log_temperature.grad, rtol=rtol, atol=1e-6)
        if dtype == torch.float64:
            got = ranks[0][str(dtype)]
            for g, p in zip(got["grads"], model.parameters()):
                torch.testing.assert_close(g, p.grad, rtol=1e-10, atol=1e-12)
    # Mutants of the gather backward that the comparison must catch: stopping
    # the gradient at the gather (public code) and averaging instead of summing.
    model, crit, x = _setup(torch.float64)
    crit(model(x))["loss"].backward()
    for mutant in ("stop", "mean"):
        got = ranks[0][mutant]
        worst = max((g - p.grad).abs().max().item() for g, p in zip(got, model.parameters()))
        assert worst > 1e-3, mutant
