"""Boundary selection: divergence-seeded plans and the quality-verified search against brute force;
the whole calibration end to end on tiny random Wan and LTX pairs (plumbing)."""
import itertools
import math

import numpy as np
import pytest
import torch
from test_divergence import encoder
from test_metrics import save_tiny_dino
from tiny_models import latent_shape, tiny_pair

from flowblend.calibrate.boundaries import (
    Scored,
    calibrate_plan,
    check_stage_steps,
    check_tolerance,
    lsl_plan,
    neighbours,
    plan_from_divergence,
    rescale_plan,
    retained_fraction,
    search_cheapest,
    small_window,
)
from flowblend.calibrate.divergence import DivergenceCurve, SamplingSetup
from flowblend.calibrate.metrics import MetricSources, QualityMetrics
from flowblend.calibrate.report import write_outputs
from flowblend.errors import FlowblendError
from flowblend.families import FAMILIES, LoadedPair
from flowblend.runtime.plan import BlendPlan


def curve_of(values) -> DivergenceCurve:
    return DivergenceCurve({}, [0.0] * len(values), [0.0] * (len(values) + 1), ["p"], [0],
                           {"cosine_guided": [list(values)]})


def brute_force_lsl(low: np.ndarray) -> tuple[int, int]:
    """Longest [s, e) with 1 <= s < e <= n - 1 and every step below the threshold."""
    n = len(low)
    best = (0, 0)
    for s in range(1, n - 1):
        for e in range(s + 1, n):
            if low[s:e].all() and e - s > best[1] - best[0]:
                best = (s, e)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_divergence_seed_is_the_longest_window_under_the_threshold(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 30))
    x = np.linspace(-1, 1, n)
    values = 0.05 + x ** 2 + 0.15 * rng.standard_normal(n)  # U-shaped with noise
    thr = float(np.quantile(values, rng.uniform(0.2, 0.8)))
    plan = plan_from_divergence(curve_of(values), thr)
    assert small_window(plan) == brute_force_lsl(values <= thr)
    assert len(plan) == n and plan.models[0] == plan.models[-1] == "large"
    anyp = plan_from_divergence(curve_of(values), thr, pattern="any")
    assert [m == "small" for m in anyp.models] == list(values <= thr)


def test_u_curve_with_median_threshold_puts_the_small_model_in_the_middle():
    values = (np.linspace(-1, 1, 20)) ** 2
    plan = plan_from_divergence(curve_of(values))  # default threshold: the median
    start, end = small_window(plan)
    assert 3 <= start < 10 < end <= 17 and plan.count("small") == 10


@pytest.mark.parametrize("tolerance", [0, -0.1, 1.5, float("nan"), "0.2"])
def test_tolerance_outside_unit_interval(tolerance):
    with pytest.raises(FlowblendError, match=r"outside \(0, 1\]"):
        check_tolerance(tolerance)
    assert check_tolerance(1) == 1.0 and check_tolerance(0.05) == 0.05


@pytest.mark.parametrize("steps", [0, 1, 2])
def test_too_few_steps_for_three_stages(steps):
    with pytest.raises(FlowblendError, match="too few to form three stages"):
        check_stage_steps(steps)
    with pytest.raises(FlowblendError, match="too few"):
        plan_from_divergence(curve_of([0.1] * max(steps, 1)))


def test_lsl_plans_neighbours_and_rescaling():
    assert lsl_plan(10, 4, 8).label == "L4,S4,L2" and lsl_plan(10, 4, 8).spec == "LSL:0.4,0.2"
    assert lsl_plan(10, 3, 3).label == "L10"
    assert BlendPlan.parse(lsl_plan(50, 20, 40).spec, 50).models == lsl_plan(50, 20, 40).models  # spec round-trips
    windows = {small_window(p) for p in neighbours(lsl_plan(10, 4, 8), 1)}
    assert windows == {(s, e) for s in (3, 4, 5) for e in (7, 8, 9)}
    assert all(1 <= s and e <= 9 for s, e in (small_window(p) for p in neighbours(lsl_plan(10, 1, 9), 2)))
    assert rescale_plan(lsl_plan(20, 8, 16), 10).models == lsl_plan(10, 4, 8).models
    assert rescale_plan(lsl_plan(20, 0, 0), 7).label == "L7"
    assert retained_fraction(0.8, 1.0, 0.5) == pytest.approx(0.6) and retained_fraction(0.3, 0.5, 0.5) == 1.0


def synthetic_quality(plan: BlendPlan) -> float:
    """Quality of a toy world: small steps hurt most at both ends (U-shaped sensitivity)."""
    n = len(plan)
    weight = np.array([(2 * i / (n - 1) - 1) ** 4 for i in range(n)])
    return 1.0 - float(sum(w for w, m in zip(weight, plan.models) if m == "small")) / n


