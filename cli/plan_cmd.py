"""`flowblend plan`: the per-step table of a plan (model, CFG scale, FLOPs) and its cost against the reference.

The reference is the large model alone (LLL) for two-model pairs, and the experts' own plan for a
two-expert pair (wan22: what diffusers' WanPipeline runs), whose switch step is printed.
"""
from __future__ import annotations

from ..bench.flops import cached_step_flops, step_flops
from ..families import reference_configs
from ..resolve.blend_request import (
    model_set_of,
    plan_of,
    resolve_experts,
    resolve_guidance,
    solver_of,
    steps_of,
    video_of,
)
from ..runtime.plan import BlendPlan
from .common import choices_of, family_of, subscribe

FLOP_UNITS = ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"))


def register(p) -> None:
    subscribe(p, "pair", "plan", "video", "guidance", "experts", "solver", "dtype", "engine")
    p.add_argument("--memory", action="store_true",
                   help="also print what the run holds on the device at its peak, term by term (planned before "
                        "loading, on the meta device: seconds at 14B)")
    p.add_argument("--device-memory", type=float, metavar="GIB",
                   help="--memory, and say whether the run fits a GPU with this much memory (GiB; default: "
                        "none, no verdict; compute capability 9.0 assumed for the BLAS workspaces)")
    p.set_defaults(func=run)


def flop_unit(flops: float) -> tuple[float, str]:
    """(scale, name) of the largest unit that keeps `flops` at 1 or more: 2.3e9 -> GFLOPs."""
    return next(((scale, name) for scale, name in FLOP_UNITS if flops >= scale), FLOP_UNITS[-1])


def format_flops(flops: float) -> str:
    scale, name = flop_unit(flops)
    return f"{flops / scale:.3g} {name}"


def reference_plan(family, steps: int, experts=None) -> BlendPlan:
    """What a plan's cost is measured against: the experts' own plan, else the first (large) model alone."""
    if experts is not None:
        return BlendPlan.from_expert_boundary(experts, model_set=model_set_of(family))
    return BlendPlan((family.models[0],) * steps, family.letters[0] * 3, model_set_of(family))


def plan_costs(family, plan, latent_shape, guidance, reference: BlendPlan | None = None) -> dict:
    """Per-step FLOPs of each model (CFG doubling every step when any step guides), the plan's and the reference's
    totals; `guidance` is one scale or the per-step table."""
    configs = reference_configs(family.name)
    table = (float(guidance),) * len(plan) if isinstance(guidance, (int, float)) else tuple(guidance)
    cfg = max(table) > 1.0
    # a model that runs but never guides is one forward per step (the sampler runs it batch 1)
    unguided = set(plan.models) - {m for m, g in zip(plan.models, table) if g > 1.0}
    per_step = {m: step_flops(family.transformer_class, configs[m], latent_shape, family.text_len,
                              cfg and m not in unguided) for m in family.models}
    # a cached step runs the forward without its repeated blocks (engines/step_cache.py)
    per_cached = {m: cached_step_flops(family.transformer_class, configs[m], latent_shape, family.text_len,
                                       cfg and m not in unguided) for m in family.models}
    reference = reference or BlendPlan((family.models[0],) * plan.base_steps, "", plan.model_set)
    total, ref_total = plan.flops(per_step, per_cached), reference.flops(per_step)
    return {"per_step": per_step, "per_cached_step": per_cached, "total": total, "lll": ref_total,
            "reference": reference.spec or reference.label, "ideal_speedup": ref_total / total, "guidance": table,
            "cache_saved": plan.flops(per_step) - total}


def run(args) -> int:
    family, choices = family_of(args), choices_of(args)
    frames, height, width = video_of(choices, family)
    latent_shape = family.latent_shape(frames, height, width)
    solver, shift, mu = solver_of(choices, family, latent_shape)
    experts = resolve_experts(choices, family, steps_of(choices, family), solver, shift, mu)
    plan = plan_of(choices, family, experts)
    guidance, table = resolve_guidance(choices, family, plan, experts)
    costs = plan_costs(family, plan, latent_shape, table, reference_plan(family, plan.base_steps, experts))
    cfg = max(table) > 1
    print(f"pair {family.name}: {frames} frames {height}x{width}, latents {latent_shape}, {solver} shift {shift:g}, "
          f"guidance {guidance} ({'CFG: 2 forwards/step' if cfg else 'no CFG'})")
    if experts is not None:
        print(f"expert switch at step {experts.switch_step}: {experts.high} runs t >= {experts.boundary_timestep:g} "
              f"(boundary_ratio {experts.boundary_ratio:g}), {experts.low} the rest")
    counts = " + ".join(f"{plan.count(m)} {m}" for m in family.models)
    base = f", over a {plan.base_steps}-step base schedule" if plan.base_steps != len(plan) else ""
    print(f"plan {plan.spec or plan.label} = {plan.label}  ({counts} steps{base})")
    scale, unit = flop_unit(max(costs["per_step"].values()))
    print(f"{'step':>4}  {'model':<12}  {'guidance':>8}  {unit:>10}")
    for i, m in enumerate(plan.models):
        cost = costs["per_cached_step" if plan.is_cached(i) else "per_step"][m]
        print(f"{i:>4}  {m + (' cached' if plan.is_cached(i) else ''):<12}  {table[i]:>8g}  {cost / scale:>10.3f}")
    print(f"{'stage':<12}  {'model':<9}  {'steps':>5}  {'of base':>7}  {'guidance':>8}  {unit:>10}")
    for name, (m, start, end, span) in zip(plan.label.split(","), plan.stage_table()):
        scales = sorted(set(table[start:end]))
        cost = costs["per_cached_step" if plan.is_cached(start) else "per_step"][m]
        print(f"{name:<12}  {m:<9}  {end - start:>5}  {span:>7}  {','.join(f'{g:g}' for g in scales):>8}  "
              f"{(end - start) * cost / scale:>10.3f}")
    if plan.cached:
        print(f"cached steps {', '.join(map(str, plan.cached_steps()))} (blocks skipped, last full step's residual "
              f"reused): {format_flops(costs['cache_saved'])} saved")
    print(f"total {format_flops(costs['total'])} vs {costs['reference']} {format_flops(costs['lll'])}: "
          f"{100 * (1 - costs['total'] / costs['lll']):.1f}% fewer, FLOP-ideal speedup {costs['ideal_speedup']:.2f}x")
    if args.memory or args.device_memory is not None:
        print_memory_plan(args, family, plan, latent_shape, solver, shift, mu, table)
    return 0


def print_memory_plan(args, family, plan, latent_shape, solver, shift, mu, guidance) -> None:
    """What the run holds on the device at its peak, term by term, before loading (bench/memory_plan.py)."""
    from ..bench.memory_plan import GIB, plan_for
    from ..runtime.solvers import make_solver_table

    solver_table = make_solver_table(solver, len(plan), shift, mu, segments=plan.segments)
    memory = plan_for(family, plan, latent_shape, solver_table, guidance, args.dtype, args.cfg, args.fp8_keep_blocks,
                      offload=args.offload)
    print(f"device memory at the peak, --dtype {args.dtype} --cfg {args.cfg} --offload {args.offload} (planned "
          "before loading):")
    for line in memory.lines():
        print(line)
    if args.device_memory is not None:
        verdict = "fits" if memory.total <= args.device_memory * GIB else "does NOT fit"
        print(f"{verdict} a {args.device_memory:g} GiB GPU")
