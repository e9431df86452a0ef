"""The engine kinds and the precisions: two tables, the one place either is named.

An engine kind says what it loads (the PyTorch transformers, or a built engine file from the store),
how its engines are built and loaded (functions named by module, imported only when used, so a
command line can offer the kinds without importing a backend), which precisions it takes and what
to install when its backend is missing. A precision says its torch dtype, ONNX and TensorRT types,
whether FP32 islands are kept, the cosine an export must reach against PyTorch and what to try when
it does not. Adding an engine kind is one `EngineKind` entry plus its module; adding a precision
(FP8) one `Precision` entry plus its quantizer module. Imports no torch at module level.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from flowblend.errors import FlowblendError

if TYPE_CHECKING:
    import torch

TRT_INSTALL_HINT = ("install the extra on a machine with an NVIDIA GPU and driver: pip install 'flowblend[trt]' "
                    "(tensorrt>=10.1 and cuda-python); or use --backend onnxruntime")


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

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.torch_name)


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", "FLOAT", "FLOAT", False, 0.99999,
              "the graph itself is wrong: report it with the summary above", "FP32"),
    Precision("fp16", "float16", "FLOAT16", "HALF", True, 0.999,
              "FP16 keeps the residual stream, norms, modulation and RoPE in FP32 already; try --dtype bf16 "
              "(FP32 range) or fp32", "FP16", "unoptimized"),
    Precision("bf16", "bfloat16", "BFLOAT16", "BF16", True, 0.999, "try --dtype fp32", "BF16", "reference"),
)}


@dataclass(frozen=True)
class EngineKind:
    """One backend: what it runs, where its engine files come from, how they are built and loaded."""

    name: str
    runs_transformers: bool  # True: engines over the loaded PyTorch modules; False: built engine files
    compiled: bool = False  # torch.compile over the PyTorch modules
    store_suffix: str | None = None  # the built engine's file suffix in the engine store
    keyed_by_gpu: bool = False  # its engines are valid for one GPU type and library version only
    needs_cuda: bool = False
    builder: str | None = None  # "module:function(onnx_path, spec, out_path, **options)"
    loader: str | None = None  # "module:function(paths by model, device) -> engines by model"
    precisions: tuple[str, ...] = tuple(PRECISIONS)
    install_hint: str = ""

    def build_function(self) -> Callable:
        return _resolve(self.builder)

    def load_function(self) -> Callable:
        return _resolve(self.loader)


ENGINE_KINDS: dict[str, EngineKind] = {k.name: k for k in (
    EngineKind("torch", runs_transformers=True),
    EngineKind("torch-compile", runs_transformers=True, compiled=True),
    EngineKind("onnxruntime", runs_transformers=False, store_suffix="onnx",
               builder="flowblend.engines.build:build_onnxruntime_engine",
               loader="flowblend.engines.ort_engine:load_engines",
               install_hint="pip install onnxruntime (onnxruntime-gpu for CUDA)"),
    EngineKind("tensorrt", runs_transformers=False, store_suffix="plan", keyed_by_gpu=True, needs_cuda=True,
               builder="flowblend.engines.trt_build:build_plan_file",
               loader="flowblend.engines.trt_engine:load_engines", install_hint=TRT_INSTALL_HINT),
)}
REFERENCE_KIND = "torch"  # eager PyTorch: what every other kind is measured and verified against
BUILT_KINDS = tuple(name for name, k in ENGINE_KINDS.items() if not k.runs_transformers)


def engine_kind(name: str) -> EngineKind:
    """The kind called `name`, or FlowblendError listing them."""
    if name not in ENGINE_KINDS:
        raise FlowblendError(f"unknown backend {name!r}: choose one of {', '.join(ENGINE_KINDS)}")
    return ENGINE_KINDS[name]


def built_kind(name: str) -> EngineKind:
    """A kind whose engines are built into the store (onnxruntime, tensorrt), or FlowblendError listing them."""
    kind = engine_kind(name) if name in ENGINE_KINDS else None
    if kind is None or kind.runs_transformers:
        raise FlowblendError(f"unknown backend {name!r}: choose one of {', '.join(BUILT_KINDS)}")
    return kind


def precision(name: str) -> Precision:
    """The precision called `name`, or FlowblendError listing them."""
    if name not in PRECISIONS:
        raise FlowblendError(f"unknown dtype {name!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def _resolve(dotted: str | None) -> Callable:
    assert dotted, "an engine kind that runs the PyTorch modules has no build or load function"
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)
