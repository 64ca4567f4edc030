import dataclasses
import itertools
import json
import math
import os

import pytest
import torch

import convert
import finetune
import utils


# ---------------------------------------------------------------------------
# Metrics against hand-computed values and brute-force definitions
# ---------------------------------------------------------------------------

def _ap_by_thresholds(scores, labels):
    """AP = sum over distinct thresholds of (recall gain) x precision, by loops."""
    n_pos = sum(labels)
    ap, prev_recall = 0.0, 0.0
    for thr in sorted(set(scores), reverse=True):
        chosen = [y for s, y in zip(scores, labels) if s >= thr]
        recall = sum(chosen) / n_pos
        ap += (recall - prev_recall) * sum(chosen) / len(chosen)
        prev_recall = recall
    return ap


def _auc_by_pairs(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p, q in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def test_average_precision_hand_cases():
    # ranked + - + - : precisions at the positives 1/1 and 2/3
    s = torch.tensor([[0.9], [0.8], [0.7], [0.6]])
    y = torch.tensor([[1.0], [0.0], [1.0], [0.0]])
    assert finetune.average_precision(s, y).item() == pytest.approx((1 + 2 / 3) / 2)
    # a tie between a negative and a positive at the top: both enter together
    s = torch.tensor([[0.9], [0.9], [0.5]])
    y = torch.tensor([[0.0], [1.0], [1.0]])
    assert finetune.average_precision(s, y).item() == pytest.approx((1 / 2 + 2 / 3) / 2)
    # the order of tied items must not matter
    assert finetune.average_precision(s[[1, 0, 2]], y[[1, 0, 2]]).item() == pytest.approx(
        (1 / 2 + 2 / 3) / 2)


def test_auc_hand_cases_and_ties():
    s = torch.tensor([[0.1], [0.4], [0.35], [0.8]])
    y = torch.tensor([[0.0], [0.0], [1.0], [1.0]])
    assert utils.roc_auc(s, y).item() == pytest.approx(0.75)
    # positive 0.5 tied with negative 0.5 counts one half: (0.5 + 1 + 2) / 4
    s = torch.tensor([[0.5], [0.5], [0.2], [0.9]])
    y = torch.tensor([[1.0], [0.0], [0.0], [1.0]])
    assert utils.roc_auc(s, y).item() == pytest.approx(0.875)


def test_multilabel_metrics_skip_class_without_positive():
    # class 0: ranked + + -  (AP 1, AUC 1); class 1: ranked - + -  (AP 1/2, AUC 1/2);
    # class 2: no positive (undefined, left out of the means)
    s = torch.tensor([[3.0, 0.9, 0.1], [1.0, 0.2, 0.3], [2.0, 0.1, 0.2]])
    y = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    ap = finetune.average_precision(s, y)
    assert ap[:2].tolist() == pytest.approx([1.0, 0.5])
    assert math.isnan(ap[2].item())
    auc = utils.roc_auc(s, y)
    assert auc[:2].tolist() == pytest.approx([1.0, 0.5])
    assert math.isnan(auc[2].item())
    m = finetune.multilabel_metrics(s, y)
    assert m["mAP"] == pytest.approx(100 * (1.0 + 0.5) / 2)
    assert m["mAUC"] == pytest.approx(0.75)
    assert m["d_prime"] == pytest.approx(math.sqrt(2) * 0.6744897501960817)
    assert m["classes_evaluated"] == 2


def test_metrics_match_brute_force_with_ties():
    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 6, (40, 5), generator=g).float()   # many ties
    labels = (torch.rand(40, 5, generator=g) < 0.3).float()
    ap = finetune.average_precision(scores, labels)
    auc = utils.roc_auc(scores, labels)
    for c in range(5):
        sc, lb = scores[:, c].tolist(), [int(v) for v in labels[:, c].tolist()]
        assert ap[c].item() == pytest.approx(_ap_by_thresholds(sc, lb))
        assert auc[c].item() == pytest.approx(_auc_by_pairs(sc, lb))


