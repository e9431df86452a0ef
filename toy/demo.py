"""The toy demo: the same prompts and seeds under LLL, LSL and SSS, scored by the exact probes.

It drives the runtime from above through the one assembly (assembly/run.py: eager engines over the
toy pair, shared by one sampler per plan) and writes what a person looks at: a side-by-side GIF, a
PNG contact sheet and a table of cost and quality.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..assembly import as_loaded, eager_choice, engines_for, load_models, sampler_for
from ..bench.flops import step_flops
from ..families import LoadedPair
from ..families.toy_vocab import DEMO_PLANS, DEMO_PROMPTS
from ..runtime.plan import BlendPlan
from ..runtime.sampler import SamplerOptions
from ..runtime.video import save_video, to_frames

__all__ = ["DEMO_PLANS", "DEMO_PROMPTS", "run_demo", "generate_plans", "format_table"]


@dataclass
class PlanResult:
    plan: BlendPlan
    videos: list[torch.Tensor]
    loop_seconds: float  # denoising loops only, all prompts
    total_seconds: float  # encode + loop + decode, all prompts
    flops_per_video: float
    scores: dict = field(default_factory=dict)

    def row(self) -> dict:
        """One table row; the seconds are totals over all `videos` (see TABLE_NOTE)."""
        return {"plan": self.plan.spec or self.plan.label, "stages": self.plan.label,
                "large_steps": self.plan.count("large"), "small_steps": self.plan.count("small"),
                "gflops_per_video": round(self.flops_per_video / 1e9, 2), "videos": len(self.videos),
                "loop_s_all_videos": round(self.loop_seconds, 3),
                "loop_s_per_video": round(self.loop_seconds / max(len(self.videos), 1), 3),
                "end_to_end_s_all_videos": round(self.total_seconds, 3),
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.scores.items()}}


TABLE_NOTE = ("loop_s_all_videos: the denoising loops of all `videos` (prompts x seeds) under that plan; "
              "end_to_end_s_all_videos adds text encoding and decoding")


def generate_plans(pair: LoadedPair, plans: list[BlendPlan], prompts: list[str], seeds: list[int],
                   guidance: float | None = None, solver: str | None = None, progress: bool = False
                   ) -> list[PlanResult]:
    """Every (prompt, seed) under every plan with shared engines; returns videos and timings per plan.

    `progress` shows one bar over all videos (per-step bars would flood the terminal).
    """
    from tqdm.auto import tqdm

    family = pair.family
    latent_shape = family.latent_shape(family.frames, family.height, family.width)
    guidance = family.guidance if guidance is None else guidance
    kwargs = family.sampler_kwargs(latent_shape)
    if solver:
        kwargs["solver"] = solver
    engines = engines_for(pair, as_loaded(pair.transformers), latent_shape, guidance)  # eager, as loaded
    configs = {name: dict(m.config) for name, m in pair.transformers.items()}
    per_step = {name: step_flops(family.transformer_class, cfg, latent_shape, family.text_len, guidance > 1)
                for name, cfg in configs.items()}
    results = []
    bar = tqdm(total=len(plans) * len(prompts) * len(seeds), desc="demo", unit="video", disable=not progress)
    for plan in plans:
        bar.set_postfix_str(plan.label)
        sampler = sampler_for(engines, plan, SamplerOptions(guidance_scale=guidance, **kwargs))
        loop_time, videos = 0.0, []
        start = time.perf_counter()
        for prompt in prompts:
            for seed in seeds:
                embeds, mask = pair.encode_prompt([prompt, ""])
                noise = torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed))
                t0 = time.perf_counter()
                latents = sampler.sample(noise, embeds[0:1], embeds[1:2])
                loop_time += time.perf_counter() - t0
                videos.append(pair.decode(latents)[0])
                bar.update()
        results.append(PlanResult(plan, videos, loop_time, time.perf_counter() - start, plan.flops(per_step)))
    bar.close()
    return results


def score_results(results: list[PlanResult], prompts: list[str], seeds: list[int]) -> None:
    """Fill each result's scores with the toy probes (colour, shape, direction, coherence, Frechet)."""
    from .data import PromptSpec
    from .probes import score_set

    specs = [PromptSpec.parse(p) for p in prompts for _ in seeds]
    for r in results:
        r.scores = score_set(r.videos, specs)


def _upscale(frames: np.ndarray, k: int) -> np.ndarray:
    return frames.repeat(k, axis=1).repeat(k, axis=2)


def side_by_side_frames(results: list[PlanResult], per_prompt: int, zoom: int = 4, gap: int = 2) -> np.ndarray:
    """[F, H, W, 3] grid: one row per video, one column per plan."""
    rows = []
    for v in range(len(results[0].videos)):
        cells = [_upscale(to_frames(r.videos[v]), zoom) for r in results]
        pad = np.full((*cells[0].shape[:2], gap, 3), 255, np.uint8)
        rows.append(np.concatenate(sum(([c, pad] for c in cells), [])[:-1], axis=2))
    hpad = np.full((rows[0].shape[0], gap, rows[0].shape[2], 3), 255, np.uint8)
    return np.concatenate(sum(([r, hpad] for r in rows), [])[:-1], axis=1)


def save_contact_sheet(results: list[PlanResult], prompts: list[str], path: Path, zoom: int = 3) -> Path:
    """PNG: for each prompt, one strip of frames per plan, labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = len(prompts) * len(results)
    strip = lambda video: np.concatenate(list(_upscale(to_frames(video), zoom)), axis=1)  # noqa: E731
    fig, axes = plt.subplots(n_rows, 1, figsize=(12, 1.1 * n_rows + 0.4))
    axes = np.atleast_1d(axes)
    per_prompt = len(results[0].videos) // len(prompts)
    for i, prompt in enumerate(prompts):
        for j, r in enumerate(results):
            ax = axes[i * len(results) + j]
            ax.imshow(strip(r.videos[i * per_prompt]))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(r.plan.label.replace(",", "\n") if len(r.plan.stages()) > 1 else r.plan.spec,
                          rotation=0, ha="right", va="center", fontsize=8)
            if j == 0:
                ax.set_title(prompt, fontsize=9, loc="left")
    fig.suptitle("flowblend toy demo: frames left to right; LLL / LSL / SSS per prompt, same seed", fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.stem}.partial.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def format_table(rows: list[dict]) -> str:
    """Markdown table of the rows, with the note that says what the seconds columns total."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines + ["", TABLE_NOTE])


def run_demo(out_dir: str | Path = "demo", prompts=DEMO_PROMPTS, plans=DEMO_PLANS, steps: int | None = None,
             seeds=(0,), progress: bool = True) -> list[dict]:
    """Generate, score and write the demo outputs; returns the table rows."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pair = load_models("toy", eager_choice())  # FP32 on the CPU
    steps = steps or pair.family.steps
    blend_plans = [BlendPlan.parse(p, steps) for p in plans]
    results = generate_plans(pair, blend_plans, list(prompts), list(seeds), progress=progress)
    score_results(results, list(prompts), list(seeds))
    save_video(side_by_side_frames(results, len(seeds)), out / "side_by_side.gif", fps=4)
    save_contact_sheet(results, list(prompts), out / "contact_sheet.png")
    rows = [r.row() for r in results]
    (out / "results.json").write_text(json.dumps({"prompts": list(prompts), "seeds": list(seeds), "steps": steps,
                                                  "weights": pair.sources, "rows": rows}, indent=2))
    (out / "results.md").write_text(format_table(rows) + "\n")
    return rows
