"""`flowblend generate`: prompts -> blended sampling -> video files (+ a JSON of what ran)."""
from __future__ import annotations

import json
import time
from pathlib import Path

from flowblend.errors import FlowblendError
from flowblend.export.pairs import load_pair
from flowblend.runtime.graph import GraphRunner
from flowblend.runtime.graph_modes import GRAPH_FLAGS
from flowblend.runtime.pipeline import BlendPipeline
from flowblend.runtime.sampler import Sampler, SamplerOptions
from flowblend.runtime.video import save_video

from .backends import BACKENDS, make_engines, parse_dtype
from .common import (
    add_pair_args,
    add_plan_args,
    add_video_args,
    family_of,
    resolve_experts,
    resolve_guidance,
    resolve_plan,
    resolve_steps,
    resolve_video,
)


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate videos with a blend plan")
    add_pair_args(p)
    add_plan_args(p)
    add_video_args(p)
    p.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for several videos)")
    p.add_argument("--prompt-file", help="file with one prompt per line")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--guidance", type=float,
                   help="CFG scale (default: the family's; 1 disables CFG; wan22: the high-noise expert's)")
    p.add_argument("--solver", choices=("unipc", "euler"), help="default: the family's")
    p.add_argument("--shift", type=float, help="flow shift (default: the family's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="torch", choices=BACKENDS)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16")
    p.add_argument("--out", default="out.mp4", help="video path; with several prompts, an index is appended")
    p.add_argument("--artifacts", default="artifacts", help="artifact root for compiled backends")
    p.add_argument("--graph", default="none", choices=GRAPH_FLAGS,
                   help="CUDA graphs (--device cuda): the whole loop in one graph, one per step, or none")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)


def read_prompts(args) -> list[str]:
    prompts = [p for p in args.prompt]
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


def run(args) -> int:
    family = family_of(args)
    frames, height, width = resolve_video(args, family)
    latent_shape = family.latent_shape(frames, height, width)
    solver_kw = family.sampler_kwargs(latent_shape)
    if args.solver:
        solver_kw["solver"] = args.solver
    if args.shift is not None:
        solver_kw["shift"], solver_kw["mu"] = args.shift, None
    experts = resolve_experts(args, family, resolve_steps(args, family), solver_kw["solver"], solver_kw["shift"],
                              solver_kw.get("mu"))
    plan = resolve_plan(args, family, experts)
    guidance, guidance_table = resolve_guidance(args, family, plan, experts)
    prompts = read_prompts(args)
    if args.graph != "none" and not args.device.startswith("cuda"):
        raise FlowblendError(f"--graph {args.graph} captures CUDA graphs: pass --device cuda, or drop --graph")
    outs = output_paths(args.out, len(prompts))
    dtype = parse_dtype(args.dtype)

    pair = load_pair(family.name, args.large, args.small, dtype=dtype, device=args.device,
                     allow_download=args.allow_download, load_transformers=args.backend == "torch")  # engines only
    engines = make_engines(args.backend, pair, args.device, dtype, args=args, latent_shape=latent_shape,
                           guidance=max(guidance_table))
    options = SamplerOptions(solver_kw["solver"], solver_kw["shift"], guidance, solver_kw.get("mu"),
                             guidance_table=guidance_table)
    sampler = Sampler(engines, plan, options=options, device=args.device, dtype=dtype)
    pipe = BlendPipeline(GraphRunner(sampler, mode=GRAPH_FLAGS[args.graph]), pair.encode_prompt, pair.decode)
    for prompt, out in zip(prompts, outs):
        start = time.perf_counter()
        video, _ = pipe(prompt, latent_shape, seed=args.seed, negative_prompt=args.negative_prompt,
                        progress=not args.no_progress)
        seconds = time.perf_counter() - start
        written = save_video(video, out)
        record = {"prompt": prompt, "seed": args.seed, "pair": family.name, "backend": args.backend,
                  "plan": plan.to_dict(), "guidance": guidance, "guidance_per_step": list(guidance_table),
                  **({"boundary_ratio": experts.boundary_ratio, "expert_switch_step": experts.switch_step}
                     if experts is not None else {}),
                  **{k: v for k, v in solver_kw.items() if v is not None},
                  "frames": frames, "height": height, "width": width, "dtype": args.dtype, "graph": args.graph,
                  "seconds": round(seconds, 4), "video": str(written), "sources": pair.sources}
        written.with_suffix(".json").write_text(json.dumps(record, indent=2))
        print(f"wrote {written} ({plan.label}, {seconds:.2f} s)")
    return 0