def test_d_prime_values():
    assert finetune.d_prime(0.5) == pytest.approx(0.0, abs=1e-12)
    assert finetune.d_prime(0.9) == pytest.approx(math.sqrt(2) * 1.2815515655446004)
    assert finetune.d_prime(0.1) == pytest.approx(-math.sqrt(2) * 1.2815515655446004)


def test_topk_accuracy_hand_cases():
    scores = torch.tensor([[0.1, 0.7, 0.2, 0.0],     # true 1: rank 0
                           [0.5, 0.1, 0.3, 0.2],     # true 2: rank 1
                           [0.4, 0.3, 0.2, 0.1],     # true 3: rank 3
                           [0.3, 0.3, 0.0, 0.0]])    # true 1 tied with class 0: rank 1
    targets = torch.tensor([1, 2, 3, 1])
    acc = finetune.topk_accuracy(scores, targets, ks=(1, 2, 5))
    assert acc == pytest.approx({"top1": 25.0, "top2": 75.0, "top5": 100.0})
    # one-hot targets give the same; constant scores are never "correct" by luck
    assert finetune.topk_accuracy(scores, torch.eye(4)[targets], ks=(1,))["top1"] == 25.0
    flat = torch.zeros(4, 4)
    assert finetune.topk_accuracy(flat, torch.tensor([0, 1, 2, 3]), ks=(1,))["top1"] == 25.0


# ---------------------------------------------------------------------------
# Recipe pieces: head learning rate, SpecAugment, config, initialization
# ---------------------------------------------------------------------------

def _tiny_classifier(mode="multimodal", num_classes=5):
    from finetune import EquiAVClassifier
    from model import get_config
    return EquiAVClassifier(get_config("tiny", depth=1), num_classes, mode)


def test_head_lr_multiplier_is_applied_every_step():
    net = _tiny_classifier()
    cfg = finetune.FinetuneConfig(lr=1e-3, head_lr_mult=50.0, warmup_start_lr=0.0,
                                  final_lr=1e-5, epochs=2)
    opt = finetune.make_optimizer(net, cfg)
    enc, head = opt.param_groups
    grouped = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(id(p) for p in net.parameters())  # each exactly once
    for step in (0, 3, 10, 55, 99):
        base = utils.set_lr(opt, step, total_steps=100, warmup_steps=10, cfg=cfg)
        assert enc["lr"] == pytest.approx(base)
        assert head["lr"] == pytest.approx(50.0 * base)
    assert utils.set_lr(opt, 10, 100, 10, cfg) == pytest.approx(1e-3)
    probe = finetune.make_optimizer(net, dataclasses.replace(cfg, linear_probe=True))
    assert [g["name"] for g in probe.param_groups] == ["head"]


def test_finetune_specaugment_masks_one_time_and_one_freq_span():
    g = torch.Generator().manual_seed(0)
    spec = torch.randn(64, 256, 64) + 5.0          # no natural zeros
    out = finetune.finetune_specaugment(spec, g)
    zero = out == 0
    kept = ~zero
    assert torch.equal(out[kept], spec[kept])      # nothing else changed
    masked_clips = 0
    for b in range(64):
        t_rows = zero[b].all(dim=1)                # fully masked time frames
        f_cols = zero[b].all(dim=0)                # fully masked frequency bins
        # every zero lies in a masked frame or a masked bin
        assert torch.equal(zero[b], t_rows[:, None] | f_cols[None, :])
        for span, limit in ((t_rows, 192 * 256 / 1024), (f_cols, 48 * 64 / 128)):
            idx = span.nonzero().flatten()
            if idx.numel():
                assert idx.numel() == idx[-1] - idx[0] + 1   # one contiguous span
                assert idx.numel() < limit
        masked_clips += bool(zero[b].any())
    assert 35 <= masked_clips <= 64                # p 0.8 of being masked


