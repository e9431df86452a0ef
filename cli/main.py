"""The `flowblend` command: each subcommand is a thin layer over a Python function.

Start-up stays short: the command modules import torch, diffusers and the backends inside the
functions that need them, every flag is checked before anything loads (cli/common.py's groups,
then the command's own checks), and the OpenMP thread policy is set before torch loads.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from flowblend.errors import FlowblendError

# command -> (module with register(parser), one-line help). Only the module of the command being run is
# imported, so `flowblend --help` loads none of them.
COMMANDS = {
    "generate": ("generate_cmd", "generate videos with a blend plan"),
    "plan": ("plan_cmd", "show which model runs each step and the plan's FLOPs vs LLL"),
    "demo": ("demo_cmd", "see FlowBlending work on the shipped toy pair (CPU, seconds)"),
    "export": ("export_cmd", "export both transformers of a pair to ONNX (verified by default)"),
    "build": ("build_cmd", "build (or reuse) both engines of an exported pair"),
    "bench": ("bench_cmd", "benchmark plans and backends against eager PyTorch LLL (JSON, markdown, PNG)"),
    "calibrate": ("calibrate_cmd", "velocity divergence and automatic stage boundaries for a model pair"),
    "verify": ("verify_cmd", "check exported ONNX graphs against PyTorch (exit 1 below thresholds)"),
    "serve": ("serve_cmd", "serve videos over HTTP from warm engines (OpenAI-style /v1/videos; --ray for Ray Serve)"),
}
INTERRUPTED = 130  # the shell's exit status for a command ended by SIGINT (128 + 2)


def build_parser(commands=tuple(COMMANDS)) -> argparse.ArgumentParser:
    """The parser with every command listed and the flags of `commands` registered (default: all)."""
    from .common import Parser

    parser = Parser(prog="flowblend", description="Stage-aware two-model video sampling, compiled.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")  # subparsers are Parsers too
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in commands:
            importlib.import_module(f"flowblend.cli.{module}").register(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads: see common.apply_thread_policy
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(commands=argv[:1])  # `flowblend --help` imports no command module
    args = parser.parse_args(argv)
    try:
        from .common import check_groups

        check_groups(args)
        return int(args.func(args) or 0)
    except (FlowblendError, ValueError) as exc:
        print(f"flowblend {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"flowblend {args.command}: interrupted", file=sys.stderr)
        return INTERRUPTED


def _close_progress_bars() -> None:
    """Ctrl-C can land while a tqdm bar draws itself (even in its constructor, before any `with` can close
    it), leaving the bar's line open; closing what is left ends that line, so the message starts its own."""
    tqdm_std = sys.modules.get("tqdm.std")  # imported only if some command drew a bar
    if tqdm_std is not None:
        for bar in list(tqdm_std.tqdm._instances):
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
