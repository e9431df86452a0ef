"""`POST /v1/videos` bodies: the JSON schema (pydantic) and its resolution into a checked job.

The schema only says which fields exist and their JSON types; every rule about values (prompts and
the toy vocabulary, plan spellings, step counts, sizes the VAE takes, guidance, seeds) is the CLI's
own check, `runtime.request.validate_request`, called here, so the server and `flowblend generate`
accept and refuse exactly the same things with the same words. The plan, the expert schedule (wan22)
and the per-step guidance table come from resolve/blend_request.py, as for `flowblend generate`,
given the request's values and, where it has none, the server's settings.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from flowblend.errors import FlowblendError
from flowblend.settings import help_of

from ..families import PairFamily
from ..resolve.blend_request import BlendChoices
from ..resolve.resolved import ResolvedRequest, resolve_request
from .config import ServeConfig

MAX_PROMPT_CHARS = 2000  # the longest text encoder (UMT5, 512 tokens) reads far less than this
PLAN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
SIZE = re.compile(r"(\d{1,9})x(\d{1,9})")
MAX_SIDE = 4096  # pixels per side a request may ask for (with --dynamic-shapes): 3x Wan's 720p, before any buffer
MAX_FRAMES = 1025  # frames per video a request may ask for (Wan makes 81, LTX up to 257): checked before any work
MAX_GUIDANCE = 100.0  # CFG scales in use are 1-20; far above, the update overflows to a black video
FPS = 8  # the frame rate every served video is written at (runtime/video.save_video's default): seconds <-> frames
SECONDS = re.compile(r"\d{1,4}(\.\d{1,6})?")


class VideoRequest(BaseModel):
    """The body of `POST /v1/videos` (OpenAI-style: prompt, seconds, size "WIDTHxHEIGHT"; flowblend: plan, steps...).

    Strict types: a JSON `steps: "20"` or `steps: true` is refused, not coerced (form fields, text by nature, are
    parsed into these types first: serve/intake.py)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    negative_prompt: str = Field("", max_length=MAX_PROMPT_CHARS)
    model: str | None = None  # the pair this server runs (checked if given)
    # plan, steps, frames, guidance: BlendChoices' settings (their help is the schema's description)
    plan: str | None = Field(None, max_length=256, description=help_of(BlendChoices, "plan") + "; or a calibrated "
                             "plan's name")
    steps: int | None = Field(None, description=help_of(BlendChoices, "steps"))
    seed: int = 0
    size: str | None = Field(None, max_length=32)  # "WIDTHxHEIGHT", e.g. "32x32"
    seconds: str | None = Field(None, max_length=16)  # OpenAI's duration: frames = seconds x FPS + 1
    frames: int | None = Field(None, description=help_of(BlendChoices, "frames"))
    guidance: float | None = Field(None, description=help_of(BlendChoices, "guidance"))


@dataclass(frozen=True)
class JobSpec(ResolvedRequest):
    """What the worker runs: the one resolved request value (resolve/resolved.py), plus the record it writes."""

    def to_dict(self) -> dict:
        r = self.request
        return {"prompt": r.prompts[0], "negative_prompt": r.negative_prompt, "plan": r.plan.to_dict(),
                "seed": r.seed, "frames": r.frames, "height": r.height, "width": r.width,
                "guidance": r.guidance, "guidance_per_step": list(self.guidance_per_step),
                **({"boundary_ratio": self.experts.boundary_ratio, "expert_switch_step": self.experts.switch_step}
                   if self.experts is not None else {})}


def warm_size(config: ServeConfig, family: PairFamily) -> str | None:
    """The one size ("WIDTHxHEIGHT") a server without --dynamic-shapes runs (its warm shape: the configured size, else
    the family's); None when any size may build its buffers on first use. A fixed-shape server's size refusals suggest
    this, since a size fitted by the dynamic rule would next be refused as not a warm shape."""
    if config.dynamic_shapes:
        return None
    blend = config.blend
    return f"{blend.width if blend.width is not None else family.width}x" \
           f"{blend.height if blend.height is not None else family.height}"


