"""FlowBlendWanPipeline: diffusers' WanPipeline (Wan 2.1, Wan 2.2 A14B's two experts) plus a small model.

It is a WanPipeline (same components, `encode_prompt`, `check_inputs`, `prepare_latents`, output and
decoding) with one more component, `small_transformer`, and a `__call__` whose denoising loop is
flowblend's runtime. Plans name `large`/`small` (Wan 2.1: L, S) or, with `transformer_2` and
`boundary_ratio` (Wan 2.2), `high`/`low`/`small` (H, L, S). The toy pair loads through it too
(`from_pretrained("toy")`): its word-level text encoder and pixel "VAE" stand in for UMT5 and the
Wan VAE.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from diffusers import WanPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput
from diffusers.video_processor import VideoProcessor

from flowblend.errors import FlowblendError

from ..runtime.guidance import guidance_table
from ..runtime.plan import EXPERTS_AND_SMALL, LARGE_SMALL, ExpertSchedule
from .blending import BlendCall, check_call_arguments, scheduler_schedule
from .loading import toy_parts

# WanPipeline.__call__'s defaults; the toy pair's come from its family.
WAN_DEFAULTS = dict(height=480, width=832, num_frames=81, num_inference_steps=50, guidance_scale=5.0)


class FlowBlendWanPipeline(BlendCall, WanPipeline):
    """`FlowBlendWanPipeline.from_pretrained(large, small=small)(prompt=..., plan="LSL:0.4,0.2").frames[0]`.

    Called with WanPipeline's arguments (None: WanPipeline's default) plus `plan` (any BlendPlan
    spelling; default the paper's LSL:0.4,0.2, Wan 2.2 its experts' own plan), `engines` (an engine kind
    of engines/kinds.py as `flowblend generate --backend` names it, or a flowblend.assembly.EngineChoice for
    every engine option: EngineChoice(dtype="fp8") for FP8 block linears of a BF16 pipeline), `cuda_graph` (False, True: the whole loop in one
    graph, 'per_step') and, for Wan 2.2, `small_guidance_scale` (default: the scale of the expert whose
    steps the small model takes).
    """

    # The transformers are bound to the runtime's shared buffers and stay on the device; CPU offload
    # moves only the text encoder and the VAE.
    model_cpu_offload_seq = "text_encoder->vae"
    _exclude_from_cpu_offload = ["transformer", "transformer_2", "small_transformer"]
    _optional_components = ["transformer", "transformer_2", "small_transformer"]

    checkpoint_family = "wan"

    def __init__(self, tokenizer, text_encoder, vae, scheduler, transformer=None, transformer_2=None,
                 small_transformer=None, boundary_ratio: float | None = None, expand_timesteps: bool = False):
        if expand_timesteps:
            raise ValueError("`expand_timesteps=True` (Wan 2.2 TI2V-5B) has no small model sharing its 48-channel "
                             "latents: use Wan 2.1 or Wan 2.2 A14B")
        super().__init__(tokenizer, text_encoder, vae, scheduler, transformer, transformer_2, boundary_ratio,
                         expand_timesteps)
        self.register_modules(small_transformer=small_transformer)
        self.toy = None  # the toy pair's LoadedPair (text encoder, pixel decoder, family) when loaded as "toy"

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, small: str | None = None, **kwargs):
        """WanPipeline.from_pretrained of the large checkpoint plus the small model's transformer (`small`: a
        diffusers checkpoint folder or hub id, or pass `small_transformer=`); "toy" loads the shipped toy pair."""
        if str(pretrained_model_name_or_path) == "toy":
            return cls._toy_pipeline(kwargs.pop("torch_dtype", kwargs.pop("dtype", None)), small)
        return super().from_pretrained(pretrained_model_name_or_path, small=small, **kwargs)

    @classmethod
    def _toy_pipeline(cls, torch_dtype, small):
        pair, scheduler = toy_parts(torch_dtype, small)
        pipe = cls(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=pair.large,
                   small_transformer=pair.small)
        pipe.toy = pair
        pipe.vae_scale_factor_temporal = pair.family.temporal_factor
        pipe.vae_scale_factor_spatial = pair.family.spatial_factor
        pipe.video_processor = VideoProcessor(vae_scale_factor=pair.family.spatial_factor)
        return pipe

    @property
    def family_name(self) -> str:
        return "toy" if self.toy is not None else "wan22" if self.config.boundary_ratio is not None else "wan"

    def blend_transformers(self) -> dict[str, torch.nn.Module]:
        if self.config.boundary_ratio is not None:
            return {"high": self.transformer, "low": self.transformer_2, "small": self.small_transformer}
        return {"large": self.transformer, "small": self.small_transformer}

    # -- the call -----------------------------------------------------------------------------------
    def _defaults(self) -> dict:
        if self.toy is None:
            return WAN_DEFAULTS
        f = self.toy.family
        return dict(height=f.height, width=f.width, num_frames=f.frames, num_inference_steps=f.steps,
                    guidance_scale=f.guidance)

    def _video_size(self, height, width, num_frames):
        """(height, width, num_frames) as WanPipeline adjusts them; the toy's are checked against its family."""
        if self.toy is not None:
            try:
                self.toy.family.check_video_shape(num_frames, height, width)
            except FlowblendError as exc:
                raise ValueError(f"`height`, `width`, `num_frames`: {exc}") from None
            return height, width, num_frames
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"`num_frames` has to be a positive integer but is {num_frames!r}")
        k = self.vae_scale_factor_temporal
        if num_frames % k != 1:
            num_frames = num_frames // k * k + 1  # WanPipeline rounds (with a warning) the same way
        patch = next(m for m in self.blend_transformers().values() if m is not None).config.patch_size
        hm, wm = self.vae_scale_factor_spatial * patch[1], self.vae_scale_factor_spatial * patch[2]
        return height // hm * hm, width // wm * wm, max(num_frames, 1)

    def _encode(self, prompt, negative_prompt, cfg, num_videos_per_prompt, prompt_embeds, negative_prompt_embeds,
                max_sequence_length):
        if self.toy is None:
            return self.encode_prompt(prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
                                      num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
                                      negative_prompt_embeds=negative_prompt_embeds,
                                      max_sequence_length=max_sequence_length, device=self._execution_device)
        prompts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        count = len(prompts) if prompt_embeds is None else prompt_embeds.shape[0] // num_videos_per_prompt
        negatives = negative_prompt or ""
        negatives = [negatives] * count if isinstance(negatives, str) else list(negatives)
        if prompt_embeds is None:
            prompt_embeds = self._toy_embeddings(prompts, num_videos_per_prompt, negative=False)
        if cfg and negative_prompt_embeds is None:
            negative_prompt_embeds = self._toy_embeddings(negatives, num_videos_per_prompt, negative=True)
        return prompt_embeds, negative_prompt_embeds if cfg else None

    def _toy_embeddings(self, prompts: list[str], num_videos_per_prompt: int, negative: bool) -> torch.Tensor:
        """The toy's word-level encoder, prompts read as its family reads them (unknown words: ValueError)."""
        try:
            texts = [self.toy.family.normalise_prompt(p, negative=negative) for p in prompts]
        except FlowblendError as exc:
            raise ValueError(f"`{'negative_prompt' if negative else 'prompt'}`: {exc}") from None
        embeds, _ = self.toy.encode_prompt(texts)
        return embeds.repeat_interleave(num_videos_per_prompt, dim=0).to(self._execution_device)

    def _decode(self, latents: torch.Tensor, output_type: str):
        """WanPipeline's decoding (denormalise, VAE, postprocess); the toy's pixel decoder in place of the VAE."""
        if self.toy is not None:
            return self.video_processor.postprocess_video(self.toy.decode(latents), output_type=output_type)
        vae = self.vae
        latents = latents.to(vae.device, dtype=vae.dtype)
        z = vae.config.z_dim
        latents_mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        latents_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents.device, latents.dtype)
        video = vae.decode(latents / latents_std + latents_mean, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] = None, negative_prompt: str | list[str] = None,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 num_inference_steps: int | None = None, guidance_scale: float | None = None,
                 guidance_scale_2: float | None = None, num_videos_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 latents: torch.Tensor | None = None, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None, output_type: str = "np",
                 return_dict: bool = True, attention_kwargs: dict[str, Any] | None = None,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ["latents"], max_sequence_length: int = 512,  # noqa: B006 - diffusers' default
                 *, plan=None, engines="torch", cuda_graph: bool | str = False,
                 small_guidance_scale: float | None = None) -> WanPipelineOutput | tuple:
        """WanPipeline.__call__ with flowblend's runtime as the loop; see the class docstring for the extra arguments."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        given = dict(height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale)
        d = {k: v if v is not None else self._defaults()[k] for k, v in given.items()}
        self.check_inputs(prompt, negative_prompt, d["height"], d["width"], prompt_embeds, negative_prompt_embeds,
                          callback_on_step_end_tensor_inputs, guidance_scale_2)
        check_call_arguments(output_type, d["num_inference_steps"], d["guidance_scale"], attention_kwargs,
                             num_videos_per_prompt)
        height, width, num_frames = self._video_size(d["height"], d["width"], d["num_frames"])
        steps, guidance = d["num_inference_steps"], float(d["guidance_scale"])
        experts_on = self.config.boundary_ratio is not None
        guidance_2 = float(guidance if guidance_scale_2 is None else guidance_scale_2)
        self._guidance_scale, self._guidance_scale_2 = guidance, guidance_2
        self._attention_kwargs, self._current_timestep, self._interrupt = None, None, False
        cfg = guidance > 1.0  # WanPipeline's rule: the first scale decides whether the unconditional pass runs

        solver, schedule, timesteps = scheduler_schedule(self.scheduler, steps)
        self._num_timesteps = steps
        experts = ExpertSchedule(schedule[0], self.config.boundary_ratio,
                                 num_train_timesteps=self.scheduler.config.num_train_timesteps) if experts_on else None
        model_set = EXPERTS_AND_SMALL if experts_on else LARGE_SMALL
        scales = {"high": guidance, "low": guidance_2} if experts_on else {}
        if small_guidance_scale is not None:
            scales["small"] = float(small_guidance_scale)
        spelled = plan if plan is not None else ("experts" if experts_on else "LSL:0.4,0.2")
        settings = self.blend_settings(
            spelled, steps, model_set, experts,
            lambda blend_plan: guidance_table(blend_plan, guidance, scales, experts) if cfg else (1.0,) * steps,
            solver=solver, schedule=schedule, timesteps=timesteps, engines=engines, cuda_graph=cuda_graph,
            with_callback=callback_on_step_end is not None)

        embeds, negative_embeds = self._encode(prompt, negative_prompt, cfg, num_videos_per_prompt, prompt_embeds,
                                               negative_prompt_embeds, max_sequence_length)
        first = next(m for m in self.blend_transformers().values() if m is not None)
        embeds = embeds.to(first.dtype)
        negative_embeds = negative_embeds.to(first.dtype) if cfg else None
        noise = self.prepare_latents(embeds.shape[0], first.config.in_channels, height, width, num_frames, torch.float32,
                                     self._execution_device, generator, latents)
        runner = self.blend_runner(settings, noise.shape[1:], self.family_name)
        latents = self.denoise(runner, settings, noise, embeds, negative_embeds, callback=callback_on_step_end,
                               tensor_inputs=callback_on_step_end_tensor_inputs)
        video = latents if output_type == "latent" else self._decode(latents, output_type)
        self.maybe_free_model_hooks()
        return WanPipelineOutput(frames=video) if return_dict else (video,)

