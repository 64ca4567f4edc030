"""Fine-tuning and linear probing of the pretrained encoders (SPEC 11).

The pretrained EquiAV encoders (with their final norm_m) get one Linear head
on mean-pooled tokens: audio, visual, or both concatenated (multimodal).
Multi-label data (AudioSet) trains with binary cross-entropy and reports mAP,
mAUC and d'; single-label data (VGGSound) with cross-entropy and top-1/top-5
accuracy. Recipe (SPEC 11, public defaults): AdamW (0.9, 0.95), weight decay
1e-5, lr 1e-4 with the head at 50x (its own parameter group, scaled every
step), warm-up + cosine, mixup p 0.5 with lambda ~ Beta(10, 10), SpecAugment
on the fine-tuning input, drop path 0.1, class-balanced sampling from a
weights CSV. Evaluation on the test split after every epoch; the best epoch
by the main metric is kept in best.pt; checkpoint.pt resumes the run.

    python finetune.py                                  # toy data, our toy checkpoint, CPU
    python finetune.py --toy_multilabel true            # toy multi-label variant (mAP)
    python finetune.py --linear_probe true              # frozen encoders
    torchrun --nproc_per_node 8 finetune.py --train as20k_train.json \\
        --test as_eval.json --label_csv class_labels_indices.csv --norm_stats audioset \\
        --init equiav_pretrained.pth
"""
import dataclasses
import json
import math
import os
import time
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import augment
import data
import utils
from utils import option
from model import EquiAVClassifier, ModelConfig, get_config, load_mae_checkpoint
from retrieval import gather_in_dataset_order, require_checkpoint


# =============================================================================
# Config
# =============================================================================

@dataclasses.dataclass
class FinetuneConfig:
    """Every field is a `--field value` option. Fields left at None take their
    value from the profile (PROFILES below): `paper` = SPEC 11, `toy` = CPU demo."""
    # -- data --
    train: Optional[str] = option(None, "training manifest; none -> the toy dataset's train split "
                                        "(generated under --toy_root if absent)")
    test: Optional[str] = option(None, "evaluation manifest, scored after every epoch; none -> "
                                       "the toy test split")
    label_csv: Optional[str] = option(None, "index,mid,display_name class list; none -> the toy's")
    toy_root: str = option("data/toy", "where the toy dataset lives (or is generated)")
    toy_multilabel: bool = option(False, "use the toy dataset's multi-label variant (two "
                                         "sounding objects per clip; reports mAP)")
    task: str = option("auto", "auto (multi-label when a training clip has several labels), "
                               "multilabel (BCE; mAP, mAUC, d') or singlelabel (CE; top-1, top-5)")
    norm_stats: str = option("auto", "fbank normalization: auto (stats.json next to --train), "
                                     "audioset, vggsound, or MEAN,STD")
    weights_csv: Optional[str] = option(None, "per-clip sampling weights, one per line (AudioSet-2M "
                                              "class balancing; `python data.py weights`)")
    samples_per_epoch: Optional[int] = option(None, "clips drawn per epoch with --weights_csv "
                                                    "(none: the training set size)")
    skip_bad: bool = option(False, "skip unreadable clips (counted) instead of failing")
    num_workers: Optional[int] = option(None, "data-loader processes per rank (paper 8, toy 0)")
    profile: Optional[str] = option(None, "defaults for the fields left at none: paper (SPEC 11) "
                                          "or toy; none -> toy without --train, paper with it")
    run_dir: Optional[str] = option(None, "checkpoint.pt (resumed when present), best.pt, "
                                          "log.jsonl, results.json; none -> runs/finetune[_toy...]")
    # -- model --
    init: Optional[str] = option(None, "weights to start from: our pretraining checkpoint, an "
                                       "authors' EquiAV checkpoint or an ImageNet MAE checkpoint; "
                                       "none -> runs/pretrain_toy/checkpoint.pt on toy data")
    init_type: str = option("auto", "auto (detected from the file), equiav (ours or the authors'), "
                                    "mae, or scratch (random initialization, --init unused)")
    preset: Optional[str] = option(None, "model size for authors'/MAE/scratch initialization (ours "
                                         "stores its own): base (paper), tiny (toy)")
    mode: str = option("multimodal", "audio, visual or multimodal (SPEC 11)")
    linear_probe: bool = option(False, "freeze the encoders and train the head only")
    drop_path: float = option(0.1, "stochastic depth rate of the encoders (SPEC 11)")
    # -- optimisation (SPEC 11) --
    epochs: Optional[int] = option(None, "training epochs (paper 50)")
    batch_size: Optional[int] = option(None, "clips per process per step")
    lr: Optional[float] = option(None, "peak learning rate of the encoders (paper 1e-4)")
    head_lr_mult: float = option(50.0, "the head's learning rate is this times --lr")
    warmup_epochs: Optional[float] = option(None, "linear warm-up in epochs")
    warmup_start_lr: float = option(0.0, "learning rate (times each group's multiplier) at step 0")
    final_lr: float = option(1e-6, "learning rate at the end of the cosine")
    weight_decay: float = option(1e-5, "AdamW weight decay")
    beta1: float = option(0.9, "AdamW beta1")
    beta2: float = option(0.95, "AdamW beta2")
    clip_grad: float = option(0.0, "gradient-norm clipping, 0 disables")
    mixup: Optional[float] = option(None, "probability of mixing a training clip with another "
                                          "(waveforms, frames, labels; lambda ~ Beta(10, 10)) "
                                          "(paper 0.5)")
    label_smoothing: float = option(0.0, "label smoothing of the training targets")
    specaug: bool = option(True, "SpecAugment on the fine-tuning input: a time and a frequency "
                                 "mask, widths up to 192 and 48 at T=1024, F=128 (scaled)")
    amp: bool = option(True, "mixed precision on CUDA; no effect on CPU")
    seed: int = option(0, "random seed")
    device: Optional[str] = option(None, "cpu or cuda; none -> cuda when available")
    eval_batch_size: int = option(64, "batch size of the evaluation")
    log_every: int = option(20, "steps between log lines")


