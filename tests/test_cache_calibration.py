"""Cached steps picked by calibration (issue 34 item 3): the rule is diffusers' MagCache decision, the measured
ratios are diffusers' calibration formula on the blocks' real residuals, and the plan file it writes is refused
(one line) for another pair or solver; `flowblend plan` shows cached steps and the FLOPs they save."""
import json
import re

import pytest
import torch
from diffusers import MagCacheConfig, WanTransformer3DModel
from diffusers.hooks.mag_cache import MagCacheBlockHook, MagCacheState
from tiny_models import TEXT, WAN_LATENT, tiny_pair
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flowblend.calibrate.cache_steps import CacheBudget, measure_mag_ratios, pick_cached
from flowblend.calibrate.divergence import Request, SamplingSetup
from flowblend.cli.main import main
from flowblend.engines.torch_engine import TorchEngine
from flowblend.families.toy_model import TOY_LARGE_CONFIG, TOY_SMALL_CONFIG
from flowblend.runtime.plan import BlendPlan


def _diffusers_skipped_steps(ratios, budget: CacheBudget) -> list[int]:
    """The steps diffusers' MagCache hooks skip on a tiny Wan transformer given `ratios` (its own state machine)."""
    model = tiny_pair("wan")["large"]
    model.enable_cache(MagCacheConfig(threshold=budget.threshold, max_skip_steps=budget.max_skip_steps,
                                      retention_ratio=budget.retention_ratio, num_inference_steps=len(ratios),
                                      mag_ratios=list(ratios)))
    ran = []
    hook = model.blocks[0].attn1.register_forward_pre_hook(lambda m, a: ran.append(step))
    gen = torch.Generator().manual_seed(0)
    latents, text = torch.randn((1, *WAN_LATENT), generator=gen), torch.randn((1, *TEXT), generator=gen)
    with torch.no_grad():
        for step in range(len(ratios)):
            model(hidden_states=latents, timestep=torch.tensor([900.0 - 40 * step]), encoder_hidden_states=text,
                  return_dict=False)
    hook.remove()
    return [i for i in range(len(ratios)) if i not in ran]


@pytest.mark.parametrize("seed,threshold,max_skip,retention", [(0, 0.06, 3, 0.2), (1, 0.2, 2, 0.1), (2, 0.5, 4, 0.0),
                                                               (3, 0.0, 3, 0.2)])
def test_the_cached_steps_are_the_ones_diffusers_magcache_skips(seed, threshold, max_skip, retention):
    gen = torch.Generator().manual_seed(seed)
    ratios = (1.0 + 0.08 * torch.randn(16, generator=gen)).tolist()
    budget = CacheBudget(threshold, max_skip, retention)
    expected = _diffusers_skipped_steps(ratios, budget)
    got = [i for i, c in enumerate(pick_cached(("large",) * 16, ratios, budget)) if c]
    assert got == expected
    if threshold > 0.1:
        assert got, "a budget this large should cache something (else the comparison shows nothing)"


def test_each_run_of_a_model_starts_full_and_keeps_its_own_accumulators():
    models = ("large",) * 4 + ("small",) * 4 + ("large",) * 4
    ratios = [1.0, 1.01, 1.01, 1.01] * 3
    cached = pick_cached(models, ratios, CacheBudget(0.05, 3, 0.0))
    # |1-1.01| = 0.01, then |1-1.0201| = 0.0201 (0.0301 total), then 0.0303 (0.0604 > 0.05: a full step)
    assert cached == (False, True, True, False) * 3


def test_the_measured_ratios_are_diffusers_calibration_on_the_blocks_residuals():
    pair = tiny_pair("wan")
    engines = {n: TorchEngine(m) for n, m in pair.items()}
    setup = SamplingSetup(6, "unipc", 3.0, 4.0, tuple(WAN_LATENT))
    gen = torch.Generator().manual_seed(3)
    request = Request("p", 0, torch.randn((1, *WAN_LATENT), generator=gen), torch.randn((2, *TEXT), generator=gen))
    residuals = {"large": [], "small": []}
    hooks = []
    for name, model in pair.items():
        seen = {}
        hooks.append(model.blocks[0].register_forward_pre_hook(
            lambda m, a, k, seen=seen: seen.__setitem__("in", (a[0] if a else k["hidden_states"]).clone()),
            with_kwargs=True))
        hooks.append(model.blocks[-1].register_forward_hook(
            lambda m, a, out, seen=seen, name=name: residuals[name].append(out - seen["in"])))
    plan = BlendPlan.parse("LLLSSS", 6)
    try:
        got = measure_mag_ratios(engines, [request], setup, plan)
    finally:
        for h in hooks:
            h.remove()
    expected = []
    for name in ("large", "small"):  # diffusers' own ratio over each model's run, from its first step (1.0)
        state, hook = MagCacheState(), MagCacheBlockHook(None, True, None)
        for r in residuals[name]:
            hook._perform_calibration_step(state, r)
            state.previous_residual = r
        expected += state.calibration_ratios
    assert len(expected) == 6 and expected[1] != 1.0
    assert got.per_request[0] == pytest.approx(expected, rel=1e-5)


