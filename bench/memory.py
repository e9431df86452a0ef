"""Peak memory of a run: resident set size on CPU, the caching allocator's peaks on CUDA.

CPU: Linux keeps the process's peak RSS in /proc/self/status (VmHWM) and resets it to the current
RSS when "5" is written to /proc/self/clear_refs, so a peak can be taken per measured region
without a helper package. Where the reset is refused (not Linux, restricted /proc), the peak is
the lifetime one from resource.getrusage and `resettable` says so in the report.
"""
from __future__ import annotations

import resource
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_bytes() -> int:
    """Resident set size now (0 where /proc is unavailable)."""
    kib = _status_kib("VmRSS")
    return 1024 * kib if kib is not None else 0


def reset_peak_rss() -> bool:
    """Restart the peak-RSS watermark at the current RSS; False if the OS does not allow it."""
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (or the process start)."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return 1024 * kib
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else 1024 * peak  # bytes on macOS, KiB on Linux


@dataclass
class PeakMemory:
    """Context manager measuring the peak of a region: RSS on CPU, allocated/reserved on CUDA.

    `rss_start`/`allocated_start` are what was in use when the region began, so `peak - start`
    is what the region itself added at its worst moment.
    """

    device: torch.device
    rss_start: int = 0
    rss_peak: int = 0
    resettable: bool = False
    allocated_start: int = 0
    allocated_peak: int = 0
    reserved_peak: int = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.allocated_start = torch.cuda.memory_allocated(self.device)
        self.resettable = reset_peak_rss()
        self.rss_start = current_rss_bytes()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.allocated_peak = torch.cuda.max_memory_allocated(self.device)
            self.reserved_peak = torch.cuda.max_memory_reserved(self.device)
        self.rss_peak = peak_rss_bytes()

    @property
    def added(self) -> int:
        """Bytes the region added at its peak: CUDA allocations on GPU, RSS on CPU."""
        if self.device.type == "cuda":
            return self.allocated_peak - self.allocated_start
        return max(0, self.rss_peak - self.rss_start)

    def to_dict(self) -> dict:
        out = {"rss_start_bytes": self.rss_start, "rss_peak_bytes": self.rss_peak, "rss_peak_resettable": self.resettable}
        if self.device.type == "cuda":
            out.update(allocated_start_bytes=self.allocated_start, max_allocated_bytes=self.allocated_peak,
                       max_reserved_bytes=self.reserved_peak)
        return out


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (its weights), each storage counted once."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def tensors_bytes(tensors) -> int:
    """Bytes of distinct storages among `tensors` (views and aliases count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


class LiveTensorBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created inside the region and alive at the same time.

    The CPU allocator keeps no statistics (CUDA's does: use PeakMemory there), and RSS keeps memory
    the allocator has cached, so on CPU this is how activations are measured: every op's outputs
    are seen at the dispatcher, new storages are counted until they are freed (a weakref
    finalizer). Storages that an op received as input (weights, the runtime's buffers, in-place
    and out= targets) are never counted. Buffers private to one kernel (workspaces) are not seen.
    """

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._live: dict[int, int] = {}
        self._known: set[int] = set()

    def _free(self, key: int, nbytes: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in tree_leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                key = t.untyped_storage().data_ptr()
                if key not in self._live:
                    self._known.add(key)
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._live and key not in self._known:
                    nbytes = storage.nbytes()
                    self._live[key] = nbytes
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                    weakref.finalize(storage, self._free, key, nbytes)
        return out


MIB = 2**20


def blas_workspace_bytes(capability: tuple[int, int] | None, environ=None) -> int:
    """The cuBLAS + cuBLASLt workspace PyTorch allocates, through its caching allocator, for each
    (handle, stream) pair the first time that stream runs a matmul; it stays allocated.

    PyTorch's aten/src/ATen/cuda/CublasHandlePool.cpp (parseChosenWorkspaceSize): CUBLAS_WORKSPACE_CONFIG
    (":SIZE_KiB:COUNT" terms) or, by default, :4096:8 = 32 MiB on compute capability 9.0 and
    :4096:2:16:8 (8 MiB + 128 KiB) elsewhere; cuBLASLt's own is CUBLASLT_WORKSPACE_SIZE KiB (default
    1024). The H200 run of 2026-12-04 showed exactly 33.0 MiB (32 + 1) more in the blended loop, on
    its own stream, than in the large model's forward on the default stream. None (CPU): 0.
    """
    import os
    import re

    if capability is None:
        return 0
    environ = os.environ if environ is None else environ
    config = environ.get("CUBLAS_WORKSPACE_CONFIG")
    terms = re.findall(r":(\d+):(\d+)", config or "")
    if terms:
        cublas = sum(int(size) * 1024 * int(count) for size, count in terms)
    else:
        cublas = 4096 * 8 * 1024 if tuple(capability) == (9, 0) else 4096 * 1024 * 2 + 16 * 1024 * 8
    try:
        lt_kib = int(environ.get("CUBLASLT_WORKSPACE_SIZE", "1024"))
    except ValueError:
        lt_kib = 1024
    return cublas + lt_kib * 1024


@dataclass(frozen=True)
class MemoryBound:
    """What the blended run may hold at its peak, term by term (each named in the report).

    `held_before` is what was allocated when the measurement began beyond the models' weights and
    constants (the caller's request tensors, the workspaces of streams that already ran); `stream
    workspaces` are those of the streams the loop runs on for the first time (blas_workspace_bytes);
    `cache_residuals` the residual buffers of models with cached steps (engines/step_cache.py: one per
    model at its CFG batch, tokens x block width).
    """

    weights: int
    engine_constants: int
    shared_buffers: int
    activations: int
    held_before: int = 0
    stream_workspaces: int = 0
    cache_residuals: int = 0

    @property
    def total(self) -> int:
        return (self.weights + self.engine_constants + self.shared_buffers + self.activations + self.held_before
                + self.stream_workspaces + self.cache_residuals)
