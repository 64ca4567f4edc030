"""Checkpoints from elsewhere (method.md §10): the authors' EquiAV release and ImageNet MAE.

Both load through explicit key maps that report the keys they could not place
(LoadReport), never silently. The authors' state dict is converted to our
names and conventions: prefixes stripped, the audio patch kernel summed over
its three input channels, the unused per-modality block norms and the loss
temperature dropped, and the public code's raw parameter-vector scales folded
into the first Linear of each augmentation encoder, so that the converted
model reproduces theirs on the same inputs and augmentations.

The last section is what the scripts share to open a pretrained model:
`load_equiav` tells our checkpoint from an authors' one, `detect_format` also
recognizes MAE, and `peek_checkpoint` reads a file's metadata without loading
its weights twice.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping, NamedTuple

import torch
import torch.nn as nn

import utils
from augment import AUDIO_SLOTS, VISUAL_SLOTS
from model import EquiAV, ModelConfig, get_config


# ---------------------------------------------------------------------------
# The authors' EquiAV checkpoint (method.md §10)
# ---------------------------------------------------------------------------


class LoadReport(NamedTuple):
    missing: list[str]     # our keys the checkpoint did not provide (kept as initialised)
    unexpected: list[str]  # checkpoint keys that have no place in the model (ignored)


def official_raw_affine(audio_length: int = 1024, mel_bins: int = 128) -> dict:
    """How the authors' code stored each slot: raw = scale * ours + offset.

    {"audio" | "visual": {slot name: (scale, offset)}}; slots not listed are
    stored identically, (1, 0). The single place these scales are written.
    """
    T, Fb = float(audio_length), float(mel_bins)
    order = {f"cj_order{i}": (3.0, 0.0) for i in range(4)}   # op index 0..3, ours /3
    audio = {
        "tmask_start": (T, 0.0), "tmask_end": (T, 0.0),          # raw frames
        "fmask_start": (Fb, 0.0), "fmask_end": (Fb, 0.0),        # raw bins
        # Public crop values were divided by the other axis' length.
        "rrc_time_start": (T / Fb, 0.0), "rrc_time_len": (T / Fb, 0.0),
        "rrc_freq_start": (Fb / T, 0.0), "rrc_freq_width": (Fb / T, 0.0),
        **order,
    }
    return {"audio": audio, "visual": dict(order)}


def _fold_raw_affine(weight, bias, slots: Mapping[str, int], table: Mapping[str, tuple]):
    """Fold raw = s * x + o into a Linear that read raw values: the weight
    column j is multiplied by s_j and the bias absorbs W @ o. Returns (W', b')."""
    scale = torch.ones(weight.shape[1], dtype=torch.float64)
    offset = torch.zeros(weight.shape[1], dtype=torch.float64)
    for name, (s, o) in table.items():
        scale[slots[name]], offset[slots[name]] = s, o
    w64 = weight.double()
    new_w = (w64 * scale[None, :]).to(weight.dtype)
    new_b = (bias.double() + w64 @ offset).to(bias.dtype)
    return new_w, new_b


_AUTHOR_PREFIXES = ("module.", "__M__.")
_UNUSED_BLOCK_NORMS = ("norm1_a", "norm1_v", "norm2_a", "norm2_v")


def _official_key_map() -> dict[str, str]:
    """Authors' key prefix -> our key prefix (method.md §10). A prefix ending in '.'
    matches sub-keys; others are whole keys."""
    m = {}
    for s, enc, d_t_name in (("a", "audio_encoder", "audio"), ("v", "visual_encoder", "visual")):
        pred = f"predictor_{s}"
        m.update({
            f"patch_embed_{s}.": f"{enc}.patch_embed.",
            f"modality_{s}": f"{enc}.modality_embed",
            f"pos_embed_{s}": f"{enc}.pos_embed",
            f"blocks_{s}.": f"{enc}.blocks.",
            f"norm_{s}.": f"{enc}.norm.",
            f"norm_{s}_aug.": f"{enc}.norm_aug.",
            f"aug_encoder_{s}.0.": f"{pred}.aug_encoder.fc1.",
            f"aug_encoder_{s}.2.": f"{pred}.aug_encoder.fc2.",
            f"aug_encoder_{s}.4.": f"{pred}.aug_encoder.fc3.",
            f"cross_attn_{s}.norm_aug.": f"{pred}.norm_aug.",
            f"cross_attn_{s}.attn.to_q.": f"{pred}.to_q.",
            f"cross_attn_{s}.attn.to_k.": f"{pred}.to_k.",
            f"cross_attn_{s}.attn.to_v.": f"{pred}.to_v.",
            f"cross_attn_{s}.attn.to_out.": f"{pred}.to_out.",
            f"cross_attn_{s}.norm.": f"{pred}.norm.",
            f"cross_attn_{s}.mlp.": f"{pred}.mlp.",
            f"pred_{s}_intra.": f"proj_intra_{s}.",
            f"pred_{s}_inter.": f"proj_inter_{s}.",
        })
    return m


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for p in _AUTHOR_PREFIXES:
            if key.startswith(p):
                key, stripped = key[len(p):], True
    return key


def _is_temperature(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1].lower()
    return "temp" in leaf or leaf == "logit_scale"


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor],
                                cfg: ModelConfig | None = None) -> dict[str, torch.Tensor]:
    """Authors' EquiAV state dict -> ours (method.md §10).

    Strips `module.` / `__M__.`, drops the loss temperature and the unused
    norm{1,2}_{a,v} block norms, renames every key, sums the audio patch kernel
    over its 3 input channels, and folds the public raw-vector scales (which
    depend on cfg's T and F; default the base sizes) into the first Linear of
    each augmentation encoder. Unknown keys are passed through unchanged so
    that loading reports them as unexpected.
    """
    cfg = cfg if cfg is not None else ModelConfig()
    key_map = _official_key_map()
    out = {}
    for key, value in state_dict.items():
        key = _strip_prefixes(key)
        if _is_temperature(key):
            continue
        parts = key.split(".")
        if parts[0] in ("blocks_a", "blocks_v") and len(parts) > 2 and parts[2] in _UNUSED_BLOCK_NORMS:
            continue
        new_key = key
        for src, dst in key_map.items():
            if key == src or (src.endswith(".") and key.startswith(src)):
                new_key = dst + key[len(src):]
                break
        out[new_key] = value

    kernel = "audio_encoder.patch_embed.proj.weight"
    if kernel in out and out[kernel].shape[1] == 3:
        # The public code repeats the spectrogram to 3 channels; summing the
        # kernel over them gives the same convolution on 1 channel.
        out[kernel] = out[kernel].sum(dim=1, keepdim=True)

    table = official_raw_affine(cfg.audio_length, cfg.mel_bins)
    for s, modality, slots in (("a", "audio", AUDIO_SLOTS), ("v", "visual", VISUAL_SLOTS)):
        w_key, b_key = f"predictor_{s}.aug_encoder.fc1.weight", f"predictor_{s}.aug_encoder.fc1.bias"
        if w_key in out and b_key in out:
            out[w_key], out[b_key] = _fold_raw_affine(out[w_key], out[b_key], slots, table[modality])
    return out


# ---------------------------------------------------------------------------
# Loading with a report (both formats)
# ---------------------------------------------------------------------------


def _read_state_dict(path_or_state_dict) -> dict[str, torch.Tensor]:
    if isinstance(path_or_state_dict, (str, os.PathLike)):
        sd = torch.load(path_or_state_dict, weights_only=True, map_location="cpu")
    else:
        sd = path_or_state_dict
    for wrapper in ("model", "state_dict"):
        if isinstance(sd.get(wrapper), Mapping):
            sd = sd[wrapper]
            break
    return dict(sd)


def _load_checked(model: nn.Module, state_dict: Mapping[str, torch.Tensor],
                  unexpected: list[str]) -> LoadReport:
    """Copy the keys the model has (after checking every shape), report the rest."""
    own = model.state_dict()
    for key, value in state_dict.items():
        if key in own and tuple(own[key].shape) != tuple(value.shape):
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(value.shape)} "
                             f"vs model {tuple(own[key].shape)}")
    usable = {k: v for k, v in state_dict.items() if k in own}
    unexpected = list(unexpected) + [k for k in state_dict if k not in own]
    model.load_state_dict(usable, strict=False)
    return LoadReport(missing=[k for k in own if k not in usable], unexpected=unexpected)


def load_official_checkpoint(model: nn.Module, path_or_state_dict) -> LoadReport:
    """Load the authors' pretrained EquiAV weights (method.md §10) into `model`
    (an EquiAV; for an EquiAVClassifier its encoders are filled). Keys in the
    report use our names; unknown authors' keys keep theirs."""
    sd = convert_official_state_dict(_read_state_dict(path_or_state_dict), model.cfg)
    return _load_checked(model, sd, [])


def load_mae_checkpoint(model: nn.Module, path_or_state_dict) -> LoadReport:
    """Initialise both encoders of an EquiAV or EquiAVClassifier from one
    ImageNet MAE ViT checkpoint (method.md §2, 10).

    Copied: patch embedding (audio kernel summed over RGB), blocks, and the
    final `norm` (into norm_m and, where present, norm_m_aug). Not copied:
    cls_token and pos_embed (our encoders have no class token and use the
    fixed sin-cos table); they and every decoder key are reported as
    unexpected, under their MAE names.
    """
    mae = {_strip_prefixes(k): v for k, v in _read_state_dict(path_or_state_dict).items()}
    own = model.state_dict()
    mapped, used = {}, set()
    for name in ("audio_encoder", "visual_encoder"):
        encoder = getattr(model, name, None)
        if encoder is None:
            continue
        for key, value in mae.items():
            if key.startswith(("patch_embed.", "blocks.")):
                targets = [f"{name}.{key}"]
                if key == "patch_embed.proj.weight" and encoder.patch_embed.proj.in_channels == 1:
                    value = value.sum(dim=1, keepdim=True)  # RGB kernel -> 1-channel spectrogram
            elif key.startswith("norm."):
                targets = [f"{name}.{key}", f"{name}.norm_aug.{key[len('norm.'):]}"]
            else:
                continue
            for target in targets:
                if target in own:
                    mapped[target] = value
                    used.add(key)
    unexpected = [k for k in mae if k not in used]
    return _load_checked(model, mapped, unexpected)


# ---------------------------------------------------------------------------
# Opening a pretrained model (finetune.py, retrieval.py)
# ---------------------------------------------------------------------------

TOY_CHECKPOINT = os.path.join("runs", "pretrain_toy", "checkpoint.pt")  # `python pretrain.py` writes it


def require_checkpoint(path, option):
    """Fail when `path` is missing, saying what to do: for the toy checkpoint, the
    command that writes it; otherwise which option to check."""
    if os.path.exists(path):
        return
    if os.path.normpath(path) == os.path.normpath(TOY_CHECKPOINT):
        hint = f"run `python pretrain.py` first (toy data, a few minutes on CPU) or pass --{option} PATH"
    else:
        hint = f"check --{option}"
    raise FileNotFoundError(f"no checkpoint at {path}: {hint}")


def peek_checkpoint(path):
    """torch.load through a memory map, so that metadata can be read without reading
    the weights (a file in torch's zip format; an older file is loaded whole)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # not a zip-format file: mmap is not possible
        return utils.load_checkpoint(path)


def detect_format(state) -> str:
    """"ours" (a pretrain.py checkpoint: it carries "model_config"), "mae" (one ViT:
    cls_token, blocks.{i}) or "authors" (blocks_a / blocks_v) from a loaded file."""
    if "model_config" in state:
        return "ours"
    sd = state.get("model", state.get("state_dict", state))
    keys = {_strip_prefixes(k) for k in sd}
    return "mae" if "cls_token" in keys or any(k.startswith("blocks.") for k in keys) else "authors"


def model_flags(state) -> dict:
    """The EquiAV switches our checkpoint `state` was trained with, {"inter_target",
    "equivariant"}; checkpoints from before inter_target stored "use_centroid"."""
    flags = dict(state.get("model_flags", {}))
    if "use_centroid" in flags:
        flags["inter_target"] = "centroid" if flags.pop("use_centroid") else "original"
    return {"inter_target": flags.get("inter_target", "centroid"),
            "equivariant": flags.get("equivariant", True)}


def check_same_model(path, ckpt, mcfg, flags):
    """Raise unless checkpoint `ckpt` (read from `path`) holds the model that ModelConfig
    mcfg and the flags {"inter_target", "equivariant"} build. Fields a checkpoint predates
    (such as the predictor kind) take their defaults."""
    stored = dataclasses.asdict(ModelConfig(**ckpt.get("model_config", {})))
    if stored["predictor"] != mcfg.predictor:
        raise ValueError(f"{path} holds a model with the {stored['predictor']} transformation "
                         f"predictor; this command builds the {mcfg.predictor} one: give "
                         f"--predictor {stored['predictor']}"
                         + (", or another --run_dir" if path.endswith("checkpoint.pt") else ""))
    if stored != dataclasses.asdict(mcfg) or model_flags(ckpt) != flags:
        raise ValueError(
            f"{path} holds a different model ({stored}, {model_flags(ckpt)}) "
            f"than this command builds ({dataclasses.asdict(mcfg)}, {flags}): give the same "
            f"--preset/--model_overrides/--predictor/--inter_target/--equivariant"
            + (", or another --run_dir" if path.endswith("checkpoint.pt") else ""))


def print_report(what: str, report: LoadReport) -> None:
    """One line of counts, then the keys (at most 12 of each kind), on rank 0."""
    utils.print0(f"loaded {what}: {len(report.missing)} missing, "
                 f"{len(report.unexpected)} unexpected keys")
    for name, keys in (("missing", report.missing), ("unexpected", report.unexpected)):
        if keys:
            shown = ", ".join(keys[:12]) + (f", ... ({len(keys) - 12} more)" if len(keys) > 12 else "")
            utils.print0(f"  {name}: {shown}")


def load_equiav(path, preset="base") -> EquiAV:
    """An EquiAV from our checkpoint (rebuilt exactly) or an authors' state dict.

    Our checkpoints carry "model_config" and "model_flags"; anything else is
    taken as an authors' EquiAV state dict and loaded through the method.md §10
    conversion into an EquiAV of `preset` (a preset name or a ModelConfig).
    """
    state = utils.load_checkpoint(path)
    if detect_format(state) == "ours":
        net = EquiAV(ModelConfig(**state["model_config"]), **model_flags(state))
        net.load_state_dict(state["model"])
        return net
    net = EquiAV(preset if isinstance(preset, ModelConfig) else get_config(preset))
    print_report(f"authors' EquiAV checkpoint {path}", load_official_checkpoint(net, state))
    return net


# ---------------------------------------------------------------------------
# A new pretraining run's weights (pretrain.py; resuming its own checkpoint is there,
# next to what it saves)
# ---------------------------------------------------------------------------

def pretraining_flags(cfg):   # what a pretrain.py config builds beyond its ModelConfig
    return {"inter_target": cfg.inter_target, "equivariant": cfg.equivariant}


def init_weights(cfg, mcfg, net):
    """A new run's start: --init_mae, --init_official or --init_from (our checkpoint of the
    same model), each with its report; none of them leaves net as built."""
    if cfg.init_mae:
        print_report(f"ImageNet MAE checkpoint {cfg.init_mae}",
                     load_mae_checkpoint(net, cfg.init_mae))
    elif cfg.init_official:
        if mcfg.predictor != "attention":
            raise utils.UsageError(f"--init_official holds the authors' attention predictor; "
                                   f"--predictor {mcfg.predictor} has no weights there")
        print_report(f"authors' EquiAV checkpoint {cfg.init_official}",
                     load_official_checkpoint(net, cfg.init_official))
    elif cfg.init_from:
        source = utils.load_checkpoint(cfg.init_from)
        check_same_model(cfg.init_from, source, mcfg, pretraining_flags(cfg))
        net.load_state_dict(source["model"])
        utils.print0(f"initialised from {cfg.init_from}")
