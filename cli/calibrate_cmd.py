"""`flowblend calibrate divergence|plan|cache`: where the small model can stand in, the boundaries, the cached steps.

Thin layers over calibrate.divergence.measure_divergence, calibrate.boundaries.calibrate_plan and
calibrate.cache_steps.calibrate_cache.
Every argument is checked (and every metric's weights loaded) before a model runs.
"""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from flowblend.atomic import write_atomic
from flowblend.errors import FlowblendError
from flowblend.settings import declared

from ..resolve.blend_request import BlendChoices, resolve_experts, resolve_scales, solver_of, video_of
from .common import add_settings, choices_of, family_of, subscribe

DEFAULT_TOLERANCE = 0.5


def register(p) -> None:
    cal = p.add_subparsers(dest="calibrate_command", required=True)
    div = cal.add_parser("divergence", help="small-vs-large velocity divergence along LLL trajectories (JSON + PNG)")
    _add_common(div)
    div.add_argument("--pattern", choices=("LSL", "any"), default="LSL",
                     help="seed plan printed: one middle small stage (LSL) or small at every quiet step (any)")
    div.add_argument("--threshold", type=float, help="divergence threshold for the seed plan (default: the median)")
    div.set_defaults(func=run_divergence)
    plan = cal.add_parser("plan", help="pick stage boundaries automatically, verified by quality metrics")
    _add_common(plan)
    plan.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                      help="fraction of the SSS->LLL quality gap a plan may lose, in (0, 1]")
    plan.add_argument("--metric", choices=("toy", "dino", "clip"),
                      help="per-video quality ranking the search: toy (exact mask IoU, toy pair; its default), "
                           "dino (DINOv2 similarity to LLL; default otherwise), clip (text-video score)")
    plan.add_argument("--dino", help="DINOv2 folder or hub id in your HF cache (default facebook/dinov2-small "
                                     "when --metric dino); also adds FD-DINOv2")
    plan.add_argument("--clip", help="CLIP folder or hub id in your HF cache: adds the CLIP text-video score")
    plan.add_argument("--inception", help="torch-fidelity Inception weights file: adds frame FID")
    plan.add_argument("--fvd-extractor", help="TorchScript video feature extractor ([N,3,F,H,W] -> [N,D]): adds FVD")
    plan.add_argument("--threshold", type=float, help="divergence threshold for the seed plan (default: the median)")
    plan.add_argument("--radius", type=int, help="boundary move per search step (default steps/10)")
    plan.add_argument("--heldout-prompt", action="append", default=[], help="held-out prompt (repeatable)")
    plan.add_argument("--heldout-prompt-file", help="file with one held-out prompt per line")
    plan.add_argument("--heldout-seeds", type=int, nargs="+", help="held-out seeds (default: 1000 + each seed)")
    plan.add_argument("--reduced-steps", type=int,
                      help="also score LLL and the chosen plan at this step count (default: not scored)")
    plan.add_argument("--report", help="markdown report path (default OUT_DIR/calibration.md); PNGs go beside it")
    plan.add_argument("--title", default="", help="report title")
    plan.set_defaults(func=run_plan)
    cache = cal.add_parser("cache", help="pick a plan's cached steps from measured residual magnitude ratios "
                                         "(MagCache's rule, fixed in the plan) within an error budget")
    _add_common(cache)
    add_settings(cache, [f for f in declared(BlendChoices) if f.name == "plan"],  # BlendChoices' one --plan
                 override={"plan": {"help": "the plan whose steps may be cached: LLL, LSL:0.4,0.2 (the default), "
                                            "L8,S8,L4 ... (in capitals: every step full)"}})
    cache.add_argument("--budget", type=float, default=0.12,
                       help="MagCache's accumulated-error threshold: more caches more steps (diffusers' default 0.06)")
    cache.add_argument("--max-skip", type=int, default=3, help="most cached steps in a row (MagCache's K)")
    cache.add_argument("--retention", type=float, default=0.2, help="fraction of the first steps kept full")
    cache.set_defaults(func=run_cache)


