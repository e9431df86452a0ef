"""Engines for a loaded pair by backend name: the only place the CLI chooses a backend."""
from __future__ import annotations

import torch

from flowblend.engines.base import FlowblendError
from flowblend.engines.torch_engine import TorchEngine

BACKENDS = ("torch", "onnxruntime", "tensorrt")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise FlowblendError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}") from None


def torch_engines(pair, device, dtype, **signature_kwargs) -> dict:
    return {name: TorchEngine(m, device=device, dtype=dtype, name=name, **signature_kwargs)
            for name, m in pair.transformers.items()}


def make_engines(backend: str, pair, device, dtype, **kwargs) -> dict:
    """Engines named 'large' and 'small' for `backend`; raises FlowblendError with the fix if unavailable."""
    if backend == "torch":
        return torch_engines(pair, device, dtype)
    if backend not in BACKENDS:
        raise FlowblendError(f"unknown backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    raise FlowblendError(f"backend {backend!r} is not wired into `generate` yet")
