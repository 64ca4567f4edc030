"""pretrain.py: end-to-end runs on a tiny toy dataset, torchrun on CPU, exact resume,
the non-finite-loss stop, profiles and the checkpoint format."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import convert
import pretrain
import toy as toy_module
import utils
from helpers import StopAfter, read_log, step_losses
from losses import EquiAVLoss
from model import EquiAV

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The toy inputs keep the tiny preset's sizes; the transformer is shrunk further.
SMALL = ("embed_dim=64,depth=1,num_heads=2,aug_hidden=32,pred_heads=2,pred_head_dim=16,"
         "proj_hidden=64,proj_dim=32")
N_TRAIN, BATCH, N_EVAL = 8, 4, 4  # 2 steps per epoch in one process


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy") / "toy"
    toy_module.make_toy_dataset(root, n_train=N_TRAIN, n_test=N_EVAL, n_retrieval=N_EVAL,
                                n_train_multilabel=0, n_test_multilabel=0, n_distractor=0, num_workers=0)
    return toy_module.toy_paths(root)


def _cfg(toy, run_dir, **kw):
    base = dict(data=toy["train"], eval_data=toy["retrieval"], profile="toy", run_dir=str(run_dir),
                model_overrides=SMALL, batch_size=BATCH, epochs=1, S=2, log_every=1,
                eval_batch_size=N_EVAL, device="cpu", num_workers=0, cpu_threads=1)
    base.update(kw)
    return pretrain.PretrainConfig(**base)


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def test_profiles_fill_only_unset_fields():
    toy = pretrain.resolve_config(pretrain.PretrainConfig())
    assert toy.profile == "toy" and toy.preset == "tiny"
    assert (toy.epochs, toy.batch_size, toy.lr) == tuple(
        pretrain.PROFILES["toy"][k] for k in ("epochs", "batch_size", "lr"))
    # with --data: the paper's recipe (method.md §12) unless set explicitly
    paper = pretrain.resolve_config(pretrain.PretrainConfig(data="x.json", lr=3e-4))
    assert paper.profile == "paper" and paper.preset == "base"
    assert (paper.epochs, paper.batch_size, paper.warmup_epochs, paper.clip_grad) == (20, 16, 2.0, 0.01)
    assert paper.lr == 3e-4  # explicit value wins over the profile
    assert (paper.beta1, paper.beta2, paper.weight_decay) == (0.9, 0.95, 1e-5)
    assert (paper.warmup_start_lr, paper.final_lr, paper.S, paper.temperature) == (2e-7, 1e-6, 16, 0.07)
    assert paper.w_inter == paper.w_a == paper.w_v == pytest.approx(1 / 3)
    # --w_intra sets both intra-modal weights; --w_a / --w_v override one
    cfg = pretrain.resolve_config(utils.parse_config(
        pretrain.PretrainConfig, ["--w_intra", "0", "--w_v", "0.5", "--inter_target", "original"]))
    assert (cfg.w_a, cfg.w_v, cfg.inter_target) == (0.0, 0.5, "original")
    with pytest.raises(ValueError, match="--inter_target must be one of"):
        pretrain.resolve_config(pretrain.PretrainConfig(inter_target="mean"))
    with pytest.raises(ValueError, match="at most one of --init_mae, --init_official and --init_from"):
        pretrain.resolve_config(pretrain.PretrainConfig(init_mae="a", init_official="b"))
    with pytest.raises(ValueError, match="unknown profile"):
        pretrain.resolve_config(pretrain.PretrainConfig(profile="huge"))
    with pytest.raises(ValueError, match="unknown ModelConfig field 'depht'"):
        pretrain.model_config(dataclasses.replace(toy, model_overrides="depht=2"))


# ---------------------------------------------------------------------------
# One process, end to end
# ---------------------------------------------------------------------------

def test_end_to_end_log_and_checkpoint(toy, tmp_path):
    cfg = _cfg(toy, tmp_path / "run")
    summary = pretrain.main(cfg)
    records = read_log(cfg.run_dir)
    steps = [r for r in records if r["type"] == "step"]
    epochs = [r for r in records if r["type"] == "epoch"]
    n_steps = N_TRAIN // BATCH
    assert [r["step"] for r in steps] == list(range(1, n_steps + 1))
    assert all(math.isfinite(r[k]) for r in steps for k in pretrain.LOG_KEYS)
    # the loss is the weighted sum of its logged terms (weights 1/3 each)
    for r in steps:
        assert r["loss"] == pytest.approx((r["inter"] + r["intra_a"] + r["intra_v"]) / 3, rel=1e-5)
    # per-iteration learning rate from the warm-up + cosine function
    resolved = pretrain.resolve_config(cfg)
    for r in steps:
        assert r["lr"] == pytest.approx(utils.cosine_lr(
            r["step"] - 1, n_steps, round(resolved.warmup_epochs * n_steps), resolved.lr,
            resolved.warmup_start_lr, resolved.final_lr))
    assert len(epochs) == 1 and epochs[0]["step"] == n_steps
    assert epochs[0]["loss"] == pytest.approx(sum(r["loss"] for r in steps) / n_steps, rel=1e-5)
    assert epochs[0]["chance"]["R@1"] == pytest.approx(100 / N_EVAL)
    assert 0 <= epochs[0]["retrieval"]["a2v_R@1"] <= epochs[0]["retrieval"]["a2v_R@10"] <= 100
    assert summary["step"] == n_steps

    path = os.path.join(cfg.run_dir, "checkpoint.pt")
    assert sorted(os.listdir(cfg.run_dir)) == ["checkpoint.pt", "log.jsonl"]  # no temp files
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    # no random state: every epoch's randomness is a function of (seed, epoch, rank)
    assert sorted(ckpt) == sorted(("model", "model_config", "model_flags", "optimizer", "scaler",
                                   "loss", "step", "epoch", "config", "norm_stats"))
    assert (ckpt["step"], ckpt["epoch"]) == (n_steps, 1)
    assert ckpt["config"] == dataclasses.asdict(resolved)
    assert ckpt["model_config"]["embed_dim"] == 64 and ckpt["model_config"]["depth"] == 1
    stats = json.load(open(os.path.join(os.path.dirname(toy["train"]), "stats.json")))
    assert ckpt["norm_stats"] == pytest.approx([stats["mean"], stats["std"]])
    assert len(ckpt["optimizer"]["state"]) == len(ckpt["optimizer"]["param_groups"][0]["params"])
    assert all(float(s["step"]) == n_steps for s in ckpt["optimizer"]["state"].values())

    # load_equiav rebuilds exactly what was trained, and training changed the weights
    net = convert.load_equiav(path)
    for k, v in net.state_dict().items():
        assert torch.equal(v, ckpt["model"][k]), k
    torch.manual_seed(cfg.seed)  # main() builds the model right after seeding like this
    fresh = dict(EquiAV(net.cfg).named_parameters())
    changed = [not torch.equal(p, ckpt["model"][k]) for k, p in fresh.items()]
    assert sum(changed) >= 0.9 * len(changed)

    # the same command again finds the finished run and does nothing
    pretrain.main(cfg)
    assert len([r for r in read_log(cfg.run_dir) if r["type"] == "step"]) == n_steps
    # another model in the same run_dir is refused before anything is overwritten
    with pytest.raises(ValueError, match="holds a different model"):
        pretrain.main(dataclasses.replace(cfg, inter_target="original", epochs=2))


def test_ablation_without_centroid_and_predictor(toy, tmp_path):
    cfg = _cfg(toy, tmp_path / "run", inter_target="original", equivariant=False, w_intra=0.0, w_inter=1.0)
    pretrain.main(cfg)
    ckpt = torch.load(os.path.join(cfg.run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["model_flags"] == {"inter_target": "original", "equivariant": False}
    assert not any(k.startswith("predictor") for k in ckpt["model"])
    steps = [r for r in read_log(cfg.run_dir) if r["type"] == "step"]
    assert all(r["intra_a"] == 0 and r["intra_v"] == 0 and r["loss"] == r["inter"] for r in steps)
    net = convert.load_equiav(os.path.join(cfg.run_dir, "checkpoint.pt"))
    assert (net.inter_target, net.equivariant) == ("original", False)


# ---------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------

def test_interrupted_and_resumed_equals_uninterrupted(toy, tmp_path, monkeypatch):
    straight = _cfg(toy, tmp_path / "straight", epochs=2)
    pretrain.main(straight)

    resumed = _cfg(toy, tmp_path / "resumed", epochs=2)
    original = pretrain.train_one_epoch

    def killed_in_second_epoch(model, criterion, optimizer, scaler, loader, epoch, *a, **kw):
        if epoch == 1:
            loader = StopAfter(loader, 1)
        return original(model, criterion, optimizer, scaler, loader, epoch, *a, **kw)

    monkeypatch.setattr(pretrain, "train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        pretrain.main(resumed)
    assert torch.load(os.path.join(resumed.run_dir, "checkpoint.pt"), weights_only=True)["epoch"] == 1
    monkeypatch.setattr(pretrain, "train_one_epoch", original)
    pretrain.main(resumed)  # the same command again: continues from epoch 2

    a, b = step_losses(read_log(straight.run_dir)), step_losses(read_log(resumed.run_dir))
    n_steps = 2 * (N_TRAIN // BATCH)
    assert sorted(a) == sorted(b) == list(range(1, n_steps + 1))
    assert len(b[N_TRAIN // BATCH + 1]) == 2  # the step run before the kill was logged twice
    for step in a:
        assert set(b[step]) == set(a[step]), step  # bit-identical, including the repeat
    ca = torch.load(os.path.join(straight.run_dir, "checkpoint.pt"), weights_only=True)
    cb = torch.load(os.path.join(resumed.run_dir, "checkpoint.pt"), weights_only=True)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    ea = [r for r in read_log(straight.run_dir) if r["type"] == "epoch"][-1]
    eb = [r for r in read_log(resumed.run_dir) if r["type"] == "epoch"][-1]
    assert ea["retrieval"] == eb["retrieval"]


# ---------------------------------------------------------------------------
# Non-finite loss
# ---------------------------------------------------------------------------

def test_nonfinite_loss_stops_with_step_and_terms(toy, tmp_path, monkeypatch):
    class NaNFromSecondStep(EquiAVLoss):
        calls = 0

        def forward(self, out):
            terms = super().forward(out)
            NaNFromSecondStep.calls += 1
            if NaNFromSecondStep.calls >= 2:
                terms = dict(terms, loss=terms["loss"] * float("nan"))
            return terms

    monkeypatch.setattr(pretrain, "EquiAVLoss", NaNFromSecondStep)
    # log_every 100: the loss is only read at the end of the epoch, the step must still be exact
    cfg = _cfg(toy, tmp_path / "run", log_every=100)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 2 \(epoch 1\): "
                                                 r"loss=nan, inter=\d"):
        pretrain.main(cfg)
    assert not os.path.exists(os.path.join(cfg.run_dir, "checkpoint.pt"))


def test_nonfinite_loss_is_caught_when_the_epochs_last_batch_is_skipped(toy, tmp_path, monkeypatch):
    class NaNFromFirstStep(EquiAVLoss):
        def forward(self, out):
            terms = super().forward(out)
            return dict(terms, loss=terms["loss"] * float("nan"))

    calls = []

    def skip_the_last(policy, batch):   # --skip_bad dropping the epoch's last batch whole
        calls.append(1)
        return None if len(calls) == N_TRAIN // BATCH else batch

    monkeypatch.setattr(pretrain, "EquiAVLoss", NaNFromFirstStep)
    monkeypatch.setattr(pretrain.BadDataPolicy, "filter", skip_the_last)
    cfg = _cfg(toy, tmp_path / "run", log_every=100, skip_bad=True)
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 1 \(epoch 1\)"):
        pretrain.main(cfg)


# ---------------------------------------------------------------------------
# torchrun, two CPU processes (gloo)
# ---------------------------------------------------------------------------

# Only a zero loss weight leaves modules without gradient (DDP must look for them, or it
# fails at the next step); an ablation that uses everything runs without the search.
@pytest.mark.parametrize("extra,unused", [([], False), (["--w_intra", "0"], True),
                                          (["--inter_target", "augmented", "--equivariant", "false"], False)])
def test_torchrun_two_processes_writes_one_checkpoint(toy, tmp_path, extra, unused):
    run_dir = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "pretrain.py", "--data", toy["train"], "--eval_data", toy["retrieval"],
           "--profile", "toy", "--run_dir", str(run_dir), "--model_overrides", SMALL,
           "--batch_size", "2", "--epochs", "1", "--S", "2", "--log_every", "1",
           "--eval_batch_size", "2", "--device", "cpu", "--num_workers", "0"] + extra
    env = dict(os.environ, OMP_NUM_THREADS="1")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"DDP: find_unused_parameters={unused}" in res.stdout
    assert sorted(os.listdir(run_dir)) == ["checkpoint.pt", "log.jsonl"]
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    n_steps = N_TRAIN // (2 * 2)
    assert (ckpt["step"], ckpt["epoch"]) == (n_steps, 1)
    records = read_log(run_dir)
    assert sum(r["type"] == "config" for r in records) == 1  # rank 0 logs alone
    assert [r["step"] for r in records if r["type"] == "step"] == list(range(1, n_steps + 1))
    epoch = [r for r in records if r["type"] == "epoch"][0]
    assert epoch["n_eval"] == N_EVAL  # both ranks' embeddings gathered, padding removed


# ---------------------------------------------------------------------------
# torch.compile (off by default; inductor on CPU needs a C compiler, as CI has)
# ---------------------------------------------------------------------------

def test_compile_gives_the_eager_losses(toy, tmp_path):
    eager = _cfg(toy, tmp_path / "eager")
    compiled = _cfg(toy, tmp_path / "compiled", compile=True)
    pretrain.main(eager)
    pretrain.main(compiled)
    a, b = step_losses(read_log(eager.run_dir)), step_losses(read_log(compiled.run_dir))
    assert sorted(a) == sorted(b) == [1, 2]
    for step in a:
        assert b[step][0] == pytest.approx(a[step][0], rel=1e-4), step
    # the checkpoint holds plain EquiAV keys, not the compiled wrapper's
    ckpt = torch.load(os.path.join(compiled.run_dir, "checkpoint.pt"), weights_only=True)
    assert not any("_orig_mod" in k for k in ckpt["model"])


def test_init_from_our_checkpoint_starts_a_new_run_with_its_weights(toy, tmp_path):
    first = _cfg(toy, tmp_path / "first")
    pretrain.main(first)
    source = torch.load(tmp_path / "first" / "checkpoint.pt", weights_only=True)
    # a checkpoint from before --inter_target stored use_centroid; it still loads
    utils.save_checkpoint({**source, "model_flags": {"use_centroid": True, "equivariant": True}},
                          tmp_path / "first" / "checkpoint.pt")
    second = _cfg(toy, tmp_path / "second", init_from=str(tmp_path / "first" / "checkpoint.pt"),
                  epochs=1, lr=0.0, warmup_start_lr=0.0, final_lr=0.0)   # lr 0: weights kept
    pretrain.main(second)
    ckpt = torch.load(tmp_path / "second" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["step"] == N_TRAIN // BATCH          # a new run
    for k, v in source["model"].items():
        assert torch.equal(ckpt["model"][k], v), k
    with pytest.raises(ValueError, match="holds a different model"):
        pretrain.main(_cfg(toy, tmp_path / "third", init_from=second.init_from,
                           inter_target="original"))


def test_checkpoint_records_its_predictor_kind_and_another_kind_is_refused(toy, tmp_path):
    cfg = _cfg(toy, tmp_path / "run", predictor="hypernetwork")
    pretrain.main(cfg)
    path = os.path.join(cfg.run_dir, "checkpoint.pt")
    assert torch.load(path, weights_only=True)["model_config"]["predictor"] == "hypernetwork"
    assert convert.load_equiav(path).cfg.predictor == "hypernetwork"
    with pytest.raises(ValueError, match="holds a model with the hypernetwork transformation "
                                         "predictor; this command builds the attention one: "
                                         "give --predictor hypernetwork"):
        pretrain.main(_cfg(toy, tmp_path / "run", epochs=2))            # resume, another kind
    with pytest.raises(ValueError, match="the hypernetwork transformation predictor"):
        pretrain.main(_cfg(toy, tmp_path / "other", init_from=path, predictor="linear"))
    # a checkpoint from before the predictor kinds has no such field: it is the attention one
    old = _cfg(toy, tmp_path / "old")
    pretrain.main(old)
    ckpt = torch.load(os.path.join(old.run_dir, "checkpoint.pt"), weights_only=True)
    del ckpt["model_config"]["predictor"], ckpt["model_config"]["pred_rank"]
    utils.save_checkpoint(ckpt, os.path.join(old.run_dir, "checkpoint.pt"))
    assert pretrain.main(_cfg(toy, tmp_path / "old", epochs=2))["epoch"] == 2


def test_loaders_pin_memory_only_for_a_cuda_training_device(toy, tmp_path, monkeypatch):
    # a CPU run on a GPU node must not open a CUDA context by pinning memory
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = pretrain.resolve_config(_cfg(toy, tmp_path / "run"))
    mcfg = pretrain.model_config(cfg)
    for device, pinned in ((torch.device("cpu"), False), (torch.device("cuda"), True)):
        train_loader, eval_loader, _ = pretrain.build_data(cfg, mcfg, device)
        assert train_loader.pin_memory is pinned and eval_loader.pin_memory is pinned


# ---------------------------------------------------------------------------
# The step's wiring: what the loop hands the optimizer, and what the model is fed
# ---------------------------------------------------------------------------

def test_optimizer_lr_follows_the_schedule_and_clipping_runs_every_step(toy, tmp_path, monkeypatch):
    """The lr the optimizer actually uses at each step is the schedule's, and gradient
    clipping runs at every step with --clip_grad (not only the lr being computed)."""
    cfg = pretrain.resolve_config(_cfg(toy, tmp_path / "run", epochs=2, clip_grad=0.37))
    seen_lr, clips = [], []
    step = torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        seen_lr.append(self.param_groups[0]["lr"])
        return step(self, *args, **kwargs)

    clip = torch.nn.utils.clip_grad_norm_

    def recording_clip(params, max_norm, *args, **kwargs):
        clips.append(max_norm)
        return clip(params, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording_clip)
    pretrain.main(cfg)
    steps_per_epoch = N_TRAIN // BATCH
    total, warmup = 2 * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    want = [utils.cosine_lr(s, total, warmup, cfg.lr, cfg.warmup_start_lr, cfg.final_lr)
            for s in range(total)]
    assert seen_lr == pytest.approx(want, rel=1e-12) and len(set(seen_lr)) > 2
    assert clips == [0.37] * total


def test_prepare_inputs_rolls_the_original_and_augments_the_rolled_original():
    """x_a is the rolled original, x_a_aug the view apply_audio makes of that rolled
    original, and every vector comes from its own sampler, in the documented draw order."""
    import augment
    from model import get_config
    mcfg = get_config("tiny", audio_length=64, mel_bins=32, image_size=32)
    B, S, seed = 5, 3, 4
    g = torch.Generator().manual_seed(0)
    batch = {"audio": torch.randn(B, 64, 32, generator=g),
             "frame": torch.randint(0, 256, (B, 3, 32, 32), generator=g, dtype=torch.uint8)}
    x_a, x_v, x_a_aug, x_v_aug, t_a, t_v, T_a, T_v = pretrain.prepare_inputs(
        batch, torch.Generator().manual_seed(seed), mcfg, S, torch.device("cpu"))
    same = torch.Generator().manual_seed(seed)
    roll = augment.sample_time_roll(B, 64, same)
    want_t_a = augment.sample_audio_params(B, same, 64, 32)
    want_t_v = augment.sample_visual_params(B, same, 32, 32)
    want_T_a = augment.sample_audio_vectors(B, S, same, 64, 32)
    want_T_v = augment.sample_visual_vectors(B, S, same, 32, 32)
    rolled = augment.roll_time(batch["audio"], roll)
    assert not torch.equal(rolled, batch["audio"])
    assert torch.equal(x_a, rolled)
    assert torch.equal(x_a_aug, augment.apply_audio(rolled, want_t_a))
    assert not torch.allclose(x_a_aug, augment.apply_audio(batch["audio"], want_t_a))
    frames = batch["frame"].float() / 255
    assert torch.equal(x_v, augment.normalize_image(frames))
    assert torch.equal(x_v_aug, augment.normalize_image(augment.apply_visual(frames, want_t_v)))
    for got, want in ((t_a, want_t_a), (t_v, want_t_v), (T_a, want_T_a), (T_v, want_T_v)):
        assert torch.equal(got, want)
