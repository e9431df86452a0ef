"""PyTorch backend: any diffusers video transformer behind the Engine interface (eager reference)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .base import TIMESTEP, VELOCITY, check_bindings
from .signature import signature_for


class TorchEngine:
    """Runs a transformer eagerly on bound buffers; `device`/`dtype` move it once at construction."""

    def __init__(self, transformer: nn.Module, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, name: str = "torch", **signature_kwargs):
        module = signature_for(transformer, **signature_kwargs)
        if device is not None or dtype is not None:
            module = module.to(device=device, dtype=dtype)
        self.module = module.eval()
        self.name = name
        self.input_names = tuple(module.input_names)
        self.output_names = tuple(module.output_names)
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._timestep_table: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_bindings(self.name, self.input_names + self.output_names, tensors)
        self._timestep_table = tensors[TIMESTEP]
        self._inputs = tuple(tensors[n] for n in self.input_names)
        self._timestep_pos = self.input_names.index(TIMESTEP)
        self._velocity = tensors[VELOCITY]

    @torch.no_grad()
    def run(self, step: int) -> None:
        args = list(self._inputs)
        args[self._timestep_pos] = self._timestep_table[step]
        self._velocity.copy_(self.module(*args))
