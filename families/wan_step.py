"""Wan's torch side: the positional signature WanTransformer3DModel runs and exports in, and its forward with
the schedule constants taken out of the step (families/wan.py hands both to engines/architectures.py).

Kept apart from wan.py because it imports torch, which the family's registry entry must not (start-up:
`flowblend --help` and every refused request stay torch-free); wan.py imports this module lazily.

Every call of WanTransformer3DModel.forward recomputes the rotary tables (a function of the latent
shape only) and the timestep embedding and its modulation projection (a function of the step's
timestep only). The runtime knows both before the loop: the shape and the timestep table are fixed
when an engine is bound. Computing them once per binding, as the solver table already is, removes
about 25 small ops from every step, which is most of the per-call cost of a small model that has
few layers (the toy small model: ~1 ms of ~8 ms on the 2-core CPU).

WanStep below is WanTransformer3DModel.forward (diffusers 0.42) with those three values passed in;
tests/test_step_split.py checks it is bitwise equal to diffusers' own forward. Anything the split
does not cover (image conditioning, Wan 2.2's per-token timesteps, a subclass with its own forward,
accelerate hooks) keeps the plain forward: wan.py decides (supports_wan_step_split).
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..engines.base import LATENTS, TEXT_EMBEDS, TIMESTEP, VELOCITY
from ..engines.step_cache import run_blocks
from ..engines.step_constants import StepConstants


class WanSignature(nn.Module):
    """WanTransformer3DModel: latents [B,C,F,H,W], timestep [B], text [B,L,D] -> velocity."""

    input_names = (LATENTS, TIMESTEP, TEXT_EMBEDS)
    output_names = (VELOCITY,)

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, timestep, text_embeds):
        return self.transformer(hidden_states=latents, timestep=timestep,
                                encoder_hidden_states=text_embeds, return_dict=False)[0]


class WanStep(nn.Module):
    """`constants(bound)` once per binding, then `forward(bound, constants, step)` per step.

    `bound` maps the engine's input names (engines/base.py) to its bound tensors.
    """

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer
        self.sequence = None  # engines/parallel.SequenceShard once Ulysses shards the tokens (shard_sequence)

    def shard_sequence(self, sequence) -> None:
        """Ulysses: this rank keeps 1/degree of the tokens through the blocks; only self-attention, which needs
        every token, trades tokens for heads around it (families/wan_ulysses.py). Cross-attention needs none:
        each query token attends to the whole text on its own."""
        from .wan_ulysses import UlyssesSelfAttention

        self.sequence = sequence
        for block in self.transformer.blocks:
            block.attn1.set_processor(UlyssesSelfAttention(sequence))

    def _tokens(self, latents: torch.Tensor) -> int:
        _, _, num_frames, height, width = latents.shape
        p_t, p_h, p_w = self.transformer.config.patch_size
        return (num_frames // p_t) * (height // p_h) * (width // p_w)

    def _own(self, tokens_first: torch.Tensor) -> torch.Tensor:
        """This rank's equal share of a [B, tokens, ...] tensor (the whole of it without Ulysses)."""
        if self.sequence is None:
            return tokens_first
        return tokens_first.chunk(self.sequence.degree, dim=1)[self.sequence.index].contiguous()

    @torch.no_grad()
    def constants(self, bound: Mapping[str, torch.Tensor]) -> StepConstants:
        """Computed exactly as forward computes them, one timestep row at a time (same shapes, same bits).

        The text only fixes the dtype of temb (forward casts it to the text's dtype); its values
        are not used.
        """
        model, text_embeds = self.transformer, bound[TEXT_EMBEDS]
        if self.sequence is not None:
            from ..engines.parallel_layout import ParallelLayout, check_tokens

            check_tokens(ParallelLayout(1, self.sequence.degree), self._tokens(bound[LATENTS]),
                         f"latents {list(bound[LATENTS].shape[1:])}")
        rotary = tuple(self._own(r) for r in model.rope(bound[LATENTS]))  # [1, tokens, 1, D]: this rank's rows
        blocks, output = [], []
        for row in bound[TIMESTEP]:
            temb, timestep_proj, _, _ = model.condition_embedder(row, text_embeds[:, :1], None)
            blocks.append(timestep_proj.unflatten(1, (6, -1)))
            output.append(temb)
        return StepConstants(rotary, block_modulation=torch.stack(blocks), output_modulation=torch.stack(output))

    def forward(self, bound: Mapping[str, torch.Tensor], constants: StepConstants, step: int,
                residual: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
        return self.run_step(bound, constants.rotary, constants.block_modulation[step],
                             constants.output_modulation[step], residual, reuse)

    def residual_buffer(self, bound: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The blocks' residual at this binding's batch: [B, tokens, inner dim] in the blocks' dtype (engines/step_cache.py)."""
        model, latents = self.transformer, bound[LATENTS]
        tokens = self._tokens(latents) // (self.sequence.degree if self.sequence is not None else 1)
        weight = model.patch_embedding.weight
        return torch.zeros(latents.shape[0], tokens, weight.shape[0], dtype=weight.dtype, device=latents.device)

    def run_step(self, bound: Mapping[str, torch.Tensor], rotary, timestep_proj: torch.Tensor,
                 temb: torch.Tensor, residual: torch.Tensor | None = None, reuse: bool = False) -> torch.Tensor:
        """One step from this step's rows of the constants (what engines/compile.py compiles: no step index).

        `residual` given: a full step stores its blocks' residual there, a `reuse` step adds it instead of
        running the blocks (engines/step_cache.py); None: the plain forward."""
        model, latents = self.transformer, bound[LATENTS]
        batch_size, _, num_frames, height, width = latents.shape
        p_t, p_h, p_w = model.config.patch_size

        hidden_states = self._own(model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous())
        encoder_hidden_states = model.condition_embedder.text_embedder(bound[TEXT_EMBEDS])

        def blocks(hidden_states):
            for block in model.blocks:
                hidden_states = block(hidden_states, encoder_hidden_states, timestep_proj, rotary)
            return hidden_states

        held = [hidden_states]
        del hidden_states  # run_blocks holds the only reference
        hidden_states = run_blocks(held, blocks, residual, reuse)

        shift, scale = (model.scale_shift_table.to(temb.device) + temb.unsqueeze(1)).chunk(2, dim=1)
        shift, scale = shift.to(hidden_states.device), scale.to(hidden_states.device)
        hidden_states = (model.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = model.proj_out(hidden_states)
        if self.sequence is not None:  # every rank's tokens back in order: [degree, B, s, out] -> [B, degree * s, out]
            hidden_states = self.sequence.gather(hidden_states).transpose(0, 1).flatten(1, 2)

        hidden_states = hidden_states.reshape(batch_size, num_frames // p_t, height // p_h, width // p_w,
                                              p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
