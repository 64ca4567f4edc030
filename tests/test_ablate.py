"""ablate.py: the runner's quick mode on a tiny config builds both tables from what
pretrain.py and finetune.py wrote, and reuses finished runs."""
import json
import math
import os

import pytest
import torch

import ablate
import toy

SMALL = ("embed_dim=64,depth=1,num_heads=2,aug_hidden=32,pred_heads=2,pred_head_dim=16,"
         "proj_hidden=64,proj_dim=32")


@pytest.fixture(scope="module")
def toy_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("abl") / "toy"
    toy.make_toy_dataset(root, n_train=8, n_test=4, n_retrieval=4, n_train_multilabel=0,
                         n_test_multilabel=0, n_distractor=0, num_workers=0)
    return str(root)


def test_quick_ablation_runs_each_row_as_the_scripts_and_tabulates(toy_root, tmp_path):
    common = f"--toy_root {toy_root} --device cpu --num_workers 0 --batch_size 4 --log_every 1"
    cfg = ablate.AblateConfig(
        rows="default,inter_augmented", seeds=1, epochs=1, out=str(tmp_path / "abl"),
        pretrain_args=f"{common} --model_overrides {SMALL} --S 2 --eval_batch_size 4 "
                      f"--cpu_threads 1",
        finetune_args=f"{common} --eval_batch_size 4 --epochs 1", score_data="none",
        survival=False)
    results = ablate.main(cfg)
    assert [(r["row"], r["seed"]) for r in results] == [("default", 0), ("inter_augmented", 0)]
    for r in results:
        # the numbers are the ones the scripts wrote: the log's last epoch, results.json
        with open(os.path.join(r["run_dir"], "log.jsonl")) as f:
            log = list(map(json.loads, f))
        epoch = [x for x in log if x["type"] == "epoch"][-1]
        assert r["retrieval"] == epoch["retrieval"] and r["epochs"] == 1
        steps = [x for x in log if x["type"] == "step"]
        assert len(steps) > 1 and r["training"] == {
            "inter_first": steps[0]["inter"], "acc_a2v_first": steps[0]["acc_a2v"],
            "inter_last": steps[-1]["inter"], "acc_a2v_last": steps[-1]["acc_a2v"]}
        with open(os.path.join(r["run_dir"], "probe", "results.json")) as f:
            assert r["probe_top1"] == json.load(f)["final"]["top1"]
    md = (tmp_path / "abl" / "ablation.md").read_text()
    assert "| default | 0 |" in md and "| inter_augmented | 0 |" in md
    assert "30.1 / 29.6" in md and "28.1 / 27.5" in md          # the paper's numbers beside
    assert "A specaugment" in md and "V grayscale" in md         # the R^2 table's columns
    saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
    assert saved["runs"][1]["pretrain_command"].startswith(
        "python pretrain.py --inter_target augmented --seed 0")

    # a second call reuses the finished runs: no new training steps, the same numbers
    log = os.path.join(results[0]["run_dir"], "log.jsonl")
    before = open(log).read()
    again = ablate.main(ablate.AblateConfig(**{**cfg.__dict__, "rows": "default"}))
    assert open(log).read().count('"type": "step"') == before.count('"type": "step"')
    assert again[0]["retrieval"] == results[0]["retrieval"]
    with pytest.raises(ValueError, match="unknown rows"):
        ablate.main(ablate.AblateConfig(rows="default,nope"))


