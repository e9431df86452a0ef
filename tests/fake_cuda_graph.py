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
- A host sync while capturing (`.item()`, `nonzero`, ...) fails the capture, as
  cudaErrorStreamCaptureUnsupported does.
- One deviation, on purpose: the recorded work also runs while capturing (a real capture runs
  nothing). GraphRunner never uses capture-time results: it loads the request after capturing.
"""
from __future__ import annotations

from torch.utils._python_dispatch import TorchDispatchMode

from flowblend.engines.streams import new_stream, use_stream

CAPTURING: dict[int, "FakeGraph"] = {}  # stream handle -> the graph being recorded on it
SYNC_OPS = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "equal", "unique", "masked_select")


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


class _OpRecorder(TorchDispatchMode):
    def __init__(self, graph: FakeGraph):
        super().__init__()
        self.graph = graph

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.__name__.split(".")[0]
        if name in SYNC_OPS:
            raise RuntimeError(f"cudaErrorStreamCaptureUnsupported: {func} syncs with the host while capturing")
        out = func(*args, **kwargs)
        if func.is_view:
            return out  # aliases memory that is already recorded
        if any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments):
            self.graph.record(lambda: func(*args, **kwargs))
        else:
            self.graph.record(lambda: _copy_into(out, func(*args, **kwargs)))
        return out


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
        stream_scope, recorder = use_stream(self.stream, "cpu"), _OpRecorder(graph)
        stream_scope.__enter__()
        recorder.__enter__()
        self._scopes = [recorder, stream_scope]
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
