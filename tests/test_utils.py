import dataclasses
import json
import math
from typing import Optional

import pytest
import torch

import utils


@dataclasses.dataclass
class _Cfg:
    lr: float = 1e-4
    epochs: int = 3
    name: str = "run"
    amp: bool = True
    init: Optional[str] = None


def test_parse_config_overrides_and_types():
    cfg = utils.parse_config(_Cfg, ["--lr", "0.5", "--amp", "false", "--init", "ckpt.pt"])
    assert cfg == _Cfg(lr=0.5, epochs=3, name="run", amp=False, init="ckpt.pt")
    assert utils.parse_config(_Cfg, ["--init", "none"]).init is None
    assert utils.parse_config(_Cfg, []) == _Cfg()


def test_parse_config_rejects_unknown_and_bad_values(capsys):
    with pytest.raises(SystemExit):
        utils.parse_config(_Cfg, ["--lrr", "0.5"])
    assert "unrecognized arguments: --lrr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        utils.parse_config(_Cfg, ["--amp", "maybe"])
    assert "expected true or false" in capsys.readouterr().err


def test_cosine_lr_schedule():
    kw = dict(total_steps=110, warmup_steps=10, base_lr=1.0, warmup_start_lr=0.1, final_lr=0.0)
    assert utils.cosine_lr(0, **kw) == pytest.approx(0.1)
    assert utils.cosine_lr(5, **kw) == pytest.approx(0.55)
    assert utils.cosine_lr(10, **kw) == pytest.approx(1.0)
    # halfway through the cosine part: exactly between base and final
    assert utils.cosine_lr(60, **kw) == pytest.approx(0.5)
    assert utils.cosine_lr(35, **kw) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.25)))
    assert utils.cosine_lr(110, **kw) == pytest.approx(0.0)
    assert utils.cosine_lr(500, **kw) == pytest.approx(0.0)


