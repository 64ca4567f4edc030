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
    assert heat.shape == (8, side, side) and heat.abs().max() <= 1.0 + 1e-5
    # backward() in the example reached the encoders
    assert scope["model"].audio_encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
