"""Argument groups that several commands share, and turning their values into validated objects."""
from __future__ import annotations

import argparse
from pathlib import Path

from flowblend.errors import FlowblendError
from flowblend.export.pairs import FAMILIES, PairFamily, get_family
from flowblend.runtime.guidance import expert_schedule_for, guidance_table
from flowblend.runtime.plan import BlendPlan, ExpertSchedule, ModelSet


def add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default="toy", help=f"model pair family: {', '.join(FAMILIES)} (default toy)")
    p.add_argument("--large", help="large model checkpoint (local diffusers folder or hub id in your cache)")
    p.add_argument("--small", help="small model checkpoint")
    p.add_argument("--allow-download", action="store_true", help="let diffusers download hub ids")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", help="LSL:0.4,0.2 (default) | LLL | SSS | L20,S20,L10 | LLSSL...; wan22 (letters H high, "
                                  "L low, S small): experts (default) | experts:4,2 (small takes the last 4 steps "
                                  "before the expert switch and the first 2 after) | H20,S6,L14 ...")
    p.add_argument("--plan-file", help="JSON plan (as written by `flowblend calibrate plan`); overrides --plan")
    p.add_argument("--steps", type=int, help="denoising steps (default: the family's)")
    add_expert_args(p)


def add_expert_args(p: argparse.ArgumentParser) -> None:
    """Two-expert families (wan22): the boundary and the experts' CFG scales, as diffusers' WanPipeline."""
    p.add_argument("--boundary-ratio", type=float,
                   help="wan22: the high-noise expert runs t >= ratio*1000 (default 0.875, T2V; I2V uses 0.9)")
    p.add_argument("--guidance-2", type=float,
                   help="wan22: the low-noise expert's CFG scale (diffusers' guidance_scale_2; default 3.0); "
                        "--guidance is the high-noise expert's")
    p.add_argument("--small-guidance", type=float,
                   help="the small model's CFG scale (default: that of the model whose step it takes)")


def model_set_of(family: PairFamily) -> ModelSet:
    return ModelSet(tuple(family.models), tuple(family.letters))


def resolve_steps(args, family: PairFamily) -> int:
    if args.plan_file:
        return len(_read_plan_file(args))
    steps = args.steps if args.steps is not None else family.steps
    if steps < 1:
        raise FlowblendError(f"--steps must be a positive integer, got {steps}")
    return steps


def resolve_experts(args, family: PairFamily, steps: int, solver: str, shift: float,
                    mu: float | None = None) -> ExpertSchedule | None:
    """The expert of every step for a two-expert family (None otherwise), on the solver's own timesteps."""
    ratio = args.boundary_ratio
    if family.experts is None:
        if ratio is not None or args.guidance_2 is not None:
            raise FlowblendError(f"--boundary-ratio / --guidance-2 are for two-expert pairs (--pair wan22), not "
                                 f"{family.name}: drop them")
        return None
    ratio = family.boundary_ratio if ratio is None else ratio
    if not 0.0 < ratio < 1.0:
        raise FlowblendError(f"--boundary-ratio must be in (0, 1), got {ratio} (Wan 2.2: 0.875 T2V, 0.9 I2V)")
    return expert_schedule_for(solver, steps, shift, ratio, mu)


def resolve_guidance(args, family: PairFamily, plan: BlendPlan, experts: ExpertSchedule | None
                     ) -> tuple[float, tuple[float, ...]]:
    """(the --guidance scale, the per-step table): each model's scale, the small one's by the step it takes."""
    default, scales = resolve_scales(args, family, experts)
    return default, guidance_table(plan, default, scales, experts)


def resolve_scales(args, family: PairFamily, experts: ExpertSchedule | None) -> tuple[float, dict[str, float]]:
    """(the --guidance scale, each model's own scale): wan22's experts from --guidance / --guidance-2, and
    --small-guidance; a model without one takes the scale of the expert whose step it runs."""
    default = args.guidance if args.guidance is not None else family.guidance
    scales = dict(family.expert_guidance)
    if experts is not None:
        scales[experts.high] = default
        if args.guidance_2 is not None:
            scales[experts.low] = args.guidance_2
    if args.small_guidance is not None:
        scales["small"] = args.small_guidance
    for name, value in {"--guidance": default, **scales}.items():
        if not value >= 0:
            raise FlowblendError(f"guidance_scale must be >= 0 (1 disables CFG), got {value} for {name}")
    return default, scales


def add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)


def _read_plan_file(args) -> BlendPlan:
    path = Path(args.plan_file)
    if not path.is_file():
        raise FlowblendError(f"plan file {path} does not exist: write one with `flowblend calibrate plan`")
    plan = BlendPlan.from_json(path.read_text())
    if args.steps is not None and args.steps != len(plan):
        raise FlowblendError(f"--steps {args.steps} disagrees with the plan file's {len(plan)} steps: drop --steps")
    return plan


def resolve_plan(args, family: PairFamily, experts: ExpertSchedule | None = None) -> BlendPlan:
    """The plan in the family's model names; `experts` (two-expert pairs) for the `experts:k,k` spelling."""
    model_set = model_set_of(family)
    if args.plan_file:
        plan = _read_plan_file(args)
        unknown = sorted(set(plan.models) - set(model_set.names))
        if unknown:
            raise FlowblendError(f"plan file {args.plan_file} names {unknown}, which pair {family.name} does not have "
                                 f"({', '.join(model_set.names)})")
        return BlendPlan(plan.models, plan.spec, model_set)
    steps = args.steps if args.steps is not None else family.steps
    spec = args.plan or ("experts" if family.experts is not None else "LSL:0.4,0.2")
    return BlendPlan.parse(spec, steps, model_set, experts)


def resolve_video(args, family: PairFamily) -> tuple[int, int, int]:
    frames = args.frames if args.frames is not None else family.frames
    height = args.height if args.height is not None else family.height
    width = args.width if args.width is not None else family.width
    family.check_video_shape(frames, height, width)
    return frames, height, width


def family_of(args) -> PairFamily:
    return get_family(args.pair)


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """Video size and CFG batch: what an exported graph and its engines are specialised for."""
    add_video_args(p)
    p.add_argument("--guidance", type=float, help="CFG scale the engines will serve (> 1: batch 2)")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")
    p.add_argument("--artifacts", default="artifacts", help="artifact root (default ./artifacts)")


def resolve_spec(args, family: PairFamily, dynamic: dict | None = None):
    """The IOSpec for a family at the requested video size, CFG and dtype."""
    frames, height, width = resolve_video(args, family)
    guidance = args.guidance if args.guidance is not None else family.guidance
    if guidance < 0:
        raise FlowblendError(f"guidance must be >= 0, got {guidance}")
    return family.io_spec(family.latent_shape(frames, height, width), guidance, args.dtype, dynamic)