def _add_common(p) -> None:
    subscribe(p, "pair", "video", "steps", "solver", "guidance", "experts", "device", "threads", "progress")
    p.add_argument("--prompt", action="append", default=[],
                   help="calibration prompt, repeatable (default for the toy pair: 12 of its 72 prompts)")
    p.add_argument("--prompt-file", help="file with one calibration prompt per line")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="noise seeds")
    p.add_argument("--out-dir", default="calibration", help="where JSON, plots and plan.json go")


def _read(prompts: list[str], path: str | None, what: str) -> list[str]:
    out = list(prompts)
    if path:
        p = Path(path)
        if not p.is_file():
            raise FlowblendError(f"{what} file {p} does not exist")
        out += p.read_text().splitlines()
    return [x.strip() for x in out if x.strip()]


def _toy_default_prompts(offset: int) -> list[str]:
    from ..toy.data import all_prompts

    return [s.text for s in all_prompts()[offset::6]]


def resolve_prompts(args, family) -> list[str]:
    prompts = _read(args.prompt, args.prompt_file, "prompt")
    if not prompts and not args.prompt_file and family.name == "toy":
        return _toy_default_prompts(0)  # 12 of the 72 toy prompts, every colour/shape/direction
    if not prompts:
        raise FlowblendError("no prompt given: pass --prompt \"...\" (repeatable) or --prompt-file with one per line")
    return [family.normalise_prompt(p) for p in prompts]


def resolve_setup(args, family):
    from ..calibrate.divergence import SamplingSetup

    choices = choices_of(args)
    steps = args.steps if args.steps is not None else family.steps
    latent_shape = family.latent_shape(*video_of(choices, family))
    solver, shift, mu = solver_of(choices, family, latent_shape)
    experts = resolve_experts(choices, family, steps, solver, shift, mu)
    guidance, scales = resolve_scales(choices, family, experts)  # the small model: the replaced expert's unless given
    return SamplingSetup(steps, solver, shift, guidance, tuple(latent_shape), mu,
                         experts.boundary_ratio if experts is not None else None, tuple(scales.items()),
                         tuple(family.models), tuple(family.letters))


def _load(args, family, setup):
    """The pair in FP32 on --device and its eager engines, through the one assembly (assembly/run.py)."""
    from ..assembly import eager_choice, engines_for, load_models

    choice = eager_choice(args.device)
    pair = load_models(family.name, choice, args.large, args.small, args.allow_download)
    return pair, engines_for(pair, choice, setup.latent_shape, setup.guidance)


def run_divergence(args) -> int:
    from ..calibrate.boundaries import default_threshold, plan_from_divergence
    from ..calibrate.divergence import make_requests, measure_divergence, plot_divergence, save_curve

    family = family_of(args)
    setup = resolve_setup(args, family)
    prompts = resolve_prompts(args, family)
    pair, engines = _load(args, family, setup)
    requests = make_requests(pair.encode_prompt, prompts, args.seeds, setup.latent_shape)
    curve, _ = measure_divergence(engines, requests, setup, progress=not args.no_progress)
    out = Path(args.out_dir)
    threshold = default_threshold(curve) if args.threshold is None else args.threshold
    reference = setup.reference_plan() if setup.boundary_ratio is not None else None  # wan22: the experts' plan
    seed = plan_from_divergence(curve, threshold, args.pattern, reference=reference) \
        if setup.steps >= 3 or args.pattern == "any" else None
    json_path = save_curve(curve, out / "divergence.json")
    png = plot_divergence(curve, out / "divergence.png", seed, threshold)
    mean = curve.mean("cosine_guided")
    print("step  cosine(guided)  relL2(guided)  cosine(cond)")
    for i in range(curve.steps):
        print(f"{i:>4}  {mean[i]:>14.4f}  {curve.mean('rel_l2_guided')[i]:>13.4f}  {curve.mean('cosine_cond')[i]:>12.4f}")
    if seed is not None:
        print(f"divergence seed plan, {args.pattern} (small where cosine <= {threshold:.4g}): {seed.label}")
    print(f"wrote {json_path} and {png}")
    return 0


