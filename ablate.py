"""The paper's ablations at toy scale, rebuilt by one command.

    python ablate.py                               # every row, seed 0 (about 80 min on 2 cores)
    python ablate.py --rows default,invariant --seeds 2
    python ablate.py --epochs 3                    # a quick look

Rows (the switches of the paper's ablation tables, as read from the authors'
poster; AudioSet zero-shot R@1, V->A / A->V):
- intra-modal loss: equivariant (default) against invariant (`--equivariant false`);
- inter-modal target (`--inter_target`): the centroid (default), the originals,
  the augmented views, the single equivariant predictions;
- centroid samples `--S` 1 / 4 / 8 (16 is the default).

Each row is the command a reader would type, `python pretrain.py` with the row's
flags (plus --seed, --run_dir and the given --pretrain_args), then the linear
probe `python finetune.py --linear_probe true --init RUN/checkpoint.pt` (plus
--finetune_args). Both are run in this process through the scripts' own
parse_config and main, and printed first. The numbers come from what the scripts
wrote: the last epoch of the run's log.jsonl (retrieval, and the equivariance
measures of retrieval.equivariance_metrics) and the probe's results.json.

Runs already finished under --out are reused (pretrain.py finds its checkpoint
complete, a probe with a results.json is not run again), so a later call can add
seeds or rows; the tables list every requested row and every seed found for it.
Writes {out}/ablation.md (markdown tables, the paper's numbers beside ours) and
{out}/ablation.json.
"""
import dataclasses
import json
import math
import os
import shlex

import finetune
import pretrain
import utils
from utils import option


@dataclasses.dataclass
class AblateConfig:
    """Every field is a `--field value` option."""
    rows: str = option("all", "comma-separated rows (see ROWS) or 'all'")
    seeds: int = option(1, "seeds 0 .. seeds-1 for every requested row")
    epochs: int = option(0, "pretraining epochs of every run; 0 -> the profile's (toy: 10)")
    out: str = option("runs/ablate", "run folders, ablation.md and ablation.json go here")
    probe: bool = option(True, "also run the linear probe of each pretraining run")
    pretrain_args: str = option("", "more pretrain.py options for every run, e.g. "
                                    "'--toy_root data/toy'")
    finetune_args: str = option("", "more finetune.py options for every probe")


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
}
PAPER_SIMILARITY = (0.90, 0.92)  # the attention predictor, A / V


def commands(cfg, row, seed):
    """(run_dir, pretrain.py argv, finetune.py argv) of one row and seed."""
    epochs = ["--epochs", str(cfg.epochs)] if cfg.epochs else []
    run_dir = os.path.join(cfg.out, f"{row}_s{seed}" + (f"_e{cfg.epochs}" if cfg.epochs else ""))
    pre = (ROWS[row][0] + ["--seed", str(seed), "--run_dir", run_dir] + epochs
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
        last = [r for r in map(json.loads, f) if r["type"] == "epoch"][-1]
    result = {"row": row, "seed": seed, "run_dir": run_dir, "epochs": last["epoch"],
              "retrieval": last.get("retrieval"), "equivariance": last.get("equivariance"),
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


def _f(value, digits=1):
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else f"{value:.{digits}f}"


def tables(results):
    """The markdown of ablation.md: retrieval, probe and similarity per run, then R^2."""
    head = ("| row | seed | a→v R@1 / 5 / 10 | v→a R@1 / 5 / 10 | probe top-1 | "
            "similarity A / V (identity t) | paper R@1 V→A / A→V |")
    lines = [head, "|" + "---|" * 7]
    for r in results:
        ret, eq = r["retrieval"], r["equivariance"]
        rec = {d: " / ".join(_f(ret[f"{d}_R@{k}"]) for k in (1, 5, 10)) for d in ("a2v", "v2a")}
        paper = ROWS[r["row"]][2]
        sim = (f"{_f(eq['similarity_a'], 3)} / {_f(eq['similarity_v'], 3)} "
               f"({_f(eq['identity_similarity_a'], 3)} / {_f(eq['identity_similarity_v'], 3)})")
        if r["row"] == "default":
            sim += f"; paper {PAPER_SIMILARITY[0]:.2f} / {PAPER_SIMILARITY[1]:.2f}"
        lines.append(f"| {r['row']} | {r['seed']} | {rec['a2v']} | {rec['v2a']} | "
                     f"{_f(r['probe_top1'])} | {sim} | {_f(paper[0])} / {_f(paper[1])} |")
    groups = {m: list(results[0]["equivariance"][f"r2_{m}"]) for m in ("a", "v")}
    r2_head = ("| row | seed | " + " | ".join(f"A {g}" for g in groups["a"]) + " | "
               + " | ".join(f"V {g}" for g in groups["v"]) + " |")
    r2 = [r2_head, "|" + "---|" * (2 + len(groups["a"]) + len(groups["v"]))]
    for r in results:
        cells = [_f(r["equivariance"][f"r2_{m}"][g], 2) for m in ("a", "v") for g in groups[m]]
        r2.append(f"| {r['row']} | {r['seed']} | " + " | ".join(cells) + " |")
    return ("Zero-shot retrieval (%) on the held-out split, linear-probe top-1 (%), "
            "predictor similarity:\n\n" + "\n".join(lines)
            + "\n\nAugmentation awareness, R² of a ridge regression from the augmented "
              "view's intra-modal embedding to t, per augmentation:\n\n" + "\n".join(r2) + "\n")


def main(cfg):
    rows = list(ROWS) if cfg.rows == "all" else [r.strip() for r in cfg.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown or cfg.seeds < 1:
        raise utils.UsageError(f"unknown rows {unknown} (choose from {list(ROWS)}) or --seeds < 1")
    results = [run_row(cfg, row, seed) for row in rows for seed in range(cfg.seeds)]
    # seeds found from earlier calls, beyond the ones run now
    for row in rows:
        seed = cfg.seeds
        while os.path.exists(os.path.join(commands(cfg, row, seed)[0], "checkpoint.pt")):
            results.append(run_row(cfg, row, seed))
            seed += 1
    results.sort(key=lambda r: (rows.index(r["row"]), r["seed"]))
    os.makedirs(cfg.out, exist_ok=True)
    with open(os.path.join(cfg.out, "ablation.md"), "w") as f:
        f.write(tables(results))
    with open(os.path.join(cfg.out, "ablation.json"), "w") as f:
        json.dump({"config": dataclasses.asdict(cfg), "runs": results}, f, indent=1)
    print("\n" + tables(results) + f"\nwrote {cfg.out}/ablation.md and ablation.json")
    return results


if __name__ == "__main__":
    utils.run_script(main, AblateConfig, __doc__.splitlines()[0])
