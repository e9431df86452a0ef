"""`POST /v1/videos` bodies: the JSON schema (pydantic) and its resolution into a checked job.

The schema only says which fields exist and their JSON types; every rule about values (prompts and
the toy vocabulary, plan spellings, step counts, sizes the VAE takes, guidance, seeds) is the CLI's
own check, `runtime.request.validate_request`, called here, so the server and `flowblend generate`
accept and refuse exactly the same things with the same words. The plan, the expert schedule (wan22)
and the per-step guidance table come from runtime/blend_request.py, as for `flowblend generate`,
given the request's values and, where it has none, the server's settings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from flowblend.errors import FlowblendError
from flowblend.families import PairFamily
from flowblend.runtime.blend_request import BlendChoices
from flowblend.runtime.resolved import ResolvedRequest, resolve_request

from .config import ServeConfig

MAX_PROMPT_CHARS = 2000  # the longest text encoder (UMT5, 512 tokens) reads far less than this
PLAN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SIZE = re.compile(r"(\d{1,5})x(\d{1,5})")


class VideoRequest(BaseModel):
    """The body of `POST /v1/videos` (OpenAI-style: prompt, size "WIDTHxHEIGHT"; flowblend: plan, steps...)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    model: str | None = None  # the pair this server runs (checked if given)
    plan: str | None = Field(None, max_length=256)  # any BlendPlan spelling, or a calibrated plan's name
    steps: int | None = None
    seed: int = 0
    size: str | None = None  # "WIDTHxHEIGHT", e.g. "32x32"
    frames: int | None = None
    guidance: float | None = None


@dataclass(frozen=True)
class JobSpec(ResolvedRequest):
    """What the worker runs: the one resolved request value (runtime/resolved.py), plus the record it writes."""

    def to_dict(self) -> dict:
        r = self.request
        return {"prompt": r.prompts[0], "negative_prompt": r.negative_prompt, "plan": r.plan.to_dict(),
                "seed": r.seed, "frames": r.frames, "height": r.height, "width": r.width,
                "guidance": r.guidance, "guidance_per_step": list(self.guidance_per_step),
                **({"boundary_ratio": self.experts.boundary_ratio, "expert_switch_step": self.experts.switch_step}
                   if self.experts is not None else {})}


def parse_size(size: str | None) -> tuple[int | None, int | None]:
    """'WIDTHxHEIGHT' -> (height, width)."""
    if size is None:
        return None, None
    m = SIZE.fullmatch(size.strip())
    if not m:
        raise FlowblendError(f"size {size!r} is not WIDTHxHEIGHT, e.g. \"32x32\"")
    return int(m.group(2)), int(m.group(1))


def plan_file(plans_dir: str | None, name: str) -> Path | None:
    """The calibrated plan called `name` (written by `flowblend calibrate plan`), if the server has one."""
    if not plans_dir or not PLAN_NAME.fullmatch(name):
        return None
    path = Path(plans_dir) / f"{name}.json"
    return path if path.is_file() else None


def resolve(body: VideoRequest, config: ServeConfig, family: PairFamily) -> JobSpec:
    """Check every value with the CLI's own rules (runtime/request.py's validate_request, runtime/blend_request.py's
    plans, experts and guidance) plus the server's limits; FlowblendError names the fix."""
    if body.model is not None and body.model != family.name:
        raise FlowblendError(f"model {body.model!r}: this server runs the {family.name} pair; drop model or send "
                             f"\"{family.name}\"")
    if body.steps is not None and not 1 <= body.steps <= config.max_steps:
        raise FlowblendError(f"steps must be between 1 and {config.max_steps} (this server's --max-steps), "
                             f"got {body.steps}")
    height, width = parse_size(body.size)
    named = plan_file(config.plans_dir, body.plan) if body.plan else config.plan_file
    steps = body.steps if body.steps is not None else config.steps
    # the request's values, else the server's (None: the family's default)
    choices = BlendChoices(plan=body.plan or config.plan, plan_file=str(named) if named else None, steps=steps,
                           frames=body.frames if body.frames is not None else config.frames,
                           height=height if height is not None else config.height,
                           width=width if width is not None else config.width,
                           guidance=body.guidance if body.guidance is not None else config.guidance,
                           boundary_ratio=config.boundary_ratio, guidance_2=config.guidance_2,
                           small_guidance=config.small_guidance)
    try:
        spec = resolve_request(family, choices, body.prompt, body.negative_prompt, body.seed)  # the CLI's resolver
    except FlowblendError as exc:
        known = sorted(p.stem for p in Path(config.plans_dir).glob("*.json")) if config.plans_dir else []
        if known and choices.plan and str(exc).startswith(f"plan {choices.plan!r}"):
            raise FlowblendError(f"{exc}; or name a calibrated plan: {', '.join(known)}") from None
        raise
    if len(spec.plan) > config.max_steps:
        raise FlowblendError(f"plan {choices.plan or spec.plan.spec!r} has {len(spec.plan)} steps; this server "
                             f"runs at most {config.max_steps} (--max-steps)")
    return JobSpec(spec.request, spec.options, spec.experts)


def error_line(errors: list[dict]) -> str:
    """pydantic's error list as the one line a client reads (the first error names the field and the fix)."""
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
    kind = first.get("type", "")
    if kind == "json_invalid":
        message = f"the body is not valid JSON ({first.get('ctx', {}).get('error', first.get('msg'))})"
    elif kind == "extra_forbidden":
        message = f"unknown field {where!r}: the fields are {', '.join(VideoRequest.model_fields)}"
    elif kind == "string_too_long":
        limit = first.get("ctx", {}).get("max_length")
        message = f"{where} is {len(first.get('input', ''))} characters; at most {limit} are accepted"
    elif kind == "missing":
        message = f"{where or 'the body'} is required"
    else:
        message = f"{where}: {first.get('msg')}" if where else f"the body must be a JSON object ({first.get('msg')})"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return message + more