# Defaults for the fields left at None. `paper`: SPEC 11 (batch size and warm-up
# are not given there: CAV-MAE's 48 per step and 2 epochs); `toy`: tuned so that
# `python finetune.py` finishes in a few minutes on 2 CPU cores.
PROFILES = {
    "paper": dict(preset="base", epochs=50, batch_size=48, lr=1e-4, warmup_epochs=2.0,
                  mixup=0.5, num_workers=8),
    "toy": dict(preset="tiny", epochs=6, batch_size=32, lr=2e-4, warmup_epochs=1.0,
                mixup=0.0, num_workers=0),
}
DEFAULT_INIT = "runs/pretrain_toy/checkpoint.pt"  # where `python pretrain.py` writes
MODES = EquiAVClassifier.MODES


def resolve_config(cfg):
    """Fill the None fields from the profile, check the rest; returns a new config."""
    toy = cfg.train is None
    cfg = utils.apply_profile(cfg, PROFILES, cfg.profile or ("toy" if toy else "paper"))
    if cfg.run_dir is None:
        name = "finetune_toy" if toy else "finetune"
        name += "_multilabel" if toy and cfg.toy_multilabel else ""
        name += f"_{cfg.mode}" if cfg.mode != "multimodal" else ""
        name += "_linear" if cfg.linear_probe else ""
        cfg = dataclasses.replace(cfg, run_dir=os.path.join("runs", name))
    if cfg.init is None and cfg.init_type != "scratch":
        if not toy:
            raise ValueError("give --init (our or the authors' EquiAV checkpoint, or an ImageNet "
                             "MAE checkpoint), or --init_type scratch")
        cfg = dataclasses.replace(cfg, init=DEFAULT_INIT)
    if cfg.mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {cfg.mode!r}")
    for name, choices in (("task", ("auto", "multilabel", "singlelabel")),
                          ("init_type", ("auto", "equiav", "mae", "scratch"))):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"--{name} must be one of {choices}, got {getattr(cfg, name)!r}")
    if not toy and cfg.test is None:
        raise ValueError("give --test with --train (evaluated after every epoch)")
    for name in ("epochs", "batch_size", "eval_batch_size", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name} must be at least 1, got {getattr(cfg, name)}")
    return cfg


