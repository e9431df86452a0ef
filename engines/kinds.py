"""The engine kinds and the precisions (engines/precisions.py, re-exported here): the one place either is named.

An engine kind says what it loads (the PyTorch transformers, or a built engine file from the store),
how its engines are built and loaded (functions named by module, imported only when used, so a
command line can offer the kinds without importing a backend), which precisions it takes and what
to install when its backend is missing. A precision says its torch dtype, ONNX and TensorRT types,
whether FP32 islands are kept, the cosine an export must reach against PyTorch and what to try when
it does not. Adding an engine kind is one `EngineKind` entry plus its module; adding a precision
(FP8) one `Precision` entry plus its quantizer module. Imports no torch at module level.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from flowblend.errors import FlowblendError

from .install_hints import TRT_INSTALL_HINT
from .precisions import EXPORT_PRECISIONS, PRECISIONS, Precision, precision, resolve_function

if TYPE_CHECKING:
    pass



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
        return resolve_function(self.builder)

    def load_function(self) -> Callable:
        return resolve_function(self.loader)


ENGINE_KINDS: dict[str, EngineKind] = {k.name: k for k in (
    # Regional compile is the default on CUDA: each repeated block compiled once (16.5 s first call at
    # Wan 14B on the H200, 5.44 s per step against 6.35 s eager); on the CPU compiling costs more than it saves.
    EngineKind("torch", runs_transformers=True, precisions=tuple(PRECISIONS), default_compile=("none", "regional")),
    EngineKind("torch-compile", runs_transformers=True, compiled=True, precisions=tuple(PRECISIONS),
               default_compile=("whole", "whole")),
    EngineKind("onnxruntime", runs_transformers=False, store_suffix="onnx",
               builder="flowblend.engines.ort_engine:build_onnxruntime_engine",
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


__all__ = ["BUILT_KINDS", "ENGINE_KINDS", "EXPORT_PRECISIONS", "PRECISIONS", "REFERENCE_KIND", "TRT_INSTALL_HINT",
           "EngineKind", "Precision", "built_kind", "check_kind_precision", "engine_kind", "precision"]
