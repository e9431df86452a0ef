"""`flowblend build`: engines of an exported pair into the per-machine engine store."""
from __future__ import annotations

from flowblend.engines.build import build_pair_engines


def register(sub) -> None:
    p = sub.add_parser("build", help="build (or reuse) both engines of an exported pair")
    p.add_argument("--pair", default="toy")
    p.add_argument("--backend", default="onnxruntime", choices=("onnxruntime", "tensorrt"))
    p.add_argument("--dtype", default=None, help="accepted for symmetry; the precision is the export's")
    p.add_argument("--artifacts", default="artifacts")
    p.add_argument("--force", action="store_true", help="rebuild even if a matching engine exists")
    p.add_argument("--opt-level", type=int, default=3, help="TensorRT builder optimization level (0-5)")
    p.add_argument("--workspace-gib", type=float, default=8.0, help="TensorRT workspace limit")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    trt = {"opt_level": args.opt_level, "workspace_gib": args.workspace_gib} if args.backend == "tensorrt" else {}
    results = build_pair_engines(args.pair, args.backend, args.artifacts, force=args.force,
                                 progress=not args.no_progress, **trt)
    for model, (path, built) in results.items():
        print(f"{model}: {'built' if built else 'reused'} {path}")
    return 0
