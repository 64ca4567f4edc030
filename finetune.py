"""Fine-tuning and linear probing of the pretrained encoders (method.md §11).

The pretrained EquiAV encoders (with their final norm_m) get one Linear head
on mean-pooled tokens: audio, visual, or both concatenated (multimodal).
Multi-label data (AudioSet) trains with binary cross-entropy and reports mAP,
mAUC and d'; single-label data (VGGSound) with cross-entropy and top-1/top-5
accuracy. Recipe (method.md §11, public defaults): AdamW (0.9, 0.95), weight decay
1e-5, lr 1e-4 with the head at 50x (its own parameter group, scaled every
step), warm-up + cosine, mixup p 0.5 with lambda ~ Beta(10, 10), SpecAugment
on the fine-tuning input, drop path 0.1, class-balanced sampling from a
weights CSV. Evaluation on the test split after every epoch; checkpoint.pt
resumes the run. The headline figure is never chosen on the data it reports:
with --val, best.pt and the headline are the epoch best on the validation
manifest, scored on test; without it, the headline is the final epoch, and the
epoch best on test (what the authors' code reports) is labelled optimistic.

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

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import augment
import convert
import data
import toy
import utils
from bad_data import BadDataPolicy
from model import EquiAV, ModelConfig, ViTEncoder, get_config
from utils import option


# =============================================================================
# The fine-tuning classifier (method.md §11)
# =============================================================================

class EquiAVClassifier(nn.Module):
    """Pretrained encoders (with their final norm_m) + one Linear head on the
    mean-pooled tokens; multimodal concatenates [audio, visual] features."""

    MODES = ("audio", "visual", "multimodal")

    def __init__(self, cfg: ModelConfig, num_classes: int, mode: str = "multimodal",
                 drop_path: float = 0.1):
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"unknown classifier mode {mode!r}; choose from {self.MODES}")
        cfg = dataclasses.replace(cfg, drop_path=drop_path)
        self.cfg, self.mode = cfg, mode
        use_a, use_v = mode in ("audio", "multimodal"), mode in ("visual", "multimodal")
        self.audio_encoder = ViTEncoder(cfg, 1, cfg.audio_grid, with_aug_norm=False) if use_a else None
        self.visual_encoder = ViTEncoder(cfg, 3, cfg.visual_grid, with_aug_norm=False) if use_v else None
        self.head = nn.Linear(cfg.embed_dim * (use_a + use_v), num_classes)
        nn.init.xavier_uniform_(self.head.weight)   # method.md §2's initialisation
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(cls, equiav: EquiAV, num_classes: int, mode: str = "multimodal",
                        drop_path: float = 0.1) -> "EquiAVClassifier":
        """A classifier whose encoders are copies of `equiav`'s (norm_m_aug left out)."""
        model = cls(equiav.cfg, num_classes, mode, drop_path)
        for name in ("audio_encoder", "visual_encoder"):
            encoder = getattr(model, name)
            if encoder is not None:
                src = getattr(equiav, name).state_dict()
                encoder.load_state_dict({k: v for k, v in src.items() if not k.startswith("norm_aug.")})
        return model.to(next(equiav.parameters()).device)

    def forward_features(self, x_a=None, x_v=None) -> torch.Tensor:
        """(B, D) for one modality or (B, 2D) = [audio, visual] for multimodal."""
        feats = []
        if self.audio_encoder is not None:
            feats.append(self.audio_encoder(x_a).mean(dim=1))
        if self.visual_encoder is not None:
            feats.append(self.visual_encoder(x_v).mean(dim=1))
        return feats[0] if len(feats) == 1 else torch.cat(feats, dim=-1)

    def forward(self, x_a=None, x_v=None) -> torch.Tensor:
        """x_a (B, T, F), x_v (B, 3, H, W) (the unused one may be None) -> logits (B, C)."""
        return self.head(self.forward_features(x_a, x_v))

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("head.")]

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())


# =============================================================================
# Config
# =============================================================================

