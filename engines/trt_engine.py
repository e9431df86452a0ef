"""TensorRT backend: a serialized plan bound by address to the runtime's shared buffers.

Written against the TensorRT 10/11 Python API (name-based tensors, `execute_async_v3`). Nothing here
imports tensorrt at module load, so the package works without it; the CPU tests drive this code
through a recording stand-in of that API (tests/fake_tensorrt.py).

- The context is created with USER_MANAGED activation memory: the two engines of a pair never run
  at the same time, so the runtime hands both ONE block sized to the larger need
  (`share_activation_memory`), instead of TensorRT giving each engine its own.
- `bind` points every I/O tensor at the shared buffers once; `run(step)` only re-points the
  timestep input at row `step` of the timestep table, then enqueues on the current torch stream,
  so the enqueue lands in a CUDA graph when torch is capturing (runtime/graph.py).
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Mapping

import torch

from flowblend.errors import FlowblendError

from .base import LATENTS, TIMESTEP, VELOCITY, check_bindings

TRT_INSTALL_HINT = ("install the extra on a machine with an NVIDIA GPU and driver: pip install 'flowblend[trt]' "
                    "(tensorrt and cuda-python); or use --backend onnxruntime")


def import_tensorrt():
    """The tensorrt module, or a FlowblendError saying how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise FlowblendError(f"TensorRT is not installed (import tensorrt failed: {exc}): {TRT_INSTALL_HINT}") from exc
    return tensorrt


def torch_dtype(trt, dtype) -> torch.dtype:
    """torch dtype of a tensorrt.DataType (the types a flowblend export can carry)."""
    table = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16, trt.DataType.INT64: torch.int64,
             trt.DataType.INT32: torch.int32}
    if hasattr(trt.DataType, "BF16"):
        table[trt.DataType.BF16] = torch.bfloat16
    if dtype not in table:
        raise FlowblendError(f"engine tensor type {dtype} is not one flowblend binds (fp32/fp16/bf16/int32/int64)")
    return table[dtype]


def _device_scope(device: torch.device):
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


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
            data, origin = path.read_bytes(), str(path)
        else:
            data, origin = bytes(plan), "<plan bytes>"
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
                    f"TensorRT could not deserialize {origin} (see its log above): plans only load with the TensorRT "
                    f"version and GPU model they were built with (this is {trt.__version__}); rebuild: "
                    "flowblend build --backend tensorrt --force")
            self.context = self.engine.create_execution_context(trt.ExecutionContextAllocationStrategy.USER_MANAGED)
        if self.context is None:
            raise FlowblendError(f"TensorRT could not create an execution context for {origin}")
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.input_names = tuple(inputs)
        self.output_names = tuple(n for n in names if n not in inputs)
        self.dtypes = {n: torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}
        self.dtype = self.dtypes.get(LATENTS, self.dtypes[self.input_names[0]])  # what the sampler allocates
        self._activation = None  # (ptr, size, owner) of the block the runtime gave us
        self._timestep_rows: list[int] = []

    # -- activation memory --------------------------------------------------------------------
    @property
    def activation_bytes(self) -> int:
        """Device memory the context needs for activations (maximum over the plan's profiles)."""
        return int(self.engine.device_memory_size_v2)

    def set_activation_memory(self, ptr: int, size: int, owner=None) -> None:
        """Use `size` bytes at `ptr` for activations; `owner` (e.g. the torch tensor) is kept alive."""
        if size < self.activation_bytes:
            raise FlowblendError(f"engine {self.name!r} needs {self.activation_bytes} bytes of activation memory, "
                                 f"got a block of {size}: size it with shared_activation_bytes(engines)")
        if hasattr(self.context, "set_device_memory"):  # TensorRT >= 10.1
            self.context.set_device_memory(ptr, size)
        else:  # 10.0: the property, size implied by the engine
            self.context.device_memory = ptr
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

    def _set_shape(self, name: str, shape: tuple[int, ...]) -> None:
        built = tuple(self.engine.get_tensor_shape(name))
        if len(built) != len(shape) or any(b not in (-1, s) for b, s in zip(built, shape)):
            raise FlowblendError(f"{self.name}: engine input {name!r} has shape {list(built)} but the runtime buffer "
                                 f"is {list(shape)}; rebuild for this shape (batch 2 with CFG, 1 without)")
        if -1 in built and not self.context.set_input_shape(name, shape):
            lo, _, hi = self.engine.get_tensor_profile_shape(name, 0)
            raise FlowblendError(f"{self.name}: {name!r} shape {list(shape)} is outside the plan's profile "
                                 f"{list(lo)}..{list(hi)}; re-export with --dynamic covering it and rebuild")

    def _set_address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, ptr):
            raise FlowblendError(f"{self.name}: TensorRT refused the address of {name!r} (misaligned or unknown name)")

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_bindings(self.name, self.input_names + self.output_names, tensors)
        table = tensors[TIMESTEP]
        for name in self.input_names + self.output_names:
            tensor = table[0] if name == TIMESTEP else tensors[name]
            self._check_buffer(name, tensor)
            if name in self.input_names:
                self._set_shape(name, tuple(tensor.shape))
        unresolved = self.context.infer_shapes()
        if unresolved:
            raise FlowblendError(f"{self.name}: TensorRT cannot infer the shapes of {list(unresolved)} from the bound "
                                 "inputs")
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            if shape != tuple(tensors[name].shape):
                raise FlowblendError(f"{self.name}: engine output {name!r} is {list(shape)} but the runtime buffer is "
                                     f"{list(tensors[name].shape)}")
        for name in self.input_names + self.output_names:
            self._set_address(name, table[0].data_ptr() if name == TIMESTEP else tensors[name].data_ptr())
        # row `step` of the [steps, B] float32 table, precomputed so run() only indexes a list
        self._timestep_rows = [table[i].data_ptr() for i in range(table.shape[0])]

    # -- the hot path ---------------------------------------------------------------------------
    def run(self, step: int) -> None:
        if self._activation is None:
            raise FlowblendError(f"engine {self.name!r} has no activation memory: call "
                                 "share_activation_memory(engines) once after creating the engines")
        self._set_address(TIMESTEP, self._timestep_rows[step])
        stream = torch.cuda.current_stream(self.device).cuda_stream if self.device.type == "cuda" else 0
        if not self.context.execute_async_v3(stream):
            raise FlowblendError(f"TensorRT enqueue of engine {self.name!r} failed at step {step} (its log above says "
                                 "why); check the bound shapes, or rebuild the plan on this machine")


