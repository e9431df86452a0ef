"""Velocity divergence: where along the large model's trajectory the small model can stand in.

For a two-expert pair (wan22) the trajectory is the experts' own plan and the small model is
compared, at every step, with whichever expert runs that step (with that expert's CFG scale).

Driven on the runtime itself: one Sampler (assembly's sampler_for) runs the large-only plan over TorchEngines bound to its
shared buffers, and at every step, before the solver update, the small engine is run on the very
same latent, timestep and text (`Sampler.evaluate(i, "small")`), then the large one
(`Sampler.evaluate(i)`), whose velocity the solver then uses (`Sampler.advance(i)`). So the
velocities compared are exactly the ones the sampler would use, CFG combine included, and the
large trajectory is computed once: its final latents are the LLL reference the plan search
scores against. Requests run one at a time because the sampler's buffers are batch 1 by design
(static shapes for whole-loop graphs); prompts are encoded in one batch.

The curve is U-shaped on a trained pair: high early (layout), low in the middle, high late (detail).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from flowblend.atomic import write_atomic
from flowblend.errors import FlowblendError

from ..assembly import sampler_for
from ..runtime.guidance import expert_schedule_for, guidance_table
from ..runtime.plan import BlendPlan, ExpertSchedule, ModelSet
from ..runtime.sampler import Sampler, SamplerOptions

CURVES = ("cosine_guided", "rel_l2_guided", "cosine_cond", "rel_l2_cond")


@dataclass(frozen=True)
class SamplingSetup:
    """The numerics every calibration run shares: steps, solver, guidance, video latent shape."""

    steps: int
    solver: str
    shift: float
    guidance: float
    latent_shape: tuple[int, ...]
    mu: float | None = None
    # Two-expert pairs (wan22): the boundary, each model's own CFG scale, and the family's model names.
    boundary_ratio: float | None = None
    scales: tuple[tuple[str, float], ...] = ()
    models: tuple[str, ...] = ("large", "small")
    letters: tuple[str, ...] = ("L", "S")

    @property
    def model_set(self) -> ModelSet:
        return ModelSet(tuple(self.models), tuple(self.letters))

    def experts(self) -> ExpertSchedule | None:
        if self.boundary_ratio is None:
            return None
        return expert_schedule_for(self.solver, self.steps, self.shift, self.boundary_ratio, self.mu)

    def reference_plan(self) -> BlendPlan:
        """What the small model stands in for: the large model alone (LLL), or the experts' own plan."""
        experts = self.experts()
        if experts is not None:
            return BlendPlan.from_expert_boundary(experts, model_set=self.model_set)
        return BlendPlan((self.models[0],) * self.steps, "LLL", self.model_set)

    def sampler(self, engines: dict, plan: BlendPlan) -> Sampler:
        table = guidance_table(plan, self.guidance, dict(self.scales), self.experts())
        options = SamplerOptions(self.solver, self.shift, self.guidance, self.mu, guidance_table=table)
        return sampler_for(engines, plan, options)  # on the engines' own device and dtype

    def with_steps(self, steps: int) -> "SamplingSetup":
        return replace(self, steps=steps)


@dataclass
class Request:
    """One (prompt, seed): its noise and encoded text, ready for Sampler.sample."""

    prompt: str
    seed: int
    noise: torch.Tensor
    embeds: torch.Tensor  # [2, L, D]: conditional, unconditional
    mask: torch.Tensor | None = None  # [2, L]

    def sample_args(self) -> dict:
        kw = dict(noise=self.noise, prompt_embeds=self.embeds[0:1], negative_prompt_embeds=self.embeds[1:2])
        if self.mask is not None:
            kw.update(prompt_mask=self.mask[0:1], negative_prompt_mask=self.mask[1:2])
        return kw


def check_prompts(prompts) -> list[str]:
    prompts = [p.strip() for p in prompts if p and p.strip()]
    if not prompts:
        raise FlowblendError("no prompt given: pass --prompt \"...\" (repeatable) or a --prompt-file with one per line")
    return prompts


def make_requests(encode_prompt, prompts, seeds, latent_shape, negative_prompt: str = "") -> list[Request]:
    """Every prompt x seed; all prompts (and the negative) are encoded in one batch."""
    prompts = check_prompts(prompts)
    if not seeds:
        raise FlowblendError("no seed given: pass --seeds with at least one integer")
    embeds, mask = encode_prompt(prompts + [negative_prompt])
    out = []
    for i, prompt in enumerate(prompts):
        pair_embeds = torch.stack([embeds[i], embeds[-1]])
        pair_mask = None if mask is None else torch.stack([mask[i], mask[-1]])
        for seed in seeds:
            noise = torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(int(seed)))
            out.append(Request(prompt, int(seed), noise, pair_embeds, pair_mask))
    return out


