"""The toy experiment of docs/toy-results.md: every prompt of the vocabulary x 2 seeds, default steps,
under LLL, SSS, LSL, LSS and SLL, scored by the exact probes, with cost and wall time.

    python scripts/toy_results.py                       # writes docs/toy-results.md and .json
    python scripts/toy_results.py --seeds 0 --out /tmp/quick   # a quicker look

Every figure in the markdown is computed here from this run; the findings are comparisons of those
figures, so the page says what the weights in families/toy_weights/ do, whatever they do.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from flowblend.engines.store import file_sha256
from flowblend.families import load_pair
from flowblend.families.toy_model import WEIGHTS_DIR
from flowblend.runtime.plan import BlendPlan
from flowblend.toy.data import all_prompts
from flowblend.toy.demo import generate_plans
from flowblend.toy.probes import (
    SCORE_KEYS,
    foreground_masks,
    read_colour,
    read_direction,
    read_shape,
    reference_videos,
    score_set,
)

PLANS = ("LLL", "SSS", "LSL:0.4,0.2", "LSS:0.4", "SLL:0.2")
# The paper's other settings on the toy pair (issue 27): (setting, solver, steps, plans), each against the LLL of
# the first entry with the same solver and steps. The stage rows give the small model's middle interval of the
# 20-step LSL (L8,S8,L4) only 3 steps, without distillation; L8,L3,L4 gives the large model the same 3 steps.
EXTRA = (("DPM++ solver, few steps", "dpm++", 10, ("LLL", "LSL:0.4,0.2")),
         ("UniPC at the same steps", "unipc", 10, ("LLL", "LSL:0.4,0.2")),
         ("few-step middle stage, no distillation", "unipc", 20, ("L8,S3,L4", "L8,L3,L4")))
HIGHER_IS_BETTER = {"semantic_acc": True, "colour_acc": True, "shape_acc": True, "direction_acc": True,
                    "coherence": True, "frechet": False}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--plans", nargs="+", default=list(PLANS))
    p.add_argument("--steps", type=int, default=None, help="default: the toy family's default (20)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="docs/toy-results", help="writes OUT.md and OUT.json")
    p.add_argument("--no-extra", action="store_true", help="skip the DPM++ and per-stage-steps rows (issue 27)")
    p.add_argument("--prompts", type=int, default=None, help="only the first N prompts (a quick check of the script)")
    p.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json (no generation)")
    return p.parse_args()


def agreement_with(reference, videos) -> dict:
    """How close each video is to the reference plan's video of the same prompt and seed: the share
    with the same semantic reading, foreground IoU over all frames, and mean absolute pixel error."""
    same, ious, errors = [], [], []
    for ref, vid in zip(reference, videos):
        a, b = ref.float().numpy(), vid.float().numpy()
        ma, mb = foreground_masks(a), foreground_masks(b)
        same.append(readings(a, ma) == readings(b, mb))
        union = (ma | mb).sum()
        ious.append((ma & mb).sum() / union if union else 1.0)
        errors.append(float(np.abs(a - b).mean()))
    return {"same_reading": float(np.mean(same)), "mask_iou": float(np.mean(ious)),
            "mean_abs_pixel_diff": float(np.mean(errors))}


def readings(video: np.ndarray, masks: np.ndarray) -> tuple:
    return read_colour(video, masks), read_shape(masks), read_direction(masks)


def markdown(record: dict) -> str:
    rows, data, lll = record["rows"], record["data_row"], record["rows"][0]
    keys = list(SCORE_KEYS)
    head = ["plan", "stages", "large/small steps", "GFLOPs/video", "FLOPs vs LLL", "loop s/video",
            "time vs LLL"] + keys
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append("| " + " | ".join([
            r["plan"], r["stages"], f"{r['large_steps']}/{r['small_steps']}", f"{r['gflops_per_video']:.2f}",
            f"{r['gflops_per_video'] / lll['gflops_per_video']:.2f}", f"{r['loop_seconds_per_video']:.3f}",
            f"{r['loop_seconds_per_video'] / lll['loop_seconds_per_video']:.2f}",
            *[f"{r[k]:.3f}" for k in keys]]) + " |")
    lines.append("| real procedural videos (probe ceiling) | - | - | - | - | - | - | " +
                 " | ".join(f"{data[k]:.3f}" for k in keys) + " |")
    agree = ["| plan | same colour/shape/direction reading as LLL | foreground IoU with LLL | mean abs pixel diff to LLL |",
             "|---|---|---|---|"]
    for r in rows[1:]:
        a = r["vs_lll"]
        agree.append(f"| {r['plan']} | {a['same_reading']:.3f} | {a['mask_iou']:.3f} | {a['mean_abs_pixel_diff']:.4f} |")
    m = record["meta"]
    return "\n".join([
        "# Toy pair results: LLL, SSS, LSL, LSS, SLL",
        "",
        f"Generated by `{m['command']}` ({m['wall_s']:.0f} s on {m['machine']}, {m['threads']} threads, PyTorch "
        f"eager backend, FP32). Do not edit by hand: re-run the command.",
        "",
        f"Evaluation set: every prompt of the vocabulary ({m['prompts']} = 6 colours x 3 shapes x 4 directions) x "
        f"seeds {m['seeds']} = {m['videos']} videos per plan; {m['steps']} {m['solver']} steps, shift {m['shift']}, "
        f"CFG {m['guidance']}; weights `families/toy_weights/` (sha256 of the safetensors: large "
        f"`{m['weights']['large'][:12]}`, small `{m['weights']['small'][:12]}`). Same noise per (prompt, seed) "
        "under every plan.",
        "",
        "Probe scores (accuracies: share of videos whose colour / shape / direction read back from the "
        "pixels is the prompt's; semantic: all three right; coherence in [0, 1]; Frechet: distance of "
        "fixed features to real procedural videos of the same prompts, lower is better). FLOPs: ours "
        "(2 per MAC, attention included, CFG counted); loop time: the denoising loop only, batch 1 with CFG, "
        "plans run one after another (a busy machine skews it; `flowblend bench` measures speed properly).",
        "",
        *lines,
        "",
        "## How close the blended plans stay to LLL (same prompt, same seed)",
        "",
        *agree,
        "",
        "## Findings",
        "",
        *[f"- {line}" for line in record["findings"]],
        "",
        *extra_markdown(record.get("extra", [])),
    ])


def extra_markdown(extra: list[dict]) -> list[str]:
    """The DPM++ and per-stage-steps rows: each against LLL at its own solver and step count."""
    if not extra:
        return []
    keys = ("semantic_acc", "direction_acc", "shape_acc", "coherence", "frechet")
    head = ["setting", "solver", "plan", "stages", "large/small steps", "GFLOPs/video", "FLOPs vs LLL",
            "vs LLL of", *keys, "same reading as that LLL", "foreground IoU with it"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in extra:
        a = r.get("vs_lll")
        lines.append("| " + " | ".join([
            r["setting"], r["solver"], r["plan"], r["stages"], f"{r['large_steps']}/{r['small_steps']}",
            f"{r['gflops_per_video']:.2f}", f"{r['flops_vs_lll']:.2f}", r["lll_of"], *[f"{r[k]:.3f}" for k in keys],
            "-" if a is None else f"{a['same_reading']:.3f}", "-" if a is None else f"{a['mask_iou']:.3f}"]) + " |")
    by = {(r["solver"], r["plan"]): r for r in extra}
    notes = []
    for solver in ("dpm++", "unipc"):
        lll, lsl = by.get((solver, "LLL")), by.get((solver, "LSL:0.4,0.2"))
        if lll and lsl:
            notes.append(f"{solver}, {lsl['steps']} steps: LSL ({lsl['stages']}) costs {lsl['flops_vs_lll']:.0%} of LLL's "
                         f"FLOPs; semantic accuracy {lsl['semantic_acc']:.3f} vs LLL {lll['semantic_acc']:.3f}, Frechet "
                         f"{lsl['frechet']:.2f} vs {lll['frechet']:.2f}; same reading as LLL for "
                         f"{lsl['vs_lll']['same_reading']:.0%} of the videos.")
    few, few_l = by.get(("unipc", "L8,S3,L4")), by.get(("unipc", "L8,L3,L4"))
    if few:
        notes.append(f"Few-step middle stage without distillation: L8,S3,L4 ({few['stages']}) costs "
                     f"{few['flops_vs_lll']:.0%} of 20-step LLL's FLOPs (L8,S8,L4: {few['lsl_flops_vs_lll']:.0%}); "
                     f"semantic accuracy {few['semantic_acc']:.3f} (L8,S8,L4 {few['lsl_semantic_acc']:.3f}), Frechet "
                     f"{few['frechet']:.2f} (L8,S8,L4 {few['lsl_frechet']:.2f}), coherence {few['coherence']:.3f} "
                     f"(L8,S8,L4 {few['lsl_coherence']:.3f}); same reading as LLL for "
                     f"{few['vs_lll']['same_reading']:.0%} of the videos.")
    if few and few_l:
        steps_ok = few_l["semantic_acc"] >= few["lsl_semantic_acc"]
        small_loses = few["semantic_acc"] < few["lsl_semantic_acc"]
        reading = ("three steps across that interval are enough for the large model, so what L8,S3,L4 loses "
                   "against L8,S8,L4 is the undistilled small model's: what a step-distilled D has to recover"
                   if steps_ok and small_loses else
                   "so the loss is not the small model's alone" if small_loses else "")
        notes.append(f"The same 3 middle steps with the large model (L8,L3,L4): semantic accuracy "
                     f"{few_l['semantic_acc']:.3f}, Frechet {few_l['frechet']:.2f}, coherence {few_l['coherence']:.3f}"
                     + (f"; {reading}." if reading else "."))
    return ["## The paper's other settings: DPM++ and a few-step middle stage (issue 27)", "",
            "Same prompts, seeds and weights as above. Each row is compared with LLL at its own solver and step "
            "count (`vs LLL of`). A stage spelled `S3/8` takes 3 steps across the sigma interval 8 base steps cover "
            "(runtime/plan.py); the toy small model is not distilled, so these rows show what few steps cost it.",
            "", *lines, "", *[f"- {n}" for n in notes], ""]


def extra_rows(pair, prompts, expected, seeds, main_rows, main_lll_videos) -> list[dict]:
    """Generate and score the EXTRA settings; each compared with the LLL of the same solver and steps."""
    rows, lll_of = [], {}
    by_main = {r["plan"]: r for r in main_rows}
    for setting, solver, steps, specs in EXTRA:
        plans = [BlendPlan.parse(p, steps) for p in specs]
        results = generate_plans(pair, plans, prompts, list(seeds), solver=solver)
        for plan, r in zip(plans, results):
            if plan.spec == "LLL":
                lll_of[(solver, steps)] = (r.videos, r.flops_per_video)
            ref_videos, ref_flops = lll_of.get((solver, steps), (main_lll_videos, by_main["LLL"]["gflops_per_video"] * 1e9))
            row = {"setting": setting, "solver": solver, "steps": steps, "plan": plan.spec or plan.label,
                   "stages": plan.label, "large_steps": plan.count("large"), "small_steps": plan.count("small"),
                   "gflops_per_video": r.flops_per_video / 1e9, "flops_vs_lll": r.flops_per_video / ref_flops,
                   "lll_of": f"{solver} {steps} steps", **score_set(r.videos, expected)}
            if plan.spec != "LLL":
                row["vs_lll"] = agreement_with(ref_videos, r.videos)
            lsl = by_main.get("LSL:0.4,0.2")
            if lsl and steps == 20:
                row.update(lsl_flops_vs_lll=lsl["gflops_per_video"] / by_main["LLL"]["gflops_per_video"],
                           lsl_semantic_acc=lsl["semantic_acc"], lsl_frechet=lsl["frechet"],
                           lsl_coherence=lsl["coherence"])
            rows.append(row)
    return rows


def findings(rows: list[dict]) -> list[str]:
    by = {r["plan"]: r for r in rows}
    lll, sss = by.get("LLL"), by.get("SSS")
    out = []
    if lll and sss:
        gaps = []
        for k in SCORE_KEYS:
            better = lll[k] > sss[k] if HIGHER_IS_BETTER[k] else lll[k] < sss[k]
            gaps.append(f"{k} {lll[k]:.3f} vs {sss[k]:.3f} ({'LLL better' if better else 'LLL not better'})")
        out.append("Capacity gap, LLL vs SSS: " + "; ".join(gaps) + ".")
        out.append(f"LLL semantic accuracy {lll['semantic_acc']:.1%} "
                   f"({'meets' if lll['semantic_acc'] >= 0.9 else 'does NOT meet'} the 90% target).")
    for name, r in by.items():
        if name in ("LLL", "SSS") or not lll:
            continue
        d = r["semantic_acc"] - lll["semantic_acc"]
        out.append(f"{name} ({r['stages']}): {r['gflops_per_video'] / lll['gflops_per_video']:.0%} of LLL's FLOPs, "
                   f"loop time {r['loop_seconds_per_video'] / lll['loop_seconds_per_video']:.0%} of LLL's; semantic "
                   f"accuracy {r['semantic_acc']:.3f} ({d:+.3f} vs LLL), Frechet {r['frechet']:.2f} vs LLL "
                   f"{lll['frechet']:.2f}; same reading as LLL for {r['vs_lll']['same_reading']:.0%} of the videos.")
    return out


def main():
    args = parse_args()
    if args.render:  # the page from the run's own record, e.g. after a change to the wording of the findings
        out = Path(args.out)
        record = json.loads(out.with_suffix(".json").read_text())
        tmp = out.with_name(f".{out.name}.md.partial")
        tmp.write_text(markdown(record))
        os.replace(tmp, out.with_suffix(".md"))
        print(markdown(record))
        return
    torch.set_num_threads(args.threads)
    t0 = time.time()
    pair = load_pair("toy")
    family = pair.family
    steps = args.steps or family.steps
    specs = all_prompts()[:args.prompts]
    prompts = [s.text for s in specs]
    plans = [BlendPlan.parse(p, steps) for p in args.plans]
    if plans[0].spec != "LLL":
        raise SystemExit("the first plan must be LLL: every other plan is compared with it")
    results = generate_plans(pair, plans, prompts, list(args.seeds))
    expected = [s for s in specs for _ in args.seeds]  # generate_plans: seeds inner, prompts outer
    rows = []
    for r in results:
        scores = score_set(r.videos, expected)
        row = {"plan": r.plan.spec or r.plan.label, "stages": r.plan.label, "large_steps": r.plan.count("large"),
               "small_steps": r.plan.count("small"), "gflops_per_video": r.flops_per_video / 1e9,
               "loop_seconds_per_video": r.loop_seconds / len(r.videos), **scores}
        if rows:
            row["vs_lll"] = agreement_with(results[0].videos, r.videos)
        rows.append(row)
    extra = [] if args.no_extra else extra_rows(pair, prompts, expected, args.seeds, rows, results[0].videos)
    data = score_set(reference_videos(expected, seed_offset=20_000), expected)
    weights = {m: file_sha256(WEIGHTS_DIR / m / "diffusion_pytorch_model.safetensors") for m in ("large", "small")}
    kwargs = family.sampler_kwargs(family.latent_shape(family.frames, family.height, family.width))
    record = {"rows": rows, "data_row": data, "findings": findings(rows), "extra": extra,
              "meta": {"command": "python scripts/toy_results.py" + (
                  "" if args.out == "docs/toy-results" else f" --out {args.out}") + (
                  "" if args.seeds == [0, 1] else " --seeds " + " ".join(map(str, args.seeds))) + (
                  " --no-extra" if args.no_extra else "") + ("" if args.prompts is None else f" --prompts {args.prompts}"),
                  "prompts": len(prompts), "seeds": list(args.seeds), "videos": len(expected), "steps": steps,
                  "solver": kwargs["solver"], "shift": kwargs["shift"], "guidance": family.guidance,
                  "weights": weights, "threads": args.threads, "wall_s": time.time() - t0,
                  "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}"}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(record, indent=2)), (".md", markdown(record))):
        tmp = out.with_name(f".{out.name}{suffix}.partial")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
    print(markdown(record))


if __name__ == "__main__":
    main()
