"""PyTorch backend: any diffusers video transformer behind the Engine interface (eager reference)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .attention import choose_attention
from .base import TIMESTEP, VELOCITY, check_bindings
from .compile import CompiledStep, check_compile, inductor_options, with_compiled_blocks
from .signature import signature_for, step_split_for
from .step_cache import REUSE, CacheSchedule


def _placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of a module's weights (where its inputs must live); cpu/float32 if it has none."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.float32


class TorchEngine:
    """Runs a transformer eagerly on bound buffers; `device`/`dtype` move it once at construction.

    For plain Wan and LTX transformers (and `split_constants=True`, the default) the rotary tables
    and per-step timestep embeddings are computed once per binding rather than in every step; the
    velocity is bitwise the same. Other modules run their whole forward each step.
    """

    def __init__(self, transformer: nn.Module, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, name: str = "torch", split_constants: bool = True,
                 compile: str = "none", compile_mode: str | None = None, attention: str = "auto",
                 **signature_kwargs):
        check_compile(compile, compile_mode)
        if device is not None or dtype is not None:
            transformer = transformer.to(device=device, dtype=dtype)
        if compile == "regional":  # engines/compile.py: the blocks compiled in a shallow copy, the split kept
            transformer = with_compiled_blocks(transformer, compile_mode)
        module = signature_for(transformer, **signature_kwargs)
        self.name = name
        self.device, self.dtype = _placement(module)
        self.input_names = tuple(module.input_names)
        self.output_names = tuple(module.output_names)
        self.step_split = step_split_for(transformer, module) if split_constants else None
        if compile == "whole":
            if self.step_split is not None:
                self.step_split = CompiledStep(self.step_split, compile_mode)
            else:
                module = torch.compile(module, **inductor_options(compile_mode))
        self.module = module.eval()
        self.compile = compile
        self.attention = choose_attention(self.device, self.dtype, attention)
        self._inputs: tuple[torch.Tensor, ...] = ()
        self._bound: dict[str, torch.Tensor] = {}
        self._timestep_table: torch.Tensor | None = None
        self._velocity: torch.Tensor | None = None
        self._constants = None
        # Bound inputs seen before -> their constants. The tensors are held, so identity means the
        # same buffers; the runtime writes a timestep table only when allocating it.
        self._constants_by_binding: list[tuple[tuple[torch.Tensor, ...], object]] = []
        # cached steps (engines/step_cache.py): the plan's schedule for this engine, and a residual buffer per binding
        self._cache = CacheSchedule({})
        self._residual: torch.Tensor | None = None
        self._residual_by_binding: list[tuple[tuple[torch.Tensor, ...], torch.Tensor]] = []

    @property
    def supports_step_cache(self) -> bool:
        """Cached steps need the family's step split (plain Wan / LTX transformers, split_constants=True)."""
        return self.step_split is not None and hasattr(self.step_split, "residual_buffer")

    def set_cache_schedule(self, schedule: CacheSchedule) -> None:
        """Which plan steps store / reuse the blocks' residual (the sampler sets it after binding, before the loop);
        the residual buffer of the current binding is made here, never in a step."""
        if schedule and not self.supports_step_cache:
            raise ValueError(f"engine {self.name} runs the whole forward (no step split): it cannot cache steps")
        self._cache = schedule
        self._residual = self._residual_for(self._bound) if schedule else None

    def _residual_for(self, bound: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = tuple(bound.values())
        for seen, residual in self._residual_by_binding:
            if all(a is b for a, b in zip(seen, inputs)):
                return residual
        residual = self.step_split.residual_buffer(bound)
        self._residual_by_binding.append((inputs, residual))
        return residual

    def residual_bytes(self) -> int:
        """Memory held by residual buffers over every binding so far (0 without cached steps)."""
        return sum(r.numel() * r.element_size() for _, r in self._residual_by_binding)

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_bindings(self.name, self.input_names + self.output_names, tensors)
        self._timestep_table = tensors[TIMESTEP]
        self._inputs = tuple(tensors[n] for n in self.input_names)
        self._bound = dict(zip(self.input_names, self._inputs))
        self._timestep_pos = self.input_names.index(TIMESTEP)
        self._velocity = tensors[VELOCITY]
        if self.step_split is not None:
            self._constants = self._constants_for(self._bound)
        if self._cache:  # a new binding: its own residual buffer (made on the first bind of those buffers)
            self._residual = self._residual_for(self._bound)

    def _constants_for(self, bound: dict[str, torch.Tensor]):
        inputs = tuple(bound.values())
        for seen, constants in self._constants_by_binding:
            if all(a is b for a, b in zip(seen, inputs)):
                return constants
        constants = self.step_split.constants(bound)
        self._constants_by_binding.append((inputs, constants))
        return constants

    def constants_bytes(self) -> int:
        """Memory held by precomputed constants over every binding so far (0 without the split)."""
        return sum(c.nbytes() for _, c in self._constants_by_binding)

    @torch.no_grad()
    def run(self, step: int) -> None:
        with self.attention.context():  # the attention kernel chosen for this engine (engines/attention.py)
            if self._constants is not None:
                action = self._cache.actions.get(step)  # fixed by the plan: a Python choice, never device data
                if action is None:
                    self._velocity.copy_(self.step_split(self._bound, self._constants, step))
                else:
                    self._velocity.copy_(self.step_split(self._bound, self._constants, step, self._residual,
                                                         action == REUSE))
                return
            args = list(self._inputs)
            args[self._timestep_pos] = self._timestep_table[step]
            self._velocity.copy_(self.module(*args))
