"""What the FlowBlend pipelines share: the plan, the sampler options and the denoising through the runtime.

A diffusers pipeline owns its loop; these pipelines replace only that loop. The pipeline class
(pipelines/wan.py, ltx.py) checks the arguments, encodes the prompt and draws the noise with
diffusers' own methods, then `BlendCall.denoise` runs our runtime (shared buffers, solver tables,
CUDA graphs) over the named transformers and calls `callback_on_step_end` between steps, where the
host has the sample; the pipeline decodes with diffusers' code again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flowblend.errors import FlowblendError

from ..assembly import EngineChoice
from ..resolve.request import resolve_plan
from ..runtime.plan import BlendPlan, ModelSet
from ..runtime.sampler import SamplerOptions
from ..runtime.solvers import check_dpmpp_config, check_unipc_config, dpmpp_solver_of_order, schedule_of
from .runner import blend_runner, check_cuda_graph, engine_choice

OUTPUT_TYPES = ("np", "pil", "pt", "latent")
SOLVER_OF_SCHEDULER = {"UniPCMultistepScheduler": "unipc", "FlowMatchEulerDiscreteScheduler": "euler",
                       "DPMSolverMultistepScheduler": "dpm++"}  # DPM++: 2M or 3M by the scheduler's solver_order
RUNNERS_KEPT = 4  # runners (engines bound to buffers, captured graphs) kept warm per pipeline


class _Interrupted(Exception):
    """A callback set `pipe._interrupt`: the loop stops at this step boundary (diffusers skips the remaining steps)."""


@dataclass(frozen=True)
class BlendSettings:
    """One call's choices beyond diffusers' arguments: the plan and how the steps run."""

    plan: BlendPlan
    options: SamplerOptions
    engines: EngineChoice  # assembly/'s: kind, precision, device (the pipeline's), artifacts
    graph_mode: str
    timesteps: torch.Tensor  # the scheduler's own, passed to callbacks as diffusers does


def check_call_arguments(output_type, num_inference_steps, guidance_scale, attention_kwargs, num_videos_per_prompt):
    """The arguments diffusers' check_inputs leaves to its loop, refused the same way (ValueError naming them)."""
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` has to be one of {list(OUTPUT_TYPES)} but is {output_type!r}")
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` has to be a positive integer but is {num_inference_steps!r}")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not guidance_scale >= 0:
        raise ValueError(f"`guidance_scale` has to be a number >= 0 (1 or less disables CFG) but is {guidance_scale!r}")
    if attention_kwargs:
        raise ValueError("`attention_kwargs` cannot reach flowblend's engines (they run fixed signatures): drop it")
    if isinstance(num_videos_per_prompt, bool) or not isinstance(num_videos_per_prompt, int) \
            or num_videos_per_prompt < 1:
        raise ValueError(f"`num_videos_per_prompt` has to be a positive integer but is {num_videos_per_prompt!r}")


def scheduler_schedule(scheduler, steps: int, **set_timesteps_kwargs) -> tuple[str, tuple, torch.Tensor]:
    """(solver, (timesteps, sigmas), timesteps tensor) of a copy of the pipeline's scheduler, set as its pipeline
    sets it; the pipeline's own scheduler is left untouched (it may be shared with the pipeline it came from)."""
    name = type(scheduler).__name__
    solver = SOLVER_OF_SCHEDULER.get(name)
    if solver is None:
        raise ValueError(f"the pipeline's scheduler {name} has no flowblend solver table: use one of "
                         f"{list(SOLVER_OF_SCHEDULER)} (pipe.scheduler = UniPCMultistepScheduler.from_config(...))")
    try:
        if solver == "unipc":
            check_unipc_config(scheduler.config)
        elif solver == "dpm++":
            check_dpmpp_config(scheduler.config)
            solver = dpmpp_solver_of_order(scheduler.config.solver_order)
    except ValueError as exc:
        raise ValueError(f"the pipeline's scheduler {name}: {exc}") from None
    if scheduler.config.get("stochastic_sampling", False):
        raise ValueError("FlowMatchEulerDiscreteScheduler with stochastic_sampling=True has no solver table: "
                         "set it to False")
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(steps, **set_timesteps_kwargs)
    return solver, schedule_of(copy), copy.timesteps


