"""GPU benchmark at the real Wan 2.1 14B / 1.3B layer sizes with random weights.

    python scripts/gpu_bench.py --out docs/gpu-runs/h100-bf16            # on a CUDA machine
    python scripts/gpu_bench.py --dry-run --out /tmp/gpu-dry              # tiny sizes on CPU: checks the script

Speed does not depend on weight values, so the transformers are built from the published configs
(families/ reference_configs) with random normal weights, directly on the GPU in the target
dtype (no checkpoint download). It measures eager PyTorch vs torch.compile vs per-step and
whole-loop CUDA graphs (runtime/graph.py, when present) for LLL vs LSL at 480x832 with a reduced
frame count (default 17 frames = 5 latent frames) so one run fits a 10-minute limit. Text encoding
and VAE decoding are not part of it (no weights): every time reported is the denoising loop.
`--layers-large/--layers-small` run fewer transformer blocks; the report then says so and states
its numbers for that depth only (nothing is extrapolated). Writes gpu-bench.json and gpu-bench.md
(and the chart) into --out, for committing under docs/gpu-runs/.

`--pair wan22` measures Wan 2.2 A14B's two experts (each at Wan 2.1 14B's size; --layers-large sets
both) and the 1.3B stand-in: the experts' own plan (the reference) against the small model taking
the last and first steps around the expert switch (`--plan experts:1,1` by default).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch

from flowblend.assembly import EngineChoice
from flowblend.bench.fullsize import random_transformer
from flowblend.bench.report import write_outputs
from flowblend.bench.run import BenchOptions, equivalent_command, run_bench
from flowblend.errors import FlowblendError
from flowblend.families import LoadedPair, get_family, reference_configs

SKIPPED = 3  # exit code scripts/gpu_run.py reads as SKIPPED
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Dry run: Wan's structure (patch, channels) at sizes a CPU runs in seconds.
DRY_CONFIG = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=32, freq_dim=32)
DRY = {"large": dict(DRY_CONFIG, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2),
       "small": dict(DRY_CONFIG, num_attention_heads=1, attention_head_dim=16, ffn_dim=32, num_layers=1)}
PLANS = {"wan": ("LLL", "LSL:0.4,0.2"), "wan22": ("experts", "experts:1,1")}


def build_pair(args, device: torch.device, dtype: torch.dtype) -> tuple[LoadedPair, dict]:
    wan = get_family(args.pair)
    if args.dry_run:  # every model but the small one has the large model's size (Wan 2.2's experts: 14B each)
        configs = {m: dict(DRY["small" if m == "small" else "large"]) for m in wan.models}
    else:
        configs = {m: dict(c) for m, c in reference_configs(args.pair).items()}
    depth = {}
    for m in configs:
        layers = args.layers_small if m == "small" else args.layers_large
        flag = "small" if m == "small" else "large"
        full = configs[m]["num_layers"]
        if layers is not None:
            if not 1 <= layers <= full:
                raise FlowblendError(f"--layers-{flag} must be between 1 and {full}, got {layers}")
            configs[m]["num_layers"] = layers
        depth[m] = f"{configs[m]['num_layers']} of {full} layers"
    family = dataclasses.replace(wan, text_dim=configs[wan.models[0]]["text_dim"],
                                 text_len=8 if args.dry_run else wan.text_len)
    transformers = {m: random_transformer(c, device, dtype, seed=i) for i, (m, c) in enumerate(configs.items())}
    text = torch.randn((2, family.text_len, family.text_dim), generator=torch.Generator().manual_seed(0))

    def encode_prompt(prompts):  # stands in for UMT5-XXL: same shape, no weights
        return text[: len(prompts)].to(device=device, dtype=dtype), None

    sizes = "tiny dry-run sizes" if args.dry_run else "Wan 2.1 14B / 1.3B layer sizes (Wan 2.2 experts: 14B)"
    sources = {m: f"random weights, {sizes}, {depth[m]}" for m in configs}
    return LoadedPair(family, transformers, encode_prompt, lambda latents: latents, sources), depth


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for gpu-bench.json/.md/.png (e.g. docs/gpu-runs/h100-bf16)")
    p.add_argument("--pair", default="wan", choices=tuple(PLANS),
                   help="wan: 14B + 1.3B, LLL vs LSL; wan22: two 14B experts + 1.3B, experts vs experts:1,1")
    p.add_argument("--plan", action="append", help="plan spelling (repeatable; default: the pair's, see --pair)")
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on CPU in FP32: checks the script end to end")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPES))
    p.add_argument("--frames", type=int, default=17, help="video frames (4k+1); 17 = 5 latent frames")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--layers-large", type=int, help="run this many of the 14B model's 40 blocks (reported)")
    p.add_argument("--layers-small", type=int, help="run this many of the 1.3B model's 30 blocks (reported)")
    p.add_argument("--backend", action="append", help="torch | torch-compile | onnxruntime | tensorrt "
                                                      "(repeatable; default torch, torch-compile)")
    p.add_argument("--mode", action="append", help="loop | step-graph | loop-graph (default: all three)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--compile-mode", help="torch.compile mode (default torch's)")
    args = p.parse_args(argv)
    if args.dry_run:
        args.height, args.width, args.frames = 64, 64, 5
        args.steps = min(args.steps, 3 if args.pair == "wan" else 6)  # wan22: 6 steps put the switch at step 4
        args.repeats, args.dtype = 1, "fp32"
        args.backend = args.backend or ["torch"]  # compiling takes minutes on a CPU; name it to include it
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("cpu" if args.dry_run else "cuda")
    try:
        if device.type == "cuda" and not torch.cuda.is_available():
            raise FlowblendError("no CUDA GPU is visible: run this on a GPU machine, or pass --dry-run to check it on CPU")
        get_family(args.pair).check_video_shape(args.frames, args.height, args.width)
        dtype = DTYPES[args.dtype]
        options = BenchOptions(backends=tuple(args.backend or ("torch", "torch-compile")),
                               modes=tuple(args.mode or ("loop", "step-graph", "loop-graph")),
                               plans=tuple(args.plan or PLANS[args.pair]), steps=args.steps, frames=args.frames, height=args.height,
                               width=args.width, warmup=args.warmup, repeats=args.repeats, overhead_repeats=0,
                               engine=EngineChoice(device=str(device), dtype=args.dtype, compile_mode=args.compile_mode),
                               end_to_end=False)
        start = time.perf_counter()
        pair, depth = build_pair(args, device, dtype)
        report = run_bench(pair, options)
    except FlowblendError as exc:
        print(f"gpu_bench: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a bare machine without the copied wheels: skipped, not failed
        if (exc.name or "").split(".")[0] == "flowblend":
            raise
        print(f"gpu_bench: skipped: python package {exc.name!r} is not installed (scripts/gpu_run.py installs the "
              "copied wheels)")
        return SKIPPED
    report["command"] = "python scripts/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    report["equivalent_bench_options"] = equivalent_command(args.pair, options)
    report["model_depth"] = depth
    report["note"] = ("random weights at the stated layer sizes; times are the denoising loop only (no text "
                      "encoder or VAE); numbers hold for the stated depth and frame count, not extrapolated")
    report["wall_seconds"] = time.perf_counter() - start
    paths = write_outputs(report, args.out, stem="gpu-bench")
    print(f"wrote {paths['json']}, {paths['markdown']}, {paths['png']} ({report['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