def test_resolve_config_defaults_and_errors():
    cfg = finetune.resolve_config(finetune.FinetuneConfig())
    assert (cfg.profile, cfg.preset, cfg.init) == ("toy", "tiny", convert.TOY_CHECKPOINT)
    assert cfg.run_dir == os.path.join("runs", "finetune_toy")
    probe = finetune.resolve_config(finetune.FinetuneConfig(toy_multilabel=True, linear_probe=True))
    assert probe.run_dir == os.path.join("runs", "finetune_toy_multilabel_linear")
    with pytest.raises(ValueError, match="give --init"):
        finetune.resolve_config(finetune.FinetuneConfig(train="a.json", test="b.json"))
    with pytest.raises(ValueError, match="--mode must be one of"):
        finetune.resolve_config(finetune.FinetuneConfig(mode="both"))
    paper = finetune.resolve_config(finetune.FinetuneConfig(train="a.json", test="b.json",
                                                           init="x.pth"))
    assert (paper.profile, paper.preset, paper.epochs, paper.mixup) == ("paper", "base", 50, 0.5)


def test_inspect_init_tells_checkpoints_apart(tmp_path, monkeypatch):
    t = torch.zeros(2)
    torch.save({"model": {"cls_token": t, "blocks.0.norm1.weight": t}}, tmp_path / "mae.pth")
    torch.save({"module.blocks_a.0.norm1.weight": t}, tmp_path / "authors.pth")
    for name, kind in (("mae.pth", "mae"), ("authors.pth", "equiav")):
        cfg = finetune.FinetuneConfig(init=str(tmp_path / name), preset="tiny")
        got, mcfg = finetune.inspect_init(cfg)
        assert got == kind and mcfg.image_size == 96
    absent = str(tmp_path / "absent.pt")
    with pytest.raises(FileNotFoundError, match="check --init"):
        finetune.inspect_init(finetune.FinetuneConfig(init=absent))
    monkeypatch.setattr(convert, "TOY_CHECKPOINT", absent)  # the default: say what to run
    with pytest.raises(FileNotFoundError, match="run `python pretrain.py` first"):
        finetune.inspect_init(finetune.FinetuneConfig(init=absent))


# ---------------------------------------------------------------------------
# End to end on a very small toy dataset, from a tiny pretraining checkpoint
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def toy_and_checkpoint(tmp_path_factory):
    import toy
    from model import EquiAV, get_config
    root = tmp_path_factory.mktemp("ft") / "toy"
    toy.make_toy_dataset(root, n_train=16, n_test=8, n_retrieval=0, n_train_multilabel=8,
                         n_test_multilabel=8, n_distractor=0, num_workers=0)
    torch.manual_seed(0)
    mcfg = get_config("tiny", depth=1)
    net = EquiAV(mcfg)
    ckpt = root.parent / "pretrain" / "checkpoint.pt"
    utils.save_checkpoint({"model": net.state_dict(), "model_config": dataclasses.asdict(mcfg),
                           "model_flags": {"use_centroid": True, "equivariant": True},
                           "norm_stats": [-5.0, 4.0]}, ckpt)
    return root, ckpt, net


def _cfg(root, ckpt, run_dir, **kw):
    base = dict(toy_root=str(root), init=str(ckpt), run_dir=str(run_dir), batch_size=8,
                eval_batch_size=8, epochs=1, log_every=1, device="cpu")
    return finetune.FinetuneConfig(**{**base, **kw})


