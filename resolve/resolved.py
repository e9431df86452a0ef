"""One request, resolved once into one immutable value: what `flowblend generate` and a server's job hold.

`resolve_request` runs every check and default of resolve/request.py and resolve/blend_request.py
(plan, expert schedule, per-step guidance, solver, video shape, seed) and returns a `ResolvedRequest`.
Before this the CLI always passed a guidance table and the server passed None when the guidance
was uniform; both now hold the same value, with a table only where the scales differ by step. The
value round-trips through JSON (`to_json` / `from_json`), so a record can be stored and loaded
instead of resolved again. Imports torch only once a request has passed every check, and no model.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..runtime.plan import BlendPlan, ExpertSchedule
from .blend_request import BlendChoices, BlendFamily, experts_of, plan_of, resolve_guidance
from .request import GenerationRequest, validate_request

if TYPE_CHECKING:  # runtime/sampler.py imports torch: loaded once a request has passed every check
    from ..runtime.sampler import SamplerOptions


@dataclass(frozen=True)
class ResolvedRequest:
    """A request every rule has accepted, with the sampler options it runs with and (wan22) its expert schedule."""

    request: GenerationRequest  # every default filled in (resolve/request.py)
    options: SamplerOptions
    experts: ExpertSchedule | None = None  # wan22: which expert each step belongs to

    @property
    def plan(self) -> BlendPlan:
        return self.request.plan

    @property
    def guidance_per_step(self) -> tuple[float, ...]:
        return self.options.guidance_for(len(self.plan))

    @property
    def cfg(self) -> bool:
        return any(g > 1.0 for g in self.guidance_per_step)  # diffusers' rule (runtime/sampler.py): batch 2 above 1

    def shape_key(self) -> tuple:
        """What buffers (and engines' static shapes, graphs) are specialised for."""
        return (self.request.latent_shape, self.cfg)

    def to_json(self) -> dict:
        """Every field as plain JSON values; `from_json(to_json(), family)` gives an equal value."""
        r = self.request
        return {"family": r.family.name, "prompts": list(r.prompts), "negative_prompt": r.negative_prompt,
                "plan": r.plan.to_dict(), "seed": r.seed, "frames": r.frames, "height": r.height, "width": r.width,
                "guidance": r.guidance, "solver": r.solver, "shift": r.shift, "mu": r.mu,
                "latent_shape": list(r.latent_shape),
                "options": {**asdict(self.options), "guidance_table": None if self.options.guidance_table is None
                            else list(self.options.guidance_table)},
                "experts": None if self.experts is None else {**asdict(self.experts),
                                                              "timesteps": list(self.experts.timesteps)}}

    @classmethod
    def from_json(cls, data: dict, family: BlendFamily) -> ResolvedRequest:
        """The value `to_json` wrote, for `family` (its name must match): loaded, not resolved again."""
        if data["family"] != family.name:
            raise ValueError(f"a {data['family']} request cannot be loaded for the {family.name} family")
        request = GenerationRequest(family, tuple(data["prompts"]), data["negative_prompt"],
                                    BlendPlan.from_dict(data["plan"]), data["seed"], data["frames"], data["height"],
                                    data["width"], data["guidance"], data["solver"], data["shift"], data["mu"],
                                    tuple(data["latent_shape"]))
        from ..runtime.sampler import SamplerOptions

        experts = None if data["experts"] is None else ExpertSchedule(
            **{**data["experts"], "timesteps": tuple(data["experts"]["timesteps"])})
        return cls(request, SamplerOptions(**data["options"]), experts)


def resolve_request(family: BlendFamily, choices: BlendChoices, prompts: str | list[str], negative_prompt: str = "",
                    seed: int = 0, plan: BlendPlan | None = None) -> ResolvedRequest:
    """Check and complete a request (FlowblendError naming the fix) and resolve its plan, experts and guidance;
    `plan`, if given, is used instead of the choices' (bench measures several plans of one request)."""
    experts = experts_of(choices, family)
    plan = plan_of(choices, family, experts) if plan is None else plan
    request = validate_request(family, prompts, negative_prompt, plan, choices.steps, seed, choices.height,
                               choices.width, choices.frames, choices.guidance, choices.solver, choices.shift)
    from ..runtime.sampler import SamplerOptions

    _, table = resolve_guidance(choices, family, request.plan, experts)
    uniform = all(g == request.guidance for g in table)  # one scale: no table (the sampler repeats guidance_scale)
    options = SamplerOptions(**request.sampler_settings(), guidance_table=None if uniform else table)
    return ResolvedRequest(request, options, experts)
