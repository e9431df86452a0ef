"""BlendPlan: which named model runs each denoising step.

A pair family names its models and gives each one letter (`ModelSet`): Wan 2.1 / LTX / toy have
`large` (L) and `small` (S); Wan 2.2 A14B has two experts and a stand-in, `high` (H), `low` (L)
and `small` (S). Within a family the letters are unique; `L` means large in a two-model pair and
low in `wan22`, which has no large model. Every spelling ends as one per-step tuple of names:
- the paper's convention `LSL:0.4,0.2` (the middle stage starts at fraction a of the steps, the
  last stage covers the final fraction b), also `LLL`, `SSS`, `LSS:0.4`, `SLL:0.4`, or any three
  letters of the family (`HSL:0.3,0.4`);
- explicit stage lengths `L20,S20,L10` (`H16,S4,L20`);
- stages with their own step count over their sigma interval and their own CFG scale, `L20,D4/10@1,L10`:
  D takes 4 steps across the interval that 10 steps of the 40-step base schedule cover (`/span`), at
  guidance 1 (`@scale`). The base schedule has sum(spans) steps, the run sum(steps); a three-stage
  plan without spans whose stages fall short of the requested steps gives the middle stage the rest
  (`L20,D4,L10` at 40 steps is `L20,D4/10,L10`). runtime/solvers.py places each stage's steps;
- any per-step string or list (`LLSSL`, ["large", "small", ...]);
- cached steps: lower-case letters in a spelling that also has capitals (`LLllSSsLL`, `L2,l2,S2,s1,L2`),
  runtime/cached_steps.py;
- for a family with two experts, relative to the expert boundary diffusers' WanPipeline uses
  (`ExpertSchedule`): `experts` is the pipeline's own plan, `experts:4,2` gives the small model the
  last 4 steps before the switch and the first 2 after it.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from .cached_steps import cached_flags, check_cached, mixed_case

_PAPER_DEFAULT = (0.4, 0.2)
MAX_PLAN_STEPS = 10_000  # steps (and base steps) any plan spelling may expand to, checked arithmetically first


@dataclass(frozen=True)
class ModelSet:
    """The models a family's plans may name, and the one letter each is spelled with."""

    names: tuple[str, ...]
    letters: tuple[str, ...]

    def __post_init__(self):
        if len(self.names) != len(self.letters) or not self.names:
            raise ValueError(f"a model set needs one letter per model name, got {self.names} / {self.letters}")
        if len(set(self.letters)) != len(self.letters) or any(not re.fullmatch(r"[A-Z]", c) for c in self.letters):
            raise ValueError(f"model letters {self.letters} must be distinct single capital letters")
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"model names {self.names} must be distinct")

    def name_of(self, letter: str) -> str:
        try:
            return self.names[self.letters.index(letter.upper())]
        except ValueError:
            raise ValueError(f"unknown model letter {letter!r}: use {self.describe()}") from None

    def letter_of(self, name: str) -> str:
        return self.letters[self.names.index(name)]

    def describe(self) -> str:
        return ", ".join(f"{c} ({n})" for c, n in zip(self.letters, self.names))

    def to_dict(self) -> dict:
        return {"names": list(self.names), "letters": list(self.letters)}


LARGE_SMALL = ModelSet(("large", "small"), ("L", "S"))
EXPERTS_AND_SMALL = ModelSet(("high", "low", "small"), ("H", "L", "S"))
MODEL_NAMES = LARGE_SMALL.names  # the two-model pairs' names (wan, ltx, toy)


@dataclass(frozen=True)
class ExpertSchedule:
    """Which expert diffusers' WanPipeline runs at each step of a two-expert model (Wan 2.2 A14B).

    As `WanPipeline.__call__`: `transformer` (high) while `t >= boundary_ratio * num_train_timesteps`,
    `transformer_2` (low) after; `timesteps` are the scheduler's own (runtime/solvers.py's table).
    """

    timesteps: tuple[float, ...]
    boundary_ratio: float
    high: str = "high"
    low: str = "low"
    num_train_timesteps: int = 1000

    def __post_init__(self):
        if not 0.0 < self.boundary_ratio < 1.0:
            raise ValueError(f"boundary_ratio must be in (0, 1), got {self.boundary_ratio} (Wan 2.2: 0.875 T2V, 0.9 I2V)")

    @property
    def boundary_timestep(self) -> float:
        return self.boundary_ratio * self.num_train_timesteps

    @property
    def models(self) -> tuple[str, ...]:
        b = self.boundary_timestep
        return tuple(self.high if t >= b else self.low for t in self.timesteps)

    @property
    def switch_step(self) -> int:
        """Index of the first low-noise step (= the number of high-noise steps)."""
        return sum(1 for m in self.models if m == self.high)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass(frozen=True)