def _cosine_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(1.0 - torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _rel_l2(small: torch.Tensor, large: torch.Tensor) -> float:
    return float((small.double() - large.double()).norm() / large.double().norm().clamp_min(1e-30))


@dataclass
class DivergenceCurve:
    """Per-step divergence of the small model's velocity from the large one's along LLL trajectories.

    `values[name]` is [requests, steps]; names in CURVES (guided = after CFG, as the solver sees it;
    cond = the conditional branch alone).
    """

    setup: dict
    timesteps: list[float]
    sigmas: list[float]
    prompts: list[str]
    seeds: list[int]
    values: dict[str, list[list[float]]] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def mean(self, name: str = "cosine_guided") -> np.ndarray:
        return np.asarray(self.values[name]).mean(axis=0)

    def spread(self, name: str = "cosine_guided") -> np.ndarray:
        """Standard deviation over requests (0 with one request)."""
        return np.asarray(self.values[name]).std(axis=0)

    def summary(self) -> dict:
        return {name: {"mean": self.mean(name).round(6).tolist(), "std": self.spread(name).round(6).tolist()}
                for name in self.values}

    def to_dict(self) -> dict:
        return {**asdict(self), "summary": self.summary()}

    @classmethod
    def from_dict(cls, data: dict) -> "DivergenceCurve":
        return cls(data["setup"], data["timesteps"], data["sigmas"], data["prompts"], data["seeds"], data["values"])


@torch.no_grad()
def measure_divergence(engines: dict, requests: list[Request], setup: SamplingSetup,
                       progress: bool = False) -> tuple[DivergenceCurve, list[torch.Tensor]]:
    """Run the reference plan (LLL, or wan22's experts) per request, evaluating the small engine on the same
    bound buffers at every step, with the CFG scale of the model it would replace.

    Returns the curve and the reference's final latents of every request (the search's reference).
    """
    if setup.steps < 1:
        raise FlowblendError(f"steps must be >= 1, got {setup.steps}")
    sampler = setup.sampler(engines, setup.reference_plan())
    values = {name: [] for name in CURVES}
    finals = []
    small_guided = small_cond = None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(requests) * setup.steps, desc="divergence", unit="step")
    for request in requests:
        bufs = sampler.load_request(**request.sample_args())
        if small_guided is None:  # once: the buffers are fixed for the shape
            small_guided, small_cond = torch.empty_like(bufs.guided), torch.empty_like(bufs.velocity[0:1])
        rows = {name: [] for name in CURVES}
        for i in range(setup.steps):
            sampler.evaluate(i, "small")
            small_guided.copy_(bufs.guided)
            small_cond.copy_(bufs.velocity[0:1])
            sampler.evaluate(i)  # the plan's (large / expert) velocity, last: the one the solver uses
            rows["cosine_guided"].append(_cosine_distance(small_guided, bufs.guided))
            rows["rel_l2_guided"].append(_rel_l2(small_guided, bufs.guided))
            rows["cosine_cond"].append(_cosine_distance(small_cond, bufs.velocity[0:1]))
            rows["rel_l2_cond"].append(_rel_l2(small_cond, bufs.velocity[0:1]))
            sampler.advance(i)
            if bar is not None:
                bar.update()
        for name in CURVES:
            values[name].append(rows[name])
        finals.append(bufs.latents.clone())
    if bar is not None:
        bar.close()
    curve = DivergenceCurve(
        setup={"steps": setup.steps, "solver": setup.solver, "shift": setup.shift, "mu": setup.mu,
               "guidance": setup.guidance, "latent_shape": list(setup.latent_shape),
               **({"boundary_ratio": setup.boundary_ratio, "scales": dict(setup.scales),
                   "reference": list(sampler.plan.models)} if setup.boundary_ratio is not None else {})},
        timesteps=list(sampler.table.timesteps), sigmas=list(sampler.table.sigmas),
        prompts=[r.prompt for r in requests], seeds=[r.seed for r in requests], values=values)
    for name, rows in values.items():
        if not all(math.isfinite(x) for row in rows for x in row):
            raise FlowblendError(f"non-finite {name} divergence: a model produced NaN/Inf (try fp32)")
    return curve, finals


def save_curve(curve: DivergenceCurve, path: Path) -> Path:
    return write_atomic(path, json.dumps(curve.to_dict(), indent=1))


def plot_divergence(curve: DivergenceCurve, path: Path, plan: BlendPlan | None = None, threshold: float | None = None,
                    title: str = "") -> Path:
    """PNG: mean +- spread of cosine distance and relative L2 per step, the small model's steps shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.arange(curve.steps)
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for ax, kind, label in ((axes[0], "cosine", "cosine distance"), (axes[1], "rel_l2", "relative L2")):
        for branch, style in (("guided", "-"), ("cond", "--")):
            name = f"{kind}_{branch}"
            mean, spread = curve.mean(name), curve.spread(name)
            ax.plot(steps, mean, style, marker="o", ms=3, label=f"{branch} (CFG-combined)" if branch == "guided"
                    else "conditional branch")
            ax.fill_between(steps, mean - spread, mean + spread, alpha=0.2)
        if plan is not None:
            for model, start, end in plan.stages():
                if model == "small":
                    ax.axvspan(start - 0.5, end - 0.5, color="tab:green", alpha=0.15,
                               label=f"small: steps {start}-{end - 1}")
        if threshold is not None and kind == "cosine":
            ax.axhline(threshold, color="grey", lw=0.8, ls=":", label=f"threshold {threshold:.3g}")
        ax.set_xlabel("denoising step (0 = pure noise)")
        ax.set_ylabel(label)
        ax.set_title(f"small vs large velocity: {label}", fontsize=10)
        ax.legend(fontsize=7)
    fig.suptitle(title or f"velocity divergence along LLL trajectories ({len(curve.prompts)} requests)", fontsize=10)
    fig.tight_layout()
    try:
        return write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100), suffix=".partial.png")
    finally:
        plt.close(fig)
