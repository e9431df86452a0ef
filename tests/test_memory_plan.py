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
    assert main(["plan", "--pair", "toy", "--steps", "4", "--plan", "LSL", "--dtype", "fp8", "--device-memory",
                 "0.01"]) == 0
    out = capsys.readouterr().out
    assert "device memory at the peak, --dtype fp8 --cfg batched" in out and "weights large:" in out
    assert "does NOT fit a 0.01 GiB GPU" in out


@pytest.mark.parametrize("cfg", ["batched", "sequential"])
def test_planned_activations_bound_the_assembled_toy_forward(cfg):
    """On the CPU the reference is LiveTensorBytes over one engine forward of an assembled BF16 run: the plan
    runs the whole forward (the engines precompute the rotary and timestep tables once), so it is an upper
    bound, within 15%; sequential CFG halves it."""
    import torch

    from flowblend.bench.memory import LiveTensorBytes
    from flowblend.bench.memory_plan import planned_activation_bytes

    family = get_family("toy")
    latent = family.latent_shape(family.frames, family.height, family.width)
    run = assemble("toy", latent, BlendPlan.parse("LSL", 4), SamplerOptions(guidance_scale=4.0),
                   EngineChoice(dtype="bf16", cfg=cfg))
    sampler = run.pipeline.sampler
    sampler = getattr(sampler, "sampler", sampler)  # the GraphRunner's Sampler
    embeds, _ = run.pair.encode_prompt(["a red circle moving left", ""])
    sampler.load_request(torch.randn(1, *latent), embeds[0:1], embeds[1:2])
    rows = 2 if cfg == "batched" else 1
    for model in family.models:
        with LiveTensorBytes() as live:
            sampler.engines[model].run(0)
        planned = planned_activation_bytes(family, model, "bf16", latent, rows)
        assert live.peak <= planned <= 1.15 * live.peak, (model, live.peak, planned)


def test_the_plan_meets_the_h200_figures():
    """docs/gpu-runs/2026-12-04-h200: fullsize.json large_fwd peaked at 36.29 GiB allocated (one 14B forward,
    the 1.3B loaded, BF16, 480x832x81, CFG batch 2); runner-report/bench/gpu-bench.json's 4-layer blended
    loop (480x832x17, unipc 10 steps) at 5335.2 MiB. The plan must be within 2% of each."""
    from flowblend.bench.memory_plan import plan_memory, planned_activation_bytes
    from flowblend.runtime.solvers import make_solver_table

    family = get_family("wan")
    forward = sum(planned_weights(family, "bf16").values()) + planned_activation_bytes(
        family, "large", "bf16", family.latent_shape(81, 480, 832), rows=2)
    assert forward == pytest.approx(36.2920184135437 * GIB, rel=0.02)
    configs = {m: dict(c, num_layers=4) for m, c in family.reference_configs.items()}
    table = make_solver_table("unipc", 10, 3.0)
    bench = plan_memory(family, ("large", "small"), family.latent_shape(17, 480, 832), "bf16", 2, table.timesteps,
                        table.state_names, capability=(9, 0), configs=configs)
    assert bench.total == pytest.approx(5594337280, rel=0.02)


def test_generate_refuses_what_cannot_fit_before_loading_and_names_the_fix(monkeypatch, capsys, tmp_path):
    from flowblend.assembly import run as assembly_run
    from flowblend.bench import memory_plan

    def no_loading(*args, **kwargs):
        raise AssertionError("the pair was loaded before the memory check")

    monkeypatch.setattr(assembly_run, "load_models", no_loading)
    family = get_family("toy")
    latent = family.latent_shape(family.frames, family.height, family.width)
    batched = memory_plan.plan_memory(family, ("large", "small"), latent, "fp32", 2, (1.0,) * 4,
                                      capability=(9, 0)).total
    capacity = batched - 1  # one byte short: sequential CFG (fewer activations) fits
    monkeypatch.setattr(memory_plan, "device_capacity", lambda device: (capacity, (9, 0)))
    rc = main(["generate", "--pair", "toy", "--steps", "4", "--plan", "LSL", "--prompt", "a red circle moving left",
               "--device", "cpu", "--out", str(tmp_path / "v.gif"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert "GiB on the device" in err and "try --dtype fp32 --cfg sequential" in err
    assert not (tmp_path / "v.gif").exists()