@dataclasses.dataclass
class FinetuneConfig(utils.TrainConfig):
    """Every field is a `--field value` option; the loader, optimiser, AMP and logging
    options are utils.TrainConfig's. Fields left at None take their value from the
    profile (PROFILES below): `paper` = method.md §11, `toy` = CPU demo. run_dir: none ->
    runs/finetune[_toy...] (checkpoint.pt, best.pt, log.jsonl, results.json)."""
    # -- data --
    train: Optional[str] = option(None, "training manifest; none -> the toy dataset's train split "
                                        "(generated under --toy_root if absent)")
    test: Optional[str] = option(None, "evaluation manifest, scored after every epoch; none -> "
                                       "the toy test split")
    val: Optional[str] = option(None, "validation manifest (labelled, disjoint from test): the "
                                      "best epoch (best.pt, the headline) is chosen on it; none -> "
                                      "the headline is the final epoch's test metric")
    label_csv: Optional[str] = option(None, "index,mid,display_name class list; none -> the toy's")
    toy_multilabel: bool = option(False, "use the toy dataset's multi-label variant (two "
                                         "sounding objects per clip; reports mAP)")
    task: str = option("auto", "auto (multi-label when a training clip has several labels), "
                               "multilabel (BCE; mAP, mAUC, d') or singlelabel (CE; top-1, top-5)")
    weights_csv: Optional[str] = option(None, "per-clip sampling weights, one per line (AudioSet-2M "
                                              "class balancing; `python data.py weights`)")
    samples_per_epoch: Optional[int] = option(None, "clips drawn per epoch with --weights_csv "
                                                    "(none: the training set size)")
    # -- model --
    init: Optional[str] = option(None, "weights to start from: our pretraining checkpoint, an "
                                       "authors' EquiAV checkpoint or an ImageNet MAE checkpoint; "
                                       f"none -> {convert.TOY_CHECKPOINT} on toy data")
    init_type: str = option("auto", "auto (detected from the file), equiav (ours or the authors'), "
                                    "mae, or scratch (random initialization, --init unused)")
    preset: Optional[str] = option(None, "model size for authors'/MAE/scratch initialization (ours "
                                         "stores its own): base (paper), tiny (toy)")
    mode: str = option("multimodal", "audio, visual or multimodal (method.md §11)")
    linear_probe: bool = option(False, "freeze the encoders and train the head only")
    drop_path: float = option(0.1, "stochastic depth rate of the encoders (method.md §11)")
    # -- the recipe (method.md §11) --
    head_lr_mult: float = option(50.0, "the head's learning rate is this times --lr")
    mixup: Optional[float] = option(None, "probability of mixing a training clip with another "
                                          "(waveforms, frames, labels; lambda ~ Beta(10, 10)) "
                                          "(paper 0.5)")
    label_smoothing: float = option(0.0, "label smoothing of the training targets")
    specaug: bool = option(True, "SpecAugment on the fine-tuning input: a time and a frequency "
                                 "mask, widths up to 192 and 48 at T=1024, F=128 (scaled)")


# Defaults for the fields left at None. `paper`: method.md §11 (batch size and warm-up
# are not given there: CAV-MAE's 48 per step and 2 epochs); `toy`: tuned so that
# `python finetune.py` finishes in a few minutes on 2 CPU cores. Both warm up from 0
# (times each group's multiplier) and clip no gradients.
PROFILES = {
    "paper": dict(preset="base", epochs=50, batch_size=48, lr=1e-4, warmup_epochs=2.0,
                  warmup_start_lr=0.0, clip_grad=0.0, mixup=0.5),
    "toy": dict(preset="tiny", epochs=6, batch_size=32, lr=2e-4, warmup_epochs=1.0,
                warmup_start_lr=0.0, clip_grad=0.0, mixup=0.0, num_workers=0),
}
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
            raise utils.UsageError("give --init (our or the authors' EquiAV checkpoint, or an ImageNet "
                             "MAE checkpoint), or --init_type scratch")
        cfg = dataclasses.replace(cfg, init=convert.TOY_CHECKPOINT)
    if cfg.mode not in MODES:
        raise utils.UsageError(f"--mode must be one of {MODES}, got {cfg.mode!r}")
    for name, choices in (("task", ("auto", "multilabel", "singlelabel")),
                          ("init_type", ("auto", "equiav", "mae", "scratch"))):
        if getattr(cfg, name) not in choices:
            raise utils.UsageError(f"--{name} must be one of {choices}, got {getattr(cfg, name)!r}")
    if not toy and cfg.test is None:
        raise utils.UsageError("give --test with --train (evaluated after every epoch)")
    utils.require_at_least_one(cfg, "epochs", "batch_size", "eval_batch_size", "log_every")
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


