"""One generation request, checked and resolved before anything loads: the CLI's and the server's check.

`validate_request` takes plain values (what `flowblend generate` parses from flags and what an HTTP
server reads from a JSON body), fills in the family's defaults and raises FlowblendError with the
fix for the first bad value. It imports neither torch nor a model, so a bad request costs
milliseconds. `check_device` is the one check of a device string (it imports torch, still no model).

The family is passed in (an `families.PairFamily`; runtime/ never imports export/): what it
supplies is written down in `VideoFamily`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from flowblend.errors import FlowblendError

from ..runtime.plan import LARGE_SMALL, BlendPlan, ExpertSchedule, ModelSet

SOLVER_NAMES = ("unipc", "euler", "dpm++", "dpm++3m")  # runtime/solvers.SOLVERS, spelled here without torch
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes any int up to here


class VideoFamily(Protocol):
    """What a request needs from a model family (families.PairFamily implements it)."""

    name: str
    steps: int
    guidance: float
    frames: int
    height: int
    width: int

    def check_video_shape(self, frames: int, height: int, width: int) -> None: ...
    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]: ...
    def sampler_kwargs(self, latent_shape) -> dict: ...
    def normalise_prompt(self, prompt: str, negative: bool = False) -> str: ...


@dataclass(frozen=True)
class GenerationRequest:
    """A checked request with every default filled in: what the sampler and the video writer need."""

    family: VideoFamily
    prompts: tuple[str, ...]  # as the family's text encoder reads them (toy: "a red circle moving left")
    negative_prompt: str
    plan: BlendPlan
    seed: int
    frames: int
    height: int
    width: int
    guidance: float
    solver: str
    shift: float
    mu: float | None = None  # LTX's dynamic shift; replaces shift when set
    latent_shape: tuple[int, int, int, int] = field(default=(0, 0, 0, 0))

    @property
    def steps(self) -> int:
        return len(self.plan)

    def sampler_settings(self) -> dict:
        """solver, shift, guidance_scale, mu: the keyword values of runtime.sampler.SamplerOptions."""
        return {"solver": self.solver, "shift": self.shift, "guidance_scale": self.guidance, "mu": self.mu}


def _check_int(name: str, value, low: int | None = None, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FlowblendError(f"{name} must be a whole number, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        upper = f" and <= {high}" if high is not None else ""
        raise FlowblendError(f"{name} must be >= {low}{upper}, got {value}")
    return value


def check_guidance(guidance) -> float:
    """The CFG scale as a float; >= 0, where <= 1 disables CFG (diffusers' rule)."""
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not guidance >= 0 \
            or guidance == float("inf"):
        raise FlowblendError(f"guidance must be a number >= 0 (1 or less disables CFG), got {guidance!r}")
    return float(guidance)


def resolve_plan(plan: str | BlendPlan, steps: int | None, default_steps: int, model_set: ModelSet = LARGE_SMALL,
                 experts: ExpertSchedule | None = None) -> BlendPlan:
    """A plan spelling (LSL:0.4,0.2, L20,S20,L10, LLSSL...; wan22: experts:4,2) or BlendPlan at the requested
    step count, in `model_set`'s names; `experts` is the two-expert schedule of those steps (wan22)."""
    if steps is not None:
        _check_int("steps", steps, 1)
    if isinstance(plan, BlendPlan):
        if steps is not None and steps != plan.base_steps:
            raise FlowblendError(f"steps {steps} disagrees with the plan's {plan.base_steps} steps: drop steps")
        return plan
    try:
        return BlendPlan.parse(str(plan), steps if steps is not None else default_steps, model_set, experts)
    except ValueError as exc:
        raise FlowblendError(f"plan {plan!r}: {exc}") from None


def validate_request(family: VideoFamily, prompt: str | list[str], negative_prompt: str = "",
                     plan: str | BlendPlan = "LSL:0.4,0.2", steps: int | None = None, seed: int = 0,
                     height: int | None = None, width: int | None = None, frames: int | None = None,
                     guidance: float | None = None, solver: str | None = None,
                     shift: float | None = None) -> GenerationRequest:
    """Every value checked and resolved (None: the family's default); FlowblendError names the fix.

    `prompt` is one prompt or a list of them (one video each); the negative prompt is shared.
    """
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise FlowblendError("no prompt given: give the text to generate from (a non-empty prompt)")
    prompts = [family.normalise_prompt(p) for p in prompts]
    negative = family.normalise_prompt(negative_prompt or "", negative=True)
    blend_plan = resolve_plan(plan, steps, family.steps)
    seed = _check_int("seed", seed, 0, MAX_SEED)
    frames = family.frames if frames is None else _check_int("frames", frames)
    height = family.height if height is None else _check_int("height", height)
    width = family.width if width is None else _check_int("width", width)
    family.check_video_shape(frames, height, width)  # its messages suggest sizes it accepts
    guidance = check_guidance(family.guidance if guidance is None else guidance)
    latent_shape = family.latent_shape(frames, height, width)
    settings = family.sampler_kwargs(latent_shape)
    if solver is not None:
        if solver not in SOLVER_NAMES:
            raise FlowblendError(f"unknown solver {solver!r}: choose one of {', '.join(SOLVER_NAMES)}")
        settings["solver"] = solver
    if shift is not None:
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not shift > 0:
            raise FlowblendError(f"shift must be a number > 0, got {shift!r}")
        settings["shift"], settings["mu"] = float(shift), None
    return GenerationRequest(family, tuple(prompts), negative, blend_plan, seed, frames, height, width,
                             guidance, settings["solver"], float(settings["shift"]), settings.get("mu"),
                             tuple(latent_shape))


def check_device(device: str) -> str:
    """`device` if this machine has it, else FlowblendError naming one it has (imports torch, loads nothing)."""
    if device == "cpu":
        return device  # the common case needs no torch import
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise FlowblendError(f"unknown device {device!r}: use cpu or cuda (cuda:N for the N-th GPU)") from None
    if parsed.type == "cpu":
        return device
    if parsed.type != "cuda":
        raise FlowblendError(f"device {device!r} is not supported: use cpu or cuda (cuda:N for the N-th GPU)")
    if not torch.cuda.is_available():
        why = "this torch is a CPU-only build" if torch.version.cuda is None else "none is visible to this torch"
        raise FlowblendError(f"device {device!r}: no CUDA GPU ({why}, torch {torch.__version__}); use cpu")
    count = torch.cuda.device_count()
    if parsed.index is not None and parsed.index >= count:
        raise FlowblendError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}; "
                             "use cuda:0")
    return device
