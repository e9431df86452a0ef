"""A stand-in for CUDA stream capture and graph replay on CPU. NOT CUDA.

What it enforces is the documented contract of the thing it replaces (CUDA programming guide,
"CUDA Graphs / stream capture"; torch.cuda.CUDAGraph): a graph replays exactly the work that was
issued to the capturing stream, with the arguments that work had at capture time, into the same
memory. Python does not run again on replay, so anything Python decided while capturing (a
pointer, a scalar, which branch to take) is frozen into the graph: here too.

- Every aten op run while capturing is recorded with its tensor arguments (by reference). Replay
  re-issues those ops: in-place/out= ops write into the same tensors again, ops that returned a
  fresh tensor write into the tensor they returned at capture; views are metadata only.
- The TensorRT stand-in (tests/fake_tensorrt.py) records an enqueue on a capturing stream as a
  closure over the addresses and shapes its context had at that moment.
- A host sync while capturing fails the capture, as cudaErrorStreamCaptureUnsupported does. The
  PyTorch docs ("CUDA Graphs", constraints: "Capture must not ... synchronize the CPU with the GPU
  (e.g., calling .item())", "dynamic shapes ... are prohibited") and NVIDIA's PyTorch CUDA-graph
  checklist ("No blocking GPU->CPU transfers: .item(), .cpu(), .numpy(), print(tensor)"; "No
  data-dependent control flow") name what that covers. Every tensor here stands in for a device
  tensor, so refused are: at the Python level (a TorchFunctionMode) `tolist`, `numpy`, `cpu`,
  `.to("cpu")`, `repr/str/format`, `bool/int/float`, `allclose/equal`; at the aten level the
  scalar reads (`_local_scalar_dense`, `nonzero`, `unique`, ...) and ops whose output shape
  depends on tensor values (boolean-mask `index`/`index_put`, `repeat_interleave` with tensor
  repeats and no `output_size`).
- Capture is per stream: only work issued to the capturing stream is recorded (work on another
  stream runs and is not replayed, as a stream not joined into the capture); work on the legacy
  default stream while a capture runs fails, as cudaErrorStreamCaptureImplicit does in the
  default "global" capture mode (torch.cuda.graph's capture_error_mode).
- One deviation, on purpose: the recorded work also runs while capturing (a real capture runs
  nothing). GraphRunner never uses capture-time results: it loads the request after capturing.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from flowblend.engines.streams import DEFAULT_STREAM, current_stream_handle, new_stream, use_stream

CAPTURING: dict[int, "FakeGraph"] = {}  # stream handle -> the graph being recorded on it
SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "unique", "masked_select", "allclose",
            "_unique2", "unique_consecutive", "unique_dim", "bincount", "histc")
# Tensor methods / torch functions that copy device data to the host or read it in Python
HOST_READS = {"tolist", "numpy", "cpu", "item", "__repr__", "__str__", "__format__", "__bool__", "__int__",
              "__float__", "__index__", "allclose", "equal", "nonzero", "unique"}


class CaptureUnsupported(RuntimeError):
    """What CUDA reports for work a stream capture cannot record (cudaErrorStreamCaptureUnsupported)."""


def _names_the_host(args, kwargs) -> bool:
    """`.to("cpu")` with the host named in the code. A torch.device is the run's device (cpu only in these
    tests: `.to(temb.device)` moves nothing on a GPU), so only a literal "cpu" string counts."""
    places = [kwargs.get("device")] + list(args)
    return any(isinstance(p, str) and torch.device(p).type == "cpu" for p in places)


def python_level_sync(func, args, kwargs) -> str | None:
    """Why a torch function / Tensor method call reads device data on the host, or None."""
    name = getattr(func, "__name__", "")
    if name in HOST_READS or (name == "to" and _names_the_host(args[1:], kwargs)):
        return f"Tensor.{name}"
    return None


def aten_level_sync(func, args, kwargs) -> str | None:
    """Why an aten op needs a device value on the host (a scalar read or a data-dependent shape), or None."""
    name = func.__name__.split(".")[0]
    if name in SYNC_OPS:
        return str(func)
    if name in ("index", "index_put", "index_put_", "_index_put_impl_") and len(args) > 1:
        if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] or ()):
            return f"{func} with a boolean mask (its output shape is the mask's count)"
    if name == "repeat_interleave" and isinstance(args[0], torch.Tensor) and func._overloadname != "self_int" \
            and kwargs.get("output_size") is None:
        return f"{func} with tensor repeats and no output_size (its output shape is their sum)"
    return None


class FakeGraph:
    def __init__(self, pool=None):
        self.ops: list = []
        self.pool = pool

    def record(self, op) -> None:
        self.ops.append(op)

    def replay(self) -> None:
        for op in self.ops:
            op()


def recording(stream_handle: int) -> FakeGraph | None:
    """The graph a stream is capturing into, or None."""
    return CAPTURING.get(stream_handle)


def _copy_into(captured, fresh) -> None:
    if isinstance(captured, (list, tuple)):
        for c, f in zip(captured, fresh):
            _copy_into(c, f)
    elif hasattr(captured, "copy_") and hasattr(fresh, "shape"):
        captured.copy_(fresh)


class _HostReadGuard(TorchFunctionMode):
    """Python-level reads of device data (tolist, numpy, repr, .cpu()): `on_sync(reason)` raises or records."""

    def __init__(self, on_sync):
        super().__init__()
        self.on_sync = on_sync

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = python_level_sync(func, args, kwargs)
        if reason:
            self.on_sync(reason)
        return func(*args, **kwargs)


def _refuse(reason):
    raise CaptureUnsupported(f"cudaErrorStreamCaptureUnsupported: {reason} syncs with the host while capturing")


class _OpRecorder(TorchDispatchMode):
    """Records each aten op issued to a capturing stream into that stream's graph."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        reason = aten_level_sync(func, args, kwargs)
        if reason:
            _refuse(reason)
        handle = current_stream_handle("cpu")
        graph = CAPTURING.get(handle)
        if graph is None and handle == DEFAULT_STREAM:
            raise CaptureUnsupported(f"cudaErrorStreamCaptureImplicit: {func} on the legacy default stream while "
                                     "a stream is capturing")
        out = func(*args, **kwargs)
        if graph is None or func.is_view:
            return out  # another stream's work is not in the graph; a view aliases memory already recorded
        if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
            graph.record(lambda: func(*args, **kwargs))
        else:
            graph.record(lambda: _copy_into(out, func(*args, **kwargs)))
        return out


