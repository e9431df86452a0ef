"""Automatic stage boundaries: a divergence-seeded plan, then a quality-verified local search.

1. From the divergence curve: the steps where the small model's velocity stays within a threshold
   of the large one's. `plan_from_divergence` returns the cheapest LSL plan whose middle stage
   lies entirely below the threshold (or, with pattern "any", small at every such step).
2. Around that seed, candidate LSL plans (each boundary moved by +-radius steps) are generated
   for the calibration prompts and seeds and scored against the LLL video of the same prompt and
   seed. Quality is put on one scale for every metric: the fraction of the SSS -> LLL gap a plan
   keeps, retained = (q - q_SSS) / (q_LLL - q_SSS). A plan is accepted when retained >= 1 - tolerance;
   the search walks to the cheapest accepted plan until no neighbour is cheaper (LLL is always
   accepted, so there is always an answer).

"Large" is the reference plan the small model stands in for: the large model alone for two-model
pairs, the experts' own plan for wan22 (`reference=`: the small window replaces whichever expert
runs those steps, and each step keeps that expert's CFG scale).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from flowblend.errors import FlowblendError

from ..runtime.plan import LARGE_SMALL, BlendPlan
from .divergence import DivergenceCurve, SamplingSetup

PAPER_DEFAULT = "LSL:0.4,0.2"
MIN_STAGE_STEPS = 3  # L, S, L: one step each at least


def check_tolerance(tolerance: float) -> float:
    if not (isinstance(tolerance, (int, float)) and 0.0 < tolerance <= 1.0):
        raise FlowblendError(f"tolerance {tolerance!r} is outside (0, 1]: it is the fraction of the SSS->LLL quality gap "
                             "a plan may lose, e.g. --tolerance 0.1")
    return float(tolerance)


def check_stage_steps(steps: int) -> int:
    if not isinstance(steps, int) or steps < MIN_STAGE_STEPS:
        raise FlowblendError(f"{steps} steps are too few to form three stages (L, S, L): use --steps >= {MIN_STAGE_STEPS}")
    return steps


def lsl_plan(steps: int, start: int, end: int, reference: BlendPlan | None = None) -> BlendPlan:
    """Large (or `reference`'s models) for [0, start) and [end, steps), small for [start, end); start == end: the reference."""
    if not 0 <= start <= end <= steps:
        raise ValueError(f"small stage [{start}, {end}) does not fit in {steps} steps")
    if reference is not None:
        if len(reference) != steps:
            raise ValueError(f"reference plan has {len(reference)} steps, not {steps}")
        if start == end:
            return reference
        models = reference.models[:start] + ("small",) * (end - start) + reference.models[end:]
        return BlendPlan(models, "", reference.model_set)
    if start == end:
        return BlendPlan(("large",) * steps, "LLL")
    models = ("large",) * start + ("small",) * (end - start) + ("large",) * (steps - end)
    return BlendPlan(models, f"LSL:{start / steps:g},{(steps - end) / steps:g}")


def small_window(plan: BlendPlan) -> tuple[int, int]:
    """(start, end) of the small steps' span; (0, 0) for a plan without small steps."""
    idx = [i for i, m in enumerate(plan.models) if m == "small"]
    return (idx[0], idx[-1] + 1) if idx else (0, 0)


def default_threshold(curve: DivergenceCurve, key: str = "cosine_guided") -> float:
    """The median of the per-step mean divergence: the small model takes the quieter half of the trajectory."""
    return float(np.median(curve.mean(key)))


def plan_from_divergence(curve: DivergenceCurve, threshold: float | None = None, pattern: str = "LSL",
                         key: str = "cosine_guided", reference: BlendPlan | None = None) -> BlendPlan:
    """Cheapest plan with the small model only where the mean divergence is <= threshold.

    LSL: the longest run of such steps that leaves step 0 and the last step to the large model.
    any: small at every such step (the cheapest L/S pattern under the threshold).
    """
    steps = curve.steps
    thr = default_threshold(curve, key) if threshold is None else float(threshold)
    low = curve.mean(key) <= thr
    if pattern.lower() == "any":
        base = reference.models if reference is not None else ("large",) * steps
        return BlendPlan(tuple("small" if ok else m for ok, m in zip(low, base)), f"divergence<={thr:.3g}",
                         reference.model_set if reference is not None else LARGE_SMALL)
    if pattern.upper() != "LSL":
        raise FlowblendError(f"unknown stage pattern {pattern!r}: use LSL or any")
    check_stage_steps(steps)
    best = (0, 0)
    i = 1
    while i < steps - 1:
        if low[i]:
            j = i
            while j < steps - 1 and low[j]:
                j += 1
            if j - i > best[1] - best[0]:
                best = (i, j)
            i = j
        else:
            i += 1
    return lsl_plan(steps, *best, reference=reference)


def neighbours(plan: BlendPlan, radius: int, reference: BlendPlan | None = None) -> list[BlendPlan]:
    """LSL plans with each boundary of `plan`'s small stage moved by -radius, 0 or +radius steps."""
    steps = len(plan)
    start, end = small_window(plan)
    if start == end:  # LLL: open a small stage of 2*radius steps in the middle
        mid = steps // 2
        start, end = mid, mid
    out = []
    for ds in (-radius, 0, radius):
        for de in (-radius, 0, radius):
            s, e = start + ds, end + de
            s, e = max(1, s), min(steps - 1, e)
            out.append(lsl_plan(steps, s, e, reference) if s < e else lsl_plan(steps, 0, 0, reference))
    return out


@dataclass
class Scored:
    """A plan with its cost and quality on the calibration set."""

    plan: BlendPlan
    flops: float
    quality: float  # mean per-video similarity metric (higher is better)
    retained: float = 1.0  # fraction of the SSS -> LLL gap kept
    accepted: bool = True
    role: str = "candidate"
    scores: dict = field(default_factory=dict)  # every set-level metric

    def row(self, lll_flops: float) -> dict:
        return {"plan": self.plan.spec or self.plan.label, "stages": self.plan.label, "role": self.role,
                "large_steps": self.plan.count("large"), "small_steps": self.plan.count("small"),
                "steps_per_model": {m: self.plan.count(m) for m in self.plan.model_set.names},
                "gflops": round(self.flops / 1e9, 4), "flops_vs_lll": round(self.flops / lll_flops, 4),
                "quality": round(self.quality, 4), "retained": round(self.retained, 4), "accepted": self.accepted,
                **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.scores.items()}}