def shared_activation_bytes(engines: Iterable) -> int:
    """One block serves engines that never run at the same time: the largest of their needs."""
    return max((int(e.activation_bytes) for e in engines if isinstance(e, TrtEngine)), default=0)


def share_activation_memory(engines: Mapping[str, object] | Iterable, device: torch.device | str | None = None):
    """Allocate one activation block for every TensorRT engine given and hand it to each; returns the block.

    Other engines (PyTorch, ONNX Runtime) manage their own activations and are skipped. The torch caching
    allocator's blocks are 512-byte aligned, more than the 256 bytes TensorRT requires.
    """
    engines = list(engines.values()) if isinstance(engines, Mapping) else list(engines)
    trt_engines = [e for e in engines if isinstance(e, TrtEngine)]
    if not trt_engines:
        return None
    size = shared_activation_bytes(trt_engines)
    device = torch.device(device) if device is not None else trt_engines[0].device
    block = torch.empty(max(size, 1), dtype=torch.uint8, device=device)
    for engine in trt_engines:
        engine.set_activation_memory(block.data_ptr(), size, owner=block)
    return block


def run_plan(plan: str | Path | bytes, inputs: Mapping[str, torch.Tensor],
             device: torch.device | str = "cuda") -> torch.Tensor:
    """One forward of a plan on `inputs` (timestep shaped [B]); returns the velocity on the CPU (for checks)."""
    engine = TrtEngine(plan, name=Path(plan).stem if isinstance(plan, (str, Path)) else "plan", device=device)
    device = engine.device
    tensors = {n: t.to(device=device, dtype=engine.dtypes[n]).contiguous() for n, t in inputs.items()}
    tensors[TIMESTEP] = tensors[TIMESTEP].reshape(1, -1)  # a one-row timestep table
    tensors[VELOCITY] = torch.empty(tuple(inputs[LATENTS].shape), dtype=engine.dtypes[VELOCITY],
                                    device=device)
    engine.bind(tensors)
    share_activation_memory([engine])
    engine.run(0)
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return tensors[VELOCITY].float().cpu()
