"""EquiAV pretraining (method.md §6, 7, 8, 12): the recipe, top to bottom.

    python pretrain.py                               # toy data, `tiny` preset, CPU, minutes
    torchrun --nproc_per_node=8 pretrain.py --data train.json --eval_data eval.json \
        --init_mae mae_pretrain_vit_base.pth         # the paper's recipe (method.md §12)

Each step: (spectrogram, frame) pairs -> a random time roll of the originals (method.md §12)
-> one augmented view per modality and its vector t (method.md §8) -> S sampled vectors per
sample for the centroids -> EquiAV forward (method.md §6) -> inter- + intra-modal InfoNCE
(method.md §7) -> AdamW, warm-up + cosine learning rate, gradient clipping. After every epoch:
zero-shot retrieval on a held-out split (method.md §13) and a checkpoint that the same command
resumes from; after the last one, the equivariance measures too (they cost twice retrieval).
"""
import dataclasses
import math
import os
import time
from typing import Optional

import torch
from tqdm import tqdm

import augment
import convert
import data
import retrieval
import toy
import utils
from bad_data import BadDataPolicy
from losses import EquiAVLoss
from model import INTER_TARGETS, EquiAV, ModelConfig, get_config
from utils import option

# The recipe's values for the options left at None, by profile. `paper` is method.md §12
# (AudioSet-2M, 8 GPUs x 16); its AdamW betas (0.9, 0.95), weight decay 1e-5 and final lr
# 1e-6 are the paper's too, and utils.TrainConfig's defaults. `toy` makes `python
# pretrain.py` visibly learn on a CPU in minutes: it loads in-process, so that every core
# computes, and each clip's fbank is computed once and kept (data.py's cache_fbanks; the
# measured effect is in docs/performance.md).
PROFILES = {
    "paper": dict(preset="base", epochs=20, batch_size=16, lr=1e-4, warmup_epochs=2.0,
                  warmup_start_lr=2e-7, clip_grad=0.01, run_dir="runs/pretrain"),
    "toy": dict(preset="tiny", epochs=10, batch_size=32, lr=1e-3, warmup_epochs=1.0,
                warmup_start_lr=2e-7, clip_grad=1.0, num_workers=0, cpu_threads=0,
                run_dir=os.path.dirname(convert.TOY_CHECKPOINT)),
}


@dataclasses.dataclass
class PretrainConfig(utils.TrainConfig):
    """Every field is a `--field value` option (the loader, optimiser, AMP and logging
    options are utils.TrainConfig's); fields left at None come from PROFILES above."""
    data: Optional[str] = option(None, "training manifest (see data.py); none -> the built-in "
                                       "toy dataset under --toy_root (generated if absent)")
    eval_data: Optional[str] = option(None, "held-out manifest for retrieval after every epoch; "
                                            "none -> the toy retrieval split on toy data")
    preset: Optional[str] = option(None, "model size: base = ViT-B/16 (paper), tiny (toy)")
    model_overrides: Optional[str] = option(None, "ModelConfig changes, e.g. depth=2,embed_dim=96")
    inter_target: str = option("centroid", "what g_inter embeds: centroid = the mean of S "
                                           "predictions (method.md §6); original / augmented = "
                                           "the "
                                           "mean token of the original / augmented input; "
                                           "equivariant = the prediction of the applied t")
    equivariant: bool = option(True, "false: invariant intra-modal loss (ablation)")
    predictor: str = option("attention", "the transformation predictor u_m (method.md §4): "
                                         "attention (the paper's), linear or hypernetwork")
    S: int = option(16, "sampled augmentation vectors per centroid (method.md §6)")
    init_mae: Optional[str] = option(None, "both encoders from ImageNet MAE (method.md §10)")
    init_official: Optional[str] = option(None, "the authors' EquiAV weights (method.md §10)")
    init_from: Optional[str] = option(None, "initialise from our checkpoint of the same model "
                                            "(new optimizer, epoch 0), e.g. on another dataset")
    temperature: float = option(0.07, "InfoNCE temperature tau (method.md §7)")
    learnable_temperature: bool = option(False, "learn tau along with the model")
    w_inter: float = option(1 / 3, "weight of the inter-modal loss")
    w_intra: float = option(1 / 3, "weight of each intra-modal loss (0: none)")
    w_a: Optional[float] = option(None, "audio intra-modal weight; none -> --w_intra")
    w_v: Optional[float] = option(None, "visual intra-modal weight; none -> --w_intra")
    time_roll: bool = option(True, "random time shift of the originals (method.md §12)")
    compile: Optional[bool] = option(None, "torch.compile; none -> on CUDA yes, on the CPU no")
    cpu_threads: Optional[int] = option(None, "torch threads per process on CPU; 0 -> the cores "
                                              "the loader workers leave; none -> torch's own")


