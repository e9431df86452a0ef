"""Which steps of a plan are cached, picked once from measurements (issue 34 item 3): MagCache's rule, made static.

1. Measure: the plan runs with every step full over the calibration prompts x seeds, each step storing its
   blocks' residual (engines/step_cache.py); per step, the magnitude ratio of that residual to the same
   model's residual one step before, mean over tokens of ||r_i|| / ||r_{i-1}|| (as diffusers'
   `MagCacheBlockHook._perform_calibration_step`), averaged over the requests. The first step of each run
   of one model has no ratio (1.0): it is always a full step (runtime/cached_steps.py).
2. Pick: diffusers' MagCache skip rule (`MagCacheHeadHook.new_forward`) on those ratios, run once on the
   host: past the retention steps a model accumulates ratio, steps and |1 - accumulated ratio|, and skips
   while that error stays <= the budget and at most `max_skip_steps` steps in a row; else it runs and
   resets. Here the answer is a plan (`LLlLL...`), fixed before the loop, so the loop stays one graph.
3. Verify: the cached plan runs on the same requests; its final latents are compared with the full plan's.

The choice holds for the pair (its weights), solver, step count, shift and guidance it was measured at:
`calibration_record` says so in the plan file, and resolve/blend_request.py refuses a different pair, solver
or step count (and warns on another shift, guidance or video size).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from flowblend.errors import FlowblendError

from ..engines.step_cache import STORE, CacheSchedule
from ..runtime.plan import BlendPlan
from .divergence import Request, SamplingSetup

INVALIDATED_BY = ("a different model pair or weights, solver, step count or base plan invalidates these cached "
                  "steps (refused); another shift, guidance or video size changes the residuals they were measured "
                  "on (warned): run `flowblend calibrate cache` again")


@dataclass(frozen=True)
class CacheBudget:
    """MagCache's knobs: the accumulated-error budget, the longest run of cached steps, the steps kept full first."""

    threshold: float
    max_skip_steps: int = 3
    retention_ratio: float = 0.2

    def __post_init__(self):
        if not self.threshold >= 0:
            raise FlowblendError(f"--budget {self.threshold} must be >= 0 (0 caches nothing; MagCache uses 0.06-0.24)")
        if self.max_skip_steps < 1:
            raise FlowblendError(f"--max-skip {self.max_skip_steps} must be >= 1 cached step in a row")
        if not 0.0 <= self.retention_ratio <= 1.0:
            raise FlowblendError(f"--retention {self.retention_ratio} must be a fraction of the steps in [0, 1]")


def pick_cached(models: tuple[str, ...], mag_ratios, budget: CacheBudget) -> tuple[bool, ...]:
    """Per step, True where MagCache's rule skips the blocks: diffusers' `MagCacheHeadHook.new_forward` for each
    model's steps (its own accumulators), with the first step of each run of one model always full."""
    steps = len(models)
    if len(mag_ratios) != steps:
        raise ValueError(f"{len(mag_ratios)} magnitude ratios for {steps} steps")
    retention_step = int(budget.retention_ratio * steps + 0.5)
    state: dict[str, list] = {}  # model -> [accumulated ratio, accumulated steps, accumulated error]
    cached = []
    for i, model in enumerate(models):
        run_start = i == 0 or models[i - 1] != model
        acc = state.setdefault(model, [1.0, 0, 0.0])
        skip = False
        if run_start:
            acc[:] = [1.0, 0, 0.0]  # a residual from before the switch is of another noise level
        elif i >= retention_step:
            acc[0] *= float(mag_ratios[i])
            acc[1] += 1
            acc[2] += abs(1.0 - acc[0])
            skip = acc[2] <= budget.threshold and acc[1] <= budget.max_skip_steps
            if not skip:
                acc[:] = [1.0, 0, 0.0]
        cached.append(skip)
    return tuple(cached)


def _mag_ratio(current: torch.Tensor, previous: torch.Tensor) -> float:
    """diffusers' calibration ratio: mean over tokens (and the CFG batch) of the residuals' norm ratio."""
    curr = torch.linalg.norm(current.float(), dim=-1)
    prev = torch.linalg.norm(previous.float(), dim=-1)
    return float((curr / (prev + 1e-8)).mean())


@dataclass
class CacheMeasurement:
    """Magnitude ratios per step (mean and per request) along the full plan, and its final latents per request."""

    mag_ratios: list[float]
    per_request: list[list[float]]
    finals: list[torch.Tensor]


