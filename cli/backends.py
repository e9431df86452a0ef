"""Engines for a loaded pair by backend name: the only place the CLI chooses a backend."""
from __future__ import annotations

import torch

from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError

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
    from flowblend.engines.build import locate_pair_engines

    spec = pair.family.io_spec(kwargs["latent_shape"], kwargs["guidance"], dtype)
    paths = locate_pair_engines(pair.family.name, backend, spec, kwargs["args"].artifacts)
    if backend == "onnxruntime":
        from flowblend.engines.ort_engine import OrtEngine

        return {name: OrtEngine(path, device=device, name=name) for name, path in paths.items()}
    if not str(device).startswith("cuda"):
        raise FlowblendError(f"TensorRT engines run on a CUDA device, not {device!r}: pass --device cuda")
    from flowblend.engines.trt_engine import TrtEngine, share_activation_memory

    engines = {name: TrtEngine(path, name=name, device=device) for name, path in paths.items()}
    share_activation_memory(engines)  # one activation block for both: they never run at the same time
    return engines