LOG_KEYS = ("loss", "inter", "intra_a", "intra_v",
            "acc_a2v", "acc_v2a", "acc_intra_a", "acc_intra_v")


# =============================================================================
# The recipe: build, resume, train, evaluate and save after every epoch
# =============================================================================

def main(cfg):
    """Pretrain EquiAV with config `cfg` (resolved here); returns the last epoch's summary."""
    cfg = resolve_config(cfg)
    utils.require_files(cfg, "data", "eval_data", "init_mae", "init_official", "init_from")
    mcfg = model_config(cfg)   # a wrong --preset / --model_overrides fails before any work
    _, world, local_rank, device = utils.init_distributed(cfg.device)
    try:
        with utils.cpu_threads(device, cfg.cpu_threads, cfg.num_workers, world):
            return run(cfg, mcfg, device, local_rank)
    finally:
        utils.cleanup_distributed()


def run(cfg, mcfg, device, local_rank=0):
    t_start, world = time.time(), utils.get_world_size()
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")   # TF32 for the matmuls autocast leaves fp32
    threads = torch.get_num_threads()
    utils.print_config(f"EquiAV pretraining: {world} process(es) on {device} ({threads} CPU "
                       f"threads each); resolved config (profile {cfg.profile!r}):", cfg)
    train_loader, eval_loader, norm_stats = build_data(cfg, mcfg, device)
    net, criterion, optimizer, scaler = build_model(cfg, mcfg, device)
    ckpt_path = os.path.join(cfg.run_dir, "checkpoint.pt")
    logger = utils.JsonLogger(os.path.join(cfg.run_dir, "log.jsonl"))
    start_epoch, step = resume_or_init(ckpt_path, cfg, mcfg, net, criterion, optimizer, scaler)
    # Only a zero loss weight leaves modules without gradient: only then must DDP look for them.
    model = utils.wrap_model(net, device, local_rank, cfg.compile,
                             find_unused_parameters=min(cfg.w_inter, cfg.w_a, cfg.w_v) == 0)
    bad_data = BadDataPolicy(cfg.max_bad_fraction) if cfg.skip_bad else None
    logger.log({"type": "config", "world_size": world, "model_config": dataclasses.asdict(mcfg),
                **dataclasses.asdict(cfg)} if start_epoch == 0 else
               {"type": "resume", "epoch": start_epoch, "step": step, "world_size": world})
    if start_epoch > 0 and start_epoch >= cfg.epochs:
        utils.print0(f"nothing to do: {cfg.run_dir} already holds {start_epoch} epoch(s)")
    summary = {"epoch": start_epoch, "step": step}
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        step, means = train_one_epoch(model, criterion, optimizer, scaler, train_loader, epoch,
                                      step, cfg, mcfg, device, logger, bad_data)
        summary = {"type": "epoch", "epoch": epoch + 1, "step": step,
                   "skipped": bad_data.skipped if bad_data is not None else 0,
                   "train_time_s": time.time() - t0, **means}
        line = (f"epoch {epoch + 1}/{cfg.epochs}  step {step}  loss {means['loss']:.4f} (inter "
                f"{means['inter']:.3f}, intra_a {means['intra_a']:.3f}, intra_v "
                f"{means['intra_v']:.3f})  acc a2v {means['acc_a2v']:.2f}  {time.time() - t0:.0f} s"
                + (f"  skipped {summary['skipped']}" if summary["skipped"] else ""))
        if eval_loader is not None:   # method.md §13, with fixed-seed centroid vectors
            metrics, chance, n = retrieval.evaluate_retrieval(net, eval_loader, device, cfg.S,
                                                              cfg.seed, cfg.amp)
            summary.update(retrieval=metrics, chance=chance, n_eval=n)
            line += f"\n  retrieval {retrieval.format_line(metrics, chance, n)}"
        if eval_loader is not None and epoch + 1 == cfg.epochs:   # once: 2x retrieval's cost
            summary["equivariance"] = eq = retrieval.equivariance_metrics(
                net, eval_loader, device, cfg.seed, cfg.amp)
            line += f"\n  equivariance {retrieval.format_equivariance(eq)}"
        utils.print0(line)
        logger.log(summary)
        if utils.is_main():   # epoch counts completed epochs: resuming is epoch-granular
            save_checkpoint(ckpt_path, cfg, mcfg, net, criterion, optimizer, scaler, step,
                            epoch + 1, norm_stats)
        utils.barrier(utils.RANK0_WORK_TIMEOUT_S)   # a base checkpoint is ~2.4 GB to write
    utils.print0(f"done: {cfg.epochs} epochs, step {step}, {time.time() - t_start:.0f} s; "
                 f"checkpoint {ckpt_path}")
    return summary


