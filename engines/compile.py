"""torch.compile as an engine option that keeps what the engine does (issue #24).

`none | regional | whole`. Regional compiles each repeated transformer block (diffusers'
`_repeated_blocks`, as its `compile_repeated_blocks` does): one block's graph, reused by every
block, so the first call costs one block's compile (16.5 s at Wan 14B on the H200 against 110 s
for the whole model, at the same step time). The engine gets a shallow copy of the transformer
whose block lists hold the compiled blocks: the same weights, the user's model untouched, and the
family's step split (rotary tables and timestep embeddings once per binding) still runs around
them. Whole compiles the split's per-step function (the step's constants passed as tensors, so
no step index is baked into a graph) or, without a split, the whole signature module.

Compiled engines run inside flowblend's whole-loop CUDA graph, so inductor must not capture CUDA
graphs of its own: the modes that do (reduce-overhead, max-autotune) are refused with the one that
does not. Imports torch only when called.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from flowblend.errors import FlowblendError

if TYPE_CHECKING:
    from torch import nn

COMPILE_MODES = ("none", "regional", "whole")
GRAPH_CAPTURING_MODES = ("reduce-overhead", "max-autotune")  # inductor cudagraphs on by default in these


def check_compile(compile: str, inductor_mode: str | None = None) -> str:
    """The compile option, or FlowblendError naming the fix."""
    if compile not in COMPILE_MODES:
        raise FlowblendError(f"unknown compile option {compile!r}: choose one of {', '.join(COMPILE_MODES)}")
    if inductor_mode in GRAPH_CAPTURING_MODES:
        raise FlowblendError(f"--compile-mode {inductor_mode} captures CUDA graphs of its own, which cannot run inside "
                             "flowblend's whole-loop graph: use max-autotune-no-cudagraphs or leave it unset")
    return compile


def inductor_options(inductor_mode: str | None) -> dict:
    """Keyword arguments of every torch.compile call of an engine (static shapes: the buffers never change)."""
    return {"dynamic": False, **({"mode": inductor_mode} if inductor_mode else {})}


def repeated_block_names(transformer: nn.Module) -> set[str]:
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    if not names:
        raise FlowblendError(f"{type(transformer).__name__} declares no repeated blocks (_repeated_blocks): "
                             "regional compile needs them; use --compile whole")
    return names


def with_compiled_blocks(transformer: nn.Module, inductor_mode: str | None = None) -> nn.Module:
    """A shallow copy of `transformer` whose top-level block lists hold torch.compile'd blocks (same weights)."""
    import torch
    from torch import nn

    names = repeated_block_names(transformer)
    clone = copy.copy(transformer)
    clone._modules = dict(transformer._modules)  # copy.copy shares the dict: the original must keep its blocks
    compiled = 0
    for attr, child in transformer.named_children():
        if isinstance(child, nn.ModuleList) and any(type(m).__name__ in names for m in child):
            blocks = [torch.compile(m, **inductor_options(inductor_mode)) if type(m).__name__ in names else m
                      for m in child]
            clone._modules[attr] = nn.ModuleList(blocks)
            compiled += sum(type(m).__name__ in names for m in child)
    if not compiled:
        raise FlowblendError(f"{type(transformer).__name__}'s repeated blocks {sorted(names)} are not in a top-level "
                             "ModuleList: use --compile whole")
    return clone


class CompiledStep:
    """A family's step split with its per-step function compiled; constants are computed as before.

    The split's `run_step(bound, rotary, block_modulation, output_modulation)` takes the step's rows
    as tensors, so one graph serves every step (an int step index would be specialised per step).
    """

    def __init__(self, split, inductor_mode: str | None = None):
        import torch

        self.split = split
        self.constants = split.constants
        self._step = torch.compile(split.run_step, **inductor_options(inductor_mode))

    def residual_buffer(self, bound):
        return self.split.residual_buffer(bound)

    def __call__(self, bound, constants, step: int, residual=None, reuse: bool = False):
        # a cached step (engines/step_cache.py) is a second graph (reuse is a Python bool), stored steps a third
        return self._step(bound, constants.rotary, constants.block_modulation[step], constants.output_modulation[step],
                          residual, reuse)
