"""The one interface every backend (PyTorch, ONNX Runtime, TensorRT) offers the runtime.

An engine is bound ONCE to named, preallocated tensors and then run per step. The runtime owns the
buffers; both engines of a pair are bound to the same ones, so a step only chooses which engine
runs. Binding contract (names are also the ONNX graph's input/output names), every buffer starting at a
256-byte-aligned address (`aligned_zeros`; TensorRT's `setTensorAddress`: "The pointer must have at
least 256-byte alignment", NvInferRuntime.h):

- `latents`     [B, C, F, H, W] model input (B = 2 with CFG: row 0 conditional, row 1 unconditional)
- `timestep`    [steps, B] float32 table; `run(step)` reads row `step` (a compiled engine copies that
                row into its own fixed [B] input on the stream: rows are 4*B bytes apart, and TensorRT
                takes only 256-byte-aligned addresses that a captured graph can keep)
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
ADDRESS_ALIGNMENT = 256  # bytes; IExecutionContext::setTensorAddress requires it (NvInferRuntime.h, TensorRT 10/11)


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


def aligned_zeros(shape, dtype: torch.dtype, device: torch.device | str,
                  alignment: int = ADDRESS_ALIGNMENT) -> torch.Tensor:
    """A zeroed contiguous tensor whose first byte sits at a multiple of `alignment` bytes.

    The CUDA caching allocator already returns 512-byte-aligned blocks; the CPU allocator only 64,
    so on CPU (where the TensorRT stand-in checks the rule) the tensor is a view at an offset into
    a slightly larger byte buffer.
    """
    numel = 1
    for d in shape:
        numel *= int(d)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    raw = torch.zeros(nbytes + alignment, dtype=torch.uint8, device=device)
    offset = (-raw.data_ptr()) % alignment
    return raw[offset:offset + nbytes].view(dtype).view(tuple(int(d) for d in shape))