class BlendPlan:
    """An immutable per-step assignment of named models; build it with `parse` or the `from_*` methods."""

    models: tuple[str, ...]
    spec: str = ""  # how the user spelled it, for reports
    model_set: ModelSet = LARGE_SMALL
    # (steps, span) per stage when a stage's step count differs from the base steps its interval covers
    # (`L20,D4/10,L10`: ((20, 20), (4, 10), (10, 10))); () is the plain schedule of len(models) steps
    segments: tuple[tuple[int, int], ...] = ()
    # a CFG scale per step where the plan sets one (`D4@1`), None where the family's scale applies; () if none
    guidance: tuple[float | None, ...] = ()
    # True per step where the model reuses its last full step's block residual (a lower-case letter); () if none
    cached: tuple[bool, ...] = ()

    def __post_init__(self):
        if len(self.models) == 0:
            raise ValueError("a plan needs at least one step: pass steps >= 1")
        unknown = sorted(set(self.models) - set(self.model_set.names))
        if unknown:
            raise ValueError(f"unknown model name(s) {unknown} in plan: use {' or '.join(self.model_set.names)} "
                             f"(letters {self.model_set.describe()})")
        object.__setattr__(self, "models", tuple(self.models))
        segments = tuple((int(k), int(span)) for k, span in self.segments)
        if segments:
            if sum(k for k, _ in segments) != len(self.models) or any(k < 1 or span < 1 for k, span in segments):
                raise ValueError(f"stage segments {segments} must cover the plan's {len(self.models)} steps, each "
                                 "with >= 1 step over >= 1 base step")
            start = 0
            for k, _ in segments:
                if len(set(self.models[start:start + k])) != 1:
                    raise ValueError(f"stage segments {segments}: one model per stage")
                start += k
        if all(k == span for k, span in segments):
            segments = ()  # the plain schedule: equal to the same plan spelled without spans
        object.__setattr__(self, "segments", segments)
        guidance = tuple(None if g is None else float(g) for g in self.guidance)
        if guidance and len(guidance) != len(self.models):
            raise ValueError(f"plan guidance has {len(guidance)} entries for {len(self.models)} steps")
        if any(g is not None and not g >= 0 for g in guidance):
            raise ValueError(f"a stage's guidance must be >= 0 (1 disables CFG), got {guidance}")
        object.__setattr__(self, "guidance", guidance if any(g is not None for g in guidance) else ())
        cached = tuple(bool(c) for c in self.cached)
        if cached and len(cached) != len(self.models):
            raise ValueError(f"plan cached flags have {len(cached)} entries for {len(self.models)} steps")
        check_cached(self.models, cached, self.model_set.letter_of)
        object.__setattr__(self, "cached", cached if any(cached) else ())

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_fractions(cls, steps: int, pattern: str = "LSL", a: float = 0.4, b: float = 0.2,
                       model_set: ModelSet = LARGE_SMALL) -> "BlendPlan":
        """Paper convention: stage 2 starts at round(a*steps), stage 3 covers the last round(b*steps)."""
        _check_steps(steps)
        pattern = pattern.upper()
        if len(pattern) != 3 or any(c not in model_set.letters for c in pattern):
            raise ValueError(f"pattern {pattern!r} must be three letters of {model_set.describe()}, e.g. "
                             f"{model_set.letters[0]}{model_set.letters[-1]}{model_set.letters[0]}")
        for name, value in (("a", a), ("b", b)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fraction {name}={value} is outside [0, 1]: give fractions of the step count, e.g. LSL:0.4,0.2")
        if a + b > 1.0 + 1e-9:
            raise ValueError(f"fractions a={a} + b={b} exceed 1: the middle stage would have negative length; lower a or b")
        first = _round_half_up(a * steps)
        last = _round_half_up(b * steps)
        last = min(last, steps - first)
        lengths = (first, steps - first - last, last)
        models = tuple(m for letter, n in zip(pattern, lengths) for m in [model_set.name_of(letter)] * n)
        spec = pattern if len(set(pattern)) == 1 else f"{pattern}:{a:g},{b:g}"
        return cls(models, spec, model_set)

    @classmethod
    def from_stages(cls, stages: str, steps: int | None = None, model_set: ModelSet = LARGE_SMALL) -> "BlendPlan":
        """Explicit stages, e.g. 'L20,S20,L10' or 'L20,D4/10@1,L10' (4 steps over 10 base steps, guidance 1).

        `steps`, if given, is the base schedule's step count: the stages' spans must add up to it, except
        that a three-stage plan without spans gives its middle stage what the outer two leave.
        """
        parsed = []  # [model, steps, span or None, guidance or None, cached]
        mixed = mixed_case(stages)
        for part in stages.replace(" ", "").split(","):
            m = re.fullmatch(r"([A-Z])(\d+)(?:/(\d+))?(?:@(\d+(?:\.\d*)?|\.\d+))?", part.upper())
            if not m or m.group(1) not in model_set.letters:
                a, z = model_set.letters[0], model_set.letters[-1]
                raise ValueError(f"stage {part!r} is not of the form <letter><n>[/<base steps>][@<guidance>] with a "
                                 f"letter of {model_set.describe()} (e.g. {a}20,{z}20 or {a}20,{z}4/10@1,{a}10)")
            k, span = int(m.group(2)), None if m.group(3) is None else int(m.group(3))
            if span is not None and (k < 1 or span < 1):
                raise ValueError(f"stage {part!r}: a stage with a span needs >= 1 step over >= 1 base step")
            if k:
                parsed.append([model_set.name_of(m.group(1)), k, span,
                               None if m.group(4) is None else float(m.group(4)), mixed and part[:1].islower()])
        runs = sum(k for _, k, _, _, _ in parsed)
        total = sum(k if span is None else span for _, k, span, _, _ in parsed)
        if max(runs, total) > MAX_PLAN_STEPS:  # counted before any per-step tuple is built (L100000000/20: 2.5 GB)
            raise ValueError(f"stages {stages!r} run {runs} steps over {total} base steps; a plan runs at most "
                             f"{MAX_PLAN_STEPS} (a server fewer: its --max-steps): give each stage fewer steps")
        if steps is not None and total != steps:
            explicit = any(span is not None for _, _, span, _, _ in parsed)
            if len(parsed) == 3 and not explicit and total < steps:
                parsed[1][2] = parsed[1][1] + steps - total  # the middle stage spans what the outer two leave
            else:
                example = ",".join(f"{model_set.letter_of(n)}{k}" + (f"/{k + steps - total}" if j == 1 else "")
                                   for j, (n, k, _, _, _) in enumerate(parsed)) if len(parsed) == 3 and steps > total \
                    else ""
                hint = f", or give a stage the base steps it spans ({example})" if example else ""
                raise ValueError(f"stage lengths {stages!r} sum to {total} but steps={steps}: make them add up{hint}")
        models = tuple(n for n, k, _, _, _ in parsed for _ in range(k))
        segments = tuple((k, k if span is None else span) for _, k, span, _, _ in parsed)
        guidance = tuple(g for _, k, _, g, _ in parsed for _ in range(k))
        cached = tuple(c for _, k, _, _, c in parsed for _ in range(k))
        return cls(models, stages, model_set, segments, guidance, cached)

    @classmethod
    def from_steps(cls, per_step, model_set: ModelSet = LARGE_SMALL) -> "BlendPlan":
        """Any per-step list of model names, or a string of the family's letters."""
        if isinstance(per_step, str):
            bad = sorted(set(per_step.upper()) - set(model_set.letters))
            if bad:
                raise ValueError(f"unknown model letter(s) {bad} in {per_step!r}: use {model_set.describe()}")
            cached = tuple(c.islower() for c in per_step) if mixed_case(per_step) else ()
            return cls(tuple(model_set.name_of(c) for c in per_step.upper()), per_step, model_set, cached=cached)
        by_letter = dict(zip(model_set.letters, model_set.names))
        return cls(tuple(by_letter.get(m, m) for m in per_step), "custom", model_set)

    @classmethod
    def from_expert_boundary(cls, experts: ExpertSchedule, before: int = 0, after: int = 0, small: str = "small",
                             model_set: ModelSet = EXPERTS_AND_SMALL) -> "BlendPlan":
        """The experts' own plan, with `small` taking the last `before` steps before the switch and the first `after`."""
        models = list(experts.models)
        switch = experts.switch_step
        if before < 0 or after < 0:
            raise ValueError(f"experts:{before},{after}: step counts must be >= 0")
        if before > switch:
            raise ValueError(f"experts:{before},{after}: only {switch} high-noise steps come before the switch "
                             f"(boundary t >= {experts.boundary_timestep:g}); use at most experts:{switch},{after}")
        if after > len(models) - switch:
            raise ValueError(f"experts:{before},{after}: only {len(models) - switch} low-noise steps follow the "
                             f"switch; use at most experts:{before},{len(models) - switch}")
        models[switch - before:switch + after] = [small] * (before + after)
        spec = "experts" if before == after == 0 else f"experts:{before},{after}"
        return cls(tuple(models), spec, model_set)

    @classmethod
    def parse(cls, spec: str, steps: int, model_set: ModelSet = LARGE_SMALL,
              experts: ExpertSchedule | None = None) -> "BlendPlan":
        """Parse any spelling; `steps` is the step count the plan must cover.

        `experts` (the expert schedule of these steps) is needed for the `experts[:before,after]` form.
        """
        _check_steps(steps)
        text = spec.strip()
        upper = text.upper()
        letters = "".join(model_set.letters)
        m = re.fullmatch(r"EXPERTS(?::(\d+),(\d+))?", upper)
        if m:
            if experts is None:
                raise ValueError(f"plan {spec!r} is relative to the expert boundary: it needs a pair with two "
                                 "experts (--pair wan22)")
            if len(experts.timesteps) != steps:
                raise ValueError(f"the expert schedule has {len(experts.timesteps)} steps but steps={steps}")
            return cls.from_expert_boundary(experts, int(m.group(1) or 0), int(m.group(2) or 0), model_set=model_set)
        if re.fullmatch(rf"[{letters}]{{3}}(:[^:]*)?", upper) and not mixed_case(text.partition(":")[0]):
            pattern, _, rest = upper.partition(":")
            fractions = [float(x) for x in rest.split(",") if x.strip()] if rest else []
            if len(fractions) > 2:
                raise ValueError(f"plan {spec!r} has more than two fractions: use e.g. LSL:0.4,0.2")
            a, b = (fractions + list(_PAPER_DEFAULT)[len(fractions):])[:2]
            if len(set(pattern)) == 1:
                a, b = 0.0, 0.0
            return cls.from_fractions(steps, pattern, a, b, model_set)
        if "," in text or re.fullmatch(r"[A-Za-z]\d+(/\d+)?(@[\d.]+)?", text):
            return cls.from_stages(text, steps, model_set)
        if re.fullmatch(rf"[{letters}]+", upper):
            plan = cls.from_steps(text, model_set)
            if len(plan) != steps:
                raise ValueError(f"per-step plan {spec!r} has {len(plan)} steps but steps={steps}")
            return plan
        hint = ", experts:4,2" if experts is not None else ""
        raise ValueError(f"cannot read plan {spec!r}: use {letters[0]}{letters[-1]}{letters[0]}:0.4,0.2, "
                         f"{letters[0]}20,{letters[-1]}20,{letters[0]}10 or a per-step string of "
                         f"{model_set.describe()}{hint}")

    # -- views --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.models)

    @property
    def num_steps(self) -> int:
        return len(self.models)

    def count(self, model: str) -> int:
        return sum(1 for m in self.models if m == model)

    def stages(self) -> list[tuple[str, int, int]]:
        """Runs of one model as (model, first_step, end_step)."""
        out: list[tuple[str, int, int]] = []
        for i, m in enumerate(self.models):
            if out and out[-1][0] == m:
                out[-1] = (m, out[-1][1], i + 1)
            else:
                out.append((m, i, i + 1))
        return out

    @property
    def base_steps(self) -> int:
        """Steps of the base schedule whose intervals the stages cover (len(plan) unless stages have spans)."""
        return sum(span for _, span in self.segments) if self.segments else len(self.models)

    def stage_table(self) -> list[tuple[str, int, int, int]]:
        """(model, first_step, end_step, span) per stage: the spans' segments, else runs of one model
        (a run of cached steps is a stage of its own)."""
        if not self.segments:
            out: list[tuple[str, int, int, int]] = []
            for i, m in enumerate(self.models):
                if out and out[-1][0] == m and self.is_cached(out[-1][1]) == self.is_cached(i):
                    out[-1] = (m, out[-1][1], i + 1, i + 1 - out[-1][1])
                else:
                    out.append((m, i, i + 1, 1))
            return out
        out, start = [], 0
        for k, span in self.segments:
            out.append((self.models[start], start, start + k, span))
            start += k
        return out

    def is_cached(self, step: int) -> bool:
        """Whether `step` reuses its model's last residual instead of running the blocks."""
        return bool(self.cached) and self.cached[step]

    def cached_steps(self) -> tuple[int, ...]:
        return tuple(i for i, c in enumerate(self.cached) if c)

    def full(self) -> "BlendPlan":
        """The same plan with every step full (the cache's reference)."""
        return BlendPlan(self.models, self.spec, self.model_set, self.segments, self.guidance)

    def with_cached(self, steps) -> "BlendPlan":
        """This plan with `steps` (indices) cached, spelled per step (`LLllSSsLL`) or as stages when it has spans."""
        steps = set(steps)
        cached = tuple(i in steps for i in range(len(self)))
        plan = BlendPlan(self.models, self.spec, self.model_set, self.segments, self.guidance, cached)
        return BlendPlan(plan.models, plan.label if plan.segments or plan.guidance else plan.per_step,
                         plan.model_set, plan.segments, plan.guidance, plan.cached)

    @property
    def per_step(self) -> str:
        """One letter per step, lower case where cached (`LLllSSsLL`)."""
        return "".join(self.model_set.letter_of(m).lower() if self.is_cached(i) else self.model_set.letter_of(m)
                       for i, m in enumerate(self.models))

    @property
    def label(self) -> str:
        """Short stage label, e.g. L20,S20,L10 (H16,S4,L20 for Wan 2.2; L20,D4/10@1,L10 with spans and scales)."""
        parts = []
        for m, start, end, span in self.stage_table():
            g = self.guidance[start] if self.guidance else None
            same = not self.guidance or all(x == g for x in self.guidance[start:end])
            scale = f"@{g:g}" if g is not None and same else ""
            letter = self.model_set.letter_of(m)
            letter = letter.lower() if self.is_cached(start) else letter
            parts.append(f"{letter}{end - start}{f'/{span}' if span != end - start else ''}{scale}")
        return ",".join(parts)

    def flops(self, per_step_flops: dict[str, float], cached_step_flops: dict[str, float] | None = None) -> float:
        """Cost of the plan: sum over steps of the running model's per-step FLOPs (`cached_step_flops`,
        what a cached step of each model still costs, for cached steps; the full step's if not given)."""
        cached_step_flops = cached_step_flops or per_step_flops
        return float(sum((cached_step_flops if self.is_cached(i) else per_step_flops)[m]
                         for i, m in enumerate(self.models)))

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        out = {"steps": len(self), "models": list(self.models), "spec": self.spec, "stages": self.label}
        if self.model_set != LARGE_SMALL:
            out["model_set"] = self.model_set.to_dict()
        if self.segments:
            out["segments"] = [list(seg) for seg in self.segments]
        if self.guidance:
            out["guidance"] = list(self.guidance)
        if self.cached:
            out["cached"] = list(self.cached_steps())
            out["per_step"] = self.per_step
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "BlendPlan":
        if "models" not in data:
            raise ValueError("plan JSON needs a 'models' list of per-step model names")
        ms = data.get("model_set")
        model_set = LARGE_SMALL if ms is None else ModelSet(tuple(ms["names"]), tuple(ms["letters"]))
        plan = cls(tuple(data["models"]), data.get("spec", ""), model_set,
                   tuple(tuple(seg) for seg in data.get("segments", ())), tuple(data.get("guidance", ())),
                   cached_flags(data.get("cached", ()), len(data["models"])))
        if "steps" in data and int(data["steps"]) != len(plan):
            raise ValueError(f"plan JSON says steps={data['steps']} but lists {len(plan)} models")
        return plan

    @classmethod
    def from_json(cls, text: str) -> "BlendPlan":
        return cls.from_dict(json.loads(text))


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
