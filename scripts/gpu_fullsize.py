"""The real-size stage of the GPU run: Wan 2.1 14B + 1.3B (and Wan 2.2 A14B) at 480x832x81, BF16, CFG.

    python scripts/gpu_fullsize.py --out docs/gpu-runs/<run>/fullsize --budget 210      # on a CUDA machine
    python scripts/gpu_fullsize.py --out /tmp/fullsize --dry-run                       # tiny sizes on CPU

Full depth (40 and 30 blocks), random N(0, 0.02) weights made on the GPU in BF16 (no host copy):
per-step time of each model under every PyTorch engine option, the 3-step blended loop (L1,S1,L1)
eager vs whole-loop CUDA graph (replay == eager; loop == sum of its steps within 2%), the 50-step
LLL / LSL projection (labelled as one), the peak memory with the allocator history summarised at
the peak, and Wan 2.2's second 14B expert beside the first (two 14B + 1.3B, ~60 GB) for one step
each. Engine options (bench/fullsize.py FULLSIZE_OPTIONS): eager, regional compile, regional compile with
FP8 linears (+ the attention each engine names), the same with FP8 attention (--attention fp8, Hopper),
whole-model compile last. On CPU without --dry-run
every row is SKIPPED with its reason. Writes fullsize.json and
fullsize.md into --out (bench/fullsize.py does the work).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from flowblend.bench.fullsize import FAST, FULLSIZE_OPTIONS, FullsizeSettings, FullsizeStage

SKIPPED = 3  # exit code scripts/gpu_run.py reads as SKIPPED


def markdown(report: dict) -> str:
    lines = ["# flowblend real-size stage", "", f"`{report['command']}`", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in report["environment"].items()]
    lines += ["", "| stage | status | seconds | figures / reason |", "|---|---|---|---|"]
    for name, row in report["stages"].items():
        figures = {k: v for k, v in row.items() if k not in ("status", "seconds", "memory")}
        lines.append(f"| {name} | {row['status'].upper()} | {row.get('seconds', 0):.1f} | "
                     f"`{json.dumps(figures, default=str)}` |".replace("|`", "| `"))
    memory = report["stages"].get("loop_eager", {}).get("memory")
    if memory and memory.get("groups"):
        lines += ["", f"## Who held the memory at the blended loop's peak ({memory['peak_live_mib']} MiB live)", "",
                  "| owner (first frame in flowblend/diffusers) | MiB |", "|---|---|"]
        lines += [f"| {g['owner']} | {g['mib']} |" for g in memory["groups"]]
    projection = report["stages"].get("projection", {})
    if projection.get("per_option"):
        lines += ["", f"## {projection['label']}", "", "| option | LLL s | LSL s | LSL/LLL speedup |", "|---|---|---|---|"]
        lines += [f"| {o} | {p['LLL']:.1f} | {p['LSL']:.1f} | {p['LSL/LLL speedup']:.2f}x |"
                  for o, p in projection["per_option"].items()]
    return "\n".join(lines) + "\n"


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for fullsize.json and fullsize.md")
    p.add_argument("--budget", type=float, default=210.0, help="seconds for the whole stage (default 210)")
    p.add_argument("--reps", type=int, default=2, help="timed steps per model and option after one warm-up")
    p.add_argument("--dry-run", action="store_true", help="tiny Wan configs on CPU in BF16: checks the stage end to end")
    p.add_argument("--no-wan22", action="store_true", help="skip Wan 2.2's second 14B expert (~29 GB more)")
    p.add_argument("--options", nargs="+", choices=[o.name for o in FULLSIZE_OPTIONS],
                   default=[o.name for o in FULLSIZE_OPTIONS], help="engine options to time (default: all, in this order)")
    args = p.parse_args(argv)
    options = tuple(o for o in FULLSIZE_OPTIONS if o.name in args.options)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"command": "python scripts/gpu_fullsize.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "environment": environment(), "stages": {}}
    code = 0
    fast = FAST if FAST in args.options else args.options[-1]
    if not (args.dry_run or torch.cuda.is_available()):
        reason = "no CUDA GPU (torch.cuda.is_available() is False); --dry-run checks the stage on CPU at tiny sizes"
        names = FullsizeSettings(configs={"large": {}, "small": {}}, device=torch.device("cpu"), options=options,
                                 fast=fast, wan22_configs=None if args.no_wan22 else {"low": {}}).stage_names()
        report["stages"] = {name: {"status": "skipped", "reason": reason} for name in names}
        code = SKIPPED
    else:
        try:
            from flowblend.families import reference_configs
        except ModuleNotFoundError as exc:  # the bare machine without its copied wheels: skipped, not failed
            if (exc.name or "").split(".")[0] == "flowblend":
                raise
            print(f"gpu_fullsize: skipped: python package {exc.name!r} is not installed")
            return SKIPPED
        if args.dry_run:
            from flowblend.bench.tiny import TEXT, WAN_LATENT, WAN_TINY

            configs = {m: dict(c) for m, c in WAN_TINY.items()}
            # BF16 as on the GPU: the FP8 option computes in BF16 (engines/precisions.py) beside the eager one.
            settings = FullsizeSettings(configs=configs, device=torch.device("cpu"), dtype=torch.bfloat16,
                                        latent=WAN_LATENT, text=TEXT, options=options, fast=fast,
                                        reps=args.reps, budget_s=args.budget,
                                        wan22_configs=None if args.no_wan22 else {"low": configs["large"]})
        else:
            # A compiled engine's first call is measured cold (an empty inductor cache; inductor reads the
            # variable when it compiles), then warm (bench/fullsize.py per_step).
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="flowblend-inductor-"))
            settings = FullsizeSettings(configs=reference_configs("wan"), device=torch.device("cuda"), options=options,
                                        fast=fast, reps=args.reps, budget_s=args.budget,
                                        wan22_configs=None if args.no_wan22 else reference_configs("wan22"))
        report["stages"] = FullsizeStage(settings).main()
        report["dry_run"] = args.dry_run
        code = 1 if any(r["status"] == "fail" for r in report["stages"].values()) else 0
    (out / "fullsize.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "fullsize.md").write_text(markdown(report))
    print(f"wrote {out / 'fullsize.md'}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