def d_prime(auc):
    """d' = sqrt(2) * Phi^-1(AUC), the AUC of two unit Gaussians d' apart."""
    return math.sqrt(2.0) * torch.special.ndtri(torch.tensor(float(auc), dtype=torch.float64)).item()


def multilabel_metrics(scores, targets):
    """mAP (percent, macro over classes with a positive), mAUC and d'(mAUC).

    scores, targets: (N, C). d' is computed from the mean AUC, as AST and
    CAV-MAE report it.
    """
    ap = average_precision(scores, targets)
    auc = utils.roc_auc(scores, targets)
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
# The recipe
# =============================================================================

def main(cfg):
    """Fine-tune with config `cfg` (resolved here); returns the results dict."""
    cfg = resolve_config(cfg)
    utils.require_files(cfg, "train", "test", "val", "label_csv")
    if cfg.init is not None:
        convert.require_checkpoint(cfg.init, "init")
    _, _, local_rank, device = utils.init_distributed(cfg.device)
    try:
        return run(cfg, device, local_rank)
    finally:
        utils.cleanup_distributed()


def run(cfg, device, local_rank=0):
    """Build, resume or initialise, then train, evaluating and saving after every epoch."""
    world = utils.get_world_size()
    utils.print_config(f"EquiAV fine-tuning: {world} process(es) on {device}; resolved config "
                       f"(profile {cfg.profile!r}):", cfg)
    init_kind, mcfg = inspect_init(cfg)
    train_loader, test_loader, val_loader, multilabel = build_data(cfg, mcfg, device)
    num_classes = train_loader.dataset.num_classes
    main_metric = "mAP" if multilabel else "top1"
    chosen_on = "val" if val_loader is not None else "test"
    net, optimizer, scaler = build_model(cfg, init_kind, mcfg, num_classes, device)
    logger = utils.JsonLogger(os.path.join(cfg.run_dir, "log.jsonl"))
    meta = {"model_config": dataclasses.asdict(net.cfg), "mode": cfg.mode,
            "num_classes": num_classes, "multilabel": multilabel,
            "linear_probe": cfg.linear_probe, "config": dataclasses.asdict(cfg)}
    start_epoch, step, best, history = resume(cfg.run_dir, meta, net, optimizer, scaler)
    earlier = best.get("chosen_on", "test") if best is not None else chosen_on
    if earlier != chosen_on:   # an epoch chosen on test must not compete with one on val
        raise utils.UsageError(f"{cfg.run_dir} chose its best epoch on {earlier}; resume it "
                               f"{'with' if earlier == 'val' else 'without'} --val, or pass "
                               f"another --run_dir")
    model = utils.wrap_model(net, device, local_rank)
    bad_data = BadDataPolicy(cfg.max_bad_fraction) if cfg.skip_bad else None
    if start_epoch == 0:
        logger.log({"type": "config", "world_size": world, "num_classes": num_classes,
                    "multilabel": multilabel, "model_config": meta["model_config"],
                    **dataclasses.asdict(cfg)})

    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.time()
        step, train = train_one_epoch(model, net, optimizer, scaler, train_loader, epoch, step,
                                      cfg, multilabel, device, logger, bad_data)
        train_s = time.time() - t0
        metrics = evaluate(net, test_loader, device, cfg, multilabel)
        # the epoch is chosen on the validation split when there is one, else on test itself
        val = evaluate(net, val_loader, device, cfg, multilabel) if val_loader is not None else None
        choice = (val if val is not None else metrics)[main_metric]
        record = {"type": "epoch", "epoch": epoch + 1, "step": step, **train,
                  "train_time_s": train_s, "eval_time_s": time.time() - t0 - train_s, **metrics}
        if val is not None:
            record.update({f"val_{k}": v for k, v in val.items()})
        history.append(record)
        logger.log(record)
        improved = best is None or choice > best["value"]
        if improved:
            best = {"metric": main_metric, "chosen_on": chosen_on, "value": choice,
                    "epoch": epoch + 1, "metrics": metrics}
        shown = ", ".join(f"{k} {v:.2f}" for k, v in metrics.items()
                          if k not in ("classes_evaluated", "test_skipped"))
        utils.print0(f"epoch {epoch + 1}/{cfg.epochs}  train loss {train['train_loss']:.4f}  "
                     f"test: {shown}"
                     + (f"  val {main_metric} {choice:.2f}" if val is not None else "")
                     + f"  ({train_s:.0f} s)"
                     + (f"  skipped {train['train_skipped']}" if train["train_skipped"] else "")
                     + (f"  best on {chosen_on}" if improved else ""))
        save(cfg.run_dir, meta, net, optimizer, scaler, epoch + 1, step, best, history, improved)
        utils.barrier()
    return _results(cfg, multilabel, main_metric, best, history)


