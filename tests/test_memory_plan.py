"""The planned weights (bench/memory_plan.py) against the storages of assembled toy runs, and what the
plan says of Wan 14B + 1.3B against the H200's measured peak (issue 32, item 2)."""
import pytest

from flowblend.assembly import EngineChoice, assemble
from flowblend.bench.memory import module_bytes
from flowblend.bench.memory_plan import GIB, planned_weights
from flowblend.cli.main import main
from flowblend.families import get_family
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import SamplerOptions


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_planned_weights_equal_the_assembled_toy_runs_weights(dtype):
    family = get_family("toy")
    run = assemble("toy", family.latent_shape(family.frames, family.height, family.width), BlendPlan.parse("LSL", 4),
                   SamplerOptions(guidance_scale=4.0), EngineChoice(dtype=dtype))
    held = {m: module_bytes(t) for m, t in run.pair.transformers.items()}
    assert planned_weights(family, dtype) == pytest.approx(held, rel=1e-3)


def test_wan_14b_weights_are_below_the_h200_peak_and_fp8_halves_them(capsys):
    # docs/gpu-runs/2026-12-04-h200/fullsize.json large_fwd: 36.29 GiB allocated at the peak of one 14B
    # forward with the 1.3B loaded (BF16, 480x832x81, CFG batch 2): weights + activations
    peak = 36.2920184135437 * GIB
    bf16, fp8 = planned_weights(get_family("wan"), "bf16"), planned_weights(get_family("wan"), "fp8")
    assert 0.7 * peak < sum(bf16.values()) < peak  # the rest of the peak is the forward's activations
    assert sum(fp8.values()) == pytest.approx(sum(bf16.values()) / 2, rel=0.03)
    assert main(["plan", "--pair", "toy", "--steps", "4", "--plan", "LSL"]) == 0
    assert "weights on the device, fp8: large" in capsys.readouterr().out
