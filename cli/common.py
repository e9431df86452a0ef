"""Flags that several commands share, declared once as argument groups each command subscribes to.

As in Polygraphy's tools: a command lists the groups it takes (`subscribe(p, "pair", "video", ...)`)
and each group knows its flags, their help and defaults, and the one check that runs on them
before the command does (`check_groups`, called by cli/main.py before anything loads). What the
flags mean is checked by plain functions outside cli/ (resolve/request.py, engines/factory.py)
that the server calls too. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import os
import sys

from flowblend.engines.attention import ATTENTION_NAMES
from flowblend.engines.cfg_modes import CFG_MODES
from flowblend.engines.compile import COMPILE_MODES
from flowblend.engines.factory import DTYPE_NAMES, check_dtype
from flowblend.engines.kinds import EXPORT_PRECISIONS, precision
from flowblend.errors import FlowblendError
from flowblend.families import FAMILIES, PairFamily, get_family
from flowblend.resolve.blend_request import BlendChoices, video_of
from flowblend.resolve.request import SOLVER_NAMES, check_device, check_guidance

__all__ = ["HelpFormatter", "Parser", "subscribe", "check_groups", "family_of", "choices_of", "FlowblendError"]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default that is a value; a None default ("the family's") is said in the help itself."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in help_text or "%(default)" in help_text:
            return help_text
        return help_text + " (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """Every flowblend parser and subparser: defaults shown in --help."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def family_defaults(attr: str) -> str:
    """'toy 20, wan 50, ltx 40': each family's default for a flag left unset, read from the registry."""
    return ", ".join(f"{name} {getattr(f, attr):g}" for name, f in FAMILIES.items())


def _pair_name(p) -> None:
    p.add_argument("--pair", default="toy", help=f"model pair family: {' | '.join(FAMILIES)}")


def _pair(p) -> None:
    g = p.add_argument_group("model pair")
    _pair_name(g)
    g.add_argument("--large", help="large model checkpoint: a local diffusers folder or a hub id in your cache "
                                   "(default: the family's; toy: the shipped weights)")
    g.add_argument("--small", help="small model checkpoint (default: the family's; toy: the shipped weights)")
    g.add_argument("--allow-download", action="store_true", help="let diffusers download hub ids missing from the cache")


def _plan(p) -> None:
    g = p.add_argument_group("blend plan")
    g.add_argument("--plan", help="which model runs each step: LSL:0.4,0.2 (paper; the default) | LLL | SSS | "
                                  "L20,S20,L10 | LLSSL...; wan22 (letters H high, L low, S small): experts (the "
                                  "default) | experts:4,2 (small takes the last 4 steps before the expert switch "
                                  "and the first 2 after) | H20,S6,L14 ...")
    g.add_argument("--plan-file", help="JSON plan as written by `flowblend calibrate plan`; overrides --plan")
    g.add_argument("--steps", type=int, help=f"denoising steps (default: the family's; {family_defaults('steps')})")


def _steps(p) -> None:
    p.add_argument("--steps", type=int, help=f"denoising steps (default: the family's; {family_defaults('steps')})")


def _video(p) -> None:
    g = p.add_argument_group("video size")
    g.add_argument("--height", type=int, help="pixels; a multiple of the VAE x patch factor (default: the family's; "
                                              f"{family_defaults('height')})")
    g.add_argument("--width", type=int, help=f"pixels (default: the family's; {family_defaults('width')})")
    g.add_argument("--frames", type=int, help="frames; what the VAE and patch take, e.g. 4k+1 for wan "
                                              f"(default: the family's; {family_defaults('frames')})")


def _guidance(p) -> None:
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale; > 1 runs two forwards a step, "
                                                  f"<= 1 disables CFG (default: the family's; {family_defaults('guidance')})")


def _solver(p) -> None:
    g = p.add_argument_group("solver")
    g.add_argument("--solver", choices=SOLVER_NAMES, help="default: the family's (toy and wan unipc, ltx euler); dpm++ is DPM-Solver++ 2M, dpm++3m order 3")
    g.add_argument("--shift", type=float, help="flow shift > 0 (default: the family's; ltx shifts by token count)")


def _experts(p) -> None:
    g = p.add_argument_group("two experts (wan22)")
    g.add_argument("--boundary-ratio", type=float,
                   help="the high-noise expert runs t >= ratio*1000 (default 0.875, T2V; I2V uses 0.9)")
    g.add_argument("--guidance-2", type=float, help="the low-noise expert's CFG scale (diffusers' guidance_scale_2; "
                                                     "default 3.0); --guidance is the high-noise expert's")
    g.add_argument("--small-guidance", type=float,
                   help="the small model's CFG scale (default: that of the model whose step it takes)")


