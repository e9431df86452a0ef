"""`flowblend demo`: the toy pair under LLL, LSL and SSS on CPU, with a table of cost and probe scores."""
from __future__ import annotations

from flowblend.toy.demo import DEMO_PLANS, DEMO_PROMPTS, format_table, run_demo


def register(sub) -> None:
    p = sub.add_parser("demo", help="see FlowBlending work on the shipped toy pair (CPU, seconds)")
    p.add_argument("--out-dir", default="demo", help="where the GIF, contact sheet and tables go (default ./demo)")
    p.add_argument("--prompt", action="append", help="prompt(s) from the toy vocabulary (default: four)")
    p.add_argument("--plan", action="append", help=f"plans to compare (default: {' '.join(DEMO_PLANS)})")
    p.add_argument("--steps", type=int, help="denoising steps (default: the toy family's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.set_defaults(func=run)


def run(args) -> int:
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    rows = run_demo(args.out_dir, tuple(args.prompt or DEMO_PROMPTS), tuple(args.plan or DEMO_PLANS),
                    args.steps, tuple(args.seeds))
    print(format_table(rows))
    print(f"wrote {args.out_dir}/side_by_side.gif, contact_sheet.png, results.json, results.md")
    return 0
