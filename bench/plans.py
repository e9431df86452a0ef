"""Which plans a benchmark measures, and the reference its speedups are measured against.

Two-model pairs: the plans given (default LLL, LSL:0.4,0.2, SSS) against the large model alone.
Two-expert pairs (wan22): the plans given (default the experts' own plan and the small model
around the expert switch) against the experts' own plan, each step with its expert's CFG scale.
"""
from __future__ import annotations

import json
from pathlib import Path

from flowblend.errors import FlowblendError

from ..resolve.blend_request import check_calibration
from ..runtime.guidance import expert_schedule_for
from ..runtime.plan import BlendPlan, ExpertSchedule, ModelSet

DEFAULT_PLANS = ("LLL", "LSL:0.4,0.2", "SSS")
EXPERT_PLANS = ("experts", "experts:4,4")  # two-expert pairs (wan22): their own plan, small around the switch


def resolve_plans(specs, plan_files, steps: int, model_set: ModelSet | None = None,
                  experts: ExpertSchedule | None = None) -> list[BlendPlan]:
    """The plans to measure in the family's model names (a two-expert pair's defaults are EXPERT_PLANS)."""
    model_set = model_set or ModelSet(("large", "small"), ("L", "S"))
    specs = EXPERT_PLANS if experts is not None and tuple(specs) == DEFAULT_PLANS else specs
    plans = [BlendPlan.parse(spec, steps, model_set, experts) for spec in specs]
    for path in plan_files:
        plan = BlendPlan.from_json(Path(path).read_text())
        if len(plan) != steps:
            raise FlowblendError(f"plan file {path} has {len(plan)} steps but the run has {steps}: pass --steps {len(plan)}")
        plans.append(BlendPlan(plan.models, plan.spec, model_set, plan.segments, plan.guidance, plan.cached))
    return plans


def reference_plan_for(family, steps: int, experts: ExpertSchedule | None) -> BlendPlan:
    """What speedups are measured against: the experts' own plan (wan22), else the large model alone (LLL)."""
    model_set = ModelSet(tuple(family.models), tuple(family.letters))
    if experts is not None:
        return BlendPlan.from_expert_boundary(experts, model_set=model_set)
    return BlendPlan((family.models[0],) * steps, "LLL", model_set)


def bench_plans(family, specs, plan_files, steps: int, sampler_kwargs: dict, guidance: float,
                boundary_ratio: float | None = None):
    """(plans with the reference among them, the reference, the expert schedule or None, per-model CFG scales)."""
    experts, scales = None, {}
    if family.experts is not None:  # wan22: the switch on the solver's timesteps, each expert's CFG scale
        ratio = family.boundary_ratio if boundary_ratio is None else boundary_ratio
        experts = expert_schedule_for(sampler_kwargs["solver"], steps, sampler_kwargs["shift"], ratio,
                                      sampler_kwargs.get("mu"))
        scales = {**dict(family.expert_guidance), experts.high: guidance}
    plans = resolve_plans(specs, plan_files, steps, ModelSet(tuple(family.models), tuple(family.letters)), experts)
    for path in plan_files:  # a calibrated plan file holds for its pair and solver only (calibrate/cache_steps.py)
        check_calibration(json.loads(Path(path).read_text()).get("calibration"), path, family.name,
                          sampler_kwargs["solver"], sampler_kwargs["shift"], guidance)
    reference = reference_plan_for(family, steps, experts)
    if not any(p.models == reference.models for p in plans):
        plans.insert(0, reference)  # the reference is always measured
    reference = next(p for p in plans if p.models == reference.models)
    return plans, reference, experts, scales
