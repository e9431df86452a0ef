"""`flowblend demo`: the toy pair under LLL, LSL and SSS on CPU, with a table of cost and probe scores."""
from __future__ import annotations

from ..families import get_family
from ..families.toy_vocab import DEMO_PLANS, DEMO_PROMPTS, vocabulary_line
from ..resolve.request import MAX_SEED, resolve_plan
from .common import FlowblendError, subscribe


def register(p) -> None:
    p.description = ("The shipped toy pair under LLL, LSL and SSS: a side-by-side GIF, a contact "
                                   "sheet and a table of cost and probe scores. Prompts use the toy vocabulary: "
                                   f"{vocabulary_line()}.")
    subscribe(p, "steps", "threads", "progress", repeat={"plan": f"plans to compare; default: {' '.join(DEMO_PLANS)}"})
    p.add_argument("--out-dir", default="demo", help="where the GIF, contact sheet and tables go")
    p.add_argument("--prompt", action="append",
                   help=f"prompt from the toy vocabulary, repeatable (default: {'; '.join(DEMO_PROMPTS)})")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds; every prompt runs with each")
    p.set_defaults(func=run)


def run(args) -> int:
    family = get_family("toy")
    prompts = [family.normalise_prompt(p) for p in (args.prompt or DEMO_PROMPTS)]
    steps = args.steps or family.steps
    for plan in args.plan or DEMO_PLANS:
        resolve_plan(plan, steps, steps)
    bad = [s for s in args.seeds if not 0 <= s <= MAX_SEED]
    if bad:
        raise FlowblendError(f"--seeds must be between 0 and {MAX_SEED}, got {bad[0]}")

    from ..toy.demo import format_table, run_demo

    rows = run_demo(args.out_dir, tuple(prompts), tuple(args.plan or DEMO_PLANS), args.steps, tuple(args.seeds),
                    progress=not args.no_progress)
    print(format_table(rows))
    print(f"wrote {args.out_dir}/side_by_side.gif, contact_sheet.png, results.json, results.md")
    return 0
