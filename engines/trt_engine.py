"""TensorRT backend: a serialized plan bound by address to the runtime's shared buffers.

Written against the TensorRT >= 10.1 Python API (name-based tensors, `execute_async_v3`,
`device_memory_size_v2`, `set_device_memory(ptr, size)`: the last two first exist in 10.1, see
NVIDIA/TensorRT "TensorRT OSS 10.1 GA Release", include/NvInferRuntime.h). Nothing here imports
tensorrt at module load, so the package works without it; the CPU tests drive this code through a
stand-in of that API that enforces its documented rules (tests/fake_tensorrt.py).

- One execution context per binding set: `bind` creates a context for a new set of buffers and
  points every I/O tensor at them ONCE; binding an old set again only selects its context. A
  context that a captured CUDA graph replays is never re-pointed or re-shaped.
- Every address is 256-byte aligned ("The pointer must have at least 256-byte alignment",
  IExecutionContext::setTensorAddress). The timestep input is a fixed [B] buffer of the context;
  `run(step)` copies row `step` of the runtime's timestep table into it on the stream (a device
  copy a CUDA graph captures), then enqueues; no address changes per step.
- Contexts are created with USER_MANAGED activation memory: engines (and contexts) that never run
  at the same time share ONE block sized to the largest need (`share_activation_memory`). So two
  samplers over the same engines must not run concurrently (they do not: one loop at a time).
- Work is enqueued on torch's current stream, which the sampler makes a dedicated one (so the
  enqueue lands in a CUDA graph while torch captures); called on the legacy default stream, an
  engine moves to a stream of its own, where TensorRT adds no device-wide syncs (engines/streams.py).
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch

from flowblend.errors import FlowblendError

from .base import ADDRESS_ALIGNMENT, LATENTS, TIMESTEP, VELOCITY, aligned_zeros, check_bindings
from .install_hints import TRT_INSTALL_HINT
from .streams import DEFAULT_STREAM, current_stream_handle, new_stream, use_stream

MIN_TENSORRT = (10, 1)  # device_memory_size_v2 and set_device_memory(ptr, size) appear in 10.1


def tensorrt_version(text: str) -> tuple[int, int]:
    numbers = [int(x) for x in re.findall(r"\d+", text)[:2]]
    return tuple(numbers + [0] * (2 - len(numbers)))


def import_tensorrt():
    """The tensorrt module (>= 10.1), or a FlowblendError saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise FlowblendError(f"TensorRT is not installed (import tensorrt failed: {exc}): {TRT_INSTALL_HINT}") from exc
    if tensorrt_version(tensorrt.__version__) < MIN_TENSORRT:
        raise FlowblendError(f"TensorRT {tensorrt.__version__} is too old: flowblend needs >= 10.1 (device_memory_size_v2 "
                             "and set_device_memory first exist there): pip install -U 'tensorrt>=10.1'")
    return tensorrt


def torch_dtype(trt, dtype) -> torch.dtype:
    """torch dtype of a tensorrt.DataType (the types a flowblend export can carry)."""
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT64: torch.int64,
             trt.DataType.INT32: torch.int32, trt.DataType.BF16: torch.bfloat16}
    if dtype not in table:
        raise FlowblendError(f"engine tensor type {dtype} is not one flowblend binds (fp32/fp16/bf16/int32/int64)")
    return table[dtype]


