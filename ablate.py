"""The paper's ablations at toy scale, rebuilt by one command, with error bars.

    python ablate.py                               # every row, seed 0 (hours on 2 cores)
    python ablate.py --rows default,invariant --seeds 5
    python ablate.py --quick                       # 1 epoch, 2 seeds, a tiny toy: a smoke run
    python ablate.py --rows default,invariant --seeds 3 --epochs 10,30   # by training length
    python ablate.py --rows inter_augmented --views true   # + which views stop that target
    python ablate.py --rows default,invariant --seeds 3 --train_clips 20000 --epochs 1,3
                                                   # a 10x training set, the same steps

Rows (the switches of the paper's ablation tables, as read from the authors'
poster; AudioSet zero-shot R@1, V->A / A->V):
- intra-modal loss: equivariant (default) against invariant (`--equivariant false`);
- inter-modal target (`--inter_target`): the centroid (default), the originals,
  the augmented views, the single equivariant predictions;
- centroid samples `--S` 1 / 4 / 8 (16 is the default);
- transformation predictor (`--predictor`): attention (default), linear, hypernetwork (the
  last two in our forms, method.md §4.2, 4.3).

Each row is the command a reader would type, `python pretrain.py` with the row's
flags (plus --seed, --run_dir and the given --pretrain_args), then the linear
probe `python finetune.py --linear_probe true --init RUN/checkpoint.pt` (plus
--finetune_args). Both are run in this process through the scripts' own
parse_config and main, and printed first. The numbers come from what the scripts
wrote: the last epoch of the run's log.jsonl (retrieval, and the equivariance
measures of retrieval.equivariance_metrics) and the probe's results.json.

Every finished run is then scored again on --score_data, a held-out split larger than the
one pretraining evaluates on (the toy writes 3,000 more test clips by its own rules into
data/toy_eval), in galleries of --gallery clips (300, the size of the toy's retrieval split,
so that R@k means what it meant there), averaged over the galleries; the evaluation's own
noise is a bootstrap over the clips of the first gallery. Per row: mean ± sd over seeds of
a->v and v->a R@1 and R@10, and the paired difference to the default row on the same seeds
with a 95 % t-interval, and whether that agrees with the paper's direction.

Runs already finished under --out are reused (pretrain.py finds its checkpoint
complete, a probe with a results.json is not run again), so a later call can add
seeds or rows; the tables list every requested row and every seed found for it.
Writes {out}/ablation.md (markdown tables, the paper's numbers beside ours) and
{out}/ablation.json.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import shlex
import types

import torch

import augment
import convert
import data
import finetune
import pretrain
import retrieval
import toy
import utils
from utils import option


@dataclasses.dataclass
class AblateConfig:
    """Every field is a `--field value` option."""
    rows: str = option("all", "comma-separated rows (see ROWS) or 'all'")
    seeds: int = option(1, "seeds 0 .. seeds-1 for every requested row")
    epochs: str = option("0", "pretraining epochs of every run; 0 -> the profile's (toy: 10); "
                              "several (10,30): every row at each length, and a table of the "
                              "rows' differences by length; other lengths run apart (RUN_e{N})")
    train_clips: int = option(0, "training clips of the toy; 0 -> the toy's own 2,000 "
                                 "(data/toy); N -> a toy of N training clips drawn by the same "
                                 "rules (data/toy_n{N}, generated if absent), its warm-up kept "
                                 "at the 2,000-clip runs' steps; its runs are RUN_n{N}[_e{E}]")
    out: str = option("runs/ablate", "run folders, ablation.md and ablation.json go here")
    probe: bool = option(True, "also run the linear probe of each pretraining run")
    pretrain_args: str = option("", "more pretrain.py options for every run, e.g. "
                                    "'--toy_root data/toy'")
    finetune_args: str = option("", "more finetune.py options for every probe")
    score_data: str = option("auto", "held-out manifest every run is scored on at the end; auto "
                                     "-> the toy's larger eval split (data/toy_eval, generated "
                                     "if absent); none -> the runs' own last evaluation")
    gallery: int = option(300, "clips per retrieval gallery when scoring on --score_data")
    bootstrap: int = option(1000, "bootstrap resamples of the first gallery's clips")
    quick: bool = option(False, "smoke run: 1 epoch, 2 seeds, default and invariant rows, a "
                                "tiny toy and model under --out")
    survival: bool = option(True, "measure what survives the views on the toy (see survival)")
    vggss: str = option("", "VGG-SS's metadata/vggss.json: also measure how much of its boxes "
                            "the visual crop keeps")
    views: bool = option(False, "also run the view diagnostic (VIEW_DIAGNOSTIC): the augmented "
                                "inter target with some views kept, 3 epochs each, seed 0")


# name -> (pretrain.py flags, what it is, the paper's R@1 V->A, A->V (None: not given))
ROWS = {
    "default": ([], "equivariant intra + centroid inter, S = 16", (30.1, 29.6)),
    "invariant": (["--equivariant", "false"], "invariant intra-modal loss", (25.2, 24.3)),
    "inter_original": (["--inter_target", "original"], "inter target: originals", (28.7, 28.5)),
    "inter_augmented": (["--inter_target", "augmented"], "inter target: augmented views",
                        (28.1, 27.5)),
    "inter_equivariant": (["--inter_target", "equivariant"],
                          "inter target: single equivariant predictions", (27.8, 27.4)),
    "S1": (["--S", "1"], "centroid of S = 1", (27.8, None)),
    "S4": (["--S", "4"], "centroid of S = 4", (28.3, None)),
    "S8": (["--S", "8"], "centroid of S = 8", (29.4, None)),
    "predictor_linear": (["--predictor", "linear"], "linear transformation predictor",
                         (28.2, 27.5)),
    "predictor_hypernetwork": (["--predictor", "hypernetwork"],
                               "hypernetwork transformation predictor", (29.6, 29.6)),
}
# The paper's predictor similarity, audio / visual, of the rows that report it: its
# predictor-architecture ablation.
PAPER_SIMILARITY = {"default": (0.90, 0.92), "predictor_linear": (0.85, 0.87),
                    "predictor_hypernetwork": (0.87, 0.90)}


TOY_TRAIN_CLIPS = 2000   # toy.make_toy_dataset's n_train: the toy's own training set


def toy_root_of(cfg):
    """Where the runs' toy lives: data/toy (or --toy_root in --pretrain_args), or
    data/toy_n{N} for --train_clips N."""
    if cfg.train_clips and cfg.train_clips != TOY_TRAIN_CLIPS:
        return os.path.join("data", f"toy_n{cfg.train_clips}")
    args = shlex.split(cfg.pretrain_args + " --toy_root data/toy")
    return args[args.index("--toy_root") + 1]


def commands(cfg, row, seed):
    """(run_dir, pretrain.py argv, finetune.py argv) of one row and seed. A run's training
    set and length are part of its identity: its folder is {row}_s{seed}, plus _n{clips}
    when --train_clips is not the toy's own 2,000, plus _e{epochs} when the run's epochs
    (--epochs, else --pretrain_args', else the profile's) are not the profile's own, so that
    a run is only ever reused for a run of its data and length. With --train_clips N the
    warm-up is set in epochs of N clips to last as many steps as the 2,000-clip runs' does."""
    given = utils.parse_config(pretrain.PretrainConfig, shlex.split(cfg.pretrain_args),
                               profiles=pretrain.PROFILES)
    resolved = pretrain.resolve_config(given)
    length = int(cfg.epochs) or resolved.epochs
    epochs = ["--epochs", str(length)] if int(cfg.epochs) else []
    suffix = "" if length == pretrain.PROFILES[resolved.profile]["epochs"] else f"_e{length}"
    data_args = []
    if cfg.train_clips and cfg.train_clips != TOY_TRAIN_CLIPS:
        suffix = f"_n{cfg.train_clips}" + suffix
        per_epoch = (TOY_TRAIN_CLIPS // resolved.batch_size, cfg.train_clips // resolved.batch_size)
        warmup = resolved.warmup_epochs * per_epoch[0] / per_epoch[1]   # the same steps
        data_args = ["--toy_root", toy_root_of(cfg), "--warmup_epochs", f"{warmup:.6g}"]
    run_dir = os.path.join(cfg.out, f"{row}_s{seed}{suffix}")
    pre = (ROWS[row][0] + ["--seed", str(seed), "--run_dir", run_dir] + epochs + data_args
           + shlex.split(cfg.pretrain_args))
    probe = (["--linear_probe", "true", "--init", os.path.join(run_dir, "checkpoint.pt"),
              "--run_dir", os.path.join(run_dir, "probe"), "--seed", str(seed)]
             + shlex.split(cfg.finetune_args))
    return run_dir, pre, probe


def run_row(cfg, row, seed):
    """Run (or reuse) one pretraining run and its probe; returns their results."""
    run_dir, pre, probe = commands(cfg, row, seed)
    print(f"\n$ python pretrain.py {shlex.join(pre)}", flush=True)
    pretrain.main(utils.parse_config(pretrain.PretrainConfig, pre, profiles=pretrain.PROFILES))
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    last = [r for r in log if r["type"] == "epoch"][-1]
    training = training_curve(log)
    result = {"row": row, "seed": seed, "run_dir": run_dir, "epochs": last["epoch"],
              "steps": last["step"], "train_clips": cfg.train_clips or TOY_TRAIN_CLIPS,
              "retrieval": last.get("retrieval"), "equivariance": last.get("equivariance"),
              "training": training,
              "probe_top1": None, "pretrain_command": "python pretrain.py " + shlex.join(pre)}
    if cfg.probe:
        results_path = os.path.join(run_dir, "probe", "results.json")
        print(f"$ python finetune.py {shlex.join(probe)}", flush=True)
        if not os.path.exists(results_path):
            finetune.main(utils.parse_config(finetune.FinetuneConfig, probe,
                                             profiles=finetune.PROFILES))
        with open(results_path) as f:
            final = json.load(f)["final"]
        result.update(probe_top1=final.get("top1", final.get("mAP")),
                      probe_command="python finetune.py " + shlex.join(probe))
    return result


def training_curve(log):
    """Did the inter-modal loss learn in training? L_inter and the a->v training accuracy of
    the first and last log windows of a run's log.jsonl records."""
    steps = [r for r in log if r["type"] == "step"]
    return {f"{k}_{when}": r[k] for when, r in (("first", steps[0]), ("last", steps[-1]))
            for k in ("inter", "acc_a2v")}


def _curve(tr, key):
    return f"{_f(tr[key + '_first'], 2)} → {_f(tr[key + '_last'], 2)}"


# ---------------------------------------------------------------------------
# Scoring the finished runs on a larger split, and the statistics over seeds
# ---------------------------------------------------------------------------

METRICS = ("a2v_R@1", "v2a_R@1", "a2v_R@10", "v2a_R@10")
# Two-sided 95 % quantiles of Student's t for 1..10 degrees of freedom (then the normal's).
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def score_run(run_dir, manifest, gallery=300, bootstrap=1000, seed=0):
    """R@1 / R@10 of a run's checkpoint on `manifest`, in consecutive galleries of `gallery`
    clips (a remainder is dropped), averaged over the galleries; with the bootstrap sd of
    each over the clips of the first gallery (the evaluation's own noise at that size)."""
    model = convert.load_equiav(os.path.join(run_dir, "checkpoint.pt")).eval()
    stats = convert.peek_checkpoint(os.path.join(run_dir, "checkpoint.pt"))["norm_stats"]
    c = model.cfg
    dataset = data.AudioVisualDataset(manifest, train=False, norm_mean=stats[0],
                                      norm_std=stats[1], audio_length=c.audio_length,
                                      mel_bins=c.mel_bins, image_size=c.image_size)
    loader = data.make_loader(dataset, 64, train=False, num_workers=0, distributed=False)
    z_a, z_v = retrieval.extract_embeddings(model, loader, torch.device("cpu"), seed=seed)
    n = (len(dataset) // gallery) * gallery
    if n == 0:
        raise utils.UsageError(f"--score_data {manifest}: fewer clips than --gallery {gallery}")
    hits = {}                                     # metric -> (n,) 0/1 per clip
    for start in range(0, n, gallery):
        a, v = z_a[start:start + gallery], z_v[start:start + gallery]
        for name, (q, k) in (("a2v", (a, v)), ("v2a", (v, a))):
            rank = retrieval.clip_ranks(q, k)
            for r in (1, 10):
                hits.setdefault(f"{name}_R@{r}", []).append((rank <= r).double())
    hits = {key: torch.cat(parts) for key, parts in hits.items()}
    g = torch.Generator().manual_seed(seed)
    resample = torch.randint(0, gallery, (bootstrap, gallery), generator=g)
    out = {"clips": n, "galleries": n // gallery}
    for key, h in hits.items():
        out[key] = 100.0 * h.mean().item()
        out[f"{key}_boot_sd"] = 100.0 * h[:gallery][resample].mean(dim=1).std().item()
    return out


def _mean_sd(values):
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def row_statistics(results, scores_key="score"):
    """Per row: seeds, mean and sd of each metric, and (rows other than default) the paired
    difference to default over the seeds both have, with its 95 % t-interval."""
    by_row = {}
    for r in results:
        by_row.setdefault(r["row"], {})[r["seed"]] = r[scores_key]
    stats = {}
    for row, seeds in by_row.items():
        entry = {"seeds": sorted(seeds)}
        for key in METRICS:
            entry[key] = _mean_sd([seeds[s][key] for s in sorted(seeds)])
        base = by_row.get("default", {})
        shared = sorted(set(seeds) & set(base))
        if row != "default" and len(shared) >= 2:
            for key in METRICS:
                m, sd = _mean_sd([seeds[s][key] - base[s][key] for s in shared])
                t = T_975[len(shared) - 2] if len(shared) - 1 <= len(T_975) else 1.96
                half = t * sd / math.sqrt(len(shared))
                entry[f"diff_{key}"] = {"n": len(shared), "mean": m, "sd": sd,
                                        "ci95": (m - half, m + half)}
        stats[row] = entry
    return stats


def verdict(row, entry):
    """The toy against the paper's direction for R@1 (both directions pooled): the paper's
    gap to the default row, and whether the 95 % interval of ours has its sign."""
    paper = ROWS[row][2]
    if row == "default" or "diff_a2v_R@1" not in entry:
        return "–"
    gaps = [p - d for p, d in zip(paper, ROWS["default"][2]) if p is not None]
    sign = 1 if sum(gaps) > 0 else -1
    lows = [entry[f"diff_{k}"]["ci95"][0] for k in ("a2v_R@1", "v2a_R@1")]
    highs = [entry[f"diff_{k}"]["ci95"][1] for k in ("a2v_R@1", "v2a_R@1")]
    if all((lo > 0 if sign > 0 else hi < 0) for lo, hi in zip(lows, highs)):
        return "agrees"
    if all((hi < 0 if sign > 0 else lo > 0) for lo, hi in zip(lows, highs)):
        return "contradicts"
    return "cannot tell"


def statistics_table(stats):
    """The markdown table of row_statistics: mean ± sd, paired difference [95 % CI]."""
    head = ("| row | seeds | a→v R@1 | v→a R@1 | a→v R@10 | v→a R@10 | Δ a→v R@1 [95 % CI] | "
            "Δ v→a R@1 [95 % CI] | paper R@1 V→A / A→V | toy vs paper |")
    lines = [head, "|" + "---|" * 10]
    for row, e in stats.items():
        cells = [f"{e[k][0]:.1f} ± {e[k][1]:.1f}" for k in METRICS]
        diffs = []
        for k in ("a2v_R@1", "v2a_R@1"):
            d = e.get(f"diff_{k}")
            diffs.append("–" if d is None else
                         f"{d['mean']:+.1f} [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]")
        paper = ROWS[row][2]
        lines.append(f"| {row} | {len(e['seeds'])} | " + " | ".join(cells + diffs)
                     + f" | {_f(paper[0])} / {_f(paper[1])} | {verdict(row, e)} |")
    return "\n".join(lines) + "\n"


def length_table(by_length, results):
    """Each row's paired difference to default [95 % CI] at each training length, R@1 and
    R@10 both ways; then each row's predictor similarity and augmentation-awareness R²
    (mean over seeds) at each length."""
    lines = ["| row − default | epochs | seeds | " + " | ".join(f"Δ {k} [95 % CI]" for k in METRICS)
             + " |", "|" + "---|" * (3 + len(METRICS))]
    for n, stats in by_length.items():
        for row, e in stats.items():
            if row == "default" or f"diff_{METRICS[0]}" not in e:
                continue
            d = [e[f"diff_{k}"] for k in METRICS]
            lines.append(f"| {row} | {n} | {d[0]['n']} | " + " | ".join(
                f"{x['mean']:+.1f} [{x['ci95'][0]:+.1f}, {x['ci95'][1]:+.1f}]" for x in d) + " |")
    groups = {m: list(results[0]["equivariance"][f"r2_{m}"]) for m in ("a", "v")}
    head = ("| row | epochs | similarity A / V | " + " | ".join(
        f"R² {m.upper()} {g}" for m in ("a", "v") for g in groups[m]) + " |")
    eq = [head, "|" + "---|" * (3 + len(groups["a"]) + len(groups["v"]))]
    for n in by_length:
        for row in dict.fromkeys(r["row"] for r in results):
            runs = [r["equivariance"] for r in results if r["row"] == row and r["epochs"] == n]
            if not runs:
                continue
            sim = [sum(x[f"similarity_{m}"] for x in runs) / len(runs) for m in ("a", "v")]
            r2 = [sum(x[f"r2_{m}"][g] for x in runs) / len(runs)
                  for m in ("a", "v") for g in groups[m]]
            eq.append(f"| {row} | {n} | {_f(sim[0], 3)} / {_f(sim[1], 3)} | "
                      + " | ".join(_f(v, 2) for v in r2) + " |")
    return "\n".join(lines) + "\n\nMean over seeds:\n\n" + "\n".join(eq) + "\n"


# ---------------------------------------------------------------------------
# Why the augmented inter target fails here: what of the object survives a view
# ---------------------------------------------------------------------------

def crop_coverage(boxes, generator, size=96):
    """Share of each box [x0, y0, x1, y1] (fractions of the model's square crop) inside one
    visual resized crop drawn as training draws them (augment.sample_visual_params). (n,)"""
    boxes = torch.as_tensor(boxes, dtype=torch.float64)
    t = augment.sample_visual_params(len(boxes), generator, size, size).double()
    crop = {k: t[:, augment.VISUAL_SLOTS[k]] for k in augment.VISUAL_GROUPS["crop"]}
    x0 = torch.maximum(boxes[:, 0], crop["rrc_left"])
    x1 = torch.minimum(boxes[:, 2], crop["rrc_left"] + crop["rrc_width"])
    y0 = torch.maximum(boxes[:, 1], crop["rrc_top"])
    y1 = torch.minimum(boxes[:, 3], crop["rrc_top"] + crop["rrc_height"])
    inside = (x1 - x0).clamp(min=0) * (y1 - y0).clamp(min=0)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inside / area.clamp(min=1e-12)


def pulse_energy_kept(power, generator):
    """Share of each clip's pulse energy inside one audio crop drawn as training draws it.
    power (n, T, F): mel power (exp of the un-normalized log-mel); the pulses are what rises
    above each bin's median over time (the stationary background). (n,)"""
    n, T, F = power.shape
    pulses = (power - power.median(dim=1, keepdim=True).values).clamp(min=0)
    t = augment.sample_audio_params(n, generator, T, F)
    kept = []
    for b in range(n):
        start, width = (round(float(t[b, augment.AUDIO_SLOTS[k]]) * size) for k, size in
                        (("rrc_time_start", T), ("rrc_time_len", T)))
        low, band = (round(float(t[b, augment.AUDIO_SLOTS[k]]) * size) for k, size in
                     (("rrc_freq_start", F), ("rrc_freq_width", F)))
        total = pulses[b].sum()
        kept.append((pulses[b, start:start + width, low:low + band].sum() / total).item()
                    if total > 0 else float("nan"))
    return torch.tensor(kept)


def survival(toy_root, seed=0, vggss=""):
    """On the toy's training clips, with one view each as training samples it: how much of
    the object's box the visual crop keeps, how much of the sound's pulse energy the audio
    crop keeps, and the fixed-feature class accuracy under the views (toy.cue_check); with
    --vggss, the same box coverage for VGG-SS's annotated boxes."""
    paths = toy.toy_paths(toy_root)
    entries = data.read_manifest(paths["train"])
    g = torch.Generator().manual_seed(seed)
    size = 96
    boxes = [data.box_in_crop(e["boxes"][data.EVAL_FRAME][e["sounding"][0]], e["frame_size"],
                              size) for e in entries]
    cover = crop_coverage(boxes, g, size)
    raw = data.AudioVisualDataset(paths["train"], train=False, norm_mean=0.0, norm_std=1.0,
                                  audio_length=256, mel_bins=64, image_size=size)
    power = torch.stack([raw[i]["audio"] for i in range(min(len(raw), 500))]).exp()
    kept = pulse_energy_kept(power, g)
    out = {"visual_box_kept_mean": cover.mean().item(),
           "visual_box_kept_half_or_more": (cover >= 0.5).double().mean().item(),
           "visual_box_lost": (cover == 0).double().mean().item(),
           "audio_pulse_energy_kept_mean": kept.nanmean().item(),
           "audio_pulse_energy_kept_half_or_more": (kept >= 0.5).double().mean().item(),
           "cue_check": toy.cue_check(toy_root, seed=seed)}
    if vggss:
        with open(vggss) as f:
            real = [box for clip in json.load(f) for box in clip["bbox"]]
        real_cover = crop_coverage(real, g, 224)
        out.update(vggss_boxes=len(real), vggss_box_kept_mean=real_cover.mean().item(),
                   vggss_box_kept_half_or_more=(real_cover >= 0.5).double().mean().item(),
                   vggss_box_lost=(real_cover == 0).double().mean().item())
    return out


def _pairs(record, digits):
    """{name: number or dict} -> "name value, ..." on one line (nested dicts in brackets)."""
    def show(v):
        if isinstance(v, dict):
            return "(" + _pairs(v, 1) + ")"
        return _f(v, digits) if isinstance(v, float) else str(v)
    return ", ".join(f"{k} {show(v)}" for k, v in record.items())


def _f(value, digits=1):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def tables(results):
    """The markdown of ablation.md: retrieval, probe and similarity per run, then R^2."""
    head = ("| row | seed | epochs (steps) | a→v R@1 / 5 / 10 | v→a R@1 / 5 / 10 | probe top-1 | "
            "similarity A / V (identity t) | train L_inter, a→v acc: first → last log | "
            "paper R@1 V→A / A→V |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        ret, eq = r["retrieval"], r["equivariance"]
        rec = {d: " / ".join(_f(ret[f"{d}_R@{k}"]) for k in (1, 5, 10)) for d in ("a2v", "v2a")}
        paper = ROWS[r["row"]][2]
        sim = (f"{_f(eq['similarity_a'], 3)} / {_f(eq['similarity_v'], 3)} "
               f"({_f(eq['identity_similarity_a'], 3)} / {_f(eq['identity_similarity_v'], 3)})")
        if r["row"] in PAPER_SIMILARITY:
            paper_sim = PAPER_SIMILARITY[r["row"]]
            sim += f"; paper {paper_sim[0]:.2f} / {paper_sim[1]:.2f}"
        curve = f"{_curve(r['training'], 'inter')}, {_curve(r['training'], 'acc_a2v')}"
        lines.append(f"| {r['row']} | {r['seed']} | {r['epochs']} ({r['steps']}) | {rec['a2v']} | "
                     f"{rec['v2a']} | "
                     f"{_f(r['probe_top1'])} | {sim} | {curve} | {_f(paper[0])} / {_f(paper[1])} |")
    groups = {m: list(results[0]["equivariance"][f"r2_{m}"]) for m in ("a", "v")}
    r2_head = ("| row | seed | epochs | " + " | ".join(f"A {g}" for g in groups["a"]) + " | "
               + " | ".join(f"V {g}" for g in groups["v"]) + " |")
    r2 = [r2_head, "|" + "---|" * (3 + len(groups["a"]) + len(groups["v"]))]
    for r in results:
        cells = [_f(r["equivariance"][f"r2_{m}"][g], 2) for m in ("a", "v") for g in groups[m]]
        r2.append(f"| {r['row']} | {r['seed']} | {r['epochs']} | " + " | ".join(cells) + " |")
    return ("Zero-shot retrieval (%) on the held-out split, linear-probe top-1 (%), "
            "predictor similarity:\n\n" + "\n".join(lines)
            + "\n\nAugmentation awareness, R² of a ridge regression from the augmented "
              "view's intra-modal embedding to t, per augmentation:\n\n" + "\n".join(r2) + "\n")


def quick_config(cfg):
    """--quick: 1 epoch, 2 seeds, default and invariant, a tiny toy and model under --out."""
    root = os.path.join(cfg.out, "toy")
    toy.ensure_toy_dataset(root, n_train=16, n_test=8, n_retrieval=8, n_train_multilabel=0,
                           n_test_multilabel=0, n_distractor=0, num_workers=0)
    small = ("embed_dim=64,depth=1,num_heads=2,aug_hidden=32,pred_heads=2,pred_head_dim=16,"
             "proj_hidden=64,proj_dim=32")
    common = f"--toy_root {root} --device cpu --num_workers 0 --batch_size 4 --log_every 1"
    return dataclasses.replace(
        cfg, rows="default,invariant", seeds=2, epochs="1", probe=False, gallery=4, bootstrap=50,
        pretrain_args=(f"{common} --model_overrides {small} --S 2 --eval_batch_size 8 "
                       f"--cpu_threads 1 " + cfg.pretrain_args).strip())


def score_manifest(cfg):
    """The manifest the finished runs are scored on (None: their own last evaluation)."""
    if cfg.score_data == "none":
        return None
    if cfg.score_data != "auto":
        utils.require_files(cfg, "score_data")
        return cfg.score_data
    root = os.path.join(cfg.out, "toy_eval") if cfg.quick else os.path.join("data", "toy_eval")
    n = 8 if cfg.quick else 3000   # the toy's own rules, another seed: new clips of its world
    return toy.ensure_toy_dataset(root, n_train=0, n_test=n, n_retrieval=n, n_train_multilabel=0,
                                  n_test_multilabel=0, n_distractor=0, seed=1)["test"]


def shared_clips(train_manifest, score_manifest):
    """How many clips the two manifests share, by content: the SHA-1 of each clip's sound
    file (the toy draws a clip's sound and picture from one random stream, so equal sounds
    mean one clip). -> (shared, clips in train_manifest, clips in score_manifest)."""
    def digests(manifest):
        root = os.path.dirname(os.path.abspath(manifest))
        with_paths = [os.path.join(root, e["wav"]) for e in data.read_manifest(manifest)]
        return {hashlib.sha1(open(p, "rb").read()).hexdigest() for p in with_paths}
    a, b = digests(train_manifest), digests(score_manifest)
    return len(a & b), len(a), len(b)


def noise(results, stats):
    """The two sources of spread in R@1: the evaluation's (bootstrap over one gallery's
    clips, mean over runs) and training's (sd over seeds of the default row), and the range
    of the paired intervals' half-widths over the rows: the effects the table can resolve
    (the smallest is one lucky row's, so both ends are reported)."""
    out = {}
    for key in ("a2v_R@1", "v2a_R@1"):
        boots = [r["score"].get(f"{key}_boot_sd") for r in results]
        boots = [b for b in boots if b is not None]
        out[f"{key}_evaluation_sd"] = sum(boots) / len(boots) if boots else None
        out[f"{key}_seed_sd_default"] = stats.get("default", {}).get(key, (None, None))[1]
        halves = [(e[f"diff_{key}"]["ci95"][1] - e[f"diff_{key}"]["ci95"][0]) / 2
                  for e in stats.values() if f"diff_{key}" in e]
        out[f"{key}_ci_half_width_min"] = min(halves) if halves else None
        out[f"{key}_ci_half_width_max"] = max(halves) if halves else None
    return out


# ---------------------------------------------------------------------------
# Which views stop the augmented inter-modal target from learning (a diagnostic)
# ---------------------------------------------------------------------------

# name -> (augmentation groups the applied audio view keeps, the visual view's); "all" keeps
# every group, () none (the identity). The centroid vectors are never restricted.
VIEW_DIAGNOSTIC = {
    "no views": ((), ()),
    "visual views only": ((), "all"),
    "audio views only": ("all", ()),
    "audio specaugment only": (("specaugment",), ()),
    "audio shift only": (("shift",), ()),
    "audio crop only": (("crop",), ()),
    "audio flip only": (("flip",), ()),
    "audio all but crop": (("specaugment", "shift", "jitter", "blur", "flip"), ()),
}
VIEW_EPOCHS = 3


@contextlib.contextmanager
def applied_views(audio_groups, visual_groups):
    """Within it, the views pretrain.prepare_inputs applies keep only the given augmentation
    groups (the others at the identity, augment.only), while the centroid vectors and the
    evaluation are as always; every draw is still made, so the random stream is unchanged.
    pretrain.py reads its samplers through its module name `augment`, which is swapped here
    for a copy with the two samplers restricted. A diagnostic, never a training setting."""
    def keeping(sample, groups, table):
        if groups == "all":
            return sample
        names = [name for group in groups for name in table[group]]
        return lambda *args: augment.only(sample(*args), names)
    proxy = types.SimpleNamespace(**vars(augment))
    proxy.sample_audio_params = keeping(augment.sample_audio_params, audio_groups,
                                        augment.AUDIO_GROUPS)
    proxy.sample_visual_params = keeping(augment.sample_visual_params, visual_groups,
                                         augment.VISUAL_GROUPS)
    real, pretrain.augment = pretrain.augment, proxy
    try:
        yield
    finally:
        pretrain.augment = real


def view_diagnostic(cfg):
    """Each VIEW_DIAGNOSTIC entry: the augmented inter target for VIEW_EPOCHS epochs, seed 0,
    with the applied views restricted; L_inter and a->v training accuracy of the first and
    last log windows, and a->v R@10 of each epoch (chance: 10 / the gallery size)."""
    out = {}
    for name, (audio, visual) in VIEW_DIAGNOSTIC.items():
        run_dir = os.path.join(cfg.out, "views", name.replace(" ", "_"))
        args = (["--inter_target", "augmented", "--epochs", str(VIEW_EPOCHS), "--seed", "0",
                 "--run_dir", run_dir] + shlex.split(cfg.pretrain_args))
        print(f"\n$ (views: {name}) python pretrain.py {shlex.join(args)}", flush=True)
        with applied_views(audio, visual):
            pretrain.main(utils.parse_config(pretrain.PretrainConfig, args,
                                             profiles=pretrain.PROFILES))
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            log = [json.loads(line) for line in f]
        out[name] = {**training_curve(log),
                     "a2v_R@10": [r["retrieval"]["a2v_R@10"] for r in log if r["type"] == "epoch"]}
    return out


def views_table(views):
    lines = ["| views kept (augmented inter target) | L_inter first → last | a→v acc first → last "
             "| a→v R@10 by epoch |", "|---|---|---|---|"]
    for name, v in views.items():
        lines.append(f"| {name} | {_curve(v, 'inter')} | {_curve(v, 'acc_a2v')} | "
                     + " / ".join(_f(r) for r in v["a2v_R@10"]) + " |")
    return "\n".join(lines) + "\n"


def main(cfg):
    if cfg.quick:
        cfg = quick_config(cfg)
    rows = list(ROWS) if cfg.rows == "all" else [r.strip() for r in cfg.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or cfg.seeds < 1:
        raise utils.UsageError(f"unknown rows {unknown} (choose from {list(ROWS)}) or --seeds < 1")
    lengths = [int(n) for n in str(cfg.epochs).split(",")]
    if cfg.train_clips and cfg.train_clips != TOY_TRAIN_CLIPS:   # the same toy, more clips
        toy.ensure_toy_dataset(toy_root_of(cfg), n_train=cfg.train_clips, progress=True)
    results = []
    for length in lengths:
        at = dataclasses.replace(cfg, epochs=str(length))
        results += [run_row(at, row, seed) for row in rows for seed in range(cfg.seeds)]
        for row in rows:   # seeds found from earlier calls, beyond the ones run now
            seed = cfg.seeds
            while os.path.exists(os.path.join(commands(at, row, seed)[0], "checkpoint.pt")):
                results.append(run_row(at, row, seed))
                seed += 1
    results.sort(key=lambda r: (r["epochs"], rows.index(r["row"]), r["seed"]))
    manifest = score_manifest(cfg)
    for r in results:
        r["score"] = (score_run(r["run_dir"], manifest, cfg.gallery, cfg.bootstrap)
                      if manifest else r["retrieval"])
    by_length = {}   # epochs -> row statistics of the runs of that length
    for r in results:
        by_length.setdefault(r["epochs"], []).append(r)
    by_length = {n: row_statistics(runs) for n, runs in by_length.items()}
    stats = by_length[max(by_length)]
    spread = noise([r for r in results if r["epochs"] == max(by_length)], stats)
    views = survival(toy_root_of(cfg), vggss=cfg.vggss) if cfg.survival else None
    overlap = (shared_clips(toy.toy_paths(toy_root_of(cfg))["train"], manifest)
               if manifest else None)
    diagnostic = view_diagnostic(cfg) if cfg.views else None
    scored = (f"{cfg.train_clips or TOY_TRAIN_CLIPS} training clips, {results[-1]['steps']} "
              f"steps at the longest, scored on {manifest or 'each run’s last evaluation'} in "
              f"galleries of {cfg.gallery}")
    report = (tables(results) + "".join(f"\nOver seeds, {n} epochs, {scored}:\n\n"
                                        + statistics_table(s) for n, s in by_length.items())
              + (f"\nEach row against default, by training length ({scored}):\n\n"
                 + length_table(by_length, results) if len(by_length) > 1 else "")
              + "\nNoise, R@1 points: " + _pairs(spread, 1) + "\n"
              + (f"\nTraining clips among the scoring clips (same sound file): {overlap[0]} "
                 f"(of {overlap[1]} training and {overlap[2]} scoring clips)\n" if overlap else "")
              + ("\nWhat survives one view: " + _pairs(views, 3) + "\n" if views else "")
              + ("\nWhich views stop the augmented target (seed 0, "
                 f"{VIEW_EPOCHS} epochs):\n\n" + views_table(diagnostic) if diagnostic else ""))
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "ablation.md"), "w") as f:
        f.write(report)
    with open(os.path.join(cfg.out, "ablation.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "runs": results, "statistics": stats,
                   "statistics_by_epochs": by_length,
                   "noise": spread, "survival": views, "view_diagnostic": diagnostic,
                   "shared_train_score_clips": overlap,
                   "score_data": manifest}, f, indent=1)
    print("\n" + report + f"\nwrote {cfg.out}/ablation.md and ablation.json")
    return results


if __name__ == "__main__":
    utils.run_script(main, AblateConfig, __doc__.splitlines()[0])