# ---------------------------------------------------------------------------
# Metrics (no sklearn / scipy). Scores are logits: the sigmoid saturates to
# exactly 1.0 in float32 and would create ties that the logits do not have.
# ---------------------------------------------------------------------------

def _positives(targets):
    """Hard 0/1 labels from (possibly smoothed) targets (N, C)."""
    return (targets > 0.5).double()


def average_precision(scores, targets):
    """Average precision per class, (C,) float64; NaN for a class without positives.

    scores: (N, C) any monotone score (logits); targets: (N, C) 0/1.
    AP = sum over thresholds of (recall gain) x precision, where every distinct
    score is one threshold: items with tied scores enter together, so each
    positive of a tie group gets the precision at the group's end (the
    definition sklearn uses; independent of the order of tied items).
    """
    s = scores.double().T.contiguous()                            # (C, N)
    y = _positives(targets).T
    n = s.shape[1]
    s_desc, order = torch.sort(s, dim=1, descending=True)
    y_desc = y.gather(1, order)
    tp = y_desc.cumsum(1)                                         # positives in the top k+1
    # number of items scoring >= each item = the end of its tie group
    n_ge = n - torch.searchsorted(s_desc.flip(1).contiguous(), s_desc, side="left")
    precision = tp.gather(1, n_ge - 1) / n_ge
    n_pos = y.sum(1)
    ap = (precision * y_desc).sum(1) / n_pos
    ap[n_pos == 0] = math.nan
    return ap


