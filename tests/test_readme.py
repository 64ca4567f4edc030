"""The README's commands and code example are what users copy: keep them true."""
import pathlib
import re

import torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_quick_start_commands_are_the_ones_ci_runs():
    commands = re.findall(r"```bash\n(.*?)\n```", README, re.S)[:2]
    assert commands == ["pip install -r requirements.txt && python pretrain.py",
                        "pip install -r requirements.txt && python -m pytest"]
    assert commands[1] in (ROOT / ".ci" / "run").read_text()


def test_python_example_runs():
    example = re.findall(r"```python\n(.*?)```", README, re.S)[0]
    scope = {}
    exec(compile(example, "README.md", "exec"), scope)
    out, losses, heat = scope["out"], scope["losses"], scope["heat"]
    cfg = scope["cfg"]
    assert all(z.shape == (8, cfg.proj_dim) for z in out)
    assert torch.isfinite(losses["loss"]) and losses["loss"].requires_grad is True
    side = cfg.image_size // cfg.patch_size
    # the occlusion map: differences of two cosines, not all equal
    assert heat.shape == (8, side, side) and heat.abs().max() <= 2.0 and heat.std() > 0
    # backward() in the example reached the encoders
    assert scope["model"].audio_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def _commands():
    """Every command line in the README's bash and plain code blocks, continuations joined."""
    lines, inside, keep = [], False, False
    for line in README.splitlines():
        if line.startswith("```"):
            inside, keep = not inside, line.strip() in ("```bash", "```")
            continue
        if inside and keep:
            lines.append(line)
    text = "\n".join(lines).replace("\\\n", " ")
    return [line.split("#")[0].strip() for line in text.splitlines() if line.strip()]


def test_every_flag_in_the_readme_exists():
    """`python X.py ... --flag` and `torchrun ... X.py --flag` in the README name real options."""
    import dataclasses
    import subprocess
    import sys

    import ablate
    import bench
    import finetune
    import prepare
    import pretrain
    import retrieval
    configs = {"pretrain.py": pretrain.PretrainConfig, "finetune.py": finetune.FinetuneConfig,
               "retrieval.py": retrieval.RetrievalConfig, "bench.py": bench.BenchConfig,
               "ablate.py": ablate.AblateConfig, "prepare.py": prepare.PrepareConfig}
    checked = 0
    for line in _commands():
        words = line.split()
        scripts = [i for i, w in enumerate(words) if w.endswith(".py") and w != "-m"]
        if not scripts or not ("python" in words[0] or words[0] == "torchrun" or
                               "&&" in words):
            continue
        script, args = words[scripts[0]], words[scripts[0] + 1:]
        flags = [w.split("=")[0] for w in args if w.startswith("--")]
        if script in configs:
            known = {f"--{f.name}" for f in dataclasses.fields(configs[script])} | {"--help"}
            assert set(flags) <= known, (line, set(flags) - known)
        elif script in ("data.py", "toy.py"):
            sub = [args[0]] if script == "data.py" else []
            usage = subprocess.run([sys.executable, script, *sub, "--help"], cwd=ROOT,
                                   capture_output=True, text=True).stdout
            for flag in flags:
                assert flag in usage, (line, flag)
        else:
            raise AssertionError(f"README runs an unknown script: {line}")
        checked += 1
    assert checked >= 3