# =============================================================================
# One step and one epoch (method.md §6-8, 12)
# =============================================================================

def prepare_inputs(batch, gen, mcfg, S, device, time_roll=True):
    """A loader batch -> the eight inputs of EquiAV.forward on `device` (method.md §6, 8, 12).
    Every random draw comes from `gen`, a CPU generator, and all of them reach the device
    in one pinned copy, so no step waits for the GPU."""
    B, T, F = batch["audio"].shape
    H = W = mcfg.image_size
    roll = augment.sample_time_roll(B, T, gen) if time_roll else torch.zeros(B)   # (B,) frames
    t_a = augment.sample_audio_params(B, gen, T, F)                     # (B, 24) applied
    t_v = augment.sample_visual_params(B, gen, H, W)                    # (B, 18) applied
    T_a = augment.sample_audio_vectors(B, S, gen, T, F)                 # (B, S, 24) centroid
    T_v = augment.sample_visual_vectors(B, S, gen, H, W)                # (B, S, 18) centroid
    roll, t_a, t_v, T_a, T_v = utils.to_device_together([roll, t_a, t_v, T_a, T_v], device)
    x_a = batch["audio"].to(device, non_blocking=True)                  # (B, T, F) normalized
    x_v = augment.frames_to(device, batch["frame"])                    # uint8 -> [0, 1]
    if time_roll:
        x_a = augment.roll_time(x_a, roll)      # the original's input noise (method.md §12) ...
    x_a_aug = augment.apply_audio(x_a, t_a)     # ... and the view is made of the rolled original
    x_v_aug = augment.apply_visual(x_v, t_v)
    return (x_a, augment.normalize_image(x_v), x_a_aug, augment.normalize_image(x_v_aug),
            t_a, t_v, T_a, T_v)


def train_step(model, criterion, optimizer, scaler, batch, gen, cfg, mcfg, device):
    """One step (the loop's and bench.py's): inputs, forward under autocast, the losses in
    float32 (logits are cosines / 0.07), then the update finetune.py makes too
    (utils.optimizer_step): backward, clipping of the global norm, AdamW. Returns the terms."""
    inputs = prepare_inputs(batch, gen, mcfg, cfg.S, device, cfg.time_roll)
    with utils.autocast_context(device, cfg.amp):
        out = model(*inputs)
    terms = criterion(out)

    def average_tau():   # a learnable tau lives outside DDP: its gradient is averaged here
        utils.average_grads(criterion.parameters())

    tau_outside_ddp = cfg.learnable_temperature and utils.get_world_size() > 1
    utils.optimizer_step(optimizer, scaler, terms["loss"], cfg.clip_grad,
                         after_backward=average_tau if tau_outside_ddp else None)
    return terms


