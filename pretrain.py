"""EquiAV pretraining (SPEC 6, 7, 8, 12): the recipe, top to bottom.

    python pretrain.py                               # toy data, `tiny` preset, CPU, ~7 min
    torchrun --nproc_per_node=8 pretrain.py --data train.json --eval_data eval.json \
        --init_mae mae_pretrain_vit_base.pth         # the paper's recipe (SPEC 12)

Each step: a batch of (spectrogram, frame) pairs -> a random time roll of the
originals (SPEC 12 input noise) -> one augmented view per modality and its
parameter vector t (SPEC 8) -> S sampled vectors per sample for the centroids
-> EquiAV forward (SPEC 6) -> inter- + intra-modal InfoNCE (SPEC 7) -> AdamW
with warm-up + cosine learning rate and gradient clipping. After every epoch:
zero-shot audio<->visual retrieval and the equivariance measures on a held-out
split (SPEC 13; retrieval.equivariance_metrics) and an atomic checkpoint that the
same command resumes from.
"""
import dataclasses
import os
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import augment
import convert
import data
import retrieval
import toy
import utils
from losses import EquiAVLoss
from model import INTER_TARGETS, EquiAV, get_config
from utils import option


# =============================================================================
# Config
# =============================================================================

@dataclasses.dataclass
class PretrainConfig(utils.TrainConfig):
    """Every field is a `--field value` option; the loader, optimiser, AMP and logging
    options are utils.TrainConfig's. Fields left at None take their value from the
    profile (PROFILES below): `paper` = SPEC 12, `toy` = CPU demo."""
    # -- data --
    data: Optional[str] = option(None, "training manifest (see data.py); none -> the built-in "
                                       "toy dataset under --toy_root (generated if absent)")
    eval_data: Optional[str] = option(None, "held-out manifest for zero-shot retrieval after "
                                            "every epoch; none -> the toy retrieval split on toy "
                                            "data, no retrieval otherwise")
    # -- model (SPEC 2-6) --
    preset: Optional[str] = option(None, "model size: base = ViT-B/16 (paper), tiny (toy)")
    model_overrides: Optional[str] = option(None, "comma-separated ModelConfig changes, "
                                                  "e.g. depth=2,embed_dim=96")
    inter_target: Optional[str] = option(None, "what g_inter embeds for the inter-modal loss: "
                                               "centroid (SPEC 6), original (mean-pooled "
                                               "tokens), augmented (mean-pooled tokens of the "
                                               "augmented view) or equivariant (the single "
                                               "prediction u(h, t)); none -> centroid, or "
                                               "original with --centroid false")
    centroid: bool = option(True, "false: the same as --inter_target original (SPEC 6 "
                                  "ablation)")
    equivariant: bool = option(True, "false: invariant intra-modal loss, no transformation "
                                     "predictor (ablation)")
    S: int = option(16, "sampled augmentation vectors per centroid (SPEC 6)")
    init_mae: Optional[str] = option(None, "initialise both encoders from an ImageNet MAE "
                                           "ViT-B/16 checkpoint (SPEC 10)")
    init_official: Optional[str] = option(None, "initialise from the authors' EquiAV (SPEC 10)")
    init_from: Optional[str] = option(None, "initialise from our pretrain.py checkpoint of the "
                                            "same model: its weights start a new run (new "
                                            "optimizer, epoch 0), e.g. on another dataset")
    # -- loss (SPEC 7) --
    temperature: float = option(0.07, "InfoNCE temperature tau")
    learnable_temperature: bool = option(False, "learn tau along with the model")
    w_inter: float = option(1 / 3, "weight of the inter-modal loss")
    w_intra: float = option(1 / 3, "weight of each intra-modal loss (0: none)")
    w_a: Optional[float] = option(None, "audio intra-modal weight; none -> --w_intra")
    w_v: Optional[float] = option(None, "visual intra-modal weight; none -> --w_intra")
    # -- the step --
    time_roll: bool = option(True, "random circular time shift of the original spectrograms "
                                   "(SPEC 12 input noise)")
    compile: bool = option(False, "torch.compile the model")
    cpu_threads: Optional[int] = option(None, "torch threads of each process on CPU; 0 -> the "
                                              "cores not taken by loader workers (oversubscribed "
                                              "cores make CPU training several times slower); "
                                              "none -> torch's default (paper), toy 0")