@pytest.mark.parametrize("steps,tolerance", [(12, 0.02), (20, 0.05), (20, 0.2), (16, 0.5)])
def test_search_finds_the_brute_force_cheapest_accepted_plan(steps, tolerance):
    per_step = {"large": 7.6, "small": 1.0}
    sss = synthetic_quality(BlendPlan(("small",) * steps))
    calls = []

    def score(plan):
        calls.append(plan.models)
        return Scored(plan, plan.flops(per_step), synthetic_quality(plan),
                      retained_fraction(synthetic_quality(plan), 1.0, sss))

    accept = lambda s: s.retained >= 1 - tolerance  # noqa: E731
    chosen, scored = search_cheapest(lsl_plan(steps, steps // 2 - 1, steps // 2 + 1), score, accept, 1, max_rounds=50)
    assert len(calls) == len(set(calls)) == len(scored)  # memoised: each plan generated once
    # brute force over every LSL window
    best = min((lsl_plan(steps, s, e) for s, e in itertools.combinations(range(1, steps), 2)
                if accept(score(lsl_plan(steps, s, e)))), key=lambda p: (p.flops(per_step), -synthetic_quality(p)))
    assert chosen.plan.flops(per_step) == pytest.approx(best.flops(per_step))
    assert chosen.accepted and chosen.plan.count("small") > 0


def test_search_falls_back_to_lll_when_nothing_passes():
    def score(plan):
        return Scored(plan, float(plan.count("large")), 1.0 if plan.count("small") == 0 else 0.0,
                      1.0 if plan.count("small") == 0 else 0.0)

    chosen, scored = search_cheapest(lsl_plan(10, 2, 8), score, lambda s: s.retained >= 0.9, 1, max_rounds=10)
    assert chosen.plan.count("small") == 0 and len(scored) > 3


# -- end to end on tiny random pairs (plumbing) --------------------------------------------------
def tiny_loaded_pair(family: str) -> LoadedPair:
    models = tiny_pair(family)

    def decode(latents):  # a stand-in VAE: first 3 channels, squashed to [-1, 1], upsampled to 32x32
        b, c, f, h, w = latents.shape
        x = torch.tanh(latents[:, :3]).permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="nearest")
        return x.reshape(b, f, 3, 32, 32).permute(0, 2, 1, 3, 4)

    return LoadedPair(FAMILIES[family], models, encoder(family), decode)


@pytest.fixture(scope="module")
def dino_metrics(tmp_path_factory):
    return QualityMetrics("dino", MetricSources(dino=save_tiny_dino(tmp_path_factory.mktemp("dino"))))


@pytest.mark.parametrize("family,solver", [("wan", "unipc"), ("ltx", "euler")])
def test_calibrate_plan_end_to_end_on_tiny_pairs(tmp_path, dino_metrics, family, solver):
    pair = tiny_loaded_pair(family)
    mu = 0.9 if family == "ltx" else None
    setup = SamplingSetup(8, solver, 3.0, 3.0, latent_shape(family), mu)
    result = calibrate_plan(pair, ["a red circle", "a blue square"], [0], setup, dino_metrics, tolerance=0.3,
                            heldout_prompts=["a green triangle", "a cyan square"], heldout_seeds=[9], reduced_steps=4)
    roles = {s.role for s in result.candidates}
    assert {"LLL", "SSS", "paper default"} <= roles and result.chosen in result.candidates
    lll, sss = result.role("LLL"), result.role("SSS")
    assert lll.quality == pytest.approx(1.0, abs=1e-5) and lll.retained == 1.0 and sss.retained == 0.0
    assert "wall_s" not in lll.scores and "wall_s" in sss.scores  # LLL's videos come from the divergence pass
    accepted = [s for s in result.candidates if s.accepted]
    assert result.chosen.accepted and result.chosen.flops == min(s.flops for s in accepted)
    for s in result.candidates:  # accepted <=> keeps >= 1 - tolerance of the SSS->LLL gap
        assert s.accepted == (s.retained >= 0.7 - 1e-12)
        assert math.isfinite(s.scores["fd_dino"]) and -1 <= s.scores["dino_sim"] <= 1
    assert [s.role for s in result.heldout][:2] == ["LLL", "SSS"] and len(result.reduced) >= 2
    assert all(len(s.plan) == 4 for s in result.reduced)
    paths = write_outputs(result, tmp_path / "out", title=f"tiny {family}")
    plan = BlendPlan.from_json(paths["plan"].read_text())
    assert plan.models == result.chosen.plan.models
    text = paths["report"].read_text()
    assert result.chosen.plan.label in text and "Held-out check" in text and "step reduction" in text
    assert "Tolerance 0.3:" in text and "{" not in text.split("```")[0]  # every placeholder filled in
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "calibration-divergence.png", "calibration-quality-vs-flops.png", "calibration.json", "calibration.md",
        "plan.json"]


def test_calibrate_plan_rejects_bad_arguments_before_sampling(dino_metrics):
    pair = tiny_loaded_pair("wan")

    def boom(*a, **k):
        raise AssertionError("sampling started")

    pair.transformers = {"large": boom, "small": boom}
    setup = SamplingSetup(8, "unipc", 3.0, 3.0, latent_shape("wan"))
    with pytest.raises(FlowblendError, match="tolerance"):
        calibrate_plan(pair, ["a"], [0], setup, dino_metrics, tolerance=0.0)
    with pytest.raises(FlowblendError, match="three stages"):
        calibrate_plan(pair, ["a"], [0], setup.with_steps(2), dino_metrics)
    with pytest.raises(FlowblendError, match="three stages"):
        calibrate_plan(pair, ["a"], [0], setup, dino_metrics, reduced_steps=2)