@torch.no_grad()
def measure_mag_ratios(engines: dict, requests: list[Request], setup: SamplingSetup, plan: BlendPlan,
                       progress: bool = False) -> CacheMeasurement:
    """Run `plan` with every step full on each request, every step storing its residual, and read the ratios."""
    full = plan.full()
    sampler = setup.sampler(engines, full)
    for name in dict.fromkeys(full.models):
        if not getattr(engines[name], "supports_step_cache", False):
            raise FlowblendError(f"engine of {name} runs the whole forward: cached steps need the torch backend")
    store_all = {name: CacheSchedule({i: STORE for i, m in enumerate(full.models) if m == name})
                 for name in dict.fromkeys(full.models)}
    per_request, finals = [], []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests) * len(full), desc="residual ratios", unit="step")
    for request in requests:
        bufs = sampler.load_request(**request.sample_args())
        for name, schedule in store_all.items():
            engines[name].set_cache_schedule(schedule)  # every step stores: the velocity is unchanged
        previous: dict[str, torch.Tensor] = {}
        ratios = []
        for i, model in enumerate(full.models):
            sampler.evaluate(i)
            residual = torch.cat([r for r in engines[model].residuals()])
            run_start = i == 0 or full.models[i - 1] != model
            ratios.append(1.0 if run_start else _mag_ratio(residual, previous[model]))
            previous[model] = residual.clone()
            sampler.advance(i)
            if bar is not None:
                bar.update()
        per_request.append(ratios)
        finals.append(bufs.latents.clone())
    if bar is not None:
        bar.close()
    for name in store_all:
        engines[name].set_cache_schedule(CacheSchedule({}))
    mean = torch.tensor(per_request, dtype=torch.float64).mean(0).tolist()
    return CacheMeasurement(mean, per_request, finals)


@torch.no_grad()
def final_errors(engines: dict, requests: list[Request], setup: SamplingSetup, plan: BlendPlan,
                 references: list[torch.Tensor]) -> list[float]:
    """Relative L2 of `plan`'s final latents to each request's reference (the full plan's)."""
    sampler = setup.sampler(engines, plan)
    out = []
    for request, ref in zip(requests, references):
        latents = sampler.sample(**request.sample_args())
        out.append(float((latents.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)))
    return out


def calibration_record(pair: str, models: dict, setup: SamplingSetup, base: BlendPlan, budget: CacheBudget,
                       measurement: CacheMeasurement, errors: list[float], prompts: list[str], seeds) -> dict:
    """What the plan file records of its calibration: what it holds for, how it was measured, what breaks it."""
    return {"kind": "cached steps (MagCache rule on measured residual magnitude ratios)", "pair": pair,
            "models": models, "solver": setup.solver, "steps": setup.steps, "shift": setup.shift,
            "guidance": setup.guidance, "latent_shape": list(setup.latent_shape), "base_plan": base.per_step,
            "budget": asdict(budget), "mag_ratios": [round(r, 6) for r in measurement.mag_ratios],
            "prompts": len(prompts), "seeds": list(seeds),
            "final_rel_l2": {"mean": sum(errors) / max(len(errors), 1), "max": max(errors, default=0.0)},
            "invalidated_by": INVALIDATED_BY}


@dataclass
class CacheCalibration:
    """`flowblend calibrate cache`'s answer: the plan with its cached steps, and what it was chosen from."""

    plan: BlendPlan
    measurement: CacheMeasurement
    errors: list[float]
    flops: float
    full_flops: float


def calibrate_cache(pair, engines: dict, requests: list[Request], setup: SamplingSetup, base: BlendPlan,
                    budget: CacheBudget, progress: bool = False) -> CacheCalibration:
    """Measure `base`'s residual ratios on `requests`, pick its cached steps within `budget`, verify them."""
    from ..bench.flops import cached_step_flops, step_flops

    if len(base) != setup.steps:
        raise FlowblendError(f"plan {base.label} has {len(base)} steps but --steps is {setup.steps}: make them agree")
    base = base.full()
    measurement = measure_mag_ratios(engines, requests, setup, base, progress)
    cached = pick_cached(base.models, measurement.mag_ratios, budget)
    plan = base.with_cached(i for i, c in enumerate(cached) if c)
    errors = final_errors(engines, requests, setup, plan, measurement.finals) if plan.cached else [0.0] * len(requests)
    cfg, text_len = setup.guidance > 1, requests[0].embeds.shape[1]
    cls = pair.family.transformer_class
    per_step = {m: step_flops(cls, dict(t.config), setup.latent_shape, text_len, cfg) for m, t in pair.transformers.items()}
    per_cached = {m: cached_step_flops(cls, dict(t.config), setup.latent_shape, text_len, cfg)
                  for m, t in pair.transformers.items()}
    return CacheCalibration(plan, measurement, errors, plan.flops(per_step, per_cached), base.flops(per_step))
