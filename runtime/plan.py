"""BlendPlan: which model runs each denoising step.

Three spellings, all of which end as one per-step tuple of model names:
- the paper's convention `LSL:0.4,0.2` (the middle stage starts at fraction a of the steps, the
  last stage covers the final fraction b), also `LLL`, `SSS`, `LSS:0.4`, `SLL:0.4`;
- explicit stage lengths `L20,S20,L10`;
- any per-step string or list (`LLSSL`, ["large", "small", ...]).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

MODEL_NAMES = ("large", "small")
_LETTERS = {"L": "large", "S": "small"}
_PAPER_DEFAULT = (0.4, 0.2)


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5 + 1e-9))


@dataclass(frozen=True)
class BlendPlan:
    """An immutable per-step assignment of models; build it with `parse` or the `from_*` methods."""

    models: tuple[str, ...]
    spec: str = ""  # how the user spelled it, for reports

    def __post_init__(self):
        if len(self.models) == 0:
            raise ValueError("a plan needs at least one step: pass steps >= 1")
        unknown = sorted(set(self.models) - set(MODEL_NAMES))
        if unknown:
            raise ValueError(f"unknown model name(s) {unknown} in plan: use {' or '.join(MODEL_NAMES)} (or L / S)")
        object.__setattr__(self, "models", tuple(self.models))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def from_fractions(cls, steps: int, pattern: str = "LSL", a: float = 0.4, b: float = 0.2) -> "BlendPlan":
        """Paper convention: stage 2 starts at round(a*steps), stage 3 covers the last round(b*steps)."""
        _check_steps(steps)
        pattern = pattern.upper()
        if len(pattern) != 3 or any(c not in _LETTERS for c in pattern):
            raise ValueError(f"pattern {pattern!r} must be three letters of L/S, e.g. LSL")
        for name, value in (("a", a), ("b", b)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"fraction {name}={value} is outside [0, 1]: give fractions of the step count, e.g. LSL:0.4,0.2")
        if a + b > 1.0 + 1e-9:
            raise ValueError(f"fractions a={a} + b={b} exceed 1: the middle stage would have negative length; lower a or b")
        first = _round_half_up(a * steps)
        last = _round_half_up(b * steps)
        last = min(last, steps - first)
        lengths = (first, steps - first - last, last)
        models = tuple(m for letter, n in zip(pattern, lengths) for m in [_LETTERS[letter]] * n)
        spec = pattern if pattern in ("LLL", "SSS") else f"{pattern}:{a:g},{b:g}"
        return cls(models, spec)

    @classmethod
    def from_stages(cls, stages: str, steps: int | None = None) -> "BlendPlan":
        """Explicit stage lengths, e.g. 'L20,S20,L10'; `steps`, if given, must equal their sum."""
        models = []
        for part in stages.replace(" ", "").split(","):
            m = re.fullmatch(r"([LS])(\d+)", part.upper())
            if not m:
                raise ValueError(f"stage {part!r} is not of the form L<n> or S<n> (e.g. L20,S20,L10)")
            models += [_LETTERS[m.group(1)]] * int(m.group(2))
        if steps is not None and len(models) != steps:
            raise ValueError(f"stage lengths {stages!r} sum to {len(models)} but steps={steps}: make them add up")
        return cls(tuple(models), stages)

    @classmethod
    def from_steps(cls, per_step) -> "BlendPlan":
        """Any per-step list of model names, or a string of L/S letters."""
        if isinstance(per_step, str):
            bad = sorted(set(per_step.upper()) - set(_LETTERS))
            if bad:
                raise ValueError(f"unknown model letter(s) {bad} in {per_step!r}: use L (large) and S (small)")
            return cls(tuple(_LETTERS[c] for c in per_step.upper()), per_step)
        return cls(tuple(_LETTERS.get(m, m) for m in per_step), "custom")

    @classmethod
    def parse(cls, spec: str, steps: int) -> "BlendPlan":
        """Parse any spelling; `steps` is the step count the plan must cover."""
        _check_steps(steps)
        text = spec.strip()
        upper = text.upper()
        if re.fullmatch(r"[LS]{3}(:[^:]*)?", upper) and (len(upper) == 3 or upper[3] == ":"):
            pattern, _, rest = upper.partition(":")
            fractions = [float(x) for x in rest.split(",") if x.strip()] if rest else []
            if len(fractions) > 2:
                raise ValueError(f"plan {spec!r} has more than two fractions: use e.g. LSL:0.4,0.2")
            a, b = (fractions + list(_PAPER_DEFAULT)[len(fractions):])[:2]
            if pattern in ("LLL", "SSS"):
                a, b = 0.0, 0.0
            return cls.from_fractions(steps, pattern, a, b)
        if "," in text or re.fullmatch(r"[LSls]\d+", text):
            return cls.from_stages(text, steps)
        if re.fullmatch(r"[LSls]+", text):
            plan = cls.from_steps(text)
            if len(plan) != steps:
                raise ValueError(f"per-step plan {spec!r} has {len(plan)} steps but steps={steps}")
            return plan
        raise ValueError(f"cannot read plan {spec!r}: use LSL:0.4,0.2, L20,S20,L10 or a per-step string like LLSSL")

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
    def label(self) -> str:
        """Short stage label, e.g. L20,S20,L10."""
        return ",".join(f"{m[0].upper()}{end - start}" for m, start, end in self.stages())

    def flops(self, per_step_flops: dict[str, float]) -> float:
        """Cost of the plan: sum over steps of the running model's per-step FLOPs."""
        return float(sum(per_step_flops[m] for m in self.models))

    # -- serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"steps": len(self), "models": list(self.models), "spec": self.spec, "stages": self.label}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict) -> "BlendPlan":
        if "models" not in data:
            raise ValueError("plan JSON needs a 'models' list of per-step model names")
        plan = cls(tuple(data["models"]), data.get("spec", ""))
        if "steps" in data and int(data["steps"]) != len(plan):
            raise ValueError(f"plan JSON says steps={data['steps']} but lists {len(plan)} models")
        return plan

    @classmethod
    def from_json(cls, text: str) -> "BlendPlan":
        return cls.from_dict(json.loads(text))


def _check_steps(steps: int) -> None:
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
