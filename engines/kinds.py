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
    # A precision that quantizes parts of a PyTorch model (FP8): the function that makes an engine's copy
    # ("module:function(transformer, device, keep_blocks) -> transformer"); `torch_name` is then the
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
        return _resolve(self.quantizer)


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
    precisions: tuple[str, ...] = EXPORT_PRECISIONS
    install_hint: str = ""
    # PyTorch kinds: the compile option (engines/compile.py) when none is asked for, on a CPU and on CUDA.
    default_compile: tuple[str, str] = ("none", "none")

    def compile_for(self, device: str, requested: str | None) -> str:
        """The compile option an engine of this kind runs with on `device`."""
        if requested is not None:
            return requested
        return self.default_compile[1] if str(device).startswith("cuda") else self.default_compile[0]

    def build_function(self) -> Callable:
        return _resolve(self.builder)

    def load_function(self) -> Callable:
        return _resolve(self.loader)


ENGINE_KINDS: dict[str, EngineKind] = {k.name: k for k in (
    # Regional compile is the default on CUDA: each repeated block compiled once (16.5 s first call at
    # Wan 14B on the H200, 5.44 s per step against 6.35 s eager); on the CPU compiling costs more than it saves.
    EngineKind("torch", runs_transformers=True, precisions=tuple(PRECISIONS), default_compile=("none", "regional")),
    EngineKind("torch-compile", runs_transformers=True, compiled=True, precisions=tuple(PRECISIONS),
               default_compile=("whole", "whole")),
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


def check_kind_precision(kind: EngineKind, name: str) -> Precision:
    """The precision, if engines of `kind` can run in it; else FlowblendError naming the kinds that can."""
    found = precision(name)
    if name not in kind.precisions:
        takers = [k for k, v in ENGINE_KINDS.items() if name in v.precisions]
        raise FlowblendError(f"--backend {kind.name} takes --dtype {' | '.join(kind.precisions)}, not {name}: "
                             f"{name} runs with --backend {' or '.join(takers)}")
    return found


def precision(name: str) -> Precision:
    """The precision called `name`, or FlowblendError listing them."""
    if name not in PRECISIONS:
        raise FlowblendError(f"unknown dtype {name!r}: choose one of {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def _resolve(dotted: str | None) -> Callable:
    assert dotted, "an engine kind that runs the PyTorch modules has no build or load function"
    module, _, attr = dotted.partition(":")
    return getattr(importlib.import_module(module), attr)