def test_quick_run_writes_statistics_that_match_its_runs(tmp_path):
    """--quick: 1 epoch, 2 seeds of default and invariant on a tiny toy; the JSON's statistics
    are the mean, sd and paired t-interval of the runs' own scores, and each score is the
    mean over galleries of retrieval_metrics on that gallery alone."""
    import statistics

    import convert
    import data
    import retrieval
    import torch
    ablate.main(ablate.AblateConfig(quick=True, out=str(tmp_path / "q")))
    saved = json.loads((tmp_path / "q" / "ablation.json").read_text())
    runs = saved["runs"]
    assert [(r["row"], r["seed"], r["epochs"]) for r in runs] == [
        ("default", 0, 1), ("default", 1, 1), ("invariant", 0, 1), ("invariant", 1, 1)]
    scores = {(r["row"], r["seed"]): r["score"] for r in runs}
    for row in ("default", "invariant"):
        values = [scores[(row, s)]["a2v_R@1"] for s in (0, 1)]
        mean, sd = saved["statistics"][row]["a2v_R@1"]
        assert mean == pytest.approx(statistics.mean(values))
        assert sd == pytest.approx(statistics.stdev(values))
    diffs = [scores[("invariant", s)]["v2a_R@10"] - scores[("default", s)]["v2a_R@10"] for s in (0, 1)]
    d = saved["statistics"]["invariant"]["diff_v2a_R@10"]
    half = 12.706 * statistics.stdev(diffs) / 2 ** 0.5          # t(0.975, 1 df)
    assert d["n"] == 2 and d["mean"] == pytest.approx(statistics.mean(diffs))
    assert d["ci95"] == pytest.approx([d["mean"] - half, d["mean"] + half])
    # one run's score, recomputed gallery by gallery with the retrieval code
    run = runs[0]
    model = convert.load_equiav(os.path.join(run["run_dir"], "checkpoint.pt")).eval()
    stats = convert.peek_checkpoint(os.path.join(run["run_dir"], "checkpoint.pt"))["norm_stats"]
    c = model.cfg
    ds = data.AudioVisualDataset(saved["score_data"], train=False, norm_mean=stats[0],
                                 norm_std=stats[1], audio_length=c.audio_length,
                                 mel_bins=c.mel_bins, image_size=c.image_size)
    loader = data.make_loader(ds, 8, train=False, num_workers=0, distributed=False)
    z_a, z_v = retrieval.extract_embeddings(model, loader, torch.device("cpu"))
    per_gallery = [retrieval.retrieval_metrics(z_a[i:i + 4], z_v[i:i + 4]) for i in (0, 4)]
    for key in ablate.METRICS:
        assert run["score"][key] == pytest.approx(statistics.mean(m[key] for m in per_gallery))
    assert run["score"]["galleries"] == 2 and run["score"]["a2v_R@1_boot_sd"] >= 0
    survival = saved["survival"]
    assert 0 <= survival["visual_box_kept_mean"] <= 1 and 0 <= survival["audio_pulse_energy_kept_mean"] <= 1
    assert set(survival["cue_check"]) == {"audio", "visual"}
    assert "toy vs paper" in (tmp_path / "q" / "ablation.md").read_text()


def test_verdict_reads_the_interval_against_the_papers_direction():
    def entry(lo, hi):
        d = {"n": 5, "mean": (lo + hi) / 2, "sd": 1.0, "ci95": (lo, hi)}
        return {"diff_a2v_R@1": d, "diff_v2a_R@1": d}
    # the paper: invariant is 4.9 / 5.3 points below default
    assert ablate.verdict("invariant", entry(-6.0, -1.0)) == "agrees"
    assert ablate.verdict("invariant", entry(1.0, 4.0)) == "contradicts"
    assert ablate.verdict("invariant", entry(-3.0, 2.0)) == "cannot tell"
    assert ablate.verdict("default", entry(-6.0, -1.0)) == "–"


def test_crop_coverage_is_the_share_of_the_box_inside_the_crop():
    import augment
    import torch
    g = torch.Generator().manual_seed(3)
    boxes = [[0.0, 0.0, 1.0, 1.0]] * 200 + [[0.4, 0.4, 0.6, 0.6]] * 200
    cover = ablate.crop_coverage(boxes, g, 96)
    t = augment.sample_visual_params(400, torch.Generator().manual_seed(3), 96, 96).double()
    area = t[:, augment.VISUAL_SLOTS["rrc_height"]] * t[:, augment.VISUAL_SLOTS["rrc_width"]]
    assert torch.allclose(cover[:200], area[:200])        # the whole frame: the crop's own area
    assert ((cover >= 0) & (cover <= 1)).all() and (cover[200:] == 1).any() and (cover[200:] < 1).any()


def test_noise_reports_both_ends_of_the_interval_half_widths():
    """Half-widths t_{n-1} sd(diff) / sqrt(n), computed here from the differences: the
    narrowest and the widest row, never one of them alone."""
    base = [20.0, 22.0, 21.0]
    rows = {"default": base, "narrow": [19.0, 21.2, 19.9], "wide": [25.0, 18.0, 24.0]}
    results = [{"row": row, "seed": i, "score": {m: v for m in ablate.METRICS}}
               for row, values in rows.items() for i, v in enumerate(values)]
    # the score dicts need bootstrap sds for the evaluation's share
    for r in results:
        r["score"].update({"a2v_R@1_boot_sd": 2.0, "v2a_R@1_boot_sd": 3.0})
    out = ablate.noise(results, ablate.row_statistics(results))

    def half(values):
        d = [v - b for v, b in zip(values, base)]
        m = sum(d) / 3
        return 4.303 * math.sqrt(sum((x - m) ** 2 for x in d) / 2) / math.sqrt(3)
    assert out["a2v_R@1_ci_half_width_min"] == pytest.approx(half(rows["narrow"]))
    assert out["a2v_R@1_ci_half_width_max"] == pytest.approx(half(rows["wide"]))
    assert out["a2v_R@1_evaluation_sd"] == 2.0 and out["v2a_R@1_evaluation_sd"] == 3.0
    assert out["a2v_R@1_seed_sd_default"] == pytest.approx(1.0)


