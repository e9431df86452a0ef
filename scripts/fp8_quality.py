"""What FP8 linears and FP8 attention cost in quality on the toy pair, emulated exactly on the CPU.

    python scripts/fp8_quality.py                      # writes docs/fp8-quality-toy.md and .json
    python scripts/fp8_quality.py --seeds 0 --out /tmp/fp8   # a quicker look

The held-out prompts (docs/calibration/toy-prompts-heldout.txt) x seeds under LLL and LSL, with both
toy models in BF16 and with the attention and FFN linears of their blocks in FP8 (engines/fp8.py:
e4m3, dynamic per-row scales, FP32 accumulation, as a GPU's scaled matmul computes), scored by the
toy's exact probes (colour, shape, motion read back from the pixels); and the same with FP8 attention
(engines/fp8_attention.py: Q, K, V in e4m3 with per-head scales, the probabilities in e4m3 with a fixed
scale, FP32 accumulation), over BF16 and over FP8 linears. Also the per-step cosine of the guided
velocity against BF16 along BF16's own LSL trajectory. Every figure is computed here.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from flowblend.engines.attention import choose_attention
from flowblend.engines.fp8 import Fp8Options, quantize_fp8
from flowblend.engines.torch_engine import TorchEngine
from flowblend.families import load_pair
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions
from flowblend.toy.demo import generate_plans, score_results

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = ROOT / "docs" / "calibration" / "toy-prompts-heldout.txt"
PLANS = ("LLL", "LSL:0.4,0.2")
SCORES = ("semantic_acc", "colour_acc", "shape_acc", "direction_acc")
TOLERANCE_POINTS = 2.0  # issue #24: FP8 keeps LSL's scores within 2 points of BF16


FP8_ATTENTION = "fp8-emulated"  # engines/attention.py: FP8 attention's arithmetic, exactly, on the CPU
WITH_FP8_ATTENTION = " + fp8 attention"


def variants(pair, keep_blocks: int) -> dict:
    """BF16 and FP8 (emulated) copies of both toy transformers; the attention variants reuse them."""
    bf16 = {m: copy.deepcopy(t).to(torch.bfloat16).eval() for m, t in pair.transformers.items()}
    fp8 = {m: copy.deepcopy(t) for m, t in bf16.items()}
    for model in fp8.values():
        quantize_fp8(model, Fp8Options(keep_blocks=keep_blocks), emulate=True)
    return {"bf16": bf16, f"fp8 (emulated{f', first/last {keep_blocks} blocks bf16' if keep_blocks else ''})": fp8}


def attention_of(name: str):
    """The attention context a variant runs every forward in (FP8 attention for the '+ fp8 attention' ones)."""
    import contextlib

    if name.endswith(WITH_FP8_ATTENTION):
        return choose_attention(torch.device("cpu"), torch.bfloat16, FP8_ATTENTION).context()
    return contextlib.nullcontext()


def velocity_cosines(pair, reference: dict, candidate: dict, plan: BlendPlan, prompt: str, seed: int,
                     attention: str = "default") -> list[float]:
    """Per step: cosine of the candidate's guided velocity vs the reference's, both at the reference's latents."""
    family = pair.family
    shape = family.latent_shape(family.frames, family.height, family.width)
    options = SamplerOptions(guidance_scale=family.guidance, **family.sampler_kwargs(shape))
    ref = Sampler({m: TorchEngine(t, name=m) for m, t in reference.items()}, plan, options)
    cand = Sampler({m: TorchEngine(t, name=m, attention=attention) for m, t in candidate.items()}, plan, options)
    embeds, _ = pair.encode_prompt([prompt, ""])
    noise = torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed))
    bufs = ref.load_request(noise, embeds[0:1], embeds[1:2])
    out = []
    with torch.no_grad():
        for i in range(len(plan)):
            ref.evaluate(i)
            cand.load_request(bufs.latents.clone(), embeds[0:1], embeds[1:2])  # the same latent and step
            cand.evaluate(i)
            a, b = cand.buffers.guided.double().flatten(), bufs.guided.double().flatten()
            out.append(torch.nn.functional.cosine_similarity(a, b, dim=0).item())
            ref.advance(i)
    return out


