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
                 dtype: str = "fp32", artifacts: str = "artifacts", compile_mode: str | None = None
                 ) -> dict[str, Engine]:
    """{'large': engine, 'small': engine} for `backend`; FlowblendError with the fix if it cannot run here."""
    kind = engine_kind(backend)
    if kind.runs_transformers:
        return _torch_engines(pair, device, torch_dtype(dtype), kind.compiled, compile_mode)
    from .build import locate_pair_engines

    spec = pair.family.io_spec(latent_shape, guidance, dtype)
    paths = locate_pair_engines(pair.family.name, backend, spec, artifacts)  # says what to export/build/install
    return kind.load_function()(paths, device)


def _torch_engines(pair: LoadedModels, device, dtype, compiled: bool, compile_mode: str | None) -> dict:
    import torch

    from .signature import signature_for
    from .torch_engine import TorchEngine

    if not compiled:
        return {name: TorchEngine(m, device=device, dtype=dtype, name=name) for name, m in pair.transformers.items()}
    kwargs = {"mode": compile_mode} if compile_mode else {}
    engines = {}
    for name, m in pair.transformers.items():
        module = signature_for(m).to(device=device, dtype=dtype)
        engines[name] = TorchEngine(torch.compile(module, **kwargs), name=name)
    return engines
