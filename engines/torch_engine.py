"""PyTorch backend: any diffusers video transformer behind the Engine interface (eager reference)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .base import LATENTS, TEXT_EMBEDS, TIMESTEP, VELOCITY, check_bindings
from .signature import WanSignature, signature_for
from .wan_step import WanStep, supports_step_split


class TorchEngine:
    """Runs a transformer eagerly on bound buffers; `device`/`dtype` move it once at construction.

    For a plain Wan transformer (and `split_constants=True`, the default) the rotary tables and
    per-step timestep embeddings are computed once per binding (engines/wan_step.py) rather than in
    every step; the velocity is bitwise the same. Other modules run their whole forward each step.
    """

    def __init__(self, transformer: nn.Module, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, name: str = "torch", split_constants: bool = True,
                 **signature_kwargs):
        module = signature_for(transformer, **signature_kwargs)
        if device is not None or dtype is not None:
            module = module.to(device=device, dtype=dtype)
        self.module = module.eval()
        self.name = name
        self.input_names = tuple(module.input_names)
        self.output_names = tuple(module.output_names)
        self.step_split = (WanStep(module.transformer) if split_constants and isinstance(module, WanSignature)
                           and supports_step_split(module.transformer) else None)
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._timestep_table: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None
        self._constants = None
        # (latents, timestep table, text) bound before -> their constants. The tensors are held, so
        # identity means the same buffers; the runtime writes a timestep table only when allocating it.
        self._constants_by_binding: list[tuple[tuple[torch.Tensor, ...], object]] = []

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_bindings(self.name, self.input_names + self.output_names, tensors)
        self._timestep_table = tensors[TIMESTEP]
        self._inputs = tuple(tensors[n] for n in self.input_names)
        self._timestep_pos = self.input_names.index(TIMESTEP)
        self._velocity = tensors[VELOCITY]
        if self.step_split is not None:
            self._latents, self._text_embeds = tensors[LATENTS], tensors[TEXT_EMBEDS]
            self._constants = self._constants_for(self._latents, self._timestep_table, self._text_embeds)

    def _constants_for(self, latents, timestep_table, text_embeds):
        key = (latents, timestep_table, text_embeds)
        for bound, constants in self._constants_by_binding:
            if all(a is b for a, b in zip(bound, key)):
                return constants
        constants = self.step_split.constants(latents, timestep_table, text_embeds)
        self._constants_by_binding.append((key, constants))
        return constants

    def constants_bytes(self) -> int:
        """Memory held by precomputed constants over every binding so far (0 without the split)."""
        return sum(t.numel() * t.element_size() for _, c in self._constants_by_binding
                   for t in (*c.rotary, c.temb, c.timestep_proj))

    @torch.no_grad()
    def run(self, step: int) -> None:
        if self._constants is not None:
            self._velocity.copy_(self.step_split(self._latents, self._text_embeds, self._constants, step))
            return
        args = list(self._inputs)
        args[self._timestep_pos] = self._timestep_table[step]
        self._velocity.copy_(self.module(*args))