def _results(cfg, multilabel, main_metric, best, history):
    """The run's summary, printed and written to {run_dir}/results.json (rank 0).

    "headline" is the figure to report: the test metrics of the epoch best on --val, or,
    without --val, of the final epoch. "best" is the epoch best on the split it names in
    "chosen_on"; when that is "test", its figure was selected on the data it reports and
    is optimistic (the authors' code reports this one)."""
    results = {"task": "multilabel" if multilabel else "singlelabel", "main_metric": main_metric,
               "headline": None, "best": best, "final": history[-1] if history else None,
               "run_dir": cfg.run_dir, "config": dataclasses.asdict(cfg)}
    if best is not None:
        on_val = best.get("chosen_on") == "val"
        results["headline"] = {"chosen_by": "val" if on_val else "final epoch",
                               "epoch": best["epoch"] if on_val else history[-1]["epoch"],
                               "metrics": best["metrics"] if on_val else
                               {k: v for k, v in history[-1].items() if k in best["metrics"]}}
        head = results["headline"]
        line = (f"{main_metric} {head['metrics'][main_metric]:.2f} on test at epoch "
                f"{head['epoch']}, ")
        if on_val:
            line += f"the epoch best on --val ({os.path.join(cfg.run_dir, 'best.pt')})"
        else:
            line += (f"the final epoch; best on test {best['value']:.2f} at epoch "
                     f"{best['epoch']} (optimistic: chosen on test; give --val to choose fairly)")
        utils.print0(line)
    if utils.is_main():
        with open(os.path.join(cfg.run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    return results


# =============================================================================
# Building: data, model, optimiser
# =============================================================================

def build_data(cfg, mcfg, device):
    """(train loader, test loader, val loader or None, multilabel) at the model's input sizes."""
    train, test, label_csv = cfg.train, cfg.test, cfg.label_csv
    if train is None:
        paths = toy.ensure_toy_dataset(cfg.toy_root)  # generated on first use
        suffix = "_multilabel" if cfg.toy_multilabel else ""
        train, test = paths["train" + suffix], test or paths["test" + suffix]
        label_csv = label_csv or paths["label_csv"]
    if label_csv is None:
        raise ValueError("give --label_csv (index,mid,display_name) with --train")
    mean, std = data.resolve_norm_stats(cfg.norm_stats, train, None, mcfg.audio_length,
                                        mcfg.mel_bins)
    sizes = dict(audio_length=mcfg.audio_length, mel_bins=mcfg.mel_bins, norm_mean=mean,
                 norm_std=std, image_size=mcfg.image_size, label_csv=label_csv,
                 skip_bad=cfg.skip_bad)
    train_set = data.AudioVisualDataset(train, train=True, mixup=cfg.mixup,
                                        label_smoothing=cfg.label_smoothing, **sizes)
    # the test and validation splits are normalised like the training split
    test_set = data.AudioVisualDataset(test, train=False, **sizes)
    val_set = data.AudioVisualDataset(cfg.val, train=False, **sizes) if cfg.val else None
    if cfg.task != "auto":
        multilabel = cfg.task == "multilabel"
    else:
        multilabel = any(len(train_set.label_indices(i)) > 1 for i in range(len(train_set)))
    weights = None
    if cfg.weights_csv:
        weights = data.load_sample_weights(cfg.weights_csv, len(train_set))
    train_loader = data.make_loader(train_set, cfg.batch_size, train=True,
                                    num_workers=cfg.num_workers, seed=cfg.seed, weights=weights,
                                    num_samples=cfg.samples_per_epoch, pin_memory=device.type == "cuda")
    test_loader, val_loader = (
        data.make_loader(split, cfg.eval_batch_size, train=False, num_workers=cfg.num_workers,
                         seed=cfg.seed, pin_memory=device.type == "cuda") if split is not None else None
        for split in (test_set, val_set))
    world = utils.get_world_size()
    utils.print0(f"data: {len(train_set)} training clips, {len(test_set)} test clips, "
                 + (f"{len(val_set)} validation clips, " if val_set is not None else "")
                 + f"{train_set.num_classes} classes, {'multi' if multilabel else 'single'}-label "
                 f"({'BCE; mAP, mAUC, d' + chr(39) if multilabel else 'CE; top-1, top-5'}), "
                 f"{len(train_loader)} steps/epoch of {cfg.batch_size} x {world}"
                 + (f", class-balanced sampling from {cfg.weights_csv}" if weights is not None else ""))
    return train_loader, test_loader, val_loader, multilabel


def inspect_init(cfg):
    """(kind, ModelConfig) of the initialization: kind "equiav" (ours or the
    authors'), "mae" or "scratch", detected from the checkpoint's keys when
    --init_type is auto. The file is read through a memory map, so a large
    checkpoint is not loaded twice."""
    if cfg.init_type == "scratch":
        return "scratch", get_config(cfg.preset)
    convert.require_checkpoint(cfg.init, "init")
    state = convert.peek_checkpoint(cfg.init)
    found = convert.detect_format(state)
    if found == "ours":  # rebuilt with its own sizes
        return "equiav", ModelConfig(**state["model_config"])
    kind = cfg.init_type if cfg.init_type != "auto" else ("mae" if found == "mae" else "equiav")
    return kind, get_config(cfg.preset)


def build_model(cfg, kind, mcfg, num_classes, device):
    """(EquiAVClassifier initialised from cfg.init as `kind` says, AdamW, GradScaler),
    with the same new head on every rank; a linear probe freezes the encoders."""
    utils.seed_everything(cfg.seed)
    if kind == "equiav":
        equiav = convert.load_equiav(cfg.init, cfg.preset)
        net = EquiAVClassifier.from_pretrained(equiav, num_classes, cfg.mode, cfg.drop_path)
        utils.print0(f"initialised from EquiAV checkpoint {cfg.init}")
    else:
        net = EquiAVClassifier(mcfg, num_classes, cfg.mode, cfg.drop_path)
        if kind == "mae":
            convert.print_report(f"MAE checkpoint {cfg.init}",
                                 convert.load_mae_checkpoint(net, cfg.init))
        else:
            utils.print0(f"random initialization (preset {cfg.preset!r})")
    if cfg.linear_probe:
        for p in net.encoder_parameters():
            p.requires_grad_(False)
    net = net.to(device)
    n_train = sum(p.numel() for p in net.parameters() if p.requires_grad)
    utils.print0(f"model: {cfg.mode}, {'linear probe' if cfg.linear_probe else 'full fine-tuning'}, "
                 f"{n_train / 1e6:.2f}M trainable parameters; head lr x{cfg.head_lr_mult:g}")
    return net, make_optimizer(net, cfg), utils.make_grad_scaler(device, cfg.amp)


def make_optimizer(net, cfg):
    """AdamW with two parameter groups: the encoders at --lr and the head at
    --lr x --head_lr_mult. Each group's "lr_scale" is applied by utils.set_lr at
    every step (the public code overwrote all groups with one rate; method.md §9).
    A linear probe has only the head group."""
    groups = [{"params": net.head_parameters(), "lr_scale": cfg.head_lr_mult, "name": "head"}]
    if not cfg.linear_probe:
        groups.insert(0, {"params": net.encoder_parameters(), "lr_scale": 1.0, "name": "encoders"})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay)


# =============================================================================
# Checkpoints: checkpoint.pt after every epoch (resumed), best.pt for the best epoch
# =============================================================================

_RUN_KEYS = ("mode", "num_classes", "multilabel", "linear_probe")


def save(run_dir, meta, net, optimizer, scaler, epoch, step, best, history, improved):
    """Write checkpoint.pt (and best.pt when the epoch improved) atomically, rank 0.
    Resuming is epoch-granular and every epoch's randomness is a function of
    (seed, epoch, rank), as in pretrain.py."""
    if not utils.is_main():
        return
    if improved:
        utils.save_checkpoint({"model": net.state_dict(), "epoch": epoch,
                               "metrics": best["metrics"], **meta},
                              os.path.join(run_dir, "best.pt"))
    utils.save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "scaler": scaler.state_dict(), "epoch": epoch, "step": step,
                           "best": best, "history": history, **meta},
                          os.path.join(run_dir, "checkpoint.pt"))


