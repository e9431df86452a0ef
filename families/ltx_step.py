"""LTX-Video's torch side: the positional signature (tokens packed inside) and its forward with the schedule
constants taken out of the step (as families/wan_step.py for Wan; ltx.py hands both to
engines/architectures.py and imports this module lazily, so the family entry stays torch-free).

LTXVideoTransformer3DModel.forward recomputes, in every call, the rotary tables from the latent
grid (shape and the pipeline's interpolation scale only) and AdaLayerNormSingle's timestep
embeddings (the step's timestep only). Both are computed once per binding here. The step is
LtxSignature.forward (token packing) around LTXVideoTransformer3DModel.forward (diffusers 0.42)
with those values passed in; tests/test_step_split.py checks it is bitwise equal to them.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..engines.base import LATENTS, TEXT_EMBEDS, TEXT_MASK, TIMESTEP, VELOCITY
from ..engines.step_cache import run_blocks
from ..engines.step_constants import StepConstants


class LtxSignature(nn.Module):
    """LTXVideoTransformer3DModel on unpacked latents [B,C,F,H,W] (patch size 1, as LTX-Video 0.9.x).

    Packing to [B, F*H*W, C] happens inside, as LTXPipeline._pack_latents does, so the runtime's
    buffers keep one layout for every family. `rope_interpolation_scale` is the pipeline's
    (temporal_compression / frame_rate, spatial_compression, spatial_compression).
    """

    input_names = (LATENTS, TIMESTEP, TEXT_EMBEDS, TEXT_MASK)
    output_names = (VELOCITY,)

    def __init__(self, transformer: nn.Module, rope_interpolation_scale=(8 / 25, 32, 32)):
        super().__init__()
        self.transformer = transformer
        self.rope_interpolation_scale = tuple(float(x) for x in rope_interpolation_scale)

    def forward(self, latents, timestep, text_embeds, text_mask):
        b, c, f, h, w = latents.shape
        tokens = latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
        out = self.transformer(hidden_states=tokens, encoder_hidden_states=text_embeds, timestep=timestep,
                               encoder_attention_mask=text_mask, num_frames=f, height=h, width=w,
                               rope_interpolation_scale=self.rope_interpolation_scale, return_dict=False)[0]
        return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)



def _pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, f, h, w = latents.shape
    return latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)


class LtxStep(nn.Module):
    """`constants(bound)` once per binding, then `forward(bound, constants, step)` per step."""

    def __init__(self, transformer: nn.Module, rope_interpolation_scale: tuple[float, float, float]):
        super().__init__()
        self.transformer = transformer
        self.rope_interpolation_scale = tuple(rope_interpolation_scale)

    @torch.no_grad()
    def constants(self, bound: Mapping[str, torch.Tensor]) -> StepConstants:
        """Computed exactly as forward computes them, one timestep row at a time (same shapes, same bits)."""
        model, latents = self.transformer, bound[LATENTS]
        batch_size, _, num_frames, height, width = latents.shape
        rotary = model.rope(_pack(latents), num_frames, height, width, self.rope_interpolation_scale, None)
        hidden_dtype = model.proj_in.weight.dtype  # forward passes proj_in's output dtype
        blocks, output = [], []
        for row in bound[TIMESTEP]:
            temb, embedded_timestep = model.time_embed(row.flatten(), batch_size=batch_size, hidden_dtype=hidden_dtype)
            blocks.append(temb.view(batch_size, -1, temb.size(-1)))
            output.append(embedded_timestep.view(batch_size, -1, embedded_timestep.size(-1)))
        return StepConstants(rotary, block_modulation=torch.stack(blocks), output_modulation=torch.stack(output))

    def forward(self, bound: Mapping[str, torch.Tensor], constants: StepConstants, step: int,
                residual: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
        return self.run_step(bound, constants.rotary, constants.block_modulation[step],
                             constants.output_modulation[step], residual, reuse)

    def residual_buffer(self, bound: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The blocks' residual at this binding's batch: [B, F*H*W, inner dim] in the blocks' dtype (engines/step_cache.py)."""
        latents, weight = bound[LATENTS], self.transformer.proj_in.weight
        b, _, f, h, w = latents.shape
        return torch.zeros(b, f * h * w, weight.shape[0], dtype=weight.dtype, device=latents.device)

    def run_step(self, bound: Mapping[str, torch.Tensor], rotary, temb: torch.Tensor,
                 embedded_timestep: torch.Tensor, residual: torch.Tensor | None = None,
                 reuse: bool = False) -> torch.Tensor:
        """One step from this step's rows of the constants (what engines/compile.py compiles: no step index).

        `residual` given: a full step stores its blocks' residual there, a `reuse` step adds it instead of
        running the blocks (engines/step_cache.py); None: the plain forward."""
        model, latents = self.transformer, bound[LATENTS]
        b, c, f, h, w = latents.shape
        hidden_states = _pack(latents)

        encoder_attention_mask = (1 - bound[TEXT_MASK].to(hidden_states.dtype)) * -10000.0
        encoder_attention_mask = encoder_attention_mask.unsqueeze(1)
        hidden_states = model.proj_in(hidden_states)
        encoder_hidden_states = model.caption_projection(bound[TEXT_EMBEDS])
        encoder_hidden_states = encoder_hidden_states.view(b, -1, hidden_states.size(-1))

        def blocks(hidden_states):
            for block in model.transformer_blocks:
                hidden_states = block(hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                                      temb=temb, image_rotary_emb=rotary, encoder_attention_mask=encoder_attention_mask)
            return hidden_states

        held = [hidden_states]
        del hidden_states  # run_blocks holds the only reference
        hidden_states = run_blocks(held, blocks, residual, reuse)

        scale_shift_values = model.scale_shift_table[None, None] + embedded_timestep[:, :, None]
        shift, scale = scale_shift_values[:, :, 0], scale_shift_values[:, :, 1]
        hidden_states = model.norm_out(hidden_states)
        hidden_states = hidden_states * (1 + scale) + shift
        output = model.proj_out(hidden_states)
        return output.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)