def run_plan(args) -> int:
    from ..calibrate.boundaries import calibrate_plan, check_stage_steps, check_tolerance
    from ..calibrate.metrics import MetricSources, QualityMetrics
    from ..calibrate.report import write_outputs

    family = family_of(args)
    check_tolerance(args.tolerance)
    setup = resolve_setup(args, family)
    check_stage_steps(setup.steps)
    if args.reduced_steps is not None:
        check_stage_steps(args.reduced_steps)
    if args.radius is not None and args.radius < 1:
        raise FlowblendError(f"--radius {args.radius} must be >= 1 step: it is how far the search moves a boundary")
    prompts = resolve_prompts(args, family)
    heldout = [family.normalise_prompt(p) for p in _read(args.heldout_prompt, args.heldout_prompt_file,
                                                         "held-out prompt")]
    if args.heldout_prompt_file and not heldout:
        raise FlowblendError(f"held-out prompt file {args.heldout_prompt_file} is empty: give one prompt per line")
    if not heldout and family.name == "toy" and not (args.prompt or args.prompt_file):
        heldout = _toy_default_prompts(3)  # 12 other toy prompts
    heldout_seeds = args.heldout_seeds or [1000 + s for s in args.seeds]
    metric = args.metric or ("toy" if family.name == "toy" else "dino")
    metrics = QualityMetrics(metric, MetricSources(args.dino, args.clip, args.inception, args.fvd_extractor),
                             toy=family.name == "toy")  # loads weights now: a missing one fails before sampling
    pair, engines = _load(args, family, setup)
    result = calibrate_plan(pair, prompts, args.seeds, setup, metrics, args.tolerance, args.threshold, args.radius,
                            heldout, heldout_seeds, args.reduced_steps, engines=engines, progress=not args.no_progress)
    command = "flowblend " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["calibrate"] else ""
    paths = write_outputs(result, Path(args.out_dir), Path(args.report) if args.report else None,
                          args.title or f"Calibration: {family.name} pair", command)
    c = result.chosen
    reference = setup.reference_plan()
    lll = reference.flops(result.per_step_flops)
    print(f"chosen plan {c.plan.label} ({c.plan.spec}): {c.flops / lll:.1%} of {reference.spec} FLOPs, {metric} quality "
          f"{c.quality:.4f}, retained {c.retained:.3f} (tolerance {result.tolerance:g})")
    print(f"wrote {paths['plan']}, {paths['report']} (+ {paths['divergence_png'].name}, {paths['quality_png'].name})")
    return 0


def run_cache(args) -> int:
    from ..calibrate.cache_steps import CacheBudget, calibrate_cache, calibration_record
    from ..calibrate.divergence import make_requests
    from ..resolve.blend_request import model_set_of
    from ..resolve.request import resolve_plan

    family = family_of(args)
    budget = CacheBudget(args.budget, args.max_skip, args.retention)
    setup = resolve_setup(args, family)
    base = resolve_plan(args.plan or ("experts" if family.experts is not None else "LSL:0.4,0.2"), setup.steps,
                        family.steps, model_set_of(family), setup.experts())
    prompts = resolve_prompts(args, family)
    pair, engines = _load(args, family, setup)
    requests = make_requests(pair.encode_prompt, prompts, args.seeds, setup.latent_shape)
    result = calibrate_cache(pair, engines, requests, setup, base, budget, progress=not args.no_progress)
    models = {"large": args.large or "default", "small": args.small or "default"}
    record = calibration_record(family.name, models, setup, base, budget, result.measurement, result.errors,
                                prompts, args.seeds)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = write_atomic(out / "plan.json", json.dumps({**result.plan.to_dict(), "calibration": record}, indent=1))
    steps = ", ".join(map(str, result.plan.cached_steps())) or "none"
    print(f"cached plan {result.plan.per_step} (cached steps {steps}): {result.flops / result.full_flops:.1%} of "
          f"{base.label}'s FLOPs, final latents {record['final_rel_l2']['mean']:.4f} relative L2 from it (mean over "
          f"{len(requests)} requests, max {record['final_rel_l2']['max']:.4f}); budget {budget.threshold:g}")
    print(f"wrote {path}: valid for pair {family.name}, {setup.solver} solver, {setup.steps} steps "
          f"(`flowblend generate --plan-file {path}`)")
    return 0