def retained_fraction(quality: float, lll_quality: float, sss_quality: float) -> float:
    """(q - q_SSS) / (q_LLL - q_SSS); 1 when the small model is already as good as the large one."""
    gap = lll_quality - sss_quality
    if gap <= 1e-12:
        return 1.0
    return float((quality - sss_quality) / gap)


def search_cheapest(seed: BlendPlan, score: Callable[[BlendPlan], Scored], accept: Callable[[Scored], bool],
                    radius: int = 1, max_rounds: int = 4, known: list[Scored] = (),
                    reference: BlendPlan | None = None) -> tuple[Scored, dict[tuple, Scored]]:
    """Local search over LSL boundaries from `seed`: score its neighbours, move to the cheapest
    accepted plan, stop when that is the centre (or after max_rounds). Scores are memoised, and
    `known` plans (LLL, SSS: already generated) are never generated again. Returns the chosen plan
    and every plan scored."""
    steps = len(seed)
    scored: dict[tuple, Scored] = {}
    for s in known:
        s.accepted = accept(s)
        scored[s.plan.models] = s

    def get(plan: BlendPlan) -> Scored:
        if plan.models not in scored:
            result = score(plan)
            result.accepted = accept(result)
            scored[plan.models] = result
        return scored[plan.models]

    window = lambda start, end: lsl_plan(steps, start, end, reference)  # noqa: E731
    centre = seed
    if seed.count("small") and seed.models != window(*small_window(seed)).models:
        centre = window(*small_window(seed))  # a non-contiguous seed: search from its span
    best = get(window(0, 0))  # LLL (the reference): always accepted, the fallback
    for _ in range(max_rounds):
        for plan in [centre] + neighbours(centre, radius, reference):
            get(plan)
        accepted = [s for s in scored.values() if s.accepted]
        best = min(accepted, key=lambda s: (s.flops, -s.quality))
        if best.plan.models == centre.models:
            break
        if best.plan.count("small") == 0:  # nothing with a small stage passed: shrink the stage
            start, end = small_window(centre)
            if end - start <= 2 * radius:
                break
            centre = window(start + radius, end - radius)
        else:
            centre = best.plan
    return best, scored


