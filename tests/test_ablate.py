"""ablate.py: the runner's quick mode on a tiny config builds both tables from what
pretrain.py and finetune.py wrote, and reuses finished runs."""
import json
import os

import pytest

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
        finetune_args=f"{common} --eval_batch_size 4 --epochs 1")
    results = ablate.main(cfg)
    assert [(r["row"], r["seed"]) for r in results] == [("default", 0), ("inter_augmented", 0)]
    for r in results:
        # the numbers are the ones the scripts wrote: the log's last epoch, results.json
        with open(os.path.join(r["run_dir"], "log.jsonl")) as f:
            epoch = [x for x in map(json.loads, f) if x["type"] == "epoch"][-1]
        assert r["retrieval"] == epoch["retrieval"] and r["epochs"] == 1
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
