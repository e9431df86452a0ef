"""`flowblend bench`: speed, FLOPs, memory and runtime overhead against eager PyTorch LLL."""
from __future__ import annotations

import argparse

from ..assembly import EngineChoice
from ..bench.report import write_outputs
from ..bench.run import (
    BACKENDS,
    DEFAULT_BACKENDS,
    DEFAULT_PLANS,
    MODES,
    BenchOptions,
    bench_pair_by_name,
    equivalent_command,
)
from ..engines.kinds import REFERENCE_KIND
from ..resolve.blend_request import video_of
from .common import choices_of, family_of, subscribe


def register(p) -> None:
    subscribe(p, "pair", "video", "plan", "guidance", "boundary_ratio", "engine", "threads", "progress",
              repeat={"backend": f"all: every one; default {' '.join(DEFAULT_BACKENDS)}; eager torch is always "
                                 "measured as the reference; onnxruntime/tensorrt export and build what is missing",
                      "plan": f"default {' '.join(DEFAULT_PLANS)}", "plan_file": "each plan is measured"})
    p.add_argument("--mode", action="append", metavar="MODE",
                   help=f"{' | '.join(MODES)} (repeatable; default loop; graph modes need --device cuda)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per case (at least 1 where a compiler runs)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per case (medians, min, max)")
    p.add_argument("--overhead-repeats", type=int, default=10,
                   help="interleaved repeats of the runtime-overhead comparison (0 skips it)")
    p.add_argument("--out", default="bench-out", help="folder for bench.json, bench.md, bench.png")
    p.set_defaults(func=run)


def options_from_args(args) -> BenchOptions:
    backends = tuple(args.backend or DEFAULT_BACKENDS)
    if "all" in backends:
        backends = BACKENDS
    plan_files = tuple(args.plan_file or ())
    choice = EngineChoice.of(argparse.Namespace(**{**vars(args), "backend": REFERENCE_KIND}))  # per backend: bench/run
    return BenchOptions(backends=backends, modes=tuple(args.mode or ("loop",)),
                        plans=tuple(args.plan or (() if plan_files else DEFAULT_PLANS)),
                        plan_files=plan_files, steps=args.steps, frames=args.frames, height=args.height,
                        width=args.width, guidance=args.guidance, boundary_ratio=args.boundary_ratio,
                        warmup=args.warmup, repeats=args.repeats, overhead_repeats=args.overhead_repeats,
                        engine=choice, progress=not args.no_progress)


def run(args) -> int:
    family = family_of(args)
    options = options_from_args(args)  # every flag is checked before a model is loaded
    video_of(choices_of(args), family)  # the device, dtype, threads and guidance were checked by cli/common.py
    report = bench_pair_by_name(family.name, options, args.large, args.small, args.allow_download)
    report["command"] = equivalent_command(family.name, options) + (f" --threads {args.threads}" if args.threads else "")
    paths = write_outputs(report, args.out)
    for t in report["targets"]:
        print(f"{t['name']}: {t['measured']} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']}")
    return 0
