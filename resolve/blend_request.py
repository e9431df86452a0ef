"""What picks a request's plan, expert schedule and per-step CFG scales, as plain values.

`flowblend generate`, `plan` and `calibrate` read these from their flags (cli/common.py's
`choices_of`), the server from a JSON body plus its own settings (serve/video_request.py); both
resolve them here, so a request means the same and is refused with the same words either way.
Messages name the CLI flag that sets each value, which the server's settings share.

The family is passed in (an `families.PairFamily`; runtime/ never imports export/): what it
supplies beyond `VideoFamily` is written down in `BlendFamily`.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Protocol

from flowblend.errors import FlowblendError
from flowblend.settings import setting

from ..runtime.plan import BlendPlan, ExpertSchedule, ModelSet
from .request import VideoFamily, check_guidance, resolve_plan


class BlendFamily(VideoFamily, Protocol):
    """A family's named models and, for two-expert models (wan22), their boundary and CFG scales."""

    models: tuple[str, ...]
    letters: tuple[str, ...]
    boundary_ratio: float | None
    expert_guidance: tuple[tuple[str, float], ...]

    @property
    def experts(self) -> tuple[str, str] | None: ...


@dataclass(frozen=True)
class BlendChoices:
    """The values that pick a plan and its guidance; None is the family's default (or no such choice).

    The one declaration of these settings (flowblend/settings.py): the CLI's flags, the server's config
    and its request schema read their help and types from here."""

    plan: str | None = setting(None, "which model runs each step: LSL:0.4,0.2 (paper; the default) | LLL | SSS | "
                                     "L20,S20,L10 | LLSSL...; wan22 (letters H high, L low, S small): experts (the "
                                     "default) | experts:4,2 (small takes the last 4 steps before the expert switch "
                                     "and the first 2 after) | H20,S6,L14 ...", group="plan")
    plan_file: str | None = setting(None, "JSON plan as written by `flowblend calibrate plan` or `calibrate cache`; "
                                          "overrides --plan",
                                    group="plan")
    steps: int | None = setting(None, "denoising steps", type=int, group="plan", family_default="steps")
    frames: int | None = setting(None, "frames; what the VAE and patch take, e.g. 4k+1 for wan", type=int,
                                 group="video", family_default="frames")
    height: int | None = setting(None, "pixels; a multiple of the VAE x patch factor", type=int, group="video",
                                 family_default="height")
    width: int | None = setting(None, "pixels", type=int, group="video", family_default="width")
    guidance: float | None = setting(None, "classifier-free guidance scale; > 1 runs two forwards a step, <= 1 "
                                           "disables CFG (wan22: the high-noise expert's)", type=float,
                                     group="guidance", family_default="guidance")
    solver: str | None = setting(None, "default: the family's (toy and wan unipc, ltx euler); dpm++ is "
                                       "DPM-Solver++ 2M, dpm++3m order 3", choices=lambda: _solver_names(),
                                 group="solver")
    shift: float | None = setting(None, "flow shift > 0 (default: the family's; ltx shifts by token count)",
                                  type=float, group="solver")
    boundary_ratio: float | None = setting(None, "wan22: the high-noise expert runs t >= ratio*1000 (default 0.875, "
                                                 "T2V; I2V uses 0.9)", type=float, group="experts")
    guidance_2: float | None = setting(None, "wan22: the low-noise expert's CFG scale (diffusers' guidance_scale_2; "
                                             "default 3.0); --guidance is the high-noise expert's", type=float,
                                       group="experts")
    small_guidance: float | None = setting(None, "the small model's CFG scale (default: that of the model whose "
                                                 "step it takes)", type=float, group="experts")

    @classmethod
    def of(cls, source) -> "BlendChoices":
        """From any object with these attributes (an argparse Namespace); missing ones are None."""
        return cls(**{f.name: getattr(source, f.name, None) for f in fields(cls)})


def _solver_names() -> tuple[str, ...]:
    from .request import SOLVER_NAMES

    return tuple(SOLVER_NAMES)


