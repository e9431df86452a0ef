"""`flowblend plan`: the per-step table of a plan and its cost against the large-only plan."""
from __future__ import annotations

from flowblend.bench.flops import step_flops
from flowblend.export.pairs import reference_configs

from .common import family_of, guidance_of, plan_of, subscribe, video_of

FLOP_UNITS = ((1e15, "PFLOPs"), (1e12, "TFLOPs"), (1e9, "GFLOPs"), (1e6, "MFLOPs"))


def register(p) -> None:
    subscribe(p, "pair", "plan", "video", "guidance")
    p.set_defaults(func=run)


def flop_unit(flops: float) -> tuple[float, str]:
    """(scale, name) of the largest unit that keeps `flops` at 1 or more: 2.3e9 -> GFLOPs."""
    return next(((scale, name) for scale, name in FLOP_UNITS if flops >= scale), FLOP_UNITS[-1])


def format_flops(flops: float) -> str:
    scale, name = flop_unit(flops)
    return f"{flops / scale:.3g} {name}"


def plan_costs(family, plan, latent_shape, guidance: float) -> dict:
    configs = reference_configs(family.name)
    cfg = guidance > 1.0
    per_step = {m: step_flops(family.transformer_class, configs[m], latent_shape, family.text_len, cfg)
                for m in ("large", "small")}
    total = plan.flops(per_step)
    lll = per_step["large"] * len(plan)
    return {"per_step": per_step, "total": total, "lll": lll, "ideal_speedup": lll / total}


def run(args) -> int:
    family = family_of(args)
    plan = plan_of(args, family)
    frames, height, width = video_of(args, family)
    latent_shape = family.latent_shape(frames, height, width)
    guidance = guidance_of(args, family)
    costs = plan_costs(family, plan, latent_shape, guidance)
    print(f"pair {family.name}: {frames} frames {height}x{width}, latents {latent_shape}, "
          f"guidance {guidance} ({'CFG: 2 forwards/step' if guidance > 1 else 'no CFG'})")
    print(f"plan {plan.spec or plan.label} = {plan.label}  ({plan.count('large')} large + {plan.count('small')} small steps)")
    scale, unit = flop_unit(max(costs["per_step"].values()))
    print(f"{'step':>4}  {'model':<5}  {unit:>10}")
    for i, m in enumerate(plan.models):
        print(f"{i:>4}  {m:<5}  {costs['per_step'][m] / scale:>10.3f}")
    print(f"total {format_flops(costs['total'])} vs LLL {format_flops(costs['lll'])}: "
          f"{100 * (1 - costs['total'] / costs['lll']):.1f}% fewer, FLOP-ideal speedup {costs['ideal_speedup']:.2f}x")
    return 0