def resume(run_dir, meta, net, optimizer, scaler):
    """Load {run_dir}/checkpoint.pt if present (refused when it holds another kind of
    run); returns (epochs done, step, best, history)."""
    path = os.path.join(run_dir, "checkpoint.pt")
    if not os.path.exists(path):
        return 0, 0, None, []
    ckpt = utils.load_checkpoint(path)
    found, expected = ({k: d[k] for k in _RUN_KEYS} for d in (ckpt, meta))
    if found != expected:
        raise ValueError(f"{path} holds a different run ({found}, this one {expected}); "
                         f"pass another --run_dir")
    net.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    utils.load_scaler_state(scaler, ckpt["scaler"], path)
    utils.print0(f"resumed from {path}: {ckpt['epoch']} epoch(s) done")
    return ckpt["epoch"], ckpt["step"], ckpt["best"], ckpt["history"]


# =============================================================================
# Fine-tuning SpecAugment, one epoch, evaluation
# =============================================================================

def finetune_specaugment(spec, generator):
    """SpecAugment on the fine-tuning input (method.md §11): augment.py's time and
    frequency masks (widths < 192 T/1024 frames and 48 F/128 bins, set to 0),
    and nothing else of the pretraining augmentations: the masks are copied
    into an identity vector. As in augment.py a clip is masked with p 0.8.
    spec (B, T, F) on any device -> (B, T, F). The vector stays on the CPU, where
    apply_audio reads its decisions (a GPU copy would be read back: a sync)."""
    b, T, F_ = spec.shape
    sampled = augment.sample_audio_params(b, generator, T=T, F=F_)
    return augment.apply_audio(spec, augment.only(sampled, augment.AUDIO_GROUPS["specaugment"]))


