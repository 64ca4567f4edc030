"""Every wrong command line gets one clear line and exit status 2, errors found while
running one line and exit status 1, and no traceback (EQUIAV_DEBUG=1 shows it)."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*argv, env=None, cwd=None):
    done = subprocess.run([sys.executable, *argv], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})})
    return done.returncode, done.stderr


@pytest.mark.parametrize("argv,says", [
    (("pretrain.py", "--data", "missing.json"), "--data missing.json: no such file"),
    (("pretrain.py", "--epochs", "-1"), "--epochs must be at least 1, got -1"),
    (("pretrain.py", "--preset", "huge"), "unknown model preset 'huge'"),
    (("pretrain.py", "--model_overrides", "depth=x"), "depth='x' is not a valid int"),
    (("pretrain.py", "--model_overrides", "deep=2"), "unknown ModelConfig field 'deep'; valid fields:"),
    (("finetune.py", "--init", "missing.pt"), "no checkpoint at missing.pt: check --init"),
    (("retrieval.py", "--checkpoint", "missing.pt"), "no checkpoint at missing.pt: check --checkpoint"),
    (("finetune.py", "--train", "data/toy/train.json"), "give --init"),
    (("ablate.py", "--rows", "nope"), "unknown rows ['nope']"),
    (("bench.py", "--parts", "warp"), "--parts: unknown ['warp']"),
])
def test_a_wrong_command_line_gets_one_line_and_exit_2(argv, says, tmp_path):
    status, err = run(*argv)
    lines = err.strip().splitlines()
    assert status == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"{argv[0]}: error: ") and says in lines[0], err


def test_debug_shows_the_traceback():
    status, err = run("pretrain.py", "--epochs", "0", env={"EQUIAV_DEBUG": "1"})
    assert status != 0 and "Traceback" in err and "UsageError" in err


def test_a_bad_sample_while_running_gets_one_line_and_exit_1(tmp_path):
    manifest = tmp_path / "train.json"
    manifest.write_text(json.dumps({"data": [{"video_id": "a", "wav": str(tmp_path / "gone.wav"),
                                              "video_path": str(tmp_path), "labels": "/m/x"}]}))
    status, err = run("pretrain.py", "--data", str(manifest), "--norm_stats", "audioset",
                      "--preset", "tiny", "--batch_size", "1", "--epochs", "1", "--num_workers", "0",
                      "--run_dir", str(tmp_path / "run"), "--device", "cpu")
    lines = err.strip().splitlines()
    assert status == 1, err
    assert "Traceback" not in err
    assert lines[-1].startswith("pretrain.py: error: ") and "gone.wav" in lines[-1], err