def test_applied_views_restrict_only_the_applied_vectors_and_are_undone():
    """Inside applied_views the applied t_a is the identity and t_v keeps only the flip slot
    of the draw it replaces; the centroid vectors and the random stream are untouched."""
    import augment
    import pretrain
    from model import get_config
    mcfg = get_config("tiny")
    batch = {"audio": torch.randn(4, mcfg.audio_length, mcfg.mel_bins),
             "frame": torch.randint(0, 256, (4, 3, mcfg.image_size, mcfg.image_size),
                                    dtype=torch.uint8)}
    cpu = torch.device("cpu")
    free = pretrain.prepare_inputs(batch, torch.Generator().manual_seed(3), mcfg, 2, cpu)
    with ablate.applied_views((), ("flip",)):
        kept = pretrain.prepare_inputs(batch, torch.Generator().manual_seed(3), mcfg, 2, cpu)
    after = pretrain.prepare_inputs(batch, torch.Generator().manual_seed(3), mcfg, 2, cpu)
    t_a, t_v, T_a, T_v = kept[4:]
    assert torch.equal(t_a, augment.audio_identity(4))
    flip = augment.VISUAL_SLOTS["flip_on"]
    expected = augment.visual_identity(4)
    expected[:, flip] = free[5][:, flip]
    assert torch.equal(t_v, expected) and not torch.equal(free[5], expected)
    assert torch.equal(T_a, free[6]) and torch.equal(T_v, free[7])   # centroid vectors as drawn
    assert torch.equal(kept[0], free[0])                              # the same time roll
    assert torch.equal(kept[2], augment.apply_audio(kept[0], t_a))    # the identity view
    assert pretrain.augment is augment and all(torch.equal(a, b) for a, b in zip(after, free))


def test_view_diagnostic_reports_what_its_runs_logged(toy_root, tmp_path, monkeypatch):
    """One restricted-view run (1 epoch): the augmented inter target, the numbers read back
    from its own log, and the table row that shows them."""
    monkeypatch.setattr(ablate, "VIEW_DIAGNOSTIC", {"audio crop only": (("crop",), ())})
    monkeypatch.setattr(ablate, "VIEW_EPOCHS", 1)
    common = f"--toy_root {toy_root} --device cpu --num_workers 0 --batch_size 4 --log_every 1"
    cfg = ablate.AblateConfig(out=str(tmp_path / "abl"), pretrain_args=(
        f"{common} --model_overrides {SMALL} --S 2 --eval_batch_size 4 --cpu_threads 1"))
    out = ablate.view_diagnostic(cfg)["audio crop only"]
    run_dir = tmp_path / "abl" / "views" / "audio_crop_only"
    log = [json.loads(line) for line in open(run_dir / "log.jsonl")]
    config = [r for r in log if r["type"] == "config"][0]
    assert config["inter_target"] == "augmented" and config["epochs"] == 1
    steps = [r for r in log if r["type"] == "step"]
    assert (out["inter_first"], out["inter_last"]) == (steps[0]["inter"], steps[-1]["inter"])
    assert out["a2v_R@10"] == [r["retrieval"]["a2v_R@10"] for r in log if r["type"] == "epoch"]
    assert "| audio crop only | " in ablate.views_table({"audio crop only": out})
    assert ablate.pretrain.augment is ablate.augment          # the samplers are restored


def test_a_runs_length_is_part_of_its_identity():
    """The profile's length (toy: 10 epochs), asked for or not, is one run folder; another
    length, from --epochs or from --pretrain_args, is another."""
    def run_dir(**kw):
        return os.path.basename(ablate.commands(ablate.AblateConfig(**kw), "invariant", 2)[0])
    assert run_dir() == run_dir(epochs=10) == "invariant_s2"
    assert run_dir(epochs=30) == run_dir(pretrain_args="--epochs 30") == "invariant_s2_e30"
    _, pre, _ = ablate.commands(ablate.AblateConfig(epochs=30), "invariant", 2)
    assert pre[-2:] == ["--epochs", "30"] and pre[:2] == ["--equivariant", "false"]