def model_set_of(family: BlendFamily) -> ModelSet:
    return ModelSet(tuple(family.models), tuple(family.letters))


def video_of(choices: BlendChoices, family: BlendFamily) -> tuple[int, int, int]:
    """(frames, height, width) with the family's defaults, checked against its VAE and patch."""
    frames = choices.frames if choices.frames is not None else family.frames
    height = choices.height if choices.height is not None else family.height
    width = choices.width if choices.width is not None else family.width
    family.check_video_shape(frames, height, width)
    return frames, height, width


def guidance_of(choices: BlendChoices, family: BlendFamily) -> float:
    return check_guidance(family.guidance if choices.guidance is None else choices.guidance)


def solver_of(choices: BlendChoices, family: BlendFamily, latent_shape) -> tuple[str, float, float | None]:
    """(solver, shift, mu): the family's for this latent size unless chosen; a chosen shift replaces LTX's mu."""
    settings = family.sampler_kwargs(latent_shape)
    shift, mu = (choices.shift, None) if choices.shift is not None else (settings["shift"], settings.get("mu"))
    return choices.solver or settings["solver"], shift, mu


def read_plan_file(path: str | Path, steps: int | None, family: BlendFamily, solver: str | None = None) -> BlendPlan:
    """A plan written by `flowblend calibrate plan|cache`, in the family's model names; a plan file that records
    its calibration (cached steps) is refused for another pair, solver (`solver`, if given) or step count."""
    path, model_set = Path(path), model_set_of(family)
    if not path.is_file():
        raise FlowblendError(f"plan file {path} does not exist: write one with `flowblend calibrate plan`")
    try:
        data = json.loads(path.read_text())
        plan = BlendPlan.from_dict(data)
    except ValueError as exc:
        raise FlowblendError(f"plan file {path}: {exc}") from None
    if steps is not None and steps != plan.base_steps:
        raise FlowblendError(f"--steps {steps} disagrees with the plan file's {plan.base_steps} steps: drop --steps")
    unknown = sorted(set(plan.models) - set(model_set.names))
    if unknown:
        raise FlowblendError(f"plan file {path} names {unknown}, which pair {family.name} does not have "
                             f"({', '.join(model_set.names)})")
    check_calibration(data.get("calibration"), path, family.name, solver)
    return BlendPlan(plan.models, plan.spec, model_set, plan.segments, plan.guidance, plan.cached)


def check_calibration(record: dict | None, path, pair: str, solver: str | None = None, shift: float | None = None,
                      guidance: float | None = None, latent_shape=None) -> None:
    """Refuse (one line) a calibrated plan file used with another pair or solver; warn on another shift, guidance
    or video size (the cached steps were measured there: calibrate/cache_steps.py)."""
    if not record:
        return
    if record.get("pair") not in (None, pair):
        raise FlowblendError(f"plan file {path} was calibrated for pair {record['pair']}, not {pair}: run "
                             f"`flowblend calibrate cache --pair {pair}` for this pair")
    if solver is not None and record.get("solver") not in (None, solver):
        raise FlowblendError(f"plan file {path} was calibrated with --solver {record['solver']}, not {solver}: pass "
                             f"--solver {record['solver']} or recalibrate with --solver {solver}")
    for name, value, recorded in (("shift", shift, record.get("shift")), ("guidance", guidance, record.get("guidance")),
                                  ("video latents", None if latent_shape is None else list(latent_shape),
                                   record.get("latent_shape"))):
        if value is not None and recorded is not None and value != recorded:
            print(f"warning: plan file {path} was calibrated at {name} {recorded}, this run uses {value}: its cached "
                  "steps may cost more quality than measured (recalibrate)", file=sys.stderr)


