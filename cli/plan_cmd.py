"""`flowblend plan`: the per-step table of a plan (model, CFG scale, FLOPs) and its cost against the reference.

The reference is the large model alone (LLL) for two-model pairs, and the experts' own plan for a
two-expert pair (wan22: what diffusers' WanPipeline runs), whose switch step is printed.
"""
from __future__ import annotations

from flowblend.bench.flops import step_flops
from flowblend.export.pairs import reference_configs
from flowblend.runtime.plan import BlendPlan

from .common import (
    add_pair_args,
    add_plan_args,
    add_video_args,
    family_of,
    model_set_of,
    resolve_experts,
    resolve_guidance,
    resolve_plan,
    resolve_steps,
    resolve_video,
)


def register(sub) -> None:
    p = sub.add_parser("plan", help="show which model runs each step, its CFG scale and the plan's FLOPs")
    add_pair_args(p)
    add_plan_args(p)
    add_video_args(p)
    p.add_argument("--guidance", type=float, help="CFG scale (> 1 doubles every forward; wan22: the high expert's)")
    p.add_argument("--solver", choices=("unipc", "euler"), help="default: the family's (sets the timesteps)")
    p.add_argument("--shift", type=float, help="flow shift (default: the family's; sets the timesteps)")
    p.set_defaults(func=run)


def reference_plan(family, steps: int, experts=None) -> BlendPlan:
    """What a plan's cost is measured against: the experts' own plan, else the first (large) model alone."""
    if experts is not None:
        return BlendPlan.from_expert_boundary(experts, model_set=model_set_of(family))
    return BlendPlan((family.models[0],) * steps, family.letters[0] * 3, model_set_of(family))


def plan_costs(family, plan, latent_shape, guidance, reference: BlendPlan | None = None) -> dict:
    """Per-step FLOPs of each model (CFG doubling a step whose scale is > 1), the plan's and the reference's totals.

    `guidance` is one scale or the per-step table; a CFG batch of 2 runs whenever any step guides.
    """
    configs = reference_configs(family.name)
    table = (float(guidance),) * len(plan) if isinstance(guidance, (int, float)) else tuple(guidance)
    cfg = max(table) > 1.0
    per_step = {m: step_flops(family.transformer_class, configs[m], latent_shape, family.text_len, cfg)
                for m in family.models}
    reference = reference or BlendPlan((family.models[0],) * len(plan), "", plan.model_set)
    total, ref_total = plan.flops(per_step), reference.flops(per_step)
    return {"per_step": per_step, "total": total, "lll": ref_total, "reference": reference.spec or reference.label,
            "ideal_speedup": ref_total / total, "guidance": table}


def run(args) -> int:
    family = family_of(args)
    frames, height, width = resolve_video(args, family)
    latent_shape = family.latent_shape(frames, height, width)
    kw = family.sampler_kwargs(latent_shape)
    solver = args.solver or kw["solver"]
    shift, mu = (args.shift, None) if args.shift is not None else (kw["shift"], kw.get("mu"))
    steps = resolve_steps(args, family)
    experts = resolve_experts(args, family, steps, solver, shift, mu)
    plan = resolve_plan(args, family, experts)
    default, table = resolve_guidance(args, family, plan, experts)
    costs = plan_costs(family, plan, latent_shape, table, reference_plan(family, len(plan), experts))
    cfg = max(table) > 1
    print(f"pair {family.name}: {frames} frames {height}x{width}, latents {latent_shape}, {solver} shift {shift:g}, "
          f"guidance {default} ({'CFG: 2 forwards/step' if cfg else 'no CFG'})")
    if experts is not None:
        print(f"expert switch at step {experts.switch_step}: {experts.high} runs t >= {experts.boundary_timestep:g} "
              f"(boundary_ratio {experts.boundary_ratio:g}), {experts.low} the rest")
    counts = " + ".join(f"{plan.count(m)} {m}" for m in family.models)
    print(f"plan {plan.spec or plan.label} = {plan.label}  ({counts} steps)")
    print(f"{'step':>4}  {'model':<6}  {'guidance':>8}  {'TFLOPs':>10}")
    for i, m in enumerate(plan.models):
        print(f"{i:>4}  {m:<6}  {table[i]:>8g}  {costs['per_step'][m] / 1e12:>10.3f}")
    print(f"total {costs['total'] / 1e12:.1f} TFLOPs vs {costs['reference']} {costs['lll'] / 1e12:.1f} TFLOPs: "
          f"{100 * (1 - costs['total'] / costs['lll']):.1f}% fewer, FLOP-ideal speedup {costs['ideal_speedup']:.2f}x")
    return 0
