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
