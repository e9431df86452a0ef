"""FlowBlendLTXPipeline: diffusers' LTXPipeline plus a small model, sampled by flowblend's runtime.

An LTXPipeline (components, `encode_prompt`, `check_inputs`, `prepare_latents`, decoding with
its timestep-conditioned VAE) with `small_transformer` added; plans name `large` and `small`.
LTX's user-facing latents are packed tokens [B, F*H*W, C] (what `latents=` takes and
`output_type="latent"` returns); the runtime works on [B, C, F, H, W] and packs inside the engine.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from diffusers import LTXPipeline
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift
from diffusers.pipelines.ltx.pipeline_output import LTXPipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from ..runtime.guidance import guidance_table
from ..runtime.plan import LARGE_SMALL
from .blending import BlendCall, check_call_arguments, scheduler_schedule

LTX_DEFAULTS = dict(height=512, width=704, num_frames=161, num_inference_steps=50, guidance_scale=3.0)


class FlowBlendLTXPipeline(BlendCall, LTXPipeline):
    """`FlowBlendLTXPipeline.from_pretrained(large, small=small)(prompt=..., plan="LSL:0.4,0.2").frames[0]`.

    LTXPipeline's arguments (None: its default) plus `plan`, `engines` and `cuda_graph` as in
    FlowBlendWanPipeline. `guidance_rescale` and custom `timesteps` are not in the runtime's tables
    and are refused.
    """

    model_cpu_offload_seq = "text_encoder->vae"  # the transformers stay bound to the runtime's buffers
    _exclude_from_cpu_offload = ["transformer", "small_transformer"]
    _optional_components = ["small_transformer"]

    checkpoint_family = family_name = "ltx"

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer, small_transformer=None):
        super().__init__(scheduler, vae, text_encoder, tokenizer, transformer)
        self.register_modules(small_transformer=small_transformer)

    def blend_transformers(self) -> dict[str, torch.nn.Module]:
        return {"large": self.transformer, "small": self.small_transformer}

    def _decode(self, latents, generator, decode_timestep, decode_noise_scale, output_type, dtype):
        """LTXPipeline's decoding: denormalise, the VAE's decode noise and timestep, postprocess."""
        vae, batch = self.vae, latents.shape[0]
        latents = self._denormalize_latents(latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
        latents = latents.to(dtype)
        timestep = None
        if vae.config.timestep_conditioning:
            noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
            if not isinstance(decode_timestep, list):
                decode_timestep = [decode_timestep] * batch
            if decode_noise_scale is None:
                decode_noise_scale = decode_timestep
            elif not isinstance(decode_noise_scale, list):
                decode_noise_scale = [decode_noise_scale] * batch
            timestep = torch.tensor(decode_timestep, device=latents.device, dtype=latents.dtype)
            scale = torch.tensor(decode_noise_scale, device=latents.device, dtype=latents.dtype)[:, None, None, None, None]
            latents = (1 - scale) * latents + scale * noise
        video = vae.decode(latents.to(vae.dtype), timestep, return_dict=False)[0]
        return self.video_processor.postprocess_video(video, output_type=output_type)

    @torch.no_grad()
    def __call__(self, prompt: str | list[str] = None, negative_prompt: str | list[str] | None = None,
                 height: int | None = None, width: int | None = None, num_frames: int | None = None,
                 frame_rate: int = 25, num_inference_steps: int | None = None, timesteps: list[int] = None,
                 guidance_scale: float | None = None, guidance_rescale: float = 0.0, num_videos_per_prompt: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None, latents: torch.Tensor | None = None,
                 prompt_embeds: torch.Tensor | None = None, prompt_attention_mask: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_attention_mask: torch.Tensor | None = None,
                 decode_timestep: float | list[float] = 0.0, decode_noise_scale: float | list[float] | None = None,
                 output_type: str = "pil", return_dict: bool = True, attention_kwargs: dict[str, Any] | None = None,
                 callback_on_step_end: Callable | PipelineCallback | MultiPipelineCallbacks | None = None,
                 callback_on_step_end_tensor_inputs: list[str] = ["latents"], max_sequence_length: int = 128,  # noqa: B006
                 *, plan=None, engines="torch", cuda_graph: bool | str = False) -> LTXPipelineOutput | tuple:
        """LTXPipeline.__call__ with flowblend's runtime as the loop; see the class docstring for the extra arguments."""
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        given = dict(height=height, width=width, num_frames=num_frames, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale)
        d = {k: v if v is not None else LTX_DEFAULTS[k] for k, v in given.items()}
        height, width, num_frames, steps = d["height"], d["width"], d["num_frames"], d["num_inference_steps"]
        self.check_inputs(prompt=prompt, height=height, width=width,
                          callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                          prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                          prompt_attention_mask=prompt_attention_mask,
                          negative_prompt_attention_mask=negative_prompt_attention_mask)
        check_call_arguments(output_type, steps, d["guidance_scale"], attention_kwargs, num_videos_per_prompt)
        if guidance_rescale:
            raise ValueError(f"`guidance_rescale` {guidance_rescale} is not in flowblend's per-step tables: pass 0.0")
        if timesteps is not None:
            raise ValueError("`timesteps` cannot be chosen by hand here: the solver table follows the scheduler; "
                             "pass num_inference_steps")
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"`num_frames` has to be a positive integer but is {num_frames!r}")
        guidance = float(d["guidance_scale"])
        self._guidance_scale, self._guidance_rescale = guidance, 0.0
        self._attention_kwargs, self._current_timestep, self._interrupt = None, None, False
        cfg = guidance > 1.0

        latent_frames = (num_frames - 1) // self.vae_temporal_compression_ratio + 1
        latent_height = height // self.vae_spatial_compression_ratio
        latent_width = width // self.vae_spatial_compression_ratio
        config = self.scheduler.config
        mu = calculate_shift(latent_frames * latent_height * latent_width, config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))  # as LTXPipeline
        solver, schedule, step_timesteps = scheduler_schedule(
            self.scheduler, steps, sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        self._num_timesteps = steps
        settings = self.blend_settings(
            plan if plan is not None else "LSL:0.4,0.2", steps, LARGE_SMALL, None,
            lambda blend_plan: guidance_table(blend_plan, guidance) if cfg else (1.0,) * steps,
            solver=solver, schedule=schedule, timesteps=step_timesteps, engines=engines, cuda_graph=cuda_graph,
            with_callback=callback_on_step_end is not None)

        embeds, mask, negative_embeds, negative_mask = self.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt, do_classifier_free_guidance=cfg,
            num_videos_per_prompt=num_videos_per_prompt, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, prompt_attention_mask=prompt_attention_mask,
            negative_prompt_attention_mask=negative_prompt_attention_mask, max_sequence_length=max_sequence_length,
            device=self._execution_device)
        packed = self.prepare_latents(embeds.shape[0], self.transformer.config.in_channels, height, width, num_frames,
                                      torch.float32, self._execution_device, generator, latents)
        grid = (latent_frames, latent_height, latent_width)
        unpack = lambda x: self._unpack_latents(x, *grid, self.transformer_spatial_patch_size,  # noqa: E731
                                                self.transformer_temporal_patch_size)
        pack = lambda x: self._pack_latents(x, self.transformer_spatial_patch_size,  # noqa: E731
                                            self.transformer_temporal_patch_size)
        noise = unpack(packed)
        signature = {"rope_interpolation_scale": (self.vae_temporal_compression_ratio / frame_rate,
                                                  self.vae_spatial_compression_ratio,
                                                  self.vae_spatial_compression_ratio)}
        runner = self.blend_runner(settings, noise.shape[1:], self.family_name, signature)
        result = self.denoise(runner, settings, noise, embeds, negative_embeds if cfg else None,
                              masks=(mask, negative_mask if cfg else None), callback=callback_on_step_end,
                              tensor_inputs=callback_on_step_end_tensor_inputs, to_user=pack, from_user=unpack)
        if output_type == "latent":
            video = pack(result)
        else:
            video = self._decode(result, generator, decode_timestep, decode_noise_scale, output_type, embeds.dtype)
        self.maybe_free_model_hooks()
        return LTXPipelineOutput(frames=video) if return_dict else (video,)
