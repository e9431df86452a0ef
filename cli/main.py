"""The `flowblend` command: each subcommand is a thin layer over a Python function."""
from __future__ import annotations

import argparse
import importlib
import sys

from flowblend.errors import FlowblendError

# One module per subcommand, each with register(subparsers).
COMMAND_MODULES = ["generate", "plan_cmd", "demo_cmd", "export_cmd", "build_cmd", "bench_cmd", "calibrate_cmd",
                   "verify_cmd", "serve_cmd"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowblend", description="Stage-aware two-model video sampling, compiled.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"flowblend.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (FlowblendError, ValueError) as exc:
        print(f"flowblend {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