def roc_auc(scores, targets):
    """ROC AUC per class, (C,) float64; NaN for a class lacking positives or negatives.

    The Mann-Whitney statistic with average ranks for ties: a positive tied
    with a negative counts one half.
    """
    s = scores.double().T.contiguous()                            # (C, N)
    y = _positives(targets).T
    s_asc = torch.sort(s, dim=1).values
    below = torch.searchsorted(s_asc, s, side="left")
    at_or_below = torch.searchsorted(s_asc, s, side="right")
    avg_rank = (below + at_or_below + 1) / 2.0                    # 1-based, ties averaged
    n_pos = y.sum(1)
    n_neg = y.shape[1] - n_pos
    auc = ((avg_rank * y).sum(1) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = math.nan
    return auc


def d_prime(auc):
    """d' = sqrt(2) * Phi^-1(AUC), the AUC of two unit Gaussians d' apart."""
    return math.sqrt(2.0) * torch.special.ndtri(torch.tensor(float(auc), dtype=torch.float64)).item()


def multilabel_metrics(scores, targets):
    """mAP (percent, macro over classes with a positive), mAUC and d'(mAUC).

    scores, targets: (N, C). d' is computed from the mean AUC, as AST and
    CAV-MAE report it.
    """
    ap = average_precision(scores, targets)
    auc = roc_auc(scores, targets)
    has_ap, has_auc = ~torch.isnan(ap), ~torch.isnan(auc)
    if not has_ap.any():
        raise ValueError("no class has a positive example: mAP is undefined")
    m_auc = auc[has_auc].mean().item() if has_auc.any() else math.nan
    return {"mAP": 100.0 * ap[has_ap].mean().item(), "mAUC": m_auc,
            "d_prime": d_prime(m_auc), "classes_evaluated": int(has_ap.sum())}


def topk_accuracy(scores, targets, ks=(1, 5)):
    """Top-k accuracy in percent for single-label data.

    scores: (N, C); targets: (N,) class indices or (N, C) one-hot / soft
    labels (argmax taken). A class tied with the true one counts as ranked
    above it exactly when its index is smaller (a stable sort), so constant
    scores do not count as correct.
    """
    if targets.dim() == 2:
        targets = targets.argmax(1)
    targets = targets.long()[:, None]
    true = scores.gather(1, targets)                              # (N, 1)
    cols = torch.arange(scores.shape[1], device=scores.device)[None, :]
    rank = (scores > true).sum(1) + ((scores == true) & (cols < targets)).sum(1)  # 0-based
    return {f"top{k}": 100.0 * (rank < k).double().mean().item() for k in ks}


def evaluation_metrics(scores, targets, multilabel):
    """The metrics of the task; the first key is the one the best epoch is chosen by."""
    if multilabel:
        return multilabel_metrics(scores, targets)
    ks = (1, 5) if scores.shape[1] > 5 else (1,)
    return topk_accuracy(scores, targets, ks)


# =============================================================================
# Model, optimiser, fine-tuning SpecAugment
# =============================================================================

def inspect_init(cfg):
    """(kind, ModelConfig) of the initialization: kind "equiav" (ours or the
    authors'), "mae" or "scratch", detected from the checkpoint's keys when
    --init_type is auto. The file is read through a memory map, so a large
    checkpoint is not loaded twice."""
    if cfg.init_type == "scratch":
        return "scratch", get_config(cfg.preset)
    require_checkpoint(cfg.init, DEFAULT_INIT, "init")
    try:
        state = torch.load(cfg.init, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file
        state = utils.load_checkpoint(cfg.init)
    if "model_config" in state:  # ours: rebuilt with its own sizes
        return "equiav", ModelConfig(**state["model_config"])
    kind = cfg.init_type
    if kind == "auto":
        sd = state.get("model", state.get("state_dict", state))
        keys = {k.removeprefix("module.") for k in sd}
        # MAE's single ViT: cls_token and blocks.{i}; the authors' EquiAV: blocks_a / blocks_v
        kind = "mae" if "cls_token" in keys or any(k.startswith("blocks.") for k in keys) else "equiav"
    return kind, get_config(cfg.preset)


def build_classifier(cfg, kind, mcfg, num_classes):
    """EquiAVClassifier initialised from cfg.init as `kind` says (on CPU)."""
    if kind == "equiav":
        from pretrain import load_equiav  # pretrain.py is only needed here
        equiav = load_equiav(cfg.init, cfg.preset)
        net = EquiAVClassifier.from_pretrained(equiav, num_classes, cfg.mode, cfg.drop_path)
        utils.print0(f"initialised from EquiAV checkpoint {cfg.init}")
        return net
    net = EquiAVClassifier(mcfg, num_classes, cfg.mode, cfg.drop_path)
    if kind == "mae":
        report = load_mae_checkpoint(net, cfg.init)
        missing = ", ".join(report.missing[:6]) + (", ..." if len(report.missing) > 6 else "")
        utils.print0(f"initialised from MAE checkpoint {cfg.init}: {len(report.missing)} missing "
                     f"keys ({missing}), {len(report.unexpected)} unexpected")
    else:
        utils.print0(f"random initialization (preset {cfg.preset!r})")
    return net


def make_optimizer(net, cfg):
    """AdamW with two parameter groups: the encoders at --lr and the head at
    --lr x --head_lr_mult. Each group's "lr_scale" is applied by set_lr at
    every step (the public code overwrote all groups with one rate; SPEC 9).
    A linear probe has only the head group."""
    groups = [{"params": net.head_parameters(), "lr_scale": cfg.head_lr_mult, "name": "head"}]
    if not cfg.linear_probe:
        groups.insert(0, {"params": net.encoder_parameters(), "lr_scale": 1.0, "name": "encoders"})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay)


def set_lr(optimizer, step, total_steps, warmup_steps, cfg):
    """Warm-up + cosine (utils.cosine_lr) for the base rate, times each group's scale."""
    # float(): cosine_lr gives a numpy scalar, which weights_only checkpoint loading rejects
    lr = float(utils.cosine_lr(step, total_steps, warmup_steps, cfg.lr, cfg.warmup_start_lr,
                               cfg.final_lr))
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    return lr


_MASK_SLOTS = [augment.AUDIO_SLOTS[k] for k in
               ("specaug_on", "tmask_start", "tmask_end", "fmask_start", "fmask_end")]


def finetune_specaugment(spec, generator):
    """SpecAugment on the fine-tuning input (SPEC 11): augment.py's time and
    frequency masks (widths < 192 T/1024 frames and 48 F/128 bins, set to 0),
    and nothing else of the pretraining augmentations: the masks are copied
    into an identity vector. As in augment.py a clip is masked with p 0.8.
    spec (B, T, F) -> (B, T, F)."""
    b, T, F_ = spec.shape
    sampled = augment.sample_audio_params(b, generator, T=T, F=F_)
    t = augment.audio_identity(b)
    t[:, _MASK_SLOTS] = sampled[:, _MASK_SLOTS]
    return augment.apply_audio(spec, t.to(spec.device))


def _epoch_generator(seed, epoch, rank):
    """A CPU generator for (seed, epoch, rank); re-seeding every epoch makes a
    resumed run draw exactly what the uninterrupted one would have."""
    mixed = int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(mixed)


def _set_train_mode(net, linear_probe):
    net.train()
    if linear_probe:  # frozen encoders: no drop path
        for enc in (net.audio_encoder, net.visual_encoder):
            if enc is not None:
                enc.eval()


def _inputs(batch, mode, device):
    x_a = batch["audio"].to(device, non_blocking=True) if mode != "visual" else None
    x_v = None
    if mode != "audio":  # ImageNet normalisation last (SPEC 1)
        x_v = augment.normalize_image(batch["frame"].to(device, non_blocking=True))
    return x_a, x_v


def compute_loss(logits, targets, multilabel):
    """BCE for multi-label, cross-entropy with (mixed / smoothed) probability targets otherwise."""
    logits = logits.float()
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


# =============================================================================
# One epoch, evaluation
# =============================================================================

def train_one_epoch(model, net, optimizer, scaler, loader, epoch, step, cfg, multilabel, device,
                    logger):
    """One pass over `loader`; returns (global step, mean training loss)."""
    _set_train_mode(net, cfg.linear_probe)
    steps_per_epoch = len(loader)
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    gen = _epoch_generator(cfg.seed, epoch, utils.get_rank())
    torch.manual_seed(int(torch.randint(2**62, (1,), generator=gen)))  # drop path
    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=device)
    since = torch.zeros((), device=device)
    n_since = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not utils.is_main(),
               dynamic_ncols=True, leave=False)
    for i, batch in enumerate(bar):
        lr = set_lr(optimizer, step, total_steps, warmup_steps, cfg)
        x_a, x_v = _inputs(batch, cfg.mode, device)
        if x_a is not None and cfg.specaug:
            x_a = finetune_specaugment(x_a, gen)
        y = batch["label"].to(device, non_blocking=True)
        with utils.autocast_context(device, cfg.amp):
            logits = model(x_a, x_v)
        loss = compute_loss(logits, y, multilabel)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.clip_grad > 0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        step += 1
        loss_sum += loss.detach()
        since += loss.detach()
        n_since += 1
        if (i + 1) % cfg.log_every == 0 or i + 1 == steps_per_epoch:
            value = since.item() / n_since  # the only host-device sync of the loop
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"non-finite loss in epoch {epoch + 1} near step {step}; stopping (the last "
                    f"checkpoint is from before this epoch). Try a lower --lr or --amp false.")
            logger.log({"type": "step", "epoch": epoch, "step": step, "lr": lr, "loss": value})
            bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}")
            since.zero_()
            n_since = 0
    bar.close()
    mean = loss_sum / steps_per_epoch
    if utils.get_world_size() > 1:
        torch.distributed.all_reduce(mean)
        mean /= utils.get_world_size()
    return step, mean.item()