def _set_train_mode(net, linear_probe):
    net.train()
    if linear_probe:  # frozen encoders: no drop path
        for enc in (net.audio_encoder, net.visual_encoder):
            if enc is not None:
                enc.eval()


def _inputs(batch, mode, device):
    x_a = batch["audio"].to(device, non_blocking=True) if mode != "visual" else None
    x_v = None
    if mode != "audio":  # ImageNet normalisation last (method.md §1)
        x_v = augment.normalize_image(augment.frames_to(device, batch["frame"]))
    return x_a, x_v


def compute_loss(logits, targets, multilabel):
    """BCE for multi-label, cross-entropy with (mixed / smoothed) probability targets otherwise."""
    logits = logits.float()
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, targets)
    return F.cross_entropy(logits, targets)


def train_one_epoch(model, net, optimizer, scaler, loader, epoch, step, cfg, multilabel, device,
                    logger, bad_data=None):
    """One pass over `loader`; returns (global step, {"train_loss", "train_skipped"}).

    `bad_data` (a bad_data.BadDataPolicy, with --skip_bad) drops and counts bad samples;
    a step whose batch lost every sample on some rank is skipped on all ranks."""
    _set_train_mode(net, cfg.linear_probe)
    loader.sampler.set_epoch(epoch)
    gen = utils.seed_epoch(cfg.seed, epoch, utils.get_rank())  # SpecAugment; drop path (global)
    steps_per_epoch = len(loader)
    total_steps, warmup_steps = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    loss_sum, since = torch.zeros((), device=device), torch.zeros((), device=device)
    done = n_since = 0
    bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not utils.is_main(),
               dynamic_ncols=True, leave=False)
    for i, batch in enumerate(bar):
        if bad_data is not None:
            batch = bad_data.filter(batch)
            if batch is None:
                continue
        lr = utils.set_lr(optimizer, step, total_steps, warmup_steps, cfg)
        x_a, x_v = _inputs(batch, cfg.mode, device)
        if x_a is not None and cfg.specaug:
            x_a = finetune_specaugment(x_a, gen)
        y = batch["label"].to(device, non_blocking=True)
        with utils.autocast_context(device, cfg.amp):
            logits = model(x_a, x_v)
        loss = compute_loss(logits, y, multilabel)
        utils.optimizer_step(optimizer, scaler, loss, cfg.clip_grad)
        step, done, n_since = step + 1, done + 1, n_since + 1
        loss_sum += loss.detach()
        since += loss.detach()
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
    if bad_data is not None:
        bad_data.check()
    mean = utils.mean_over_ranks(loss_sum / max(done, 1)).item()
    return step, {"train_loss": mean,
                  "train_skipped": bad_data.skipped if bad_data is not None else 0}