def test_finetune_end_to_end_resumes_and_keeps_best(toy_and_checkpoint, tmp_path):
    root, ckpt, pretrained = toy_and_checkpoint
    run = tmp_path / "run"
    first = finetune.main(_cfg(root, ckpt, run))
    assert first["task"] == "singlelabel" and first["main_metric"] == "top1"
    assert 0.0 <= first["final"]["top1"] <= first["final"]["top5"] <= 100.0
    assert first["final"]["top1"] * 8 / 100 == pytest.approx(round(first["final"]["top1"] * 8 / 100))
    # a second call with more epochs resumes from epoch 1 instead of starting over
    second = finetune.main(_cfg(root, ckpt, run, epochs=2))
    ckpt2 = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ckpt2["epoch"] == 2 and len(ckpt2["history"]) == 2
    assert ckpt2["history"][0] == first["final"]
    best = torch.load(run / "best.pt", weights_only=True)
    assert best["metrics"]["top1"] == max(h["top1"] for h in ckpt2["history"])
    assert second["best"]["value"] == best["metrics"]["top1"]
    # without --val the headline is the final epoch, and "best" says it was chosen on test
    assert second["best"]["chosen_on"] == "test"
    assert second["headline"]["chosen_by"] == "final epoch" and second["headline"]["epoch"] == 2
    assert second["headline"]["metrics"]["top1"] == ckpt2["history"][1]["top1"]
    # the encoders really trained (full fine-tuning) and started from the checkpoint
    w0 = pretrained.audio_encoder.blocks[0].mlp.fc1.weight
    assert not torch.equal(ckpt2["model"]["audio_encoder.blocks.0.mlp.fc1.weight"], w0)
    with pytest.raises(ValueError, match="holds a different run"):
        finetune.main(_cfg(root, ckpt, run, mode="audio"))


def test_val_manifest_chooses_the_epoch_and_the_headline_is_its_test_score(
        toy_and_checkpoint, tmp_path):
    """With --val, best.pt and the headline are the epoch best on the validation split
    (the first of equals), and the headline carries that epoch's test metrics."""
    root, ckpt, _ = toy_and_checkpoint
    entries = json.loads((root / "train.json").read_text())["data"]
    val = root / "val_from_train.json"        # beside the toy: its paths are relative
    val.write_text(json.dumps({"data": entries[:8]}))
    run = tmp_path / "run_val"
    res = finetune.main(_cfg(root, ckpt, run, val=str(val), epochs=3, lr=1e-3))
    history = torch.load(run / "checkpoint.pt", weights_only=True)["history"]
    val_top1 = [h["val_top1"] for h in history]
    chosen = val_top1.index(max(val_top1))                   # first epoch with the best val
    assert res["best"]["chosen_on"] == "val" and res["headline"]["chosen_by"] == "val"
    assert res["headline"]["epoch"] == chosen + 1
    assert res["headline"]["metrics"]["top1"] == history[chosen]["top1"]
    assert torch.load(run / "best.pt", weights_only=True)["epoch"] == chosen + 1
    # resuming it without --val would let a test-chosen epoch compete: refused
    with pytest.raises(utils.UsageError, match="chose its best epoch on val; resume it with --val"):
        finetune.main(_cfg(root, ckpt, run, epochs=4, lr=1e-3))
    # a missing validation file is a usage error before anything runs
    with pytest.raises(utils.UsageError, match="--val .*no such file"):
        finetune.main(_cfg(root, ckpt, tmp_path / "x", val=str(tmp_path / "missing.json")))


def test_finetune_multilabel_linear_probe_keeps_encoders(toy_and_checkpoint, tmp_path):
    root, ckpt, pretrained = toy_and_checkpoint
    res = finetune.main(_cfg(root, ckpt, tmp_path / "ml", toy_multilabel=True, linear_probe=True,
                             mode="audio", mixup=0.5))
    assert res["task"] == "multilabel" and res["main_metric"] == "mAP"
    final = res["final"]
    assert 0.0 < final["mAP"] <= 100.0 and 0.0 <= final["mAUC"] <= 1.0
    assert final["d_prime"] == pytest.approx(finetune.d_prime(final["mAUC"]))
    state = torch.load(tmp_path / "ml" / "checkpoint.pt", weights_only=True)["model"]
    assert "visual_encoder.blocks.0.mlp.fc1.weight" not in state       # audio mode
    for key, value in pretrained.audio_encoder.state_dict().items():
        if not key.startswith("norm_aug"):
            assert torch.equal(state[f"audio_encoder.{key}"], value), key  # frozen
    assert state["head.weight"].shape == (8, 128)


