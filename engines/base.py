"""The one interface every backend (PyTorch, ONNX Runtime, TensorRT) offers the runtime.

An engine is bound ONCE to named, preallocated tensors and then run per step. The runtime owns the
buffers; both engines of a pair are bound to the same ones, so a step only chooses which engine
runs. Binding contract (names are also the ONNX graph's input/output names):

- `latents`     [B, C, F, H, W] model input (B = 2 with CFG: row 0 conditional, row 1 unconditional)
- `timestep`    [steps, B] float32 table; `run(step)` reads row `step`
- `text_embeds` [B, L, D] text-encoder output
- `text_mask`   [B, L] int64 attention mask (only for families that take one, e.g. LTX)
- `velocity`    [B, C, F, H, W] output, written in place
"""
from __future__ import annotations

from typing import Mapping, Protocol, runtime_checkable

import torch

from flowblend.errors import FlowblendError

LATENTS = "latents"
TIMESTEP = "timestep"
TEXT_EMBEDS = "text_embeds"
TEXT_MASK = "text_mask"
VELOCITY = "velocity"


@runtime_checkable
class Engine(Protocol):
    """A compiled or eager transformer bound to shared buffers.

    `device` and `dtype` say where and in what type the engine reads `latents`/`text_embeds` and
    writes `velocity`: the runtime allocates the shared buffers from them (the timestep table is
    always float32, the mask int64).
    """

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    device: torch.device
    dtype: torch.dtype

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Remember the tensors to read and write; called once per buffer set, never per step."""

    def run(self, step: int) -> None:
        """Compute `velocity` from the bound inputs, reading timestep row `step`; no allocation of I/O."""


def check_bindings(engine_name: str, names: tuple[str, ...], tensors: Mapping[str, torch.Tensor]) -> None:
    missing = [n for n in names if n not in tensors]
    if missing:
        raise FlowblendError(f"engine {engine_name!r} needs buffers {missing}; the runtime offered {sorted(tensors)}")