@contextlib.contextmanager
def watch_host_syncs():
    """Collects (instead of refusing) every host sync the capture would refuse: a list of reasons."""
    seen: list[str] = []

    class _Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            reason = aten_level_sync(func, args, kwargs)
            if reason:
                seen.append(reason)
            return func(*args, **kwargs)

    with _HostReadGuard(seen.append), _Watch():
        yield seen


class FakeGraphBackend:
    """GraphRunner's backend on CPU: capture records, replay re-issues only what was recorded."""

    def __init__(self, fail_end=False):
        self.events, self.capturing, self.fail_end = [], False, fail_end
        self.stream = new_stream("cpu")
        self.pool = object()  # one memory pool for every graph of the runner, as TorchGraphBackend
        self._scopes = []

    def warm_up(self, fn):
        self.events.append("warm_up")
        with use_stream(self.stream, "cpu"):
            fn()

    def begin_capture(self, body=None):
        assert not self.capturing, "captures must not nest"
        self.events.append("begin")
        self.capturing = True
        graph = FakeGraph(pool=self.pool)
        CAPTURING[self.stream.cuda_stream] = graph
        scopes = [use_stream(self.stream, "cpu"), _HostReadGuard(_refuse), _OpRecorder()]
        for scope in scopes:
            scope.__enter__()
        self._scopes = scopes[::-1]
        return graph

    def end_capture(self, graph):
        self.events.append("end")
        for scope in self._scopes:
            scope.__exit__(None, None, None)
        self._scopes = []
        CAPTURING.pop(self.stream.cuda_stream, None)
        self.capturing = False
        if self.fail_end:
            raise RuntimeError("operation not permitted when stream is capturing (capture invalidated)")

    def is_capturing(self):
        return self.capturing

    def discard_stream(self):
        assert not self.capturing, "a stream is discarded only after its capture ended"
        self.events.append("discard_stream")
        self.stream = new_stream("cpu")

    def replay(self, graph):
        self.events.append("replay")
        with use_stream(self.stream, "cpu"):
            graph.replay()