def parse_size(size: str | None, family: PairFamily, warm: str | None = None) -> tuple[int | None, int | None]:
    """'WIDTHxHEIGHT' -> (height, width); sides above MAX_SIDE are refused with a size that is accepted (`warm`, the
    fixed-shape server's one size, where given)."""
    if size is None:
        return None, None
    m = SIZE.fullmatch(size.strip())
    if not m:
        raise FlowblendError(f"size {size!r} is not WIDTHxHEIGHT, e.g. \"{warm or f'{family.width}x{family.height}'}\"")
    width, height = int(m.group(1)), int(m.group(2))
    if width > MAX_SIDE or height > MAX_SIDE:
        step = family.pixel_multiple
        fit = [max(step, min(v, MAX_SIDE) // step * step) for v in (width, height)]
        raise FlowblendError(f"size {size!r}: this server makes sides of at most {MAX_SIDE} pixels; try "
                             f"\"{warm or f'{fit[0]}x{fit[1]}'}\"")
    return height, width


def frames_of(seconds: str, family: PairFamily) -> int:
    """OpenAI's `seconds` as frames at FPS (frames = seconds x FPS + 1, the first frame at 0 s), if the family makes
    that many; else FlowblendError naming the nearest durations it makes."""
    if not SECONDS.fullmatch(seconds.strip()):
        raise FlowblendError(f"seconds {seconds!r} is not a duration in seconds, e.g. \"1\"")
    frames = float(seconds) * FPS + 1
    if frames == int(frames) and family.frames_ok(int(frames)):
        return int(frames)
    whole = int(frames)
    candidates = {f for f in (*family.nearest_frames(whole), whole) if f is not None and family.frames_ok(f)}
    near = sorted(candidates, key=lambda f: abs(f - frames))[:2]  # by formula: never a list of every count
    raise FlowblendError(f"seconds {seconds!r} is not a length the {family.name} pair makes at {FPS} fps (frames = "
                         f"seconds x {FPS} + 1); try {' or '.join(repr(seconds_of(f)) for f in sorted(near))}")


def seconds_of(frames: int) -> str:
    """The duration of `frames` frames at FPS, as OpenAI spells it (a string)."""
    return f"{(frames - 1) / FPS:g}"


def plan_file(plans_dir: str | None, name: str) -> Path | None:
    """The calibrated plan called `name` (written by `flowblend calibrate plan`), if the server has one."""
    if not plans_dir or not PLAN_NAME.fullmatch(name):
        return None
    path = Path(plans_dir) / f"{name}.json"
    return path if path.is_file() else None


def resolve(body: VideoRequest, config: ServeConfig, family: PairFamily) -> JobSpec:
    """Check every value with the CLI's own rules (resolve/request.py's validate_request, resolve/blend_request.py's
    plans, experts and guidance) plus the server's limits; FlowblendError names the fix."""
    if body.model is not None and body.model != family.name:
        raise FlowblendError(f"model {body.model!r}: this server runs the {family.name} pair; drop model or send "
                             f"\"{family.name}\"")
    if body.steps is not None and not 1 <= body.steps <= config.max_steps:
        raise FlowblendError(f"steps must be between 1 and {config.max_steps} (this server's --max-steps), "
                             f"got {body.steps}")
    if body.guidance is not None and body.guidance > MAX_GUIDANCE:
        raise FlowblendError(f"guidance must be at most {MAX_GUIDANCE:g} on this server, got {body.guidance!r}")
    if body.seconds is not None and body.frames is not None:
        raise FlowblendError("give seconds or frames, not both")
    warm = warm_size(config, family)
    height, width = parse_size(body.size, family, warm)
    frames = frames_of(body.seconds, family) if body.seconds is not None else body.frames
    if frames is not None and not 1 <= frames <= MAX_FRAMES:
        what = f"seconds {body.seconds!r} makes {frames} frames" if body.seconds is not None else f"frames {frames}"
        raise FlowblendError(f"{what}: this server makes 1 to {MAX_FRAMES} frames per video; try "
                             f"{family.frames if 1 <= family.frames <= MAX_FRAMES else 1} frames")
    served = config.blend  # the server's settings: a request's values replace them (None: the family's default)
    named = plan_file(config.plans_dir, body.plan) if body.plan else served.plan_file
    asked = {"plan": body.plan, "steps": body.steps, "frames": frames, "height": height, "width": width,
             "guidance": body.guidance}
    choices = replace(served, plan_file=str(named) if named else None,
                      **{k: v for k, v in asked.items() if v is not None})
    try:
        spec = resolve_request(family, choices, body.prompt, body.negative_prompt, body.seed)  # the CLI's resolver
    except FlowblendError as exc:
        if body.size is not None and str(exc).startswith(f"{family.name}: height and width"):
            step = family.pixel_multiple  # the family speaks HEIGHTxWIDTH; a size is WIDTHxHEIGHT
            fit = [max(step, round(v / step) * step) for v in (width, height)]
            if warm is not None:
                raise FlowblendError(f"{exc}; this server runs one size (no --dynamic-shapes): \"{warm}\"") from None
            raise FlowblendError(f"{exc} (as a size, WIDTHxHEIGHT: \"{fit[0]}x{fit[1]}\")") from None
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