def plan_of(choices: BlendChoices, family: BlendFamily, experts: ExpertSchedule | None = None) -> BlendPlan:
    """The plan file, else the plan spelling (default: experts for wan22, the paper's LSL:0.4,0.2) at the step
    count; `experts` (wan22) for the `experts[:before,after]` spelling."""
    if choices.plan_file:
        plan = read_plan_file(choices.plan_file, choices.steps, family)
        if plan.cached:  # its calibration: the solver, shift, guidance and video size this request resolves to
            record = json.loads(Path(choices.plan_file).read_text()).get("calibration")
            latent_shape = family.latent_shape(*video_of(choices, family))
            solver, shift, _ = solver_of(choices, family, latent_shape)
            check_calibration(record, choices.plan_file, family.name, solver, shift, guidance_of(choices, family),
                              latent_shape)
        return plan
    spec = choices.plan or ("experts" if family.experts is not None else "LSL:0.4,0.2")
    return resolve_plan(spec, choices.steps, family.steps, model_set_of(family), experts)


def steps_of(choices: BlendChoices, family: BlendFamily) -> int:
    """The step count a plan will have (the plan file's, the chosen one, or the family's)."""
    if choices.plan_file:
        return len(read_plan_file(choices.plan_file, choices.steps, family))
    steps = choices.steps if choices.steps is not None else family.steps
    if steps < 1:
        raise FlowblendError(f"--steps must be a positive integer, got {steps}")
    return steps


def resolve_experts(choices: BlendChoices, family: BlendFamily, steps: int, solver: str, shift: float,
                    mu: float | None = None) -> ExpertSchedule | None:
    """The expert of every step for a two-expert family (None otherwise), on the solver's own timesteps."""
    from ..runtime.guidance import expert_schedule_for  # imports torch: only once a command runs

    ratio = choices.boundary_ratio
    if family.experts is None:
        if ratio is not None or choices.guidance_2 is not None:
            raise FlowblendError(f"--boundary-ratio / --guidance-2 are for two-expert pairs (--pair wan22), not "
                                 f"{family.name}: drop them")
        return None
    ratio = family.boundary_ratio if ratio is None else ratio
    if not 0.0 < ratio < 1.0:
        raise FlowblendError(f"--boundary-ratio must be in (0, 1), got {ratio} (Wan 2.2: 0.875 T2V, 0.9 I2V)")
    return expert_schedule_for(solver, steps, shift, ratio, mu)


def experts_of(choices: BlendChoices, family: BlendFamily) -> ExpertSchedule | None:
    """wan22: which expert runs each step, on the chosen solver's timesteps (None for two-model pairs)."""
    if family.experts is None:
        return resolve_experts(choices, family, 1, "unipc", 1.0)  # refuses boundary_ratio/guidance_2 here
    solver, shift, mu = solver_of(choices, family, family.latent_shape(*video_of(choices, family)))
    return resolve_experts(choices, family, steps_of(choices, family), solver, shift, mu)


def resolve_scales(choices: BlendChoices, family: BlendFamily, experts: ExpertSchedule | None
                   ) -> tuple[float, dict[str, float]]:
    """(the guidance scale, each model's own scale): wan22's experts from guidance / guidance_2, and
    small_guidance; a model without one takes the scale of the expert whose step it runs."""
    default = guidance_of(choices, family)
    scales = dict(family.expert_guidance)
    if experts is not None:
        scales[experts.high] = default
        if choices.guidance_2 is not None:
            scales[experts.low] = choices.guidance_2
    if choices.small_guidance is not None:
        scales["small"] = choices.small_guidance
    for name, value in scales.items():
        if not value >= 0:
            raise FlowblendError(f"guidance_scale must be >= 0 (1 disables CFG), got {value} for {name}")
    return default, scales


def resolve_guidance(choices: BlendChoices, family: BlendFamily, plan: BlendPlan, experts: ExpertSchedule | None
                     ) -> tuple[float, tuple[float, ...]]:
    """(the guidance scale, the per-step table): each model's scale, the small one's by the step it takes."""
    from ..runtime.guidance import guidance_table

    default, scales = resolve_scales(choices, family, experts)
    return default, guidance_table(plan, default, scales, experts)
