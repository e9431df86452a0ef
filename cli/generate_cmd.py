"""`flowblend generate`: prompts -> blended sampling -> video files (+ a JSON of what ran).

Every flag is checked by runtime/request.validate_request (the server's check too) before torch,
diffusers or a model loads; then assembly/ loads the pair and makes the engines and the
pipeline (as for the server and bench), and each prompt becomes a video, written to a temporary name and renamed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from flowblend.errors import FlowblendError

from ..families.toy_vocab import vocabulary_line
from ..resolve.resolved import ResolvedRequest, resolve_request
from ..runtime.graph_modes import check_graph_flag
from .common import choices_of, family_of, subscribe


def register(p) -> None:
    p.description = ("Generate one video per prompt with a blend plan. Toy pair prompts use its "
                                   f"vocabulary: {vocabulary_line()}.")
    subscribe(p, "pair", "plan", "video", "guidance", "experts", "solver", "engine", "graph", "threads", "progress")
    g = p.add_argument_group("prompts and output")
    g.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for several videos)")
    g.add_argument("--prompt-file", help="file with one prompt per line")
    g.add_argument("--negative-prompt", default="", help="what CFG steers away from (used when guidance > 1)")
    g.add_argument("--seed", type=int, default=0, help="noise seed, 0 to 2**63-1 (the same for every prompt)")
    g.add_argument("--out", default="out.mp4", help="video path (.mp4 or .gif); with several prompts an index is "
                                                     "appended (out_0.mp4, ...)")
    p.set_defaults(func=run)


def read_prompts(args) -> list[str]:
    prompts = list(args.prompt)
    if args.prompt_file:
        path = Path(args.prompt_file)
        if not path.is_file():
            raise FlowblendError(f"prompt file {path} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    prompts = [p for p in prompts if p.strip()]
    if not prompts:
        raise FlowblendError("no prompt given: pass --prompt \"...\" (repeatable) or --prompt-file with one per line")
    return prompts


def output_paths(out: str, n: int) -> list[Path]:
    path = Path(out)
    if path.suffix.lower() not in (".mp4", ".gif"):
        raise FlowblendError(f"--out {out!r} must end in .mp4 or .gif")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def resolved_of(args) -> ResolvedRequest:
    """The flags as one resolved request (resolve/resolved.py, the server's resolver too): nothing has loaded yet."""
    return resolve_request(family_of(args), choices_of(args), read_prompts(args), args.negative_prompt, args.seed)


def check_memory(request, resolved, choice) -> None:
    """Refuse, before loading, a run of PyTorch engines on a GPU that its memory plan says cannot fit."""
    from ..bench.memory_plan import check_fits, device_capacity
    from ..runtime.solvers import make_solver_table

    capacity = device_capacity(choice.device) if choice.runs_transformers else None
    if capacity is None:
        return
    o = resolved.options
    table = make_solver_table(o.solver, len(request.plan), o.shift, o.mu, segments=request.plan.segments)
    check_fits(request.family, request.plan, request.latent_shape, table, resolved.guidance_per_step, choice.dtype,
               choice.cfg, choice.fp8_keep_blocks, *capacity, offload=choice.offload)


def run(args) -> int:
    resolved = resolved_of(args)
    request, experts, guidance_table = resolved.request, resolved.experts, resolved.guidance_per_step
    check_graph_flag(args.graph, args.device)
    outs = output_paths(args.out, len(request.prompts))

    from ..assembly import EngineChoice, assemble
    from ..runtime.video import save_video

    choice = EngineChoice.of(args)
    check_memory(request, resolved, choice)  # before anything loads: refused in one line if it cannot fit
    assembled = assemble(request.family.name, request.latent_shape, request.plan, resolved.options, choice,
                         graph=args.graph, large=args.large, small=args.small, allow_download=args.allow_download)
    pair, pipe = assembled.pair, assembled.pipeline
    settings = {k: v for k, v in request.sampler_settings().items() if v is not None and k != "guidance_scale"}
    for prompt, out in zip(request.prompts, outs):
        start = time.perf_counter()
        video, _ = pipe(prompt, request.latent_shape, seed=request.seed, negative_prompt=request.negative_prompt,
                        progress=not args.no_progress)
        seconds = time.perf_counter() - start
        written = save_video(video, out)
        record = {"prompt": prompt, "seed": request.seed, "pair": request.family.name, "backend": args.backend,
                  "plan": request.plan.to_dict(), "guidance": request.guidance,
                  "guidance_per_step": list(guidance_table),
                  **({"boundary_ratio": experts.boundary_ratio, "expert_switch_step": experts.switch_step}
                     if experts is not None else {}),
                  **settings,
                  "frames": request.frames, "height": request.height, "width": request.width, "dtype": args.dtype,
                  "graph": args.graph, "engines": choice.resolved(), "seconds": round(seconds, 4), "video": str(written),
                  "sources": pair.sources}
        written.with_suffix(".json").write_text(json.dumps(record, indent=2))
        print(f"wrote {written} ({request.plan.label}, {seconds:.2f} s)")
    return 0