def markdown(report: dict) -> str:
    lines = ["# FP8 linears and FP8 attention on the toy pair (emulated exactly on the CPU)", "",
             f"`{report['command']}` ({report['wall_s']:.0f} s, {report['machine']}). {len(report['prompts'])} held-out "
             f"prompts x seeds {report['seeds']}, {report['steps']} steps; FP8 = the attention and FFN linears of every "
             "transformer block in e4m3 with dynamic per-row scales and FP32 accumulation (engines/fp8.py), everything "
             "else BF16; '+ fp8 attention' = every attention with Q, K, V in e4m3 (per-head dynamic scales) and "
             "the probabilities in e4m3 (fixed scale 448), FP32 accumulation (engines/fp8_attention.py, torchao's "
             "FA3 FP8 SDPA's quantisation). Scores in % (the toy probes: colour, shape and motion read back from "
             "the pixels).", "",
             "| plan | precision | semantic | colour | shape | direction | vs BF16 (points, worst score) |",
             "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        delta = "" if row["precision"] == "bf16" else f"{row['worst_delta_points']:+.1f}"
        lines.append(f"| {row['plan']} | {row['precision']} | " + " | ".join(f"{100 * row[k]:.1f}" for k in SCORES)
                     + f" | {delta} |")
    lines += ["", "Per-step cosine of the guided velocity vs BF16 at BF16's own LSL latents (mean over prompts x seeds):", "",
              "| precision | " + " | ".join(str(i) for i in range(report["steps"])) + " | min |",
              "|---|" + "---|" * (report["steps"] + 1)]
    for name, cosines in report["velocity_cosine"].items():
        lines.append(f"| {name} | " + " | ".join(f"{c:.4f}" for c in cosines) + f" | {min(cosines):.4f} |")
    videos = len(report["prompts"]) * len(report["seeds"])
    lines += ["", f"Target (issues #24, #32): LSL and LLL with every FP8 variant within {TOLERANCE_POINTS:g} points of "
              "BF16 on every score: " + ("met" if report["lsl_within_tolerance"] else "NOT met")
              + f". Resolution: {videos} videos per row, so "
              f"one video is {100 / videos:.1f} points; a difference of one or two videos either way is within the "
              "noise of so small a set, and FP8 scoring higher than BF16 is such noise, not a gain."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--keep-blocks", type=int, default=0, help="first/last N blocks stay BF16 in the FP8 variant")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "fp8-quality-toy"), help="writes OUT.md and OUT.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pair = load_pair("toy")
    prompts = [line.strip() for line in HELD_OUT.read_text().splitlines() if line.strip()]
    steps = pair.family.steps
    plans = [BlendPlan.parse(s, steps) for s in PLANS]
    rows, by_variant = [], variants(pair, args.keep_blocks)
    runs = [(name, t) for name, t in by_variant.items()]
    runs += [(name + WITH_FP8_ATTENTION, t) for name, t in by_variant.items()]
    for name, transformers in runs:
        with attention_of(name):
            results = generate_plans(dataclasses.replace(pair, transformers=transformers), plans, prompts, args.seeds)
        score_results(results, prompts, args.seeds)
        for result in results:
            rows.append({"plan": result.plan.label, "precision": name, **{k: result.scores[k] for k in SCORES}})
    for row in rows:
        base = next(r for r in rows if r["plan"] == row["plan"] and r["precision"] == "bf16")
        row["worst_delta_points"] = min(100 * (row[k] - base[k]) for k in SCORES)
    lsl = BlendPlan.parse(PLANS[1], steps)
    names = list(by_variant)
    candidates = {names[1]: (by_variant[names[1]], "default")}
    candidates.update({name + WITH_FP8_ATTENTION: (t, FP8_ATTENTION) for name, t in by_variant.items()})
    cosines = {name: [velocity_cosines(pair, by_variant["bf16"], t, lsl, prompt, seed, attention)
                      for prompt in prompts for seed in args.seeds] for name, (t, attention) in candidates.items()}
    report = {"command": "python scripts/fp8_quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}", "prompts": prompts,
              "seeds": args.seeds, "steps": steps, "rows": rows,
              "velocity_cosine": {name: [sum(c[i] for c in cs) / len(cs) for i in range(steps)]
                                  for name, cs in cosines.items()},
              "lsl_within_tolerance": all(r["worst_delta_points"] >= -TOLERANCE_POINTS for r in rows),
              "wall_s": time.perf_counter() - start}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
