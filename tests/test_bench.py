"""bench.py: the analytic FLOP count against torch's own counter, and a small run
of the cheap parts (CI also runs `bench.py --quick`; no timing is asserted)."""
import json
import math

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import augment
import bench
from losses import EquiAVLoss
from model import EquiAV, get_config


@pytest.mark.parametrize("overrides", [{}, {"depth": 2, "embed_dim": 64, "pred_heads": 2}])
def test_step_flops_matches_flop_counter(overrides):
    """step_flops(cfg, B, S) = the matmul FLOPs torch counts in a real forward + backward.

    The math SDPA backend runs attention as bmm's, which FlopCounterMode counts
    (the fused CPU kernel it would not). The forward must match exactly; the
    step within 0.1 %: the formula leaves out the B x B loss similarities and
    counts an input gradient for the aug encoder's first Linear, whose input t
    is data (autograd skips part of it)."""
    cfg = get_config("tiny", **overrides)
    B, S = 3, 5
    torch.manual_seed(0)
    net, criterion = EquiAV(cfg), EquiAVLoss()
    g = torch.Generator().manual_seed(0)
    x_a = torch.randn(B, cfg.audio_length, cfg.mel_bins, generator=g)
    x_v = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g)
    x_a_aug, t_a = augment.augment_audio(x_a, g)
    x_v_aug, t_v = augment.augment_visual(x_v, g)
    T_a = augment.sample_audio_vectors(B, S, g, T=cfg.audio_length, F=cfg.mel_bins)
    T_v = augment.sample_visual_vectors(B, S, g, H=cfg.image_size, W=cfg.image_size)
    args = (x_a, augment.normalize_image(x_v), x_a_aug, augment.normalize_image(x_v_aug),
            t_a, t_v, T_a, T_v)
    analytic = bench.step_flops(cfg, B, S)
    patch = sum(2 * (2 * B) * math.prod(grid) * c * cfg.patch_size ** 2 * cfg.embed_dim
                for grid, c in ((cfg.audio_grid, 1), (cfg.visual_grid, 3)))
    with sdpa_kernel(SDPBackend.MATH):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net(*args)
        assert counter.get_total_flops() == (analytic + patch) / 3  # forward, exactly
        with FlopCounterMode(display=False) as counter:
            criterion(net(*args))["loss"].backward()
    assert counter.get_total_flops() == pytest.approx(analytic, rel=1e-3)


def test_bench_cheap_parts_write_json(tmp_path):
    out = tmp_path / "bench.json"
    cfg = bench.BenchConfig(quick=True, parts="augment,retrieval", out=str(out), device="cpu",
                            aug_batch=2, retrieval_sizes="50")
    results = bench.main(cfg)
    saved = json.loads(out.read_text())
    assert saved["meta"]["torch"] == torch.__version__
    assert {r["input"] for r in saved["augment"]} == {"audio", "visual", "step inputs"}
    for row in saved["augment"]:
        assert row["batch"] == 2 and row["samples_per_s"] > 0
        assert math.isclose(row["ms_per_sample"], 1e3 / row["samples_per_s"], rel_tol=1e-9)
        assert row["step_launches"] == bench.augment_launches(2)[0]
    assert [r["N"] for r in saved["retrieval"]] == [50, 50]  # both embedding widths
    assert "step" not in results and "data" not in results


def test_launch_counter_counts_device_ops_not_views():
    x = torch.zeros(4, 3, device="meta")
    with bench.LaunchCounter() as counter:
        (x * 2 + 1).view(12)                # 2 kernels and a view
        torch.ones(3) * 2                                                  # CPU: not counted
    assert counter.count == 2 and counter.ops == {"mul": 1, "add": 1}
    n2, ops2, uploads2 = bench.augment_launches(2)
    n4, ops4, uploads4 = bench.augment_launches(4)
    assert n2 > 0 and ops2["grid_sampler_2d"] == 2 and ops2["convolution"] == 4   # one per modality; 2 blurs x 2 axes


def test_input_pipeline_ops_do_not_grow_with_the_batch():
    """Every augmentation runs once on the whole batch (batched crops, blurs, jitter), and
    the step's draws travel in one copy: the same device ops at any batch size. Uploads:
    the step's draws, the batch's audio and frames, and the small index table torchvision's
    HSV conversion copies (augment.adjust_hue)."""
    counts = {B: bench.augment_launches(B) for B in (2, 16, 40)}
    assert counts[2][0] == counts[16][0] == counts[40][0]
    assert counts[2][1] == counts[40][1]
    assert counts[16][2] == 4


def test_bad_options_are_rejected():
    with pytest.raises(ValueError, match="--parts: unknown"):
        bench.resolve_config(bench.BenchConfig(parts="step,warp"))
    with pytest.raises(ValueError, match="--precisions: unknown"):
        bench.resolve_config(bench.BenchConfig(precisions="fp8"))
    import utils
    cfg = utils.parse_config(bench.BenchConfig, ["--quick", "--parts", "data"])
    assert cfg.quick is True and cfg.parts == "data"       # a bare bool flag means true