@torch.no_grad()
def evaluate(net, loader, device, cfg, multilabel):
    """Scores of every test clip (gathered over ranks in dataset order) -> metrics
    dict (the same on every rank), with the mean loss under "loss"."""
    net.eval()
    indices, scores, targets = [], [], []
    for batch in loader:
        x_a, x_v = _inputs(batch, cfg.mode, device)
        with utils.autocast_context(device, cfg.amp):
            logits = net(x_a, x_v)
        indices.append(batch["index"].to(device))
        scores.append(logits.float())
        targets.append(batch["label"].to(device).float())
    _, scores, targets = gather_in_dataset_order(torch.cat(indices), torch.cat(scores),
                                                 torch.cat(targets))
    metrics = evaluation_metrics(scores.cpu(), targets.cpu(), multilabel)
    metrics["loss"] = compute_loss(scores, targets, multilabel).item()
    return metrics


# =============================================================================
# The recipe
# =============================================================================

def main(cfg):
    """Fine-tune with config `cfg` (resolved here); returns the results dict."""
    cfg = resolve_config(cfg)
    rank, world, local_rank, device = utils.init_distributed(cfg.device)
    try:
        return _run(cfg, rank, world, local_rank, device)
    finally:
        utils.cleanup_distributed()


def _datasets(cfg, mcfg):
    train, test, label_csv = cfg.train, cfg.test, cfg.label_csv
    if train is None:
        if utils.is_main():
            data.ensure_toy_dataset(cfg.toy_root)  # generated on first use
        utils.barrier()
        toy = data.ensure_toy_dataset(cfg.toy_root)
        suffix = "_multilabel" if cfg.toy_multilabel else ""
        train, test = toy["train" + suffix], test or toy["test" + suffix]
        label_csv = label_csv or toy["label_csv"]
    if label_csv is None:
        raise ValueError("give --label_csv (index,mid,display_name) with --train")
    mean, std = data.resolve_norm_stats(cfg.norm_stats)
    sizes = dict(audio_length=mcfg.audio_length, mel_bins=mcfg.mel_bins,
                 image_size=mcfg.image_size, label_csv=label_csv, skip_bad=cfg.skip_bad)
    train_set = data.AudioVisualDataset(train, train=True, norm_mean=mean, norm_std=std,
                                        mixup=cfg.mixup, label_smoothing=cfg.label_smoothing,
                                        **sizes)
    # the test split is normalised like the training split it is scored against
    test_set = data.AudioVisualDataset(test, train=False, norm_mean=train_set.norm_mean,
                                       norm_std=train_set.norm_std, **sizes)
    return train_set, test_set