@torch.no_grad()
def evaluate(net, loader, device, cfg, multilabel):
    """Scores of every test clip (gathered over ranks in dataset order) -> metrics
    dict (the same on every rank), with the mean loss under "loss". With
    --skip_bad, bad test clips are left out and counted under "test_skipped"."""
    net.eval()
    indices, scores, targets, skipped = [], [], [], 0
    for batch in loader:
        skipped += batch["skipped"]
        if batch["index"].numel() == 0:
            continue
        x_a, x_v = _inputs(batch, cfg.mode, device)
        with utils.autocast_context(device, cfg.amp):
            logits = net(x_a, x_v)
        indices.append(batch["index"].to(device, non_blocking=True))
        scores.append(logits.float())
        targets.append(batch["label"].to(device, non_blocking=True).float())
    if not indices:  # every clip of this rank was bad: an empty share of the gather
        c = loader.dataset.num_classes
        indices, scores, targets = ([torch.zeros(0, dtype=torch.long, device=device)],
                                    [torch.zeros(0, c, device=device)],
                                    [torch.zeros(0, c, device=device)])
    _, scores, targets = utils.gather_in_dataset_order(torch.cat(indices), torch.cat(scores),
                                                       torch.cat(targets))
    if scores.shape[0] == 0:
        raise data.DataError(f"{loader.dataset.manifest}: no test clip could be read")
    metrics = evaluation_metrics(scores.cpu(), targets.cpu(), multilabel)
    metrics["loss"] = compute_loss(scores, targets, multilabel).item()
    if cfg.skip_bad:
        metrics["test_skipped"] = int(utils.sum_over_ranks(torch.tensor(skipped, device=device)))
    return metrics


if __name__ == "__main__":
    utils.run_script(main, FinetuneConfig, __doc__.splitlines()[0], PROFILES)
