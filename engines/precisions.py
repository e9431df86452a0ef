"""The precisions: fp32 / fp16 / bf16 / fp8, as every layer spells them (the table engines/kinds.py re-exports).

A precision says its torch dtype, ONNX and TensorRT types, whether FP32 islands are kept, the cosine an
export must reach against PyTorch and what to try when it does not. Apart from the engine kinds so that
the modules a kind names (iospec, the builders) can read it without importing the kinds back.
Imports no torch at module level.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from flowblend.errors import FlowblendError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Precision:
    """One precision of weights and activations, as every layer spells it."""

    name: str  # the flag value and the artifact keys' spelling
    torch_name: str  # attribute of the torch module
    onnx_type: str  # onnx.TensorProto's name of the element type
    tensorrt_type: str  # tensorrt.DataType's name
    fp32_islands: bool  # norms, modulation, timestep embedding and RoPE stay FP32 (export/precision.py)
    min_cosine: float  # verification against PyTorch FP32 (export/verify.py); NaN/Inf always fails
    remedy: str  # what to try when an export or engine falls below `min_cosine`
    label: str  # how reports name it
    # How ONNX Runtime's CPU provider checks a graph of this precision: "session" (as it runs),
    # "unoptimized" (graph optimizations off: its FP16 fusions drift), "reference" (onnx's reference
    # evaluator: the CPU provider has no kernels for it).
    onnxruntime_cpu: str = "session"
    # A precision that quantizes parts of a PyTorch model (FP8): the function that makes an engine's copy
    # ("module:function(transformer, device, keep_blocks, keep_original=False) -> transformer", in place unless
    # keep_original); `torch_name` is then the
    # precision of everything it leaves alone. Such a precision is never exported to ONNX.
    quantizer: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)

    @property
    def exportable(self) -> bool:
        """Whether ONNX graphs and built engines are made in this precision (fp32/fp16/bf16, not FP8)."""
        return self.quantizer is None

    def quantize_function(self) -> Callable:
        return resolve_function(self.quantizer)


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", "FLOAT", "FLOAT", False, 0.99999,
              "the graph itself is wrong: report it with the summary above", "FP32"),
    Precision("fp16", "float16", "FLOAT16", "HALF", True, 0.999,
              "FP16 keeps the residual stream, norms, modulation and RoPE in FP32 already; try --dtype bf16 "
              "(FP32 range) or fp32", "FP16", "unoptimized"),
    Precision("bf16", "bfloat16", "BFLOAT16", "BF16", True, 0.999, "try --dtype fp32", "BF16", "reference"),
    # The blocks' attention and FFN linears in FP8 e4m3 (torchao on compute capability >= 8.9; an exact
    # emulation on the CPU), everything else BF16: engines/fp8.py.
    Precision("fp8", "bfloat16", "FLOAT8E4M3FN", "FP8", True, 0.99,
              "keep the first and last blocks in BF16 (--fp8-keep-blocks N) or use --dtype bf16",
              "FP8 (e4m3 block linears, BF16 elsewhere)", "reference", quantizer="flowblend.engines.fp8:fp8_for_engine"),
)}
EXPORT_PRECISIONS = tuple(name for name, p in PRECISIONS.items() if p.exportable)


def precision(name: str) -> Precision:
    """The precision called `name`, or FlowblendError listing them."""
    if name not in PRECISIONS:
        raise FlowblendError(f"unknown dtype {name!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def resolve_function(dotted: str | None) -> Callable:
    """The function a "module:attr" string names, imported on first use."""
    assert dotted, "an engine kind that runs the PyTorch modules has no build or load function"
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)