# -- the calibration run: divergence -> seed -> quality-verified search -> held-out check -----------
@dataclass
class CalibrationResult:
    """Everything `flowblend calibrate plan` reports; `chosen.plan` is the answer."""

    setup: SamplingSetup
    metric: str
    tolerance: float
    threshold: float
    curve: DivergenceCurve
    seed: BlendPlan
    chosen: Scored
    candidates: list[Scored]  # every plan scored on the calibration set, references included
    heldout: list[Scored] = field(default_factory=list)
    reduced: list[Scored] = field(default_factory=list)
    reduced_steps: int | None = None
    per_step_flops: dict = field(default_factory=dict)
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    heldout_prompts: list[str] = field(default_factory=list)
    heldout_seeds: list[int] = field(default_factory=list)

    def role(self, role: str, rows: list[Scored] | None = None) -> Scored | None:
        """The scored plan with this role (also when it was chosen: role 'chosen (LLL)')."""
        return next((s for s in (rows if rows is not None else self.candidates)
                     if s.role == role or s.role == f"chosen ({role})"), None)


class PlanScorer:
    """Generates a request set under a plan (engines shared across plans) and scores it against LLL."""

    def __init__(self, engines, setup, requests, decode, metrics, per_step_flops, references=None):
        self.engines, self.setup, self.requests, self.decode = engines, setup, requests, decode
        self.metrics, self.per_step = metrics, per_step_flops
        self.prompts = [r.prompt for r in requests]
        self.references = references  # LLL videos of the same requests
        self.lll_quality = self.sss_quality = None

    def videos(self, plan: BlendPlan) -> list:
        import torch

        sampler = self.setup.sampler(self.engines, plan)
        with torch.no_grad():
            return [self.decode(sampler.sample(**r.sample_args()))[0] for r in self.requests]

    def score(self, plan: BlendPlan, role: str = "candidate", videos=None) -> Scored:
        import time

        start = time.perf_counter()
        generated = videos is None
        videos = self.videos(plan) if generated else videos
        seconds = time.perf_counter() - start
        quality = float(np.mean(self.metrics.per_video(videos, self.references, self.prompts)))
        scores = self.metrics.set_scores(videos, self.references, self.prompts)
        if generated:  # sampling + decode wall time on this machine (LLL's videos come from the divergence pass)
            scores["wall_s"] = seconds
        result = Scored(plan, plan.flops(self.per_step), quality, role=role, scores=scores)
        if self.lll_quality is not None:
            result.retained = retained_fraction(quality, self.lll_quality, self.sss_quality)
        return result

    def anchor(self, lll_videos=None) -> tuple[Scored, Scored]:
        """Score LLL (the references themselves unless given) and SSS, which fix the retained scale."""
        steps, reference = self.setup.steps, self.setup.reference_plan()
        if self.references is None:
            self.references = self.videos(reference)
        lll = self.score(reference, "LLL", videos=self.references if lll_videos is None else lll_videos)
        sss = self.score(BlendPlan(("small",) * steps, "SSS", reference.model_set), "SSS")
        self.lll_quality, self.sss_quality = lll.quality, sss.quality
        for s in (lll, sss):
            s.retained = retained_fraction(s.quality, lll.quality, sss.quality)
        return lll, sss


def per_step_flops(pair, setup, text_len: int) -> dict[str, float]:
    from ..bench.flops import step_flops

    return {name: step_flops(pair.family.transformer_class, dict(m.config), setup.latent_shape, text_len,
                             setup.guidance > 1.0) for name, m in pair.transformers.items()}


def rescale_plan(plan: BlendPlan, steps: int, reference: BlendPlan | None = None) -> BlendPlan:
    """The same stage fractions at another step count (step reduction); `reference` is at `steps`."""
    start, end = small_window(plan)
    if start == end:
        return lsl_plan(steps, 0, 0, reference)
    n = len(plan)
    s, e = round(start * steps / n), round(end * steps / n)
    s, e = max(1, s), min(steps - 1, max(e, s + 1))
    return lsl_plan(steps, s, e, reference) if s < e else lsl_plan(steps, 0, 0, reference)


def paper_default(setup: SamplingSetup) -> BlendPlan:
    """The paper's LSL:0.4,0.2; for wan22 the same window (steps 40%-80%) over the experts' plan."""
    if setup.boundary_ratio is None:
        return BlendPlan.parse(PAPER_DEFAULT, setup.steps)
    window = BlendPlan.parse(PAPER_DEFAULT, setup.steps)
    return lsl_plan(setup.steps, *small_window(window), setup.reference_plan())


