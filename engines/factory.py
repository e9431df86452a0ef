"""Engines 'large' and 'small' of a loaded pair, by backend name: the one place a backend is chosen.

`flowblend generate`, `flowblend bench` and the server all call `make_engines` with plain values
(backend, device, dtype name, artifacts folder, latent shape, guidance); it never sees argparse.
Compiled backends (onnxruntime, tensorrt) load what `flowblend export` and `flowblend build` left
in the engine store, and say what to run when nothing matches; the benchmark exports and builds
first (bench/run.py). Imports torch and the backends only when called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Protocol

if TYPE_CHECKING:
    import torch

    from .base import Engine
    from .iospec import IOSpec

from .kinds import ENGINE_KINDS, PRECISIONS, engine_kind, precision

BACKENDS = tuple(ENGINE_KINDS)  # engines/kinds.py: the table of engine kinds
TORCH_BACKENDS = tuple(n for n, k in ENGINE_KINDS.items() if k.runs_transformers)  # the others run built engines
DTYPE_NAMES = tuple(PRECISIONS)


class PairFamilyShape(Protocol):
    """What the factory reads of a family (families.PairFamily) to find compiled engines."""

    name: str

    def io_spec(self, latent_shape, guidance: float, dtype: str = "fp32", dynamic: dict | None = None) -> IOSpec: ...


class LoadedModels(Protocol):
    """A loaded pair as the factory uses it (families.LoadedPair)."""

    family: PairFamilyShape
    transformers: Mapping[str, torch.nn.Module]


def check_backend(backend: str) -> str:
    return engine_kind(backend).name


def check_dtype(name: str) -> str:
    return precision(name).name


def torch_dtype(name: str) -> torch.dtype:
    """A precision name ('fp32', 'fp16', 'bf16') -> the torch dtype."""
    return precision(name).torch_dtype


def make_engines(backend: str, pair: LoadedModels, *, latent_shape, guidance: float, device: str = "cpu",
                 dtype: str = "fp32", artifacts: str = "artifacts", compile_mode: str | None = None,
                 compile: str | None = None, attention: str = "auto", fp8_keep_blocks: int = 0,
                 cfg: str = "batched", parallel: str = "1x1", parallel_timeout: float = 300.0,
                 keep_originals: bool = False, split_constants: bool = True) -> dict[str, Engine]:
    """{'large': engine, 'small': engine} for `backend`; FlowblendError with the fix if it cannot run here.

    A quantizing precision (FP8) replaces the pair's weights it quantizes, unless `keep_originals` (a
    caller that compares against them: bench, a pipeline's own transformers) asks for a copy.
    `split_constants=False` (PyTorch kinds): engines run each module's whole forward every step instead of
    computing the schedule constants once per binding; the cost model times the two against a bare loop.
    `parallel` (engines/parallel_layout.py): joins torchrun's world and splits each forward over it."""
    kind = engine_kind(backend)
    if kind.runs_transformers:
        engines = _torch_engines(pair, device, precision(dtype), kind.compile_for(device, compile), compile_mode,
                                 attention, fp8_keep_blocks, keep_originals, cfg, split_constants, parallel,
                                 parallel_timeout)
        return engines
    from .build import locate_pair_engines

    spec = pair.family.io_spec(latent_shape, guidance, dtype)
    paths = locate_pair_engines(pair.family.name, backend, spec, artifacts)  # says what to export/build/install
    return kind.load_function()(paths, device)


def _torch_engines(pair: LoadedModels, device, prec, compile: str, compile_mode: str | None, attention: str,
                   fp8_keep_blocks: int, keep_originals: bool, cfg: str = "batched",
                   split_constants: bool = True, parallel: str = "1x1", parallel_timeout: float = 300.0) -> dict:
    """TorchEngines over the pair's transformers: moved to the device in the precision's dtype, quantized (in
    place, or into a copy when `keep_originals`) where the precision has a quantizer (FP8), compiled as
    `compile` says (engines/compile.py)."""
    from .parallel_layout import check_heads, parse_layout
    from .torch_engine import TorchEngine

    layout = parse_layout(parallel)
    groups = None
    if not layout.is_single:  # refused before any model moves: heads first, then the launch
        check_heads(layout, {n: _heads(m) for n, m in pair.transformers.items()})
        from .parallel import CfgParallelEngine, join

        groups = join(layout, device, parallel_timeout)
    engines = {}
    for name, m in pair.transformers.items():
        model = _in_precision(m, device, prec.torch_dtype)
        if prec.quantizer:
            model = prec.quantize_function()(model, device, fp8_keep_blocks, keep_original=keep_originals)
        engine = TorchEngine(model, name=name, compile=compile, compile_mode=compile_mode, attention=attention,
                             cfg=cfg, split_constants=split_constants,
                             sequence=groups.sequence if groups is not None else None)
        engines[name] = CfgParallelEngine(engine, groups) if groups is not None and layout.cfg > 1 else engine
    return engines


def _heads(model) -> int:
    """The attention head count of a diffusers transformer (its config's num_attention_heads)."""
    return int(model.config.num_attention_heads)


def _in_precision(model, device, dtype):
    """`model` on `device` with its weights in `dtype`, cast only when its weights are in another dtype: a model
    diffusers loaded in `dtype` keeps its _keep_in_fp32_modules (Wan: time embedder, modulation, norms) in FP32
    on purpose, and a blanket .to(dtype) would cast those down in the caller's own module."""
    model = model.to(device=device)
    return model if weights_dtype(model, dtype) == dtype else model.to(dtype=dtype)


def weights_dtype(model, default: torch.dtype | None = None) -> torch.dtype | None:
    """The dtype most of `model`'s floating weights are in (`default` if it has none): the precision engines
    over it run in without a cast (assembly/run.as_loaded)."""
    from collections import Counter

    counts = Counter()
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] += p.numel()
    return counts.most_common(1)[0][0] if counts else default
