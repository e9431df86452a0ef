"""PyTorch backend: any diffusers video transformer behind the Engine interface (eager reference)."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from flowblend.errors import FlowblendError

from .attention import choose_attention
from .base import TIMESTEP, VELOCITY, check_bindings
from .cfg_modes import check_cfg
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
                 cfg: str = "batched", sequence=None, **signature_kwargs):
        check_compile(compile, compile_mode)
        check_cfg(cfg)
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
        if sequence is not None:  # Ulysses (engines/parallel.py): the family's step split shards the tokens
            if self.step_split is None or not hasattr(self.step_split, "shard_sequence"):
                raise FlowblendError(f"--parallel with a Ulysses degree > 1 runs inside a family's step split "
                                     f"(Wan, Wan 2.2); {type(transformer).__name__} has none here: use a CFG-only "
                                     "layout (2x1)")
            self.step_split.shard_sequence(sequence)
        if compile == "whole":
            if self.step_split is not None:
                self.step_split = CompiledStep(self.step_split, compile_mode)
            else:
                module = torch.compile(module, **inductor_options(compile_mode))
        self.module = module.eval()
        self.compile = compile
        self.attention = choose_attention(self.device, self.dtype, attention)
        self.cfg = cfg
        self._parts: list[dict[str, torch.Tensor]] = []  # bindings each run() computes, in order
        self._parts_by_binding: list[tuple[tuple[torch.Tensor, ...], list]] = []
        self._timestep_pos = self.input_names.index(TIMESTEP)
        # Bound inputs seen before -> their constants. The tensors are held, so identity means the
        # same buffers; the runtime writes a timestep table only when allocating it.
        self._constants_by_binding: list[tuple[tuple[torch.Tensor, ...], object]] = []
        # cached steps (engines/step_cache.py): the plan's schedule for this engine, and a residual buffer per binding
        self._cache = CacheSchedule({})
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
        self._set_residuals()

    def _residual_for(self, bound: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = tuple(bound.values())
        for seen, residual in self._residual_by_binding:
            if all(a is b for a, b in zip(seen, inputs)):
                return residual
        residual = self.step_split.residual_buffer(bound)
        self._residual_by_binding.append((inputs, residual))
        return residual

    def residuals(self) -> tuple[torch.Tensor, ...]:
        """The current binding's residual buffers, one per forward (what the last storing step wrote; () uncached)."""
        return tuple(part["residual"] for part in self._parts if part["residual"] is not None)

    def residual_bytes(self) -> int:
        """Memory held by residual buffers over every binding so far (0 without cached steps)."""
        return sum(r.numel() * r.element_size() for _, r in self._residual_by_binding)

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_bindings(self.name, self.input_names + self.output_names, tensors)
        self._inputs = tuple(tensors[n] for n in self.input_names)  # the whole binding (tests, subclasses read it)
        self._velocity = tensors[VELOCITY]
        self._parts = self._parts_for(tensors)
        if self._cache:  # a new binding: its own residual buffers (made on the first bind of those buffers)
            self._set_residuals()

    def _parts_for(self, tensors: Mapping[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """The bindings one run() computes: the whole batch, or (cfg sequential) one per batch row, as views
        made once per binding so each row's constants are computed once too."""
        if self.cfg != "sequential" or tensors[VELOCITY].shape[0] == 1:
            return [self._part(tensors)]
        whole = tuple(tensors[n] for n in (*self.input_names, VELOCITY))
        for seen, parts in self._parts_by_binding:
            if all(a is b for a, b in zip(seen, whole)):
                return parts
        rows = tensors[VELOCITY].shape[0]
        parts = [self._part({k: v[:, r:r + 1] if k == TIMESTEP else v[r:r + 1] for k, v in tensors.items()})
                 for r in range(rows)]
        self._parts_by_binding.append((whole, parts))
        return parts

    def _part(self, tensors: Mapping[str, torch.Tensor]) -> dict:
        inputs = tuple(tensors[n] for n in self.input_names)
        bound = dict(zip(self.input_names, inputs))
        return {"inputs": inputs, "bound": bound, "timestep_table": tensors[TIMESTEP], "velocity": tensors[VELOCITY],
                "constants": self._constants_for(bound) if self.step_split is not None else None, "residual": None}

    def _set_residuals(self) -> None:
        for part in self._parts:  # one residual per forward: the CFG batch, or each row under cfg sequential
            part["residual"] = self._residual_for(part["bound"]) if self._cache else None

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
            for part in self._parts:  # one forward, or one per CFG row (cfg sequential: half the activations)
                if part["constants"] is not None:
                    action = self._cache.actions.get(step)  # fixed by the plan: a Python choice, never device data
                    if action is None:
                        part["velocity"].copy_(self.step_split(part["bound"], part["constants"], step))
                    else:
                        part["velocity"].copy_(self.step_split(part["bound"], part["constants"], step,
                                                               part["residual"], action == REUSE))
                    continue
                args = list(part["inputs"])
                args[self._timestep_pos] = part["timestep_table"][step]
                part["velocity"].copy_(self.module(*args))
