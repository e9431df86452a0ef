"""A benchmark's measurements turned into its report: paired speedups, rows, targets, markdown, PNG.

Kept apart from bench/run.py (which runs the cases) so scripts/bench_readme.py and the GPU
script can render a report from its JSON without measuring anything.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

from flowblend.atomic import write_atomic

from ..engines.kinds import REFERENCE_KIND
from ..runtime.plan import BlendPlan
from .pairing import paired_ratios, paired_speedup

TARGETS = {"realized_fraction": 0.95, "overhead_percent": 2.0}


def stats(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _quartiles(values: list[float]) -> list[float] | None:
    return [q for i, q in enumerate(statistics.quantiles(values, n=4)) if i != 1] if len(values) >= 2 else None


def case_rows(cases: list, per_step: dict, reference_plan: BlendPlan, frames: int, device,
              per_cached_step: dict | None = None) -> list[dict]:
    """One row per case; a cached step counts what it still runs (`per_cached_step`), so the FLOP-ideal speedup
    and the realized fraction of a plan with cached steps are against the blocks it really skips."""
    ref = next(c for c in cases if (c.backend, c.mode, c.plan) == (REFERENCE_KIND, "loop", reference_plan))
    ref_loop = statistics.median(ref.times["loop"])
    lll_flops = reference_plan.flops(per_step)
    rows = []
    for c in cases:
        loop, e2e = statistics.median(c.times["loop"]), statistics.median(c.times["e2e"])
        ratios = paired_ratios(ref.times["loop"], c.times["loop"])
        speedup_loop = statistics.median(ratios)  # = paired_speedup: the ratios are kept for their quartiles
        flops = c.plan.flops(per_step, per_cached_step)
        ideal = lll_flops / flops
        row = {"backend": c.backend, "mode": c.mode, "plan": c.plan.spec or c.plan.label, "stages": c.plan.label,
               "reference": c is ref, "large_steps": c.plan.count("large"), "small_steps": c.plan.count("small"),
               "steps_per_model": {m: c.plan.count(m) for m in c.plan.model_set.names},
               "cached_steps": list(c.plan.cached_steps()), "flops": flops, "ideal_speedup": ideal,
               "loop_s": stats(c.times["loop"]), "e2e_s": stats(c.times["e2e"]),
               "loop_rounds_s": list(c.times["loop"]),  # in round order: pairs with the reference's rounds
               "encode_s": statistics.median(c.times["encode"]), "decode_s": statistics.median(c.times["decode"]),
               "speedup_loop": speedup_loop, "speedup_e2e": paired_speedup(ref.times["e2e"], c.times["e2e"]),
               "speedup_loop_of_medians": ref_loop / loop,
               "realized_fraction": speedup_loop / ideal, "seconds_per_frame": e2e / frames,
               "realized_quartiles": [q / ideal for q in _quartiles(ratios) or []] or None,
               "step_ms": {m: {k: (v * 1e3 if k != "n" else v) for k, v in stats(s).items()}
                           for m, s in c.step_seconds.items() if s},
               "engine_share": statistics.median(c.engine_share) if c.engine_share else None,
               "first_run_s": c.first_run_s, "peak_rss_bytes": c.peak.rss_peak, "attention": c.attention}
        if c.runner is not None:  # same noise and prompt as the eager loop of this backend and plan
            eager = next((e for e in cases if (e.backend, e.mode, e.plan) == (c.backend, "loop", c.plan)), None)
            if eager is not None:
                row["max_abs_diff_vs_loop"] = float((c.runner.latents.float() - eager.sampler.buffers.latents.float())
                                                    .abs().max())
        if device.type == "cuda":
            row.update(max_allocated_bytes=c.peak.allocated_peak, max_reserved_bytes=c.peak.reserved_peak)
        rows.append(row)
    return rows


def targets(report: dict) -> list[dict]:
    out = []
    lsl = next((r for r in report["cases"] if (r["backend"], r["mode"], r["stages"]) == (REFERENCE_KIND, "loop", _lsl_label(report))),
               None)
    if lsl:
        name = "LSL" if "expert_switch_step" not in report["pair"] else f"{lsl['plan']} ({lsl['stages']})"
        out.append({"name": f"{name} realized speedup / FLOP-ideal (eager, loop)", "target": f">= {TARGETS['realized_fraction']:.0%}",
                    "measured": f"{lsl['realized_fraction']:.1%} ({lsl['speedup_loop']:.2f}x of {lsl['ideal_speedup']:.2f}x"
                    + (f"; rounds' quartiles {lsl['realized_quartiles'][0]:.0%}-{lsl['realized_quartiles'][1]:.0%}"
                       if lsl.get("realized_quartiles") else "") + ")",
                    "value": lsl["realized_fraction"], "met": lsl["realized_fraction"] >= TARGETS["realized_fraction"]})
    if report["overhead"]:
        o = report["overhead"][0]
        out.append({"name": f"runtime overhead vs bare loop ({o['size']})", "target": f"<= {TARGETS['overhead_percent']:g}%",
                    "measured": f"{o['overhead_percent']:+.2f}%", "met": o["overhead_percent"] <= TARGETS["overhead_percent"]})
    m = report["memory"]
    if m:
        out.append({"name": f"peak memory of the blended run ({m['plan']})", "target": f"<= {_mib(m['bound_bytes'])} "
                    "(weights" + (" and engine constants" if _has_engine_constants(m) else "")
                    + " + large activations + buffers" + (" + held before + the loop stream's BLAS workspace"
                                                          if _has_cuda_terms(m) else "") + ")",
                    "measured": _mib(m["measured_bytes"]), "met": m["met"]})
    return out


def _has_engine_constants(memory: dict) -> bool:
    """Reports from before engines precomputed constants have no such term (or only zeros)."""
    return any((memory.get("engine_constants_bytes") or {}).values())


def _has_cuda_terms(memory: dict) -> bool:
    """CUDA runs bound what was held before and the loop stream's BLAS workspace (CPU reports: zeros or absent)."""
    return bool(memory.get("held_before_bytes") or memory.get("stream_workspace_bytes"))