# Defaults for the fields left at None, by profile. `paper` is SPEC 12 (AudioSet-2M,
# 8 GPUs x 16, AdamW (0.9, 0.95), weight decay 1e-5, warm-up from 2e-7 over 2 epochs,
# cosine to 1e-6, clipping 0.01); `toy` is tuned so that `python pretrain.py` visibly
# learns on 2 CPU cores in a few minutes.
PROFILES = {
    "paper": dict(preset="base", epochs=20, batch_size=16, lr=1e-4, warmup_epochs=2.0,
                  warmup_start_lr=2e-7, clip_grad=0.01, num_workers=8, run_dir="runs/pretrain"),
    "toy": dict(preset="tiny", epochs=10, batch_size=32, lr=1e-3, warmup_epochs=1.0,
                warmup_start_lr=2e-7, clip_grad=1.0, num_workers=1, cpu_threads=0,
                run_dir=os.path.dirname(convert.TOY_CHECKPOINT)),
}


def resolve_config(cfg):
    """Fill the None fields from the profile and check the rest; returns a new config."""
    default_profile = "toy" if cfg.data is None else "paper"
    cfg = utils.apply_profile(cfg, PROFILES, cfg.profile or default_profile)
    cfg = dataclasses.replace(cfg, w_a=cfg.w_intra if cfg.w_a is None else cfg.w_a,
                              w_v=cfg.w_intra if cfg.w_v is None else cfg.w_v)
    target = cfg.inter_target or ("centroid" if cfg.centroid else "original")
    if target not in INTER_TARGETS:
        raise ValueError(f"--inter_target must be one of {INTER_TARGETS}, got {target!r}")
    if not cfg.centroid and target != "original":
        raise ValueError(f"--centroid false means --inter_target original, not {target!r}")
    cfg = dataclasses.replace(cfg, inter_target=target, centroid=target == "centroid")
    if sum(bool(x) for x in (cfg.init_mae, cfg.init_official, cfg.init_from)) > 1:
        raise ValueError("give at most one of --init_mae, --init_official and --init_from")
    for name in ("epochs", "batch_size", "S", "log_every", "eval_batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    if min(cfg.w_inter, cfg.w_a, cfg.w_v) < 0 or cfg.w_inter + cfg.w_a + cfg.w_v == 0:
        raise ValueError("loss weights must be >= 0 and not all zero")
    return cfg


def model_config(cfg):
    """The ModelConfig of the preset with --model_overrides applied."""
    preset = get_config(cfg.preset)
    overrides = {}
    for item in filter(None, (cfg.model_overrides or "").split(",")):
        key, _, value = (s.strip() for s in item.partition("="))
        if not hasattr(preset, key):
            raise ValueError(f"--model_overrides: unknown ModelConfig field {key!r}")
        overrides[key] = type(getattr(preset, key))(value)  # int or float, as in the preset
    return get_config(cfg.preset, **overrides)


# =============================================================================
# The recipe
# =============================================================================

def main(cfg):
    """Pretrain EquiAV with config `cfg` (resolved here); returns the final summary dict."""
    cfg = resolve_config(cfg)
    rank, world, local_rank, device = utils.init_distributed(cfg.device)
    threads = torch.get_num_threads()
    if device.type == "cpu" and cfg.cpu_threads is not None:
        torch.set_num_threads(cfg.cpu_threads or _free_cores(cfg.num_workers, world))
    try:
        return run(cfg, device, local_rank)
    finally:
        torch.set_num_threads(threads)  # main() may be called in-process (tests, notebooks)
        utils.cleanup_distributed()


def run(cfg, device, local_rank=0):
    """Build, resume or initialise, then train; after every epoch evaluate and save."""
    t_start, world = time.time(), utils.get_world_size()
    utils.print_config(f"EquiAV pretraining: {world} process(es) on {device}"
                       + (f" ({torch.get_num_threads()} threads each)" if device.type == "cpu" else "")
                       + f"; resolved config (profile {cfg.profile!r}):", cfg)
    mcfg = model_config(cfg)
    train_loader, eval_loader, norm_stats = build_data(cfg, mcfg)
    net, criterion, optimizer, scaler = build_model(cfg, mcfg, device)
    ckpt_path = os.path.join(cfg.run_dir, "checkpoint.pt")
    logger = utils.JsonLogger(os.path.join(cfg.run_dir, "log.jsonl"))
    start_epoch, step = resume_or_init(ckpt_path, cfg, mcfg, net, criterion, optimizer, scaler)
    model = wrap(net, cfg, device, local_rank)
    bad_data = data.BadDataPolicy(cfg.max_bad_fraction) if cfg.skip_bad else None
    if start_epoch == 0:
        logger.log({"type": "config", "world_size": world, "model_config": dataclasses.asdict(mcfg),
                    **dataclasses.asdict(cfg)})
    else:
        logger.log({"type": "resume", "epoch": start_epoch, "step": step, "world_size": world})
        if start_epoch >= cfg.epochs:
            utils.print0(f"nothing to do: {cfg.run_dir} already holds {start_epoch} epoch(s)")

    summary = {"epoch": start_epoch, "step": step}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        step, means = train_one_epoch(model, criterion, optimizer, scaler, train_loader, epoch,
                                      step, cfg, mcfg, device, logger, bad_data)
        summary = {"type": "epoch", "epoch": epoch + 1, "step": step,
                   "skipped": bad_data.skipped() if bad_data is not None else 0,
                   "train_time_s": time.time() - t0, **means}
        line = _epoch_line(cfg, summary)
        if eval_loader is not None:
            metrics, chance, n = retrieval.evaluate_retrieval(net, eval_loader, device, cfg.S,
                                                              cfg.seed, cfg.amp)
            eq = retrieval.equivariance_metrics(net, eval_loader, device, cfg.seed, cfg.amp)
            summary.update({"retrieval": metrics, "chance": chance, "n_eval": n,
                            "equivariance": eq})
            line += ("\n  retrieval " + retrieval.format_line(metrics, chance, n)
                     + "\n  equivariance " + retrieval.format_equivariance(eq))
        utils.print0(line)
        logger.log(summary)
        save(ckpt_path, cfg, mcfg, net, criterion, optimizer, scaler, step, epoch + 1, norm_stats)
        utils.barrier()
    utils.print0(f"done: {cfg.epochs} epochs, step {step}, {time.time() - t_start:.0f} s in "
                 f"this process; checkpoint {ckpt_path}, log {logger.path}")
    return summary


def _free_cores(num_workers, world):
    """Cores per process left after the data-loader workers (at least 1)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, cores // world - num_workers)


def _epoch_line(cfg, s):
    return (f"epoch {s['epoch']}/{cfg.epochs}  step {s['step']}  loss {s['loss']:.4f} "
            f"(inter {s['inter']:.3f}, intra_a {s['intra_a']:.3f}, intra_v {s['intra_v']:.3f})  "
            f"acc a2v {s['acc_a2v']:.2f}  {s['train_time_s']:.0f} s"
            + (f"  skipped {s['skipped']}" if s["skipped"] else ""))


# =============================================================================
# Building: data, model, loss, optimiser
# =============================================================================

def build_data(cfg, mcfg):
    """(train loader, eval loader or None, [fbank mean, std]) at the model's input sizes."""
    train_manifest, eval_manifest = cfg.data, cfg.eval_data
    if train_manifest is None:
        paths = toy.ensure_toy_dataset(cfg.toy_root)  # generated on first use
        train_manifest, eval_manifest = paths["train"], eval_manifest or paths["retrieval"]
    sizes = dict(audio_length=mcfg.audio_length, mel_bins=mcfg.mel_bins,
                 image_size=mcfg.image_size, skip_bad=cfg.skip_bad)
    mean, std = data.resolve_norm_stats(cfg.norm_stats, train_manifest, None, mcfg.audio_length,
                                        mcfg.mel_bins)
    train_set = data.AudioVisualDataset(train_manifest, train=True, norm_mean=mean, norm_std=std,
                                        **sizes)
    train_loader = data.make_loader(train_set, cfg.batch_size, train=True,
                                    num_workers=cfg.num_workers, seed=cfg.seed)
    world = utils.get_world_size()
    eval_loader = None
    if eval_manifest is not None:
        eval_set = data.AudioVisualDataset(eval_manifest, train=False, norm_mean=mean,
                                           norm_std=std, **sizes)
        eval_loader = data.make_loader(eval_set, cfg.eval_batch_size, train=False,
                                       num_workers=cfg.num_workers, seed=cfg.seed)
    utils.print0(f"data: {len(train_set)} training clips ({train_manifest}), "
                 f"{len(train_loader)} steps/epoch of {cfg.batch_size} x {world}; retrieval on "
                 f"{eval_manifest or 'nothing (no --eval_data)'}; fbank mean/std {[mean, std]}")
    return train_loader, eval_loader, [mean, std]


def build_model(cfg, mcfg, device):
    """(EquiAV, EquiAVLoss, AdamW, GradScaler) on `device`, with the same initial
    weights on every rank."""
    torch.manual_seed(cfg.seed)
    net = EquiAV(mcfg, equivariant=cfg.equivariant, inter_target=cfg.inter_target).to(device)
    criterion = EquiAVLoss(temperature=cfg.temperature,
                           learnable_temperature=cfg.learnable_temperature,
                           w_inter=cfg.w_inter, w_a=cfg.w_a, w_v=cfg.w_v).to(device)
    optimizer = torch.optim.AdamW(list(net.parameters()) + list(criterion.parameters()),
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay)
    scaler = utils.make_grad_scaler(device, cfg.amp)
    utils.print0(f"model: preset {cfg.preset!r} ({sum(p.numel() for p in net.parameters()) / 1e6:.2f}M "
                 f"parameters), inter_target={cfg.inter_target}, equivariant={cfg.equivariant}, "
                 f"S={cfg.S}")
    return net, criterion, optimizer, scaler


def wrap(net, cfg, device, local_rank):
    """DDP under torchrun, then torch.compile if asked; `net` itself stays what is saved."""
    model = net
    if utils.get_world_size() > 1:
        # ablations leave some modules out of the loss; DDP must then look for unused ones
        unused = (cfg.inter_target != "centroid" or not cfg.equivariant
                  or min(cfg.w_inter, cfg.w_a, cfg.w_v) == 0)
        model = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None,
                                        find_unused_parameters=unused)
    return torch.compile(model) if cfg.compile else model


