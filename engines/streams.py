"""The stream engine work is enqueued on: a dedicated, non-default CUDA stream, graph or not.

TensorRT's execute_async_v3 / enqueueV3 documentation: "Using default stream may lead to performance
issues due to additional cudaDeviceSynchronize() calls by TensorRT to ensure correct synchronizations.
Please use non-default stream instead." (python/docstrings/infer/pyCoreDoc.h, NvInferRuntime.h).
The sampler runs its loop inside `use_stream(new_stream(device), device)`; a graph capture runs on
its own side stream. On a CPU device there is no stream: a host token with a non-zero handle stands
in, so that the TensorRT stand-in (tests/fake_tensorrt.py) can check the runtime chose a stream
other than the legacy default one (handle 0).
"""
from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass

import torch

DEFAULT_STREAM = 0  # cudaStreamLegacy's handle as torch reports it for the default stream
_tokens = itertools.count(1)


class _HostStack(threading.local):
    """Per thread: the handles of the host streams made current with `use_stream`, innermost last."""

    def __init__(self):
        self.stack: list[int] = []


_host = _HostStack()


@dataclass(frozen=True)
class HostStream:
    """A CPU stand-in for a CUDA stream: only its handle, which is never the default one."""

    cuda_stream: int


def new_stream(device: torch.device):
    """A fresh non-default stream of `device` (a HostStream token on CPU)."""
    device = torch.device(device)
    return torch.cuda.Stream(device) if device.type == "cuda" else HostStream(0x5000 + next(_tokens))


def current_stream_handle(device: torch.device) -> int:
    """The handle engine work on `device` is enqueued on right now (torch's current stream)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    stack = _host.stack
    return stack[-1] if stack else DEFAULT_STREAM


@contextlib.contextmanager
def use_stream(stream, device: torch.device):
    """Make `stream` current for work on `device`, ordered after what was queued before and before what follows."""
    device = torch.device(device)
    if device.type == "cuda":
        current = torch.cuda.current_stream(device)
        stream.wait_stream(current)
        try:
            with torch.cuda.stream(stream):
                yield stream
        finally:
            current.wait_stream(stream)
        return
    stack = _host.stack
    stack.append(stream.cuda_stream)
    try:
        yield stream
    finally:
        stack.pop()