def _measured_what(memory: dict) -> str:
    """How the measured figure was taken (reports before engine constants existed say it without them)."""
    what = memory["measured"]
    if _has_engine_constants(memory) and "engine constants" not in what:
        what = what.replace("weights + ", "weights + engine constants + ", 1)
    return what


def _lsl_label(report: dict) -> str:
    """The blended plan the realized-speedup target is read from (LSL; wan22: small around the expert switch)."""
    return report.get("blended_stages") or BlendPlan.parse("LSL:0.4,0.2", report["pair"]["steps"]).label


def _peak(row: dict) -> str:
    if "max_allocated_bytes" in row:
        return f"{_mib(row['max_allocated_bytes'])} allocated, {_mib(row['max_reserved_bytes'])} reserved"
    return f"{_mib(row['peak_rss_bytes'])} RSS"


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def render_markdown(report: dict, heading: str = "##") -> str:
    """Results table, targets, memory terms and runtime overhead, with the machine and the command."""
    mach, pair = report["machine"], report["pair"]
    hw = mach.get("gpu") or mach["cpu"]
    models = pair.get("models", ["large", "small"])  # reports before named models had these two
    lines = [f"{heading} Benchmark: {pair['name']} pair, {pair['frames']} frames {pair['width']}x{pair['height']}, "
             f"{pair['steps']} steps, CFG {pair['guidance']}", "",
             f"Machine: {hw}, {mach['cores']} cores ({mach['torch_threads']} torch threads), torch {mach['torch']}"
             + (f", CUDA {mach['cuda']}" if "cuda" in mach else "")
             + (f", fused step kernel {'on' if mach['fused_step_kernel'] else 'off (not built)'}"
                if "fused_step_kernel" in mach else "") + f", {report['options']['dtype']}, "
             f"{report['options']['device']}. Load average at start/end: "
             f"{report['load_average']['start'][0]:.2f} / {report['load_average']['end'][0]:.2f}.", "",
             f"Command: `{report.get('command', '(Python API)')}`", "",
             "Models: " + "; ".join(f"{m}: {src}" for m, src in pair["sources"].items())
             + (f". {report['note'][0].upper()}{report['note'][1:]}." if report.get("note") else "."), "",
             "Loop: the denoising loop alone; end to end: text encoding + loop + decode"
             + ("" if report["options"]["end_to_end"] else " (not measured: no text encoder / VAE, end to end = loop)")
             + f". Medians of {report['options']['repeats']} repeats visited round-robin (each round starts one case later), after "
             f"{max(report['options']['warmup'], 1)} warm-up run(s). Speedups are against eager PyTorch "
             f"{report['flops']['reference_plan']} measured in the same run: the median over repeats of the "
             "ratio within each round (\"of medians\": ratio of the two medians, for comparison); FLOP-ideal = reference FLOPs / plan FLOPs "
             "(2 FLOPs per MAC, attention included, CFG counted); realized = measured speedup / FLOP-ideal. "
             "Per-step latencies come from a separate pass that times every engine call; \"outside engines\" is the "
             "share of that pass's loop time spent outside them (CFG combine, solver, Python). Eager PyTorch runs "
             "diffusers' modules as they are; for Wan and LTX its engines compute the rotary tables and the per-step "
             "timestep embeddings once when bound to the buffers instead of in every step "
             "(families/wan_step.py, ltx_step.py; bitwise the same velocities).", "",
             "| backend | mode | plan | stages | GFLOPs | FLOP-ideal | loop s (min-max) | speedup (of medians) | realized "
             "| end to end s | s/frame | " + "".join(f"{m} step ms (min-max) | " for m in models)
             + "outside engines | peak memory |",
             "|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(models) + "---|---|"]

    def ms(row, m):
        s = row["step_ms"].get(m)
        return f"{s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})" if s else "-"
    for r in report["cases"]:
        lines.append(f"| {r['backend']} | {r['mode']} | {r['plan']} | {r['stages']} | {r['flops'] / 1e9:.2f} | "
                     f"{r['ideal_speedup']:.2f}x | {r['loop_s']['median']:.3f} ({r['loop_s']['min']:.3f}-"
                     f"{r['loop_s']['max']:.3f}) | {r['speedup_loop']:.2f}x ({r.get('speedup_loop_of_medians', r['speedup_loop']):.2f}x) | "
                     f"{r['realized_fraction']:.0%} | "
                     f"{r['e2e_s']['median']:.3f} | {r['seconds_per_frame']:.4f} | {''.join(ms(r, m) + ' | ' for m in models)}"
                     f"{'-' if r['engine_share'] is None else format(1 - r['engine_share'], '.1%')} | "
                     f"{_peak(r)} |")
    first = {}
    for r in report["cases"]:
        first[r["backend"]] = first.get(r["backend"], 0.0) + (r["first_run_s"] or 0.0)
    lines.append("\nFirst (untimed) runs, all plans, per backend: " + ", ".join(f"{b} {t:.1f} s" for b, t in first.items())
                 + " (torch-compile compiles there; the inductor cache makes later processes faster).")
    graphs = [r for r in report["cases"] if "max_abs_diff_vs_loop" in r]
    if graphs:
        lines.append("\nGraph replays against the eager loop (same noise and prompt), max abs difference of the final "
                     "latents: " + ", ".join(f"{r['backend']} {r['mode']} {r['plan']} {r['max_abs_diff_vs_loop']:.1e}"
                                              for r in graphs) + ".")
    kernels = {r["backend"]: r.get("attention") for r in report["cases"] if r.get("attention")}
    if kernels:
        lines.append("\nAttention: " + "; ".join(f"{b}: {a}" for b, a in kernels.items()))
    for s in report["skipped"]:
        lines.append(f"\nNot measured: {s['backend']} ({s['mode']}): {s['reason']}")
    lines += ["", f"{heading}# Targets", "", "| target | goal | measured | met |", "|---|---|---|---|"]
    lines += [f"| {t['name']} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |" for t in report["targets"]]
    m, rss = report["memory"], report["memory"]["rss"]
    lines += ["", f"Memory terms ({m['plan']} loop): weights " + ", ".join(f"{k} {_mib(v)}" for k, v in m["weights_bytes"].items())
              + ("; engine constants (rotary tables and per-step timestep embeddings, precomputed at binding) "
                 + ", ".join(f"{k} {v / 2**10:.0f} KiB" for k, v in m["engine_constants_bytes"].items())
                 if _has_engine_constants(m) else "")
              + f"; large-model activations {_mib(m['large_activations_bytes'])}; shared buffers "
              f"{_mib(m['shared_buffers_bytes'])}"
              + (f"; held before the run (caller's tensors, workspaces of streams already used) "
                 f"{_mib(m['held_before_bytes'])}; BLAS workspace of the loop's own stream "
                 f"{_mib(m['stream_workspace_bytes'])}" if _has_cuda_terms(m) else "")
              + f"; bound {_mib(m['bound_bytes'])}; measured {_mib(m['measured_bytes'])} "
              f"({_measured_what(m)}). Resident memory: {_mib(rss['loaded_bytes'])} with the pair loaded, "
              f"+{_mib(rss['first_large_forward_growth_bytes'])} during the large model's first forward (allocator "
              f"caches and one-time kernel setup included), peak {_mib(rss['blended_peak_bytes'])} in the blended loop"
              + (f", {_mib(rss['process_growth_bytes'])} above the process before loading the pair."
                 if rss["process_growth_bytes"] else ".")]
    if report["overhead"]:
        lines += ["", f"{heading}# Runtime overhead", "",
                  "The blended runtime (shared buffers, CFG combine, solver table) against a bare loop over the same "
                  "modules (module call, CFG combine, diffusers scheduler step); interleaved repeats, each round "
                  "starting one variant later; loop times are medians, percentages the median of the per-round ratios. "
                  "\"Runtime\" runs each module's whole forward per step, so its difference to the bare loop is the "
                  "runtime's own overhead (the target); \"default\" is the engines as shipped, which for Wan and LTX compute "
                  "the rotary tables and timestep embeddings once per binding (bitwise the same velocities).", "",
                  "| size | plan | latents | repeats | bare loop ms | runtime loop ms | overhead | max abs diff "
                  "| default loop ms | default vs bare |",
                  "|---|---|---|---|---|---|---|---|---|---|"]

        def split(o):
            if not o.get("runtime_split_loop_ms"):
                return "- | -"
            return f"{o['runtime_split_loop_ms']:.2f} | {o['split_vs_bare_percent']:+.2f}%"
        lines += [f"| {o['size']} | {o['plan']} | {tuple(o['latent_shape'])} | {o['repeats']} | {o['bare_loop_ms']:.2f} "
                  f"| {o['runtime_loop_ms']:.2f} | {o['overhead_percent']:+.2f}% | {o['max_abs_diff_vs_bare']:.1e} "
                  f"| {split(o)} |" for o in report["overhead"]]
    return "\n".join(lines) + "\n"


def plot_report(report: dict, path: Path) -> None:
    """Two panels: loop time per case (min-max bars) and measured vs FLOP-ideal speedup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["cases"]
    labels = [f"{r['backend']}\n{r['mode']}\n{r['stages']}" for r in rows]
    x = range(len(rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(rows) + 4), 4.5))
    med = [r["loop_s"]["median"] for r in rows]
    err = [[m - r["loop_s"]["min"] for m, r in zip(med, rows)], [r["loop_s"]["max"] - m for m, r in zip(med, rows)]]
    ax1.bar(x, med, yerr=err, capsize=3, color="tab:blue")
    ax1.set(title="denoising loop (median, min-max)", ylabel="seconds", xticks=list(x))
    ax1.set_xticklabels(labels, fontsize=7)
    w = 0.4
    ax2.bar([i - w / 2 for i in x], [r["ideal_speedup"] for r in rows], w, label="FLOP-ideal", color="tab:gray")
    ax2.bar([i + w / 2 for i in x], [r["speedup_loop"] for r in rows], w, label="measured", color="tab:orange")
    ax2.axhline(1.0, color="k", lw=0.5)
    ax2.set(title=f"speedup vs eager {report['flops']['reference_plan']} (loop)", ylabel="x", xticks=list(x))
    ax2.set_xticklabels(labels, fontsize=7)
    ax2.legend(fontsize=8)
    hw = report["machine"].get("gpu") or report["machine"]["cpu"]
    fig.suptitle(f"flowblend bench: {report['pair']['name']} pair on {hw}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def write_json_and_markdown(out: str | Path, report: dict, markdown: str) -> tuple[Path, Path]:
    """<out>.json and <out>.md of a measurement script, each written atomically: a run stopped halfway
    leaves the previous pair as it was, never a JSON of one run beside the markdown of another."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = out.with_suffix(".json"), out.with_suffix(".md")
    write_atomic(paths[0], json.dumps(report, indent=2, default=str))
    write_atomic(paths[1], markdown if markdown.endswith("\n") else markdown + "\n")
    return paths


def write_outputs(report: dict, out_dir: str | Path, stem: str = "bench") -> dict[str, Path]:
    """Write <stem>.json, <stem>.md and <stem>.png into out_dir (each atomically)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "markdown": out / f"{stem}.md", "png": out / f"{stem}.png"}
    write_atomic(paths["json"], json.dumps(report, indent=1, default=str))
    write_atomic(paths["markdown"], render_markdown(report))
    write_atomic(paths["png"], lambda p: plot_report(report, p), suffix=".partial.png")
    return paths