def _is_multilabel(cfg, train_set):
    if cfg.task != "auto":
        return cfg.task == "multilabel"
    return any(len(train_set.label_indices(i)) > 1 for i in range(len(train_set)))


def _run(cfg, rank, world, local_rank, device):
    utils.print0(f"EquiAV fine-tuning: {world} process(es) on {device}; resolved config "
                 f"(profile {cfg.profile!r}):")
    for f in dataclasses.fields(cfg):
        utils.print0(f"  {f.name:18s} {getattr(cfg, f.name)}")
    ckpt_path = os.path.join(cfg.run_dir, "checkpoint.pt")
    best_path = os.path.join(cfg.run_dir, "best.pt")
    logger = utils.JsonLogger(os.path.join(cfg.run_dir, "log.jsonl"))

    # ---- data (at the model's input sizes) -------------------------------------
    init_kind, mcfg = inspect_init(cfg)
    train_set, test_set = _datasets(cfg, mcfg)
    num_classes = train_set.num_classes
    multilabel = _is_multilabel(cfg, train_set)
    weights = None
    if cfg.weights_csv:
        weights = data.load_sample_weights(cfg.weights_csv, len(train_set))
    train_loader = data.make_loader(train_set, cfg.batch_size, train=True,
                                    num_workers=cfg.num_workers, seed=cfg.seed, weights=weights,
                                    num_samples=cfg.samples_per_epoch)
    test_loader = data.make_loader(test_set, cfg.eval_batch_size, train=False,
                                   num_workers=cfg.num_workers, seed=cfg.seed)
    if len(train_loader) == 0:
        raise ValueError(f"{len(train_set)} training clips is less than one batch of "
                         f"{cfg.batch_size} x {world} processes")
    main_metric = "mAP" if multilabel else "top1"
    utils.print0(f"data: {len(train_set)} training clips, {len(test_set)} test clips, "
                 f"{num_classes} classes, {'multi' if multilabel else 'single'}-label "
                 f"({'BCE; mAP, mAUC, d' + chr(39) if multilabel else 'CE; top-1, top-5'}), "
                 f"{len(train_loader)} steps/epoch of {cfg.batch_size} x {world}"
                 + (f", class-balanced sampling from {cfg.weights_csv}" if weights is not None else ""))

    # ---- model, optimiser, resume ------------------------------------------------
    utils.seed_everything(cfg.seed)  # the same new head on every rank
    net = build_classifier(cfg, init_kind, mcfg, num_classes)
    mcfg = net.cfg  # with drop_path
    if cfg.linear_probe:
        for p in net.encoder_parameters():
            p.requires_grad_(False)
    net = net.to(device)
    optimizer = make_optimizer(net, cfg)
    scaler = utils.make_grad_scaler(device, cfg.amp)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    utils.print0(f"model: {cfg.mode}, {'linear probe' if cfg.linear_probe else 'full fine-tuning'}, "
                 f"{n_train / 1e6:.2f}M trainable parameters; head lr x{cfg.head_lr_mult:g}")
    start_epoch, step, best, history = 0, 0, None, []
    if os.path.exists(ckpt_path):
        ckpt = utils.load_checkpoint(ckpt_path)
        expected = {"mode": cfg.mode, "num_classes": num_classes, "multilabel": multilabel,
                    "linear_probe": cfg.linear_probe}
        found = {k: ckpt[k] for k in expected}
        if found != expected:
            raise ValueError(f"{ckpt_path} holds a different run ({found}, this one {expected}); "
                             f"pass another --run_dir")
        net.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step, best, history = ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["history"]
        utils.print0(f"resumed from {ckpt_path}: {start_epoch} epoch(s) done")
        del ckpt
    model = net
    if world > 1:
        model = DistributedDataParallel(net, device_ids=[local_rank] if device.type == "cuda" else None)
    if start_epoch == 0 and not history:
        logger.log({"type": "config", "world_size": world, "num_classes": num_classes,
                    "multilabel": multilabel, "model_config": dataclasses.asdict(mcfg),
                    **dataclasses.asdict(cfg)})

    # ---- train, evaluating after every epoch ------------------------------------
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        train_loader.sampler.set_epoch(epoch)
        step, train_loss = train_one_epoch(model, net, optimizer, scaler, train_loader, epoch,
                                           step, cfg, multilabel, device, logger)
        train_s = time.time() - t0
        metrics = evaluate(net, test_loader, device, cfg, multilabel)
        record = {"type": "epoch", "epoch": epoch + 1, "step": step, "train_loss": train_loss,
                  "train_time_s": train_s, "eval_time_s": time.time() - t0 - train_s, **metrics}
        history.append(record)
        logger.log(record)
        improved = best is None or metrics[main_metric] > best["value"]
        if improved:
            best = {"metric": main_metric, "value": metrics[main_metric], "epoch": epoch + 1,
                    "metrics": metrics}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k != "classes_evaluated")
        utils.print0(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train_loss:.4f}  test: {shown}  "
                     f"({train_s:.0f} s){'  best' if improved else ''}")
        if utils.is_main():
            meta = {"model_config": dataclasses.asdict(mcfg), "mode": cfg.mode,
                    "num_classes": num_classes, "multilabel": multilabel,
                    "linear_probe": cfg.linear_probe, "config": dataclasses.asdict(cfg)}
            if improved:
                utils.save_checkpoint({"model": net.state_dict(), "epoch": epoch + 1,
                                       "metrics": metrics, **meta}, best_path)
            utils.save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                                   "scaler": scaler.state_dict(), "epoch": epoch + 1, "step": step,
                                   "best": best, "history": history, **meta}, ckpt_path)
        utils.barrier()

    results = {"task": "multilabel" if multilabel else "singlelabel", "main_metric": main_metric,
               "best": best, "final": history[-1] if history else None,
               "run_dir": cfg.run_dir, "config": dataclasses.asdict(cfg)}
    if best is not None:
        utils.print0(f"best {main_metric} {best['value']:.2f} at epoch {best['epoch']} "
                     f"({best_path}); final {main_metric} {history[-1][main_metric]:.2f}")
    if utils.is_main():
        with open(os.path.join(cfg.run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main(utils.parse_config(FinetuneConfig, description=__doc__.splitlines()[0]))