def train_one_epoch(model, criterion, optimizer, scaler, loader, epoch, step, cfg, mcfg, device,
                    logger, bad_data=None):
    """One pass over `loader`; returns (global step, epoch means of LOG_KEYS). The
    epoch's randomness is a function of (seed, epoch, rank) (utils.seed_epoch). Every
    step's terms stay on the device until a log step reads them all at once (the loop's
    one sync), averaged over ranks, so every rank stops at the first non-finite one."""
    model.train()
    loader.sampler.set_epoch(epoch)   # a new, reproducible order every epoch
    gen = utils.seed_epoch(cfg.seed, epoch, utils.get_rank())
    total_steps = cfg.epochs * len(loader)
    warmup_steps = round(cfg.warmup_epochs * len(loader))
    window = []                          # the terms of the steps since the last log line
    sums = dict.fromkeys(LOG_KEYS, 0.0)  # for the epoch means
    done = 0                             # steps this epoch
    seen = 0                             # samples since the last log line, all ranks
    t_last = time.time()
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not utils.is_main(),
               dynamic_ncols=True, leave=False)
    for i, batch in enumerate(bar):
        if bad_data is not None:
            batch = bad_data.filter(batch)   # equal batch sizes on every rank; None: all skip it
        if batch is not None:
            lr = utils.set_lr(optimizer, step, total_steps, warmup_steps, cfg)
            terms = train_step(model, criterion, optimizer, scaler, batch, gen, cfg, mcfg, device)
            step += 1
            done += 1
            seen += batch["index"].numel() * utils.get_world_size()
            window.append(torch.stack([terms[k].detach().float() for k in LOG_KEYS]))
        # The non-finite check waits for the log step: one sync per log window, not per step.
        if window and ((i + 1) % cfg.log_every == 0 or i + 1 == len(loader)):
            rows = utils.mean_over_ranks(torch.stack(window)).tolist()   # the sync
            for k, row in enumerate(rows):   # stop on the values read for logging (as MAE)
                if not all(map(math.isfinite, row)):
                    raise FloatingPointError(
                        f"non-finite loss at step {step - len(rows) + k + 1} (epoch {epoch + 1}): "
                        + ", ".join(f"{n}={v:.4g}" for n, v in zip(LOG_KEYS[:4], row))
                        + ". Stopping; the last checkpoint is from before this epoch. Try a "
                          "lower --lr, a smaller --clip_grad or --amp false.")
            for row in rows:                 # the epoch means
                for key, value in zip(LOG_KEYS, row):
                    sums[key] += value
            rate = seen / (time.time() - t_last)
            now = dict(zip(LOG_KEYS, rows[-1]))
            window, seen, t_last = [], 0, time.time()   # a new window
            logger.log({"type": "step", "epoch": epoch, "step": step, "lr": lr,
                        "samples_per_s": rate, **now})
            bar.set_postfix(loss=f"{now['loss']:.4f}", lr=f"{lr:.2e}", samples_per_s=f"{rate:.1f}")
    bar.close()
    if bad_data is not None:
        bad_data.check()
    return step, {key: total / max(done, 1) for key, total in sums.items()}


# =============================================================================
# The checkpoint: what is saved and what is restored; then building: config, data,
# model, loss, optimiser
# =============================================================================

def save_checkpoint(path, cfg, mcfg, net, criterion, optimizer, scaler, step, epoch, norm_stats):
    """{run_dir}/checkpoint.pt, written atomically by rank 0: plain tensors and values that
    torch.load(weights_only=True) accepts. All randomness of an epoch is a function of
    (seed, epoch, rank), so no random state is saved."""
    utils.save_checkpoint({
        "model": net.state_dict(),          # unwrapped and uncompiled: plain EquiAV keys
        "model_config": dataclasses.asdict(mcfg),
        "model_flags": convert.pretraining_flags(cfg),   # inter_target, equivariant
        "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
        "loss": criterion.state_dict(),     # a learnable temperature
        "step": step, "epoch": epoch,       # the epochs completed
        "config": dataclasses.asdict(cfg),
        "norm_stats": norm_stats,           # fbank [mean, std], for evaluation and fine-tuning
    }, path)


def resume_or_init(path, cfg, mcfg, net, criterion, optimizer, scaler):
    """Restore what save_checkpoint wrote when `path` exists (resuming wins over --init_*),
    else start from --init_* (convert.init_weights). Returns (epochs done, step)."""
    if not os.path.exists(path):
        convert.init_weights(cfg, mcfg, net)
        return 0, 0
    ckpt = utils.load_checkpoint(path)
    convert.check_same_model(path, ckpt, mcfg, convert.pretraining_flags(cfg))
    net.load_state_dict(ckpt["model"])
    criterion.load_state_dict(ckpt["loss"])
    optimizer.load_state_dict(ckpt["optimizer"])
    utils.load_scaler_state(scaler, ckpt["scaler"], path)
    changed = {k: (v, getattr(cfg, k)) for k, v in ckpt["config"].items()
               if getattr(cfg, k, v) != v}
    utils.print0(f"resumed from {path}: {ckpt['epoch']} epoch(s), step {ckpt['step']} done"
                 + (f"; config changed since (old, new): {changed}" if changed else "")
                 + ("; --init_* ignored: resuming wins" if cfg.init_mae or cfg.init_official
                    or cfg.init_from else ""))
    return ckpt["epoch"], ckpt["step"]