def test_calibrate_cache_writes_a_plan_file_refused_for_another_solver_or_pair(tmp_path, capsys):
    out = tmp_path / "cal"
    rc = main(["calibrate", "cache", "--pair", "toy", "--plan", "LLL", "--steps", "8", "--prompt",
               "a red circle moving left", "--seeds", "0", "--budget", "0.5", "--retention", "0.25",
               "--out-dir", str(out), "--no-progress"])
    assert rc == 0
    data = json.loads((out / "plan.json").read_text())
    record = data["calibration"]
    assert (record["pair"], record["solver"], record["steps"]) == ("toy", "unipc", 8)
    assert "invalidated_by" in record and "solver" in record["invalidated_by"]
    expected = pick_cached(("large",) * 8, record["mag_ratios"], CacheBudget(0.5, 3, 0.25))
    assert data.get("cached", []) == [i for i, c in enumerate(expected) if c] and data["cached"]
    assert record["final_rel_l2"]["mean"] > 0  # the cached plan was run and differs from the full one
    capsys.readouterr()
    assert main(["plan", "--pair", "toy", "--plan-file", str(out / "plan.json")]) == 0
    assert "cached steps " + ", ".join(map(str, data["cached"])) in capsys.readouterr().out
    for extra, words in ((["--solver", "euler"], "calibrated with --solver unipc, not euler"),
                         (["--steps", "9"], "disagrees with the plan file's 8 steps")):
        assert main(["plan", "--pair", "toy", "--plan-file", str(out / "plan.json"), *extra]) != 0
        err = capsys.readouterr().err.strip()
        assert words in err and len(err.splitlines()) == 1
    data["calibration"]["pair"] = "wan"
    (out / "other.json").write_text(json.dumps(data))
    assert main(["plan", "--pair", "toy", "--plan-file", str(out / "other.json")]) != 0
    err = capsys.readouterr().err.strip()
    assert "calibrated for pair wan, not toy" in err and len(err.splitlines()) == 1


def _block_flops(config: dict) -> float:
    """FLOPs torch counts in the toy transformer's blocks at its CFG batch: the forward minus the forward without them."""
    model = WanTransformer3DModel(**config).eval()
    inputs = dict(hidden_states=torch.randn(2, 3, 9, 32, 32), timestep=torch.tensor([500.0, 500.0]),
                  encoder_hidden_states=torch.randn(2, 8, 32), return_dict=False)
    counts = []
    for blocks in (model.blocks, torch.nn.ModuleList()):
        model.blocks = blocks
        # the math SDPA backend: the counter has no formula for the fused CPU kernel and would skip attention
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            model(**inputs)
        counts.append(counter.get_total_flops())
    return float(counts[0] - counts[1])


def test_plan_prints_the_cached_steps_and_the_flops_they_save(capsys):
    assert main(["plan", "--pair", "toy", "--plan", "LLllLLSSsLLl", "--steps", "12"]) == 0
    out = capsys.readouterr().out
    assert "cached steps 2, 3, 8, 11" in out
    marked = [int(line.split()[0]) for line in out.splitlines() if re.match(r"\s*\d+\s+\w+ cached\s", line)]
    assert marked == [2, 3, 8, 11]  # the per-step rows say which steps are cached
    m = re.search(r"cached steps 2, 3, 8, 11 .*: ([\d.]+) (\w)FLOPs saved", out)
    saved = float(m.group(1)) * {"G": 1e9, "M": 1e6, "T": 1e12}[m.group(2)]
    expected = 3 * _block_flops(TOY_LARGE_CONFIG) + _block_flops(TOY_SMALL_CONFIG)
    assert saved == pytest.approx(expected, rel=0.02)
