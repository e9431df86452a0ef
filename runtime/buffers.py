"""The shared, preallocated tensors of one sampling shape.

Both engines bind to these very tensors (decision 2 of the design card), the solver updates them
in place, and a CUDA graph captured over them stays valid for every later request of the same
shape: a request only copies its noise and text into them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..engines.base import LATENTS, TEXT_EMBEDS, TEXT_MASK, TIMESTEP, VELOCITY, aligned_zeros


@dataclass
class SamplerBuffers:
    latents: torch.Tensor          # [1, C, F, H, W] float32: the sample the solver moves
    model_input: torch.Tensor      # [B, C, F, H, W] engine dtype (aliases `latents` when B=1 and float32)
    text_embeds: torch.Tensor      # [B, L, D] engine dtype, row 0 conditional, row 1 unconditional
    text_mask: torch.Tensor | None  # [B, L] int64, for families that take a mask
    timestep_table: torch.Tensor   # [steps, B] float32
    guidance_table: torch.Tensor   # [steps] float32: each step's CFG scale (runtime/guidance.py)
    velocity: torch.Tensor         # [B, C, F, H, W] engine dtype: engine output
    guided: torch.Tensor           # [1, C, F, H, W] float32: CFG-combined velocity (aliases `velocity` if possible)
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # solver history

    @classmethod
    def allocate(cls, latent_shape, text_shape, timesteps, cfg: bool, dtype: torch.dtype,
                 device: torch.device, state_names=(), with_mask: bool = False,
                 guidance=None) -> "SamplerBuffers":
        batch = 2 if cfg else 1
        f32 = torch.float32
        latents = aligned_zeros((1, *latent_shape), f32, device)  # every buffer 256-byte aligned (engines/base.py)
        same = not cfg and dtype == f32
        model_input = latents if same else aligned_zeros((batch, *latent_shape), dtype, device)
        velocity = aligned_zeros((batch, *latent_shape), dtype, device)
        table = aligned_zeros((len(timesteps), batch), f32, device)
        table.copy_(torch.tensor(list(timesteps), dtype=f32)[:, None].expand(-1, batch))
        return cls(
            latents=latents,
            model_input=model_input,
            text_embeds=aligned_zeros((batch, *text_shape), dtype, device),
            text_mask=aligned_zeros((batch, text_shape[0]), torch.int64, device) if with_mask else None,
            timestep_table=table,
            guidance_table=torch.tensor(list(guidance) if guidance is not None else [1.0] * len(timesteps),
                                        dtype=f32, device=device),
            velocity=velocity,
            guided=velocity if same else aligned_zeros(latents.shape, f32, device),
            state={name: aligned_zeros(latents.shape, f32, device) for name in state_names},
        )

    @property
    def cfg(self) -> bool:
        return self.velocity.shape[0] == 2

    def engine_bindings(self) -> dict[str, torch.Tensor]:
        out = {LATENTS: self.model_input, TIMESTEP: self.timestep_table,
               TEXT_EMBEDS: self.text_embeds, VELOCITY: self.velocity}
        if self.text_mask is not None:
            out[TEXT_MASK] = self.text_mask
        return out

    def solver_tensors(self) -> dict[str, torch.Tensor]:
        """Names the solver tables use: `velocity` there is the guided velocity."""
        return {"latents": self.latents, "velocity": self.guided, **self.state}

    def addresses(self) -> dict[str, int]:
        """Data pointers of every buffer (tests assert they never change)."""
        named = {**self.engine_bindings(), "latents32": self.latents, "guided": self.guided,
                 "guidance_table": self.guidance_table, **self.state}
        return {k: v.data_ptr() for k, v in named.items()}