def calibrate_plan(pair, prompts, seeds, setup, metrics, tolerance: float = 0.1, threshold: float | None = None,
                   radius: int | None = None, heldout_prompts=(), heldout_seeds=(), reduced_steps: int | None = None,
                   max_rounds: int = 4, engines: dict | None = None, progress: bool = False) -> CalibrationResult:
    """Measure divergence on (prompts x seeds), seed a plan from it, search the cheapest plan within
    `tolerance` of LLL quality, then check it on held-out prompts/seeds and at `reduced_steps`."""
    from ..assembly import as_loaded, engines_over
    from .divergence import make_requests, measure_divergence

    tolerance = check_tolerance(tolerance)
    check_stage_steps(setup.steps)
    if reduced_steps is not None:
        check_stage_steps(reduced_steps)
    if radius is not None and radius < 1:
        raise FlowblendError(f"--radius {radius} must be >= 1 step: it is how far the search moves a boundary")
    engines = engines or engines_over(pair.transformers, as_loaded(pair.transformers))  # eager, as loaded
    requests = make_requests(pair.encode_prompt, prompts, seeds, setup.latent_shape)
    heldout = make_requests(pair.encode_prompt, heldout_prompts, heldout_seeds or seeds, setup.latent_shape) \
        if heldout_prompts else []
    flops = per_step_flops(pair, setup, text_len=requests[0].embeds.shape[1])

    curve, lll_latents = measure_divergence(engines, requests, setup, progress)
    import torch

    with torch.no_grad():
        lll_videos = [pair.decode(x)[0] for x in lll_latents]
    scorer = PlanScorer(engines, setup, requests, pair.decode, metrics, flops, references=lll_videos)
    lll, sss = scorer.anchor()
    thr = default_threshold(curve) if threshold is None else float(threshold)
    reference = setup.reference_plan() if setup.boundary_ratio is not None else None  # wan22: the experts' plan
    seed = plan_from_divergence(curve, thr, reference=reference)
    radius = radius or max(1, round(setup.steps / 10))
    accept = lambda s: s.retained >= 1.0 - tolerance - 1e-12  # noqa: E731
    chosen, scored = search_cheapest(seed, scorer.score, accept, radius, max_rounds, known=[lll, sss],
                                     reference=reference)
    paper = paper_default(setup)
    if paper.models not in scored:
        scored[paper.models] = scorer.score(paper)
        scored[paper.models].accepted = accept(scored[paper.models])
    scored[paper.models].role = "paper default"
    if seed.models in scored and scored[seed.models].role == "candidate":
        scored[seed.models].role = "divergence seed"
    chosen.role = "chosen" if chosen.role in ("candidate", "divergence seed") else f"chosen ({chosen.role})"
    if chosen.plan.count("small") == 0:
        chosen.role = "chosen (LLL)"
    result = CalibrationResult(setup, metrics.name, tolerance, thr, curve, seed, chosen, list(scored.values()),
                               per_step_flops=flops, prompts=[r.prompt for r in requests], seeds=list(seeds),
                               heldout_prompts=list(heldout_prompts), heldout_seeds=list(heldout_seeds or seeds))
    if heldout:
        held = PlanScorer(engines, setup, heldout, pair.decode, metrics, flops)
        h_lll, h_sss = held.anchor()
        h_lll.accepted, h_sss.accepted = accept(h_lll), accept(h_sss)
        result.heldout = [h_lll, h_sss]
        for plan, role in ((paper, "paper default"), (chosen.plan, "chosen")):
            if plan.models not in (h_lll.plan.models, h_sss.plan.models):
                s = held.score(plan, role)
                s.accepted = accept(s)
                result.heldout.append(s)
    if reduced_steps is not None:
        reduced_setup = setup.with_steps(reduced_steps)
        red = PlanScorer(engines, reduced_setup, requests, pair.decode, metrics,
                         per_step_flops(pair, reduced_setup, requests[0].embeds.shape[1]), references=lll_videos)
        red.lll_quality, red.sss_quality = lll.quality, sss.quality  # retained on the full-step scale
        result.reduced_steps = reduced_steps
        reduced_reference = reduced_setup.reference_plan() if setup.boundary_ratio is not None else None
        for plan, role in ((lsl_plan(reduced_steps, 0, 0, reduced_reference), "LLL"),
                           (rescale_plan(chosen.plan, reduced_steps, reduced_reference), "chosen"),
                           (paper_default(reduced_setup), "paper default")):
            if not any(s.plan.models == plan.models for s in result.reduced):
                s = red.score(plan, role)
                s.accepted = accept(s)
                result.reduced.append(s)
    return result