def _device(p) -> None:
    p.add_argument("--device", default="cpu", help="where the models run: cpu | cuda | cuda:N")


def _dtype(p) -> None:
    p.add_argument("--dtype", default="fp32", help=f"weights and activations: {' | '.join(DTYPE_NAMES)} (fp8: the "
                   "transformer blocks' linears in FP8 e4m3 on GPUs with compute capability >= 8.9, BF16 elsewhere; "
                   "emulated exactly on the CPU; PyTorch engines only)")


def _engine(p) -> None:
    g = p.add_argument_group("PyTorch engines (--backend torch / torch-compile)")
    g.add_argument("--compile", choices=COMPILE_MODES,
                   help="torch.compile of each engine: regional (each repeated block once), whole, or none "
                        "(default: regional on CUDA, none on the CPU; whole for --backend torch-compile)")
    g.add_argument("--attention", default="auto", choices=ATTENTION_NAMES,
                   help="the attention kernel (default auto: cuDNN on Hopper and newer, flash on Ampere/Ada, "
                        "PyTorch's choice on the CPU)")
    g.add_argument("--fp8-keep-blocks", type=int, default=0,
                   help="--dtype fp8: the first and last N transformer blocks stay BF16 (default 0)")
    g.add_argument("--cfg", default="batched", choices=CFG_MODES,
                   help="CFG as one batch-2 forward (batched, default) or two batch-1 forwards per step "
                        "(sequential: the same numbers, half the activations)")


def _artifacts(p) -> None:
    p.add_argument("--artifacts", default="artifacts", help="artifact root: ONNX exports and the engine store")


def _threads(p) -> None:
    p.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's, one per core; on a shared "
                                               "machine fewer threads degrade more gracefully)")


def _progress(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


GROUPS = {"pair": _pair, "pair_name": _pair_name, "plan": _plan, "steps": _steps, "video": _video, "guidance": _guidance,
          "experts": _experts, "solver": _solver,
          "device": _device, "dtype": _dtype, "engine": _engine, "artifacts": _artifacts, "threads": _threads, "progress": _progress}


def subscribe(p: argparse.ArgumentParser, *groups: str) -> None:
    """Add the named shared groups' flags to a command and remember them for `check_groups`."""
    for name in groups:
        GROUPS[name](p)
    p.set_defaults(arg_groups=groups)


def apply_thread_policy(threads: int | None) -> None:
    """OpenMP threads sleep instead of spinning when they wait, so a shared CPU slows torch gracefully.

    Busy-waiting threads (OpenMP's default) made a toy generate loop ~40x slower beside another
    2-thread process on 2 cores (docs/shared-cpu.md). Both variables are read when torch loads, so
    this runs before torch is imported; `threads` then also caps torch's intra-op threads.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if threads is None:
        return
    if threads < 1:
        raise FlowblendError(f"--threads must be >= 1, got {threads}")
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if "torch" in sys.modules:  # already loaded (a test calling main() in-process): set it directly
        import torch

        torch.set_num_threads(threads)


def check_groups(args: argparse.Namespace) -> None:
    """The shared groups' own checks, before the command runs: bad flags fail before anything loads."""
    groups = args.arg_groups
    apply_thread_policy(args.threads if "threads" in groups else None)
    if "pair" in groups or "pair_name" in groups:
        family = get_family(args.pair)
        if "video" in groups:
            video_of(choices_of(args), family)
    if "dtype" in groups and args.dtype is not None:
        check_dtype(args.dtype)
        if "engine" not in groups and not precision(args.dtype).exportable:
            raise FlowblendError(f"--dtype {args.dtype} runs only in PyTorch engines (generate, serve, bench with "
                                 f"--backend torch); ONNX exports and built engines take {' | '.join(EXPORT_PRECISIONS)}")
    if "engine" in groups and args.fp8_keep_blocks < 0:
        raise FlowblendError(f"--fp8-keep-blocks must be >= 0, got {args.fp8_keep_blocks}")
    if "guidance" in groups and args.guidance is not None:
        check_guidance(args.guidance)
    if "steps" in groups and args.steps is not None and args.steps < 1:
        raise FlowblendError(f"--steps must be >= 1, got {args.steps}")
    if "device" in groups:
        check_device(args.device)  # imports torch only for a cuda device


def family_of(args) -> PairFamily:
    return get_family(args.pair)


def choices_of(args: argparse.Namespace) -> BlendChoices:
    """The plan, video, guidance, solver and experts flags as plain values (resolve/blend_request.py resolves
    them, for the server too); a flag the command does not take is None."""
    return BlendChoices.of(args)