def _device_scope(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@dataclass
class _Binding:
    """One execution context bound, once, to one set of buffers."""

    context: object
    table: torch.Tensor            # the runtime's [steps, B] timestep table
    timestep_input: torch.Tensor   # the context's fixed [B] timestep input, 256-byte aligned
    tensors: dict                  # keeps every bound buffer alive as long as the context points at it


class TrtEngine:
    """An Engine over a TensorRT plan; give it activation memory before running (`share_activation_memory`).

    `device` is the CUDA device the plan is deserialized on and runs on (default: the current one);
    a CPU device is accepted only so the binding logic can be exercised against a stand-in.
    """

    def __init__(self, plan: str | Path | bytes, name: str = "tensorrt", device: torch.device | str | None = None):
        trt = import_tensorrt()
        if isinstance(plan, (str, Path)):
            path = Path(plan)
            if not path.is_file():
                raise FlowblendError(f"TensorRT plan {path} does not exist: run `flowblend build --backend tensorrt`")
            data, self.origin = path.read_bytes(), str(path)
        else:
            data, self.origin = bytes(plan), "<plan bytes>"
        self.trt = trt
        self.name = name
        self.device = torch.device(device if device is not None else "cuda")
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)  # must outlive the engine
        with _device_scope(self.device):
            self.engine = self._runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise FlowblendError(
                f"TensorRT could not deserialize {self.origin} (see its log above): plans only load with the "
                f"TensorRT version and GPU model they were built with (this is {trt.__version__}); rebuild: "
                "flowblend build --backend tensorrt --force")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_names = tuple(inputs)
        self.output_names = tuple(n for n in names if n not in inputs)
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.dtype = self.dtypes.get(LATENTS, self.dtypes[self.input_names[0]])  # what the sampler allocates
        self._activation = None  # (ptr, size, owner) of the block the runtime gave us
        self._bindings: dict[tuple, _Binding] = {}
        self._current: _Binding | None = None
        self._own_stream = None  # made on first use from the default stream

    # -- activation memory --------------------------------------------------------------------
    @property
    def activation_bytes(self) -> int:
        """Device memory a context needs for activations (maximum over the plan's profiles)."""
        return int(self.engine.device_memory_size_v2)

    def set_activation_memory(self, ptr: int, size: int, owner=None) -> None:
        """Use `size` bytes at `ptr` for activations in every context; `owner` (e.g. the torch tensor) is kept alive.

        Set once, before binding: a context a graph has captured must keep its memory.
        """
        if size < self.activation_bytes:
            raise FlowblendError(f"engine {self.name!r} needs {self.activation_bytes} bytes of activation memory, "
                                 f"got a block of {size}: size it with shared_activation_bytes(engines)")
        if self._activation is not None and self._activation[:2] == (ptr, size):
            return
        if self._bindings:
            raise FlowblendError(f"engine {self.name!r} is already bound: give it activation memory once, before "
                                 "binding (share_activation_memory right after creating the engines)")
        self._activation = (ptr, size, owner)

    # -- binding --------------------------------------------------------------------------------
    def _check_buffer(self, name: str, tensor: torch.Tensor) -> None:
        want = self.dtypes[name]
        if tensor.dtype != want:
            raise FlowblendError(f"{self.name}: engine tensor {name!r} is {want} but the runtime buffer is "
                                 f"{tensor.dtype}; build the engine from an export in the runtime's dtype (--dtype)")
        if tensor.device != self.device:
            raise FlowblendError(f"{self.name}: buffer {name!r} is on {tensor.device} but the engine runs on "
                                 f"{self.device}; allocate the sampler on that device")
        if not tensor.is_contiguous():
            raise FlowblendError(f"{self.name}: buffer {name!r} must be contiguous")
        if tensor.data_ptr() % ADDRESS_ALIGNMENT:
            raise FlowblendError(f"{self.name}: buffer {name!r} starts at an address that is not {ADDRESS_ALIGNMENT}-byte "
                                 "aligned, as TensorRT requires: allocate it with engines.base.aligned_zeros")

    def _set_shape(self, context, name: str, shape: tuple[int, ...]) -> None:
        built = tuple(self.engine.get_tensor_shape(name))
        if len(built) != len(shape) or any(b not in (-1, s) for b, s in zip(built, shape)):
            raise FlowblendError(f"{self.name}: engine input {name!r} has shape {list(built)} but the runtime buffer "
                                 f"is {list(shape)}; rebuild for this shape (batch 2 with CFG, 1 without)")
        if -1 in built and not context.set_input_shape(name, shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            raise FlowblendError(f"{self.name}: {name!r} shape {list(shape)} is outside the plan's profile "
                                 f"{list(lo)}..{list(hi)}; re-export with --dynamic covering it and rebuild")

    def _set_address(self, context, name: str, ptr: int) -> None:
        if not context.set_tensor_address(name, ptr):
            raise FlowblendError(f"{self.name}: TensorRT refused the address of {name!r} (misaligned or unknown name)")

    def _new_context(self):
        with _device_scope(self.device):
            context = self.engine.create_execution_context(self.trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if context is None:
            raise FlowblendError(f"TensorRT could not create an execution context for {self.origin}")
        if self._activation is not None:
            context.set_device_memory(*self._activation[:2])
        return context

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Select the context bound to these buffers, creating and binding one (once) for a new set."""
        check_bindings(self.name, self.input_names + self.output_names, tensors)
        names = self.input_names + self.output_names
        key = tuple((n, tensors[n].data_ptr(), tuple(tensors[n].shape)) for n in names)
        if key in self._bindings:
            self._current = self._bindings[key]
            return
        table = tensors[TIMESTEP]
        if table.dim() != 2 or table.dtype != torch.float32:
            raise FlowblendError(f"{self.name}: the timestep buffer must be the [steps, B] float32 table, got "
                                 f"{table.dtype} {list(table.shape)}")
        timestep_input = aligned_zeros(tuple(table.shape[1:]), self.dtypes[TIMESTEP], self.device)
        bound = {n: (timestep_input if n == TIMESTEP else tensors[n]) for n in names}
        for name in names:
            self._check_buffer(name, bound[name])
        context = self._new_context()
        for name in self.input_names:
            self._set_shape(context, name, tuple(bound[name].shape))
        unresolved = context.infer_shapes()
        if unresolved:
            raise FlowblendError(f"{self.name}: TensorRT cannot infer the shapes of {list(unresolved)} from the bound "
                                 "inputs")
        for name in self.output_names:
            shape = tuple(context.get_tensor_shape(name))
            if shape != tuple(bound[name].shape):
                raise FlowblendError(f"{self.name}: engine output {name!r} is {list(shape)} but the runtime buffer is "
                                     f"{list(bound[name].shape)}")
        for name in names:
            self._set_address(context, name, bound[name].data_ptr())
        self._current = self._bindings[key] = _Binding(context, table, timestep_input, dict(bound, table=table))

    @property
    def context(self):
        """The execution context of the current binding set."""
        if self._current is None:
            raise FlowblendError(f"engine {self.name!r} is not bound: the sampler binds it in prepare()")
        return self._current.context

    @property
    def contexts(self) -> list:
        """Every context this engine created, one per binding set, in creation order."""
        return [b.context for b in self._bindings.values()]

    # -- the hot path ---------------------------------------------------------------------------
    def run(self, step: int) -> None:
        if self._activation is None:
            raise FlowblendError(f"engine {self.name!r} has no activation memory: call "
                                 "share_activation_memory(engines) once after creating the engines")
        binding = self._current
        if binding is None:
            raise FlowblendError(f"engine {self.name!r} is not bound: the sampler binds it in prepare()")
        if current_stream_handle(self.device) == DEFAULT_STREAM:  # never enqueue TensorRT on the default stream
            if self._own_stream is None:
                self._own_stream = new_stream(self.device)
            with use_stream(self._own_stream, self.device):
                self._enqueue(binding, step)
            return
        self._enqueue(binding, step)

    def _enqueue(self, binding: _Binding, step: int) -> None:
        binding.timestep_input.copy_(binding.table[step])  # on the stream: a graph captures the copy, not an address
        if not binding.context.execute_async_v3(current_stream_handle(self.device)):
            raise FlowblendError(f"TensorRT enqueue of engine {self.name!r} failed at step {step} (its log above says "
                                 "why); check the bound shapes, or rebuild the plan on this machine")


def shared_activation_bytes(engines: Iterable) -> int:
    """One block serves engines that never run at the same time: the largest of their needs."""
    return max((e.activation_bytes for e in engines if isinstance(e, TrtEngine)), default=0)


def share_activation_memory(engines: Mapping[str, object] | Iterable, device: torch.device | str | None = None):
    """Allocate one activation block for every TensorRT engine given and hand it to each; returns the block.

    Engines of other backends (PyTorch, ONNX Runtime) are skipped. The block is 256-byte aligned, as
    setDeviceMemoryV2 requires ("aligned with CUDA memory alignment property").
    """
    engines = list(engines.values()) if isinstance(engines, Mapping) else list(engines)
    trt_engines = [e for e in engines if isinstance(e, TrtEngine)]
    if not trt_engines:
        return None
    size = shared_activation_bytes(trt_engines)
    device = torch.device(device) if device is not None else trt_engines[0].device
    block = aligned_zeros((max(size, 1),), torch.uint8, device)
    for engine in trt_engines:
        engine.set_activation_memory(block.data_ptr(), size, owner=block)
    return block


def run_plan(plan: str | Path | bytes, inputs: Mapping[str, torch.Tensor],
             device: torch.device | str = "cuda") -> torch.Tensor:
    """One forward of a plan on `inputs` (timestep shaped [B]); returns the velocity on the CPU (for checks)."""
    engine = TrtEngine(plan, name=Path(plan).stem if isinstance(plan, (str, Path)) else "plan", device=device)
    device = engine.device
    tensors = {}
    for name, t in inputs.items():
        tensors[name] = aligned_zeros(tuple(t.shape), engine.dtypes[name], device)
        tensors[name].copy_(t)
    table = aligned_zeros((1, *inputs[TIMESTEP].shape), torch.float32, device)  # a one-row timestep table
    table.copy_(inputs[TIMESTEP].reshape(1, -1))
    tensors[TIMESTEP] = table
    tensors[VELOCITY] = aligned_zeros(tuple(inputs[LATENTS].shape), engine.dtypes[VELOCITY], device)
    share_activation_memory([engine])
    engine.bind(tensors)
    engine.run(0)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return tensors[VELOCITY].float().cpu()


def load_engines(paths: dict, device: torch.device | str | None = None) -> dict[str, TrtEngine]:
    """The tensorrt engine kind's loader (engines/kinds.py): one engine per plan, one shared activation block."""
    if not str(device).startswith("cuda"):
        raise FlowblendError(f"TensorRT engines run on a CUDA device, not {device!r}: pass --device cuda")
    engines = {name: TrtEngine(path, name=name, device=device) for name, path in paths.items()}
    share_activation_memory(engines)  # one activation block for all: they never run at the same time
    return engines