def test_interrupted_and_resumed_equals_uninterrupted(toy_and_checkpoint, tmp_path, monkeypatch):
    """The twin of pretrain's resume test: killed in epoch 2 and run again, the losses
    of every step and the final weights are bit-identical to an uninterrupted run
    (mixup, SpecAugment and drop path all draw from the per-epoch streams)."""
    from helpers import StopAfter, read_log, step_losses
    root, ckpt, _ = toy_and_checkpoint
    kw = dict(epochs=2, mixup=0.5)
    straight = _cfg(root, ckpt, tmp_path / "straight", **kw)
    finetune.main(straight)
    resumed = _cfg(root, ckpt, tmp_path / "resumed", **kw)
    original = finetune.train_one_epoch

    def killed_in_second_epoch(model, net, optimizer, scaler, loader, epoch, *a, **kw):
        if epoch == 1:
            loader = StopAfter(loader, 1)
        return original(model, net, optimizer, scaler, loader, epoch, *a, **kw)

    monkeypatch.setattr(finetune, "train_one_epoch", killed_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(resumed)
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(finetune, "train_one_epoch", original)
    finetune.main(resumed)  # the same command again: continues from epoch 2

    a = step_losses(read_log(straight.run_dir))
    b = step_losses(read_log(resumed.run_dir))
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]  # 16 clips, batch 8, 2 epochs
    assert len(b[3]) == 2  # the step run before the kill was logged twice
    for step in a:
        assert set(b[step]) == set(a[step]), step
    ca = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    cb = torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert ca["history"][-1]["top1"] == cb["history"][-1]["top1"]


def test_specaugment_vector_stays_on_the_cpu(monkeypatch):
    """apply_audio reads its decisions from a CPU copy of t; handing it a device t
    makes it copy t back every step (a host-device sync on a GPU). The "meta"
    device stands in for a GPU here."""
    seen = []

    def spy(spec, t):
        seen.append(t.device.type)
        return spec

    monkeypatch.setattr(finetune.augment, "apply_audio", spy)
    finetune.finetune_specaugment(torch.empty(4, 256, 64, device="meta"),
                                  torch.Generator().manual_seed(0))
    assert seen == ["cpu"]


def _with_missing_audio(root, bad, tmp_path):
    """A copy of the toy train manifest whose entries `bad` name absent WAV files."""
    import data
    entries = data.read_manifest(root / "train.json")
    for i, e in enumerate(entries):
        e["wav"] = str(root / e["wav"]) if i not in bad else str(tmp_path / f"gone_{i}.wav")
        e["video_path"] = str(root / e["video_path"])
    data.write_manifest(tmp_path / "train.json", entries)
    return str(tmp_path / "train.json")


def test_skip_bad_drops_empty_batches_counts_and_enforces_the_fraction(toy_and_checkpoint,
                                                                       tmp_path):
    """With batch size 1 every bad clip is an empty batch: it is not trained on (the
    loss of 0 rows would be NaN), it is counted, and --max_bad_fraction holds."""
    import data
    root, ckpt, _ = toy_and_checkpoint
    train = _with_missing_audio(root, {1, 5, 6, 11}, tmp_path)
    kw = dict(train=train, test=str(root / "test.json"),
              label_csv=str(root / "class_labels_indices.csv"), profile="toy", norm_stats="-5,4",
              skip_bad=True, batch_size=1, log_every=4)
    res = finetune.main(_cfg(root, ckpt, tmp_path / "ok", max_bad_fraction=0.5, **kw))
    final = res["final"]
    assert final["train_skipped"] == 4 and final["step"] == 12
    assert math.isfinite(final["train_loss"]) and final["test_skipped"] == 0
    with pytest.raises(data.DataError, match=r"4 of 16 samples were bad \(25.00% > 10.00%"):
        finetune.main(_cfg(root, ckpt, tmp_path / "strict", max_bad_fraction=0.1, **kw))