class BlendCall:
    """Mixin of the FlowBlend pipelines (before the diffusers pipeline class in the bases)."""

    artifacts = "artifacts"  # where built engines (`engines='onnxruntime' | 'tensorrt'`) are looked up
    checkpoint_family = ""  # the family whose transformer class the checkpoints hold (its Architecture loads them)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, small: str | None = None, **kwargs):
        """The diffusers pipeline's from_pretrained of the large checkpoint, plus the small model's transformer
        (`small`: a diffusers checkpoint folder or hub id; or pass `small_transformer=` a loaded one)."""
        from ..families import get_family
        from .loading import load_small_transformer

        if small is not None and kwargs.get("small_transformer") is None:
            model_class = get_family(cls.checkpoint_family).architecture.model_class()
            kwargs["small_transformer"] = load_small_transformer(
                model_class, small, kwargs.get("torch_dtype", kwargs.get("dtype")), kwargs.get("local_files_only", False))
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        pipe.check_models()
        return pipe

    @classmethod
    def from_pipe(cls, pipeline, **kwargs):
        """DiffusionPipeline.from_pipe with every component of `pipeline` taken as it is (shared, not copied; no
        type matching), then the pair's compatibility check; pass `small_transformer=` the small model."""
        expected, _ = cls._get_signature_keys(cls)
        shared = {name: c for name, c in pipeline.components.items() if name in expected and name not in kwargs}
        pipe = super().from_pipe(pipeline, **shared, **kwargs)
        pipe.check_models()
        return pipe

    def check_models(self) -> None:
        """Refuse a small transformer that cannot share the latents and text conditioning (ValueError naming it)."""
        from ..families import check_models_compatible, get_family

        models = {n: m for n, m in self.blend_transformers().items() if m is not None}
        try:
            check_models_compatible(get_family(self.family_name), {n: dict(m.config) for n, m in models.items()})
        except FlowblendError as exc:
            raise ValueError(f"`small_transformer`: {exc}") from None

    def blend_transformers(self) -> dict[str, torch.nn.Module]:
        """The named transformers plans refer to (large/small; Wan 2.2: high/low/small)."""
        raise NotImplementedError

    def blend_settings(self, plan, steps: int, model_set: ModelSet, experts,
                       guidance_of: Callable[[BlendPlan], tuple[float, ...]], *,
                       solver: str, schedule: tuple, timesteps: torch.Tensor, engines, cuda_graph,
                       with_callback: bool) -> BlendSettings:
        """The checked plan, options, engine kind and graph mode of one call (ValueErrors name the argument)."""
        if not isinstance(plan, (str, BlendPlan)):
            raise ValueError(f"`plan` has to be a plan spelling such as 'LSL:0.4,0.2' or a BlendPlan but is {plan!r}")
        if isinstance(plan, BlendPlan) and plan.base_steps != steps:
            raise ValueError(f"`plan` has {plan.base_steps} steps but `num_inference_steps` is {steps}: make them agree")
        try:  # the CLI's and the server's plan resolution (resolve/request.py), named as the argument is
            blend_plan = resolve_plan(plan, steps, steps, model_set, experts)
        except FlowblendError as exc:
            raise ValueError(f"`{exc}".replace("`plan ", "`plan` ", 1)) from None
        if any(k != span for k, span in blend_plan.segments):
            raise ValueError(f"`plan` {blend_plan.label}: stages with their own step counts are placed on flowblend's "
                             "own schedule, not yet on the pipeline's scheduler: use `flowblend generate`, or a plan "
                             "whose stages share the steps")
        missing = [m for m in dict.fromkeys(blend_plan.models) if self.blend_transformers().get(m) is None]
        if missing:
            raise ValueError(f"`plan` {blend_plan.label} runs {missing}, which this pipeline has no transformer for: "
                             "pass small_transformer= (from_pretrained(..., small=...) or from_pipe(..., "
                             "small_transformer=...)), or plan='LLL'")
        dtype = next(m for m in self.blend_transformers().values() if m is not None).dtype
        choice = engine_choice(engines, self._execution_device, dtype, self.artifacts)
        mode = check_cuda_graph(cuda_graph, self._execution_device, with_callback)
        guidance = guidance_of(blend_plan)  # per-step CFG scales (Wan 2.2: the experts' and the small model's)
        options = SamplerOptions(solver=solver, guidance_scale=max(guidance), guidance_table=guidance,
                                 schedule=schedule)
        return BlendSettings(blend_plan, options, choice, mode, timesteps)

    def blend_runner(self, settings: BlendSettings, latent_shape, family_name: str, signature: dict | None = None):
        """The runtime for these settings, kept warm across calls (engines bound, graphs captured once).

        `signature`: the transformers' call options (LTX: rope_interpolation_scale), bound by wrapping each in
        its family's signature (engines/signature.py), which every engine kind then runs as it is."""
        from ..engines.signature import signature_for

        found = {n: m for n, m in self.blend_transformers().items() if m is not None}
        key = (settings.plan, settings.options, settings.engines, settings.graph_mode, tuple(latent_shape),
               tuple(sorted((signature or {}).items())), next(iter(found.values())).dtype,
               tuple((n, id(m)) for n, m in found.items()))
        cache = self.__dict__.setdefault("_blend_runners", {})
        if key not in cache:
            try:
                transformers = {n: signature_for(m, **signature) if signature else m for n, m in found.items()}
                runner = blend_runner(transformers, settings.plan, settings.options, settings.engines,
                                      graph_mode=settings.graph_mode, family_name=family_name,
                                      latent_shape=latent_shape)
            except FlowblendError as exc:
                raise ValueError(str(exc)) from None
            if len(cache) >= RUNNERS_KEPT:
                cache.pop(next(iter(cache)))
            cache[key] = runner
        return cache[key]

    def denoise(self, runner, settings: BlendSettings, noise: torch.Tensor, embeds: torch.Tensor,
                negative_embeds: torch.Tensor | None, masks: tuple | None = None,
                callback: Callable | None = None, tensor_inputs=("latents",),
                to_user: Callable = lambda x: x, from_user: Callable = lambda x: x) -> torch.Tensor:
        """Sample every video of `noise` [B, C, F, H, W] one at a time; returns the final latents [B, C, F, H, W].

        `callback(self, i, t, {name: tensor})` runs after step i where the host regains control (every step
        eagerly or with per-step graphs); the latents it sees and returns are in the user's layout
        (`to_user` / `from_user`: LTX's packed tokens).
        """
        if callback is not None and noise.shape[0] > 1:
            raise ValueError("`callback_on_step_end` with several videos in one call: flowblend samples one video at "
                             "a time, so call the pipeline once per prompt (num_videos_per_prompt=1)")
        self._interrupt = False
        steps = len(settings.plan)
        out = []
        for b in range(noise.shape[0]):
            cond, uncond = embeds[b:b + 1], None if negative_embeds is None else negative_embeds[b:b + 1]
            mask_kwargs = {} if masks is None else dict(prompt_mask=masks[0][b:b + 1],
                                                        negative_prompt_mask=None if masks[1] is None
                                                        else masks[1][b:b + 1])
            with self.progress_bar(total=steps) as bar:
                on_step = self._step_hook(runner, settings, bar, callback, tensor_inputs, cond, uncond, to_user,
                                          from_user)
                try:
                    latents = runner.sample(noise[b:b + 1], cond, uncond, on_step=on_step, **mask_kwargs)
                except _Interrupted:
                    latents = runner.current.sampler.buffers.latents.clone()
            out.append(latents)
        return torch.cat(out)

    def _step_hook(self, runner, settings, bar, callback, tensor_inputs, cond, uncond, to_user, from_user):
        steps = len(settings.plan)

        def on_step(i: int) -> None:
            bar.update(steps - bar.n if i == steps - 1 else 1)  # a whole-loop graph reports once, at the end
            if callback is None:
                if self._interrupt:
                    raise _Interrupted
                return
            sampler = runner.current.sampler
            bufs = sampler.buffers
            values = {"latents": lambda: to_user(bufs.latents.clone()), "prompt_embeds": lambda: cond,
                      "negative_prompt_embeds": lambda: uncond}
            outputs = callback(self, i, settings.timesteps[i], {k: values[k]() for k in tensor_inputs}) or {}
            if "latents" in outputs:
                sampler.replace_sample(from_user(outputs["latents"]).to(bufs.latents))
            if "prompt_embeds" in outputs:
                bufs.text_embeds[0:1].copy_(outputs["prompt_embeds"])
            if "negative_prompt_embeds" in outputs and bufs.cfg:
                bufs.text_embeds[1:2].copy_(outputs["negative_prompt_embeds"])
            if self._interrupt:
                raise _Interrupted

        return on_step