def test_a_runs_training_set_size_is_part_of_its_identity():
    """--train_clips N (not the toy's own 2,000) is another folder and another toy, with the
    warm-up in epochs of N clips that lasts the 2,000-clip runs' 62 steps at batch 32."""
    def commands(**kw):
        return ablate.commands(ablate.AblateConfig(**kw), "default", 1)
    assert commands(train_clips=2000) == commands()
    run_dir, pre, _ = commands(train_clips=20000, epochs=3)
    assert os.path.basename(run_dir) == "default_s1_n20000_e3"
    toy_root = pre[pre.index("--toy_root") + 1]
    assert toy_root == os.path.join("data", "toy_n20000") != commands(train_clips=4000)[1][
        commands(train_clips=4000)[1].index("--toy_root") + 1]
    warmup = float(pre[pre.index("--warmup_epochs") + 1])
    assert round(warmup * (20000 // 32)) == 62 == round(1.0 * (2000 // 32))
    run_dir, pre, _ = commands(train_clips=20000, epochs=3, pretrain_args="--batch_size 16")
    assert round(float(pre[pre.index("--warmup_epochs") + 1]) * (20000 // 16)) == 2000 // 16


def test_length_table_pairs_each_row_with_default_at_each_length():
    def run(row, seed, epochs, r1, sim):
        score = {"a2v_R@1": r1, "v2a_R@1": r1 + 1, "a2v_R@10": 3 * r1, "v2a_R@10": 50.0}
        eq = {"similarity_a": sim, "similarity_v": sim / 2, "r2_a": {"crop": sim},
              "r2_v": {"flip": -sim}}
        return {"row": row, "seed": seed, "epochs": epochs, "score": score, "equivariance": eq}
    results = [run("default", 0, 10, 20.0, 0.8), run("default", 1, 10, 22.0, 0.9),
               run("invariant", 0, 10, 23.0, 0.5), run("invariant", 1, 10, 24.0, 0.7),
               run("default", 0, 30, 25.0, 0.6), run("default", 1, 30, 26.0, 0.6),
               run("invariant", 0, 30, 24.0, 0.4), run("invariant", 1, 30, 23.0, 0.4)]
    by_length = {n: ablate.row_statistics([r for r in results if r["epochs"] == n])
                 for n in (10, 30)}
    table = ablate.length_table(by_length, results)
    # 10 epochs: differences +3, +2 -> mean +2.5, sd 0.707, t(1) 12.706 -> +/- 6.35
    assert "| invariant | 10 | 2 | +2.5 [-3.9, +8.9] | +2.5 [-3.9, +8.9] | +7.5 [-11.6, +26.6] " \
           "| +0.0 [+0.0, +0.0] |" in table
    assert "| invariant | 30 | 2 | -2.0 [-14.7, +10.7] |" in table
    assert "| default | 10 | 0.850 / 0.425 | 0.85 | -0.85 |" in table
    assert "| invariant | 30 | 0.400 / 0.200 | 0.40 | -0.40 |" in table


def test_shared_clips_counts_the_clips_two_manifests_hold_alike(toy_root, tmp_path):
    """The scoring set is drawn with another seed: it shares no clip with a training set.
    A larger training set under the same seed holds the smaller one's clips, and a test
    split drawn with the same seed is still a split of its own."""
    paths = toy.toy_paths(toy_root)
    bigger = tmp_path / "bigger"
    toy.make_toy_dataset(bigger, n_train=12, n_test=4, n_retrieval=4, n_train_multilabel=0,
                         n_test_multilabel=0, n_distractor=0, num_workers=0)
    other = tmp_path / "other"
    toy.make_toy_dataset(other, n_train=0, n_test=6, n_retrieval=6, n_train_multilabel=0,
                         n_test_multilabel=0, n_distractor=0, num_workers=0, seed=1)
    big = toy.toy_paths(bigger)
    assert ablate.shared_clips(paths["train"], big["train"]) == (8, 8, 12)
    assert ablate.shared_clips(big["train"], toy.toy_paths(other)["test"]) == (0, 12, 6)
    assert ablate.shared_clips(big["train"], big["test"]) == (0, 12, 4)