def test_checkpoint_roundtrip_is_atomic_and_weights_only(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    obj = {"model": {"w": torch.arange(4.0)}, "step": 7, "config": {"lr": 0.1}}
    utils.save_checkpoint(obj, path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pt"]  # no temp file left
    back = utils.load_checkpoint(path)
    assert back["step"] == 7 and torch.equal(back["model"]["w"], obj["model"]["w"])


def test_json_logger_appends_lines(tmp_path):
    log = utils.JsonLogger(tmp_path / "log.jsonl")
    log.log({"step": 1, "loss": 0.5})
    log.log({"step": 2, "loss": 0.25})
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2]


def test_not_distributed_without_torchrun(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    rank, world, local, device = utils.init_distributed("cpu")
    assert (rank, world, local, device.type) == (0, 1, 0, "cpu")
    assert not utils.is_distributed() and utils.is_main()


def test_seed_epoch_streams_differ_by_rank_and_epoch_and_repeat():
    def draws(seed, epoch, rank):
        gen = utils.seed_epoch(seed, epoch, rank)
        return torch.rand(4, generator=gen), torch.rand(4)  # its stream, then torch's global one
    a = draws(0, 3, 0)
    for x, y in zip(a, draws(0, 3, 0)):
        assert torch.equal(x, y)  # a function of (seed, epoch, rank) only: resuming repeats it
    for other in (draws(0, 3, 1), draws(0, 4, 0), draws(1, 3, 0)):
        assert not torch.equal(a[0], other[0]) and not torch.equal(a[1], other[1])
    assert not torch.equal(a[0], a[1])  # the generator and the global seed are not one stream


def test_gather_in_dataset_order_drops_padding_repeats():
    index = torch.tensor([4, 0, 2, 0, 1, 3])       # 0 repeated, as sampler padding does
    rows = index.float()[:, None] * 10
    idx, out = utils.gather_in_dataset_order(index, rows)
    assert idx.tolist() == [0, 1, 2, 3, 4]
    assert out[:, 0].tolist() == [0.0, 10.0, 20.0, 30.0, 40.0]


def test_optimizer_step_clips_and_calls_the_hook():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    opt = torch.optim.SGD([{"params": [w], "lr_scale": 2.0}], lr=1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    seen = []
    utils.optimizer_step(opt, scaler, (w * w).sum(), clip_grad=1.0,
                         after_backward=lambda: seen.append(w.grad.clone()))
    assert torch.equal(seen[0], torch.tensor([6.0, 8.0]))      # the hook saw the raw gradient
    # clipped to norm 1 before the step: w - lr * g / |g|
    torch.testing.assert_close(w.detach(), torch.tensor([3.0 - 0.6, 4.0 - 0.8]))
    cfg = _Cfg(lr=0.5)
    cfg.warmup_start_lr, cfg.final_lr = 0.0, 0.0
    assert utils.set_lr(opt, 10, 10, 0, cfg) == pytest.approx(0.0)
    assert utils.set_lr(opt, 0, 10, 0, cfg) == pytest.approx(0.5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.0)      # times the group's lr_scale
    assert isinstance(utils.cosine_lr(3, 10, 2, 1.0), float)    # a plain float, not numpy


# ---------------------------------------------------------------------------
# The CUDA paths, checked without a GPU
# ---------------------------------------------------------------------------

def _fake_gpu(monkeypatch, major):
    """A CUDA device of compute capability `major`.x where bf16 can be emulated."""
    from types import SimpleNamespace
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(major=major))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda d: True)


@pytest.mark.parametrize("major,dtype", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_amp_uses_fp16_where_bf16_would_be_emulated(monkeypatch, major, dtype):
    _fake_gpu(monkeypatch, major)
    assert torch.cuda.is_bf16_supported()          # counts emulation: a V100 / T4 says yes
    assert utils.amp_dtype("cuda", True) == dtype
    assert utils.amp_dtype("cuda", False) is None and utils.amp_dtype("cpu", True) is None


def test_scaler_state_loads_only_when_both_runs_used_a_scaler(capsys):
    used = torch.amp.GradScaler("cpu", init_scale=1024.0)
    used.scale(torch.ones((), requires_grad=True))   # the scale tensor exists once used
    saved_with, saved_without = used.state_dict(), torch.amp.GradScaler("cpu", enabled=False).state_dict()
    assert saved_without == {}
    with pytest.raises(RuntimeError, match="empty"):   # what resuming did before
        torch.amp.GradScaler("cpu").load_state_dict(saved_without)
    fresh = torch.amp.GradScaler("cpu", init_scale=8.0)
    utils.load_scaler_state(fresh, saved_without, "ckpt.pt")
    assert fresh.get_scale() == 8.0 and "starts afresh" in capsys.readouterr().out
    resumed = torch.amp.GradScaler("cpu", init_scale=8.0)
    utils.load_scaler_state(resumed, saved_with, "ckpt.pt")
    assert resumed.get_scale() == 1024.0
    disabled = torch.amp.GradScaler("cpu", enabled=False)
    utils.load_scaler_state(disabled, saved_with, "ckpt.pt")
    assert not disabled.is_enabled() and "starts afresh" in capsys.readouterr().out


def _barrier_worker(rank, init_file, out_dir):
    import os
    import time
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if rank == 0:
            time.sleep(2.0)   # rank-0-only work
        start = time.time()
        utils.barrier(timeout_s=30)
        with open(os.path.join(out_dir, f"waited{rank}"), "w") as f:
            f.write(str(time.time() - start))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_barrier_with_a_timeout_waits_for_rank_0(tmp_path):
    torch.multiprocessing.spawn(_barrier_worker, args=(str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2, join=True)
    assert float((tmp_path / "waited1").read_text()) > 1.0    # rank 1 waited for rank 0
    assert float((tmp_path / "waited0").read_text()) < 1.0


def test_roc_auc_is_the_share_of_positive_negative_pairs_ranked_right():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (40, 3), generator=g).double()      # many ties
    targets = torch.rand(40, 3, generator=g) > 0.6
    auc = utils.roc_auc(scores, targets)
    for c in range(3):
        pos, neg = scores[targets[:, c], c], scores[~targets[:, c], c]
        pairs = (pos[:, None] > neg[None]).double() + 0.5 * (pos[:, None] == neg[None]).double()
        assert auc[c].item() == pytest.approx(pairs.mean().item())
    assert math.isnan(utils.roc_auc(scores[:, :1], torch.ones(40, 1))[0].item())  # no negative
