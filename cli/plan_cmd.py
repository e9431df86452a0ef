"""`flowblend plan`: the per-step table of a plan and its cost against the large-only plan."""
from __future__ import annotations

from flowblend.bench.flops import step_flops
from flowblend.export.pairs import reference_configs

from .common import add_pair_args, add_plan_args, add_video_args, family_of, resolve_plan, resolve_video


def register(sub) -> None:
    p = sub.add_parser("plan", help="show which model runs each step and the plan's FLOPs vs LLL")
    add_pair_args(p)
    add_plan_args(p)
    add_video_args(p)
    p.add_argument("--guidance", type=float, help="CFG scale (> 1 doubles every forward)")
    p.set_defaults(func=run)


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
    plan = resolve_plan(args, family)
    frames, height, width = resolve_video(args, family)
    latent_shape = family.latent_shape(frames, height, width)
    guidance = args.guidance if args.guidance is not None else family.guidance
    costs = plan_costs(family, plan, latent_shape, guidance)
    print(f"pair {family.name}: {frames} frames {height}x{width}, latents {latent_shape}, "
          f"guidance {guidance} ({'CFG: 2 forwards/step' if guidance > 1 else 'no CFG'})")
    print(f"plan {plan.spec or plan.label} = {plan.label}  ({plan.count('large')} large + {plan.count('small')} small steps)")
    print(f"{'step':>4}  {'model':<5}  {'TFLOPs':>10}")
    for i, m in enumerate(plan.models):
        print(f"{i:>4}  {m:<5}  {costs['per_step'][m] / 1e12:>10.3f}")
    print(f"total {costs['total'] / 1e12:.1f} TFLOPs vs LLL {costs['lll'] / 1e12:.1f} TFLOPs: "
          f"{100 * (1 - costs['total'] / costs['lll']):.1f}% fewer, FLOP-ideal speedup {costs['ideal_speedup']:.2f}x")
    return 0