# =============================================================================
# Checkpoints: written by rank 0 after every epoch; a run resumes from its own
# =============================================================================

def _model_flags(cfg):
    return {"inter_target": cfg.inter_target, "equivariant": cfg.equivariant}


def save(path, cfg, mcfg, net, criterion, optimizer, scaler, step, epoch, norm_stats):
    """Write {run_dir}/checkpoint.pt atomically (rank 0), plain tensors and values only.

    `epoch` counts completed epochs: resuming is epoch-granular, and everything
    random in an epoch is a function of (seed, epoch, rank) (utils.seed_epoch,
    the sampler, the dataset's SampleKey), so no random state needs saving.
    """
    if not utils.is_main():
        return
    utils.save_checkpoint({
        "model": net.state_dict(),  # unwrapped and uncompiled: plain EquiAV keys
        "model_config": dataclasses.asdict(mcfg), "model_flags": _model_flags(cfg),
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "loss": criterion.state_dict(), "step": step, "epoch": epoch,
        "config": dataclasses.asdict(cfg), "norm_stats": norm_stats,
    }, path)


def resume_or_init(path, cfg, mcfg, net, criterion, optimizer, scaler):
    """Resume from our checkpoint at `path` if there is one (it wins over --init_*),
    else initialise from --init_mae / --init_official. Returns (epoch, step) done."""
    if not os.path.exists(path):
        if cfg.init_mae:
            convert.print_report(f"ImageNet MAE checkpoint {cfg.init_mae}",
                                 convert.load_mae_checkpoint(net, cfg.init_mae))
        elif cfg.init_official:
            convert.print_report(f"authors' EquiAV checkpoint {cfg.init_official}",
                                 convert.load_official_checkpoint(net, cfg.init_official))
        elif cfg.init_from:
            source = utils.load_checkpoint(cfg.init_from)
            _check_same_model(cfg.init_from, source, cfg, mcfg)
            net.load_state_dict(source["model"])
            utils.print0(f"initialised from {cfg.init_from}")
        return 0, 0
    ckpt = utils.load_checkpoint(path)
    _check_same_model(path, ckpt, cfg, mcfg)
    net.load_state_dict(ckpt["model"])
    criterion.load_state_dict(ckpt["loss"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items()
               if getattr(cfg, k, v) != v}
    utils.print0(f"resumed from {path}: {ckpt['epoch']} epoch(s), step {ckpt['step']} done"
                 + (f"; config changed since (old, new): {changed}" if changed else ""))
    if cfg.init_mae or cfg.init_official or cfg.init_from:
        utils.print0("  (--init_mae/--init_official/--init_from ignored: resuming wins)")
    return ckpt["epoch"], ckpt["step"]


def _check_same_model(path, ckpt, cfg, mcfg):
    if ckpt.get("model_config") != dataclasses.asdict(mcfg) or \
            convert.model_flags(ckpt) != _model_flags(cfg):
        raise ValueError(
            f"{path} holds a different model ({ckpt.get('model_config')}, "
            f"{convert.model_flags(ckpt)}) than this command builds ({dataclasses.asdict(mcfg)}, "
            f"{_model_flags(cfg)}): give the same --preset/--model_overrides/--inter_target/"
            f"--equivariant" + (", or another --run_dir" if path.endswith("checkpoint.pt") else ""))


# =============================================================================
# One step and one epoch of pretraining (SPEC 6-8, 12)
# =============================================================================

LOG_KEYS = ("loss", "inter", "intra_a", "intra_v",
            "acc_a2v", "acc_v2a", "acc_intra_a", "acc_intra_v")


def prepare_inputs(batch, gen, mcfg, S, device, time_roll=True):
    """A loader batch -> the eight inputs of EquiAV.forward, on `device` (SPEC 6, 8, 12).

    The originals get the random time roll (SPEC 12 input noise), then one
    augmented view per modality with its parameter vector t (SPEC 8), ImageNet
    normalisation last (after the colour augmentations), and S sampled vectors
    per sample for the centroids (SPEC 6; sampled, never applied). All random
    draws come from `gen`, a CPU generator, so no step waits for the GPU.
    """
    x_a = batch["audio"].to(device, non_blocking=True)   # (B, T, F) normalised fbank
    x_v = batch["frame"].to(device, non_blocking=True)   # (B, 3, H, W) in [0, 1]
    n = x_a.shape[0]
    if time_roll:
        x_a = augment.random_time_roll(x_a, gen)
    x_a_aug, t_a = augment.augment_audio(x_a, gen)      # (B, T, F), (B, 24)
    x_v_aug, t_v = augment.augment_visual(x_v, gen)     # (B, 3, H, W), (B, 18)
    x_v, x_v_aug = augment.normalize_image(x_v), augment.normalize_image(x_v_aug)
    T_a = augment.to_device(augment.sample_audio_vectors(
        n, S, gen, T=mcfg.audio_length, F=mcfg.mel_bins), device)  # (B, S, 24)
    T_v = augment.to_device(augment.sample_visual_vectors(
        n, S, gen, H=mcfg.image_size, W=mcfg.image_size), device)  # (B, S, 18)
    return x_a, x_v, x_a_aug, x_v_aug, t_a, t_v, T_a, T_v


def train_step(model, criterion, optimizer, scaler, batch, gen, cfg, mcfg, device):
    """One pretraining step, as the loop and bench.py run it: the inputs
    (prepare_inputs), the EquiAV forward under autocast, the losses in float32,
    then backward, clipping and AdamW (utils.optimizer_step). Returns the loss
    terms, left on the device (reading them is a host-device sync)."""
    inputs = prepare_inputs(batch, gen, mcfg, cfg.S, device, cfg.time_roll)
    with utils.autocast_context(device, cfg.amp):
        out = model(*inputs)
    terms = criterion(out)  # float32 inside: logits are cosines divided by tau = 0.07

    def average_tau_grad():  # tau is not inside DDP: its gradient is averaged here
        _average_grads(criterion.parameters())

    sync = cfg.learnable_temperature and utils.get_world_size() > 1
    utils.optimizer_step(optimizer, scaler, terms["loss"], cfg.clip_grad,
                         average_tau_grad if sync else None)
    return terms


def train_one_epoch(model, criterion, optimizer, scaler, loader, epoch, step, cfg, mcfg, device,
                    logger, bad_data=None):
    """One pass over `loader`; returns (global step, epoch means of LOG_KEYS).

    The epoch's random stream comes from (seed, epoch, rank) (utils.seed_epoch).
    Loss values stay on the device and are read only every `log_every` steps,
    so the loop never waits for the GPU in between; a non-finite loss is
    recorded on the device at the step it happens and raised at the next read.
    `bad_data` (a data.BadDataPolicy, with --skip_bad) drops and counts bad samples.
    """
    model.train()
    loader.sampler.set_epoch(epoch)  # a new, reproducible order every epoch
    gen = utils.seed_epoch(cfg.seed, epoch, utils.get_rank())
    steps_per_epoch = len(loader)
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    sums = torch.zeros(len(LOG_KEYS), device=device)
    first_bad = torch.full((1 + len(LOG_KEYS),), -1.0, device=device)  # [step, terms...]
    step_dev = torch.tensor(float(step), device=device)
    done, since, t_last = 0, 0, time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not utils.is_main(),
               dynamic_ncols=True, leave=False)
    for i, batch in enumerate(bar):
        if bad_data is not None:
            batch = bad_data.filter(batch)  # equal batch sizes on every rank
            if batch is None:
                continue
        lr = utils.set_lr(optimizer, step, total_steps, warmup_steps, cfg)
        terms = train_step(model, criterion, optimizer, scaler, batch, gen, cfg, mcfg, device)
        step, done, since = step + 1, done + 1, since + batch["index"].numel() * utils.get_world_size()
        values = torch.stack([terms[k].detach().float() for k in LOG_KEYS])
        sums += values
        step_dev += 1
        is_first_bad = ~torch.isfinite(values[0]) & (first_bad[0] < 0)
        first_bad = torch.where(is_first_bad, torch.cat([step_dev.view(1), values]), first_bad)
        if (i + 1) % cfg.log_every == 0 or i + 1 == steps_per_epoch:
            _raise_if_nonfinite(first_bad, epoch)  # reads the device: the loop's one sync
            now = dict(zip(LOG_KEYS, utils.mean_over_ranks(values).tolist()))
            rate = since / max(time.time() - t_last, 1e-9)
            since, t_last = 0, time.time()
            logger.log({"type": "step", "epoch": epoch, "step": step, "lr": lr,
                        "samples_per_s": rate, **now})
            bar.set_postfix(loss=f"{now['loss']:.4f}", lr=f"{lr:.2e}", samples_per_s=f"{rate:.1f}")
    bar.close()
    if bad_data is not None:
        bad_data.check()
    _raise_if_nonfinite(first_bad, epoch)
    means = (utils.mean_over_ranks(sums) / max(done, 1)).tolist()
    return step, dict(zip(LOG_KEYS, means))


def _raise_if_nonfinite(first_bad, epoch):
    """Stop every rank if any rank has seen a non-finite loss (collective call)."""
    seen = (first_bad[:1] >= 0).float()
    if utils.get_world_size() > 1:
        dist.all_reduce(seen)  # a rank that stopped alone would leave the others hanging
    if seen.item() == 0:  # the host-device sync of a log step
        return
    row = first_bad.tolist()
    if row[0] < 0:
        raise FloatingPointError(f"non-finite loss on another rank in epoch {epoch + 1}; stopping")
    terms = ", ".join(f"{k}={v:.4g}" for k, v in zip(LOG_KEYS[:4], row[1:5]))
    raise FloatingPointError(
        f"non-finite loss at step {int(row[0])} (epoch {epoch + 1}): {terms}. Stopping; "
        f"the last checkpoint is from before this epoch. Try a lower --lr, a smaller "
        f"--clip_grad or --amp false.")


def _average_grads(params):
    world = utils.get_world_size()
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


if __name__ == "__main__":
    main(utils.parse_config(PretrainConfig, description=__doc__.splitlines()[0], profiles=PROFILES))
