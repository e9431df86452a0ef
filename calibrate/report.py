"""What a calibration run leaves behind: the plan file, a JSON of every number, plots and a markdown report.

Every file is written to a temporary name beside its target and renamed into place, and the report's
text is computed from the result (no figure is typed in by hand).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from flowblend.atomic import write_atomic

from .boundaries import CalibrationResult, Scored, default_threshold
from .divergence import plot_divergence
from .metrics import METRIC_DESCRIPTIONS

ROLE_ORDER = ("LLL", "SSS", "paper default", "divergence seed", "chosen")


def _fmt(x) -> str:
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table(rows: list[dict], keys: list[str]) -> str:
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def result_dict(result: CalibrationResult) -> dict:
    lll_flops = result.setup.reference_plan().flops(result.per_step_flops)  # LLL, or wan22's experts plan

    def rows(items):
        return [s.row(lll_flops) for s in items]

    return {"setup": result.curve.setup, "metric": result.metric, "tolerance": result.tolerance,
            "threshold": result.threshold, "seed_plan": result.seed.to_dict(), "chosen": result.chosen.plan.to_dict(),
            "chosen_row": result.chosen.row(lll_flops), "per_step_flops": result.per_step_flops,
            "prompts": result.prompts, "seeds": result.seeds, "heldout_prompts": result.heldout_prompts,
            "heldout_seeds": result.heldout_seeds, "candidates": rows(result.candidates),
            "heldout": rows(result.heldout), "reduced_steps": result.reduced_steps, "reduced": rows(result.reduced),
            "divergence": result.curve.summary()}


def plot_quality_vs_flops(result: CalibrationResult, path: Path) -> Path:
    """Every scored plan: mean quality vs GFLOPs per video; the chosen one starred, the acceptance line dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lll, sss = result.role("LLL"), result.role("SSS")
    fig, ax = plt.subplots(figsize=(7, 4.2))
    others = [s for s in result.candidates if s is not result.chosen]
    ax.scatter([s.flops / 1e9 for s in others], [s.quality for s in others], c=["tab:blue" if s.accepted else "tab:red"
               for s in others], s=22, zorder=2, label="candidates (blue: accepted, red: rejected)")
    for s in others:
        if s.role != "candidate":
            ax.annotate(f"{s.role}\n{s.plan.label}", (s.flops / 1e9, s.quality), fontsize=7,
                        xytext=(4, -10), textcoords="offset points")
    c = result.chosen
    ax.scatter([c.flops / 1e9], [c.quality], marker="*", s=260, c="gold", edgecolors="k", zorder=3,
               label=f"chosen {c.plan.label}")
    if lll is not None and sss is not None:
        bar = sss.quality + (1 - result.tolerance) * (lll.quality - sss.quality)
        ax.axhline(bar, color="grey", ls="--", lw=0.8, label=f"accept: keeps >= {1 - result.tolerance:.0%} of SSS->LLL gap")
    for s in result.reduced:
        ax.scatter([s.flops / 1e9], [s.quality], marker="x", c="tab:purple", s=30, zorder=2)
        ax.annotate(f"{s.role} @{len(s.plan)} steps", (s.flops / 1e9, s.quality), fontsize=7, color="tab:purple",
                    xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("GFLOPs per video")
    ax.set_ylabel(f"quality: {METRIC_DESCRIPTIONS.get(result.metric, result.metric)}", fontsize=8)
    ax.set_title(f"quality vs cost, {result.setup.steps} steps {result.setup.solver}", fontsize=10)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _curve_sentence(result: CalibrationResult) -> str:
    mean = result.curve.mean("cosine_guided")
    lo = int(np.argmin(mean))
    return (f"Mean cosine distance of the guided velocities: {mean[0]:.3g} at step 0, lowest {mean[lo]:.3g} at step "
            f"{lo}, {mean[-1]:.3g} at the last step (max {mean.max():.3g}); relative L2 {result.curve.mean('rel_l2_guided')[0]:.3g}"
            f" / {result.curve.mean('rel_l2_guided')[lo]:.3g} / {result.curve.mean('rel_l2_guided')[-1]:.3g} at the same steps.")


def _summary(result: CalibrationResult, lll_flops: float) -> list[str]:
    """One sentence per reference: cost and quality, calibration set and (where run) held out."""
    out = []
    held = {s.role: s for s in result.heldout}
    for s in _sorted_refs(result.candidates):
        if s.role == "divergence seed":
            continue
        h = held.get(s.role.split(" (")[0])
        tail = f"; held out: quality {h.quality:.4g}, retained {h.retained:.3f}" if h is not None else ""
        out.append(f"- {s.role} {s.plan.label}: {s.flops / 1e9:.4g} GFLOPs ({s.flops / lll_flops:.1%} of LLL), quality "
                   f"{s.quality:.4g}, retained {s.retained:.3f}{tail}")
    return out + [""]


def _sorted_refs(items: list[Scored]) -> list[Scored]:
    def key(s):
        base = s.role.split(" (")[0]
        return ROLE_ORDER.index(base) if base in ROLE_ORDER else len(ROLE_ORDER)
    return sorted([s for s in items if s.role != "candidate"], key=key)


def write_outputs(result: CalibrationResult, out_dir: Path, report: Path | None = None, title: str = "",
                  command: str = "") -> dict[str, Path]:
    """plan.json (for `generate --plan-file`), calibration.json, divergence.png, quality_vs_flops.png, report .md."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Path(report) if report is not None else out_dir / "calibration.md"
    stem = report.stem
    paths = {"plan": write_atomic(out_dir / "plan.json", result.chosen.plan.to_json()),
             "json": write_atomic(out_dir / "calibration.json", json.dumps(result_dict(result), indent=1))}
    figure_dir = report.parent
    figure_dir.mkdir(parents=True, exist_ok=True)
    paths["divergence_png"] = plot_divergence(
        result.curve, figure_dir / f"{stem}-divergence.png", result.chosen.plan, result.threshold,
        title=f"velocity divergence, {result.setup.steps} steps {result.setup.solver}; shaded: chosen small stage")
    paths["quality_png"] = plot_quality_vs_flops(result, figure_dir / f"{stem}-quality-vs-flops.png")
    paths["report"] = write_atomic(report, markdown(result, paths, title, command))
    return paths


def markdown(result: CalibrationResult, paths: dict, title: str = "", command: str = "") -> str:
    s = result.setup
    lll_flops = s.reference_plan().flops(result.per_step_flops)
    c = result.chosen
    extra = sorted({k for x in result.candidates for k in x.scores} - {"wall_s"})
    keys = ["role", "stages", "large_steps", "small_steps", "gflops", "flops_vs_lll", "quality", "retained",
            "accepted"] + extra + ["wall_s"]
    refs = [x.row(lll_flops) for x in _sorted_refs(result.candidates)]
    cands = [x.row(lll_flops) for x in sorted(result.candidates, key=lambda x: x.flops)]
    median = ", the median" if abs(result.threshold - default_threshold(result.curve)) < 1e-12 else ""
    lines = [f"# {title or 'Calibration report'}", ""]
    if command:
        lines += [f"Produced by `{command}`; every number below comes from that run.", ""]
    lines += [
        f"Setup: {s.steps} steps, {s.solver} solver, shift {s.shift:g}" + (f", mu {s.mu:.4g}" if s.mu is not None else "")
        + f", guidance {s.guidance:g}, latents {tuple(s.latent_shape)}; calibration set {len(result.prompts)} prompts x "
        f"seeds {result.seeds}. Quality metric `{result.metric}`: {METRIC_DESCRIPTIONS.get(result.metric, result.metric)}"
        f" (per video, same prompt and seed; mean over the set). Tolerance {result.tolerance:g}: a plan is accepted when it keeps at least "
        f"{1 - result.tolerance:.0%} of the SSS -> LLL quality gap (retained = (q - q_SSS) / (q_LLL - q_SSS))."
        + (f" Two experts: \"LLL\" is the experts' own plan {s.reference_plan().label} (high-noise expert while "
           f"t >= {s.boundary_ratio * 1000:g}, as diffusers' WanPipeline), CFG scales {dict(s.scales)}; the small model "
           "is compared with, and takes the scale of, the expert whose step it runs." if s.boundary_ratio is not None
           else ""), "",
        "## Chosen plan", "",
        f"**{c.plan.label}** ({c.plan.spec}): "
        + " + ".join(f"{c.plan.count(m)} {m}" for m in c.plan.model_set.names) + " steps, "
        f"{c.flops / 1e9:.4g} GFLOPs per video = {c.flops / lll_flops:.1%} of LLL ({1 - c.flops / lll_flops:.1%} fewer); "
        f"quality {c.quality:.4g}, retained {c.retained:.3f}. Plan file: `{paths['plan']}` "
        f"(`flowblend generate --plan-file {paths['plan']}`):", "", "```json", c.plan.to_json(), "```", "",
        *_summary(result, lll_flops),
        "## Velocity divergence", "", f"![divergence]({Path(paths['divergence_png']).name})", "",
        _curve_sentence(result) + f" Divergence seed (small where the mean cosine distance <= {result.threshold:.3g}"
        f"{median}): {result.seed.label}.", "",
        "## Chosen vs references (calibration set)", "", table(refs, keys), "",
        f"![quality vs FLOPs]({Path(paths['quality_png']).name})", "",
    ]
    if result.heldout:
        h = [x.row(lll_flops) for x in _sorted_refs(result.heldout)]
        lines += ["## Held-out check", "",
                  f"Prompts and seeds not used for calibration: {len(result.heldout_prompts)} prompts x seeds "
                  f"{result.heldout_seeds}, scored against their own LLL videos.", "",
                  table(h, [k for k in keys if k != "wall_s"]), ""]
        ho = next((x for x in result.heldout if x.role == "chosen"), None)
        if ho is not None:
            lines += [f"Chosen plan: retained {c.retained:.3f} on the calibration set, {ho.retained:.3f} held out "
                      f"(quality {c.quality:.4g} vs {ho.quality:.4g}).", ""]
    if result.reduced:
        r = [x.row(lll_flops) for x in result.reduced]
        lines += ["## With step reduction", "",
                  f"The same stage fractions at {result.reduced_steps} steps ({s.solver}), scored against the "
                  f"{s.steps}-step LLL videos; retained on the {s.steps}-step SSS -> LLL scale; flops_vs_lll relative to "
                  f"LLL at {s.steps} steps.", "", table(r, ["role", "stages", "gflops", "flops_vs_lll", "quality",
                                                           "retained", "accepted"] + extra), ""]
    lines += ["## Every plan scored", "", table(cands, keys), ""]
    return "\n".join(lines)
