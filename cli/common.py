"""Argument groups that several commands share, and turning their values into validated objects."""
from __future__ import annotations

import argparse
from pathlib import Path

from flowblend.errors import FlowblendError
from flowblend.export.pairs import FAMILIES, PairFamily, get_family
from flowblend.runtime.plan import BlendPlan


def add_pair_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pair", default="toy", help=f"model pair family: {', '.join(FAMILIES)} (default toy)")
    p.add_argument("--large", help="large model checkpoint (local diffusers folder or hub id in your cache)")
    p.add_argument("--small", help="small model checkpoint")
    p.add_argument("--allow-download", action="store_true", help="let diffusers download hub ids")


def add_plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plan", default="LSL:0.4,0.2", help="LSL:0.4,0.2 | LLL | SSS | L20,S20,L10 | LLSSL...")
    p.add_argument("--plan-file", help="JSON plan (as written by `flowblend calibrate plan`); overrides --plan")
    p.add_argument("--steps", type=int, help="denoising steps (default: the family's)")


def add_video_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int)


def resolve_plan(args, family: PairFamily) -> BlendPlan:
    if args.plan_file:
        path = Path(args.plan_file)
        if not path.is_file():
            raise FlowblendError(f"plan file {path} does not exist: write one with `flowblend calibrate plan`")
        plan = BlendPlan.from_json(path.read_text())
        if args.steps is not None and args.steps != len(plan):
            raise FlowblendError(f"--steps {args.steps} disagrees with the plan file's {len(plan)} steps: drop --steps")
        return plan
    steps = args.steps if args.steps is not None else family.steps
    return BlendPlan.parse(args.plan, steps)


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