def resolve_config(cfg):
    """Fill the None fields from the profile and check the rest; returns a new config."""
    profile = cfg.profile or ("toy" if cfg.data is None else "paper")
    cfg = utils.apply_profile(cfg, PROFILES, profile)
    cfg = dataclasses.replace(cfg, w_a=cfg.w_intra if cfg.w_a is None else cfg.w_a,
                              w_v=cfg.w_intra if cfg.w_v is None else cfg.w_v)
    if cfg.inter_target not in INTER_TARGETS:
        raise utils.UsageError(f"--inter_target must be one of {INTER_TARGETS}, "
                               f"got {cfg.inter_target!r}")
    if cfg.compile is None:   # an eager step is host-bound on a GPU at the paper's batch (README)
        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        cfg = dataclasses.replace(cfg, compile=device.startswith("cuda"))
    if sum(bool(x) for x in (cfg.init_mae, cfg.init_official, cfg.init_from)) > 1:
        raise utils.UsageError("give at most one of --init_mae, --init_official and --init_from")
    utils.require_at_least_one(cfg, "epochs", "batch_size", "S", "log_every", "eval_batch_size")
    if min(cfg.w_inter, cfg.w_a, cfg.w_v) < 0 or cfg.w_inter + cfg.w_a + cfg.w_v == 0:
        raise utils.UsageError("loss weights must be >= 0 and not all zero")
    return cfg


def model_config(cfg):
    """--preset with --model_overrides applied; a wrong one is a UsageError."""
    overrides = utils.parse_overrides(cfg.model_overrides, ModelConfig())   # names and types
    try:
        return get_config(cfg.preset, **{"predictor": cfg.predictor, **overrides})
    except ValueError as err:   # an unknown preset, or sizes that do not fit together
        raise utils.UsageError(f"--preset / --model_overrides: {err}") from None


def build_data(cfg, mcfg, device):
    """(train loader, eval loader or None, [fbank mean, std]) at the model's input sizes."""
    train_manifest, eval_manifest = cfg.data, cfg.eval_data
    if train_manifest is None:   # collective: rank 0 generates it if absent
        paths = toy.ensure_toy_dataset(cfg.toy_root)
        train_manifest, eval_manifest = paths["train"], eval_manifest or paths["retrieval"]
    mean, std = data.resolve_norm_stats(cfg.norm_stats, train_manifest, None, mcfg.audio_length,
                                        mcfg.mel_bins)

    def loader(manifest, train, batch_size):
        dataset = data.AudioVisualDataset(manifest, train=train, norm_mean=mean, norm_std=std,
                                          audio_length=mcfg.audio_length, mel_bins=mcfg.mel_bins,
                                          image_size=mcfg.image_size, skip_bad=cfg.skip_bad,
                                          cache_fbanks=cfg.num_workers == 0)
        return data.make_loader(dataset, batch_size, train=train, num_workers=cfg.num_workers,
                                seed=cfg.seed, pin_memory=device.type == "cuda")

    train_loader = loader(train_manifest, True, cfg.batch_size)
    eval_loader = loader(eval_manifest, False, cfg.eval_batch_size) if eval_manifest else None
    utils.print0(f"data: {len(train_loader.dataset)} training clips ({train_manifest}), "
                 f"{len(train_loader)} steps/epoch of {cfg.batch_size} x {utils.get_world_size()}; "
                 f"retrieval on {eval_manifest or 'nothing (no --eval_data)'}; "
                 f"fbank mean/std {[mean, std]}")
    return train_loader, eval_loader, [mean, std]


def build_model(cfg, mcfg, device):
    """(EquiAV, EquiAVLoss, AdamW, GradScaler) on `device`, the same weights on every rank."""
    torch.manual_seed(cfg.seed)
    net = EquiAV(mcfg, equivariant=cfg.equivariant, inter_target=cfg.inter_target).to(device)
    criterion = EquiAVLoss(temperature=cfg.temperature,
                           learnable_temperature=cfg.learnable_temperature,
                           w_inter=cfg.w_inter, w_a=cfg.w_a, w_v=cfg.w_v).to(device)
    optimizer = torch.optim.AdamW(list(net.parameters()) + list(criterion.parameters()),
                                  lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                  weight_decay=cfg.weight_decay,
                                  fused=device.type == "cuda")   # one kernel; no scaler sync
    scaler = utils.make_grad_scaler(device, cfg.amp)
    millions = sum(p.numel() for p in net.parameters()) / 1e6
    utils.print0(f"model: preset {cfg.preset!r} ({millions:.2f}M parameters), {mcfg.predictor} "
                 f"predictor, inter_target={cfg.inter_target}, equivariant={cfg.equivariant}")
    return net, criterion, optimizer, scaler


if __name__ == "__main__":
    utils.run_script(main, PretrainConfig, __doc__.splitlines()[0], PROFILES)
