"""Per-step CFG scales: a table beside the solver's coefficients, one scale per step.

Wan 2.2 A14B gives each expert its own scale (diffusers' `guidance_scale` for the high-noise
`transformer`, `guidance_scale_2` for the low-noise `transformer_2`). In a blended plan the
model that runs a step brings its scale; a stand-in (the small model) takes the scale of the
expert whose step it runs, unless it is given one explicitly. Two-model pairs have one scale
for every step. The sampler copies the table into a device tensor once per buffer set and reads
row i at step i, so the whole-loop graph reads the scale from memory rather than baking it.
"""
from __future__ import annotations

from .plan import BlendPlan, ExpertSchedule
from .solvers import make_solver_table


def guidance_table(plan: BlendPlan, default: float, scales: dict[str, float] | None = None,
                   experts: ExpertSchedule | None = None) -> tuple[float, ...]:
    """The CFG scale of every step of `plan`.

    A scale the plan sets for a stage (`L20,D4/10@1,L10`) comes first. `scales[m]` is model m's
    scale; a model without one takes, at step i, the scale of the expert
    `experts.models[i]` that step belongs to (when that expert has one), else `default`.
    """
    scales = dict(scales or {})
    for name, value in scales.items():
        if value < 0:
            raise ValueError(f"guidance scale of {name!r} must be >= 0 (1 disables CFG), got {value}")
    if default < 0:
        raise ValueError(f"guidance_scale must be >= 0 (1 disables CFG), got {default}")
    if experts is not None and plan.segments:
        raise ValueError(f"plan {plan.label}: stages with their own step counts are not supported for two-expert pairs "
                         "(the expert boundary is a step of the plain schedule); give every stage its base steps")
    if experts is not None and len(experts.timesteps) != len(plan):
        raise ValueError(f"the expert schedule has {len(experts.timesteps)} steps, the plan {len(plan)}")
    table = []
    for i, model in enumerate(plan.models):
        if plan.guidance and plan.guidance[i] is not None:  # the plan's own stage scale (`D4/10@1`)
            table.append(plan.guidance[i])
        elif model in scales:
            table.append(float(scales[model]))
        elif experts is not None and experts.models[i] in scales:
            table.append(float(scales[experts.models[i]]))
        else:
            table.append(float(default))
    return tuple(table)


def expert_schedule_for(solver: str, steps: int, shift: float, boundary_ratio: float,
                        mu: float | None = None) -> ExpertSchedule:
    """The expert of every step for a solver's own timesteps (what WanPipeline compares to the boundary)."""
    return ExpertSchedule(make_solver_table(solver, steps, shift, mu).timesteps, boundary_ratio)
