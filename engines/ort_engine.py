"""ONNX Runtime backend: an exported graph bound by pointer to the runtime's shared buffers.

`bind` hands ORT the data pointers of the shared tensors through IOBinding
(`bind_input(name, device_type, device_id, element_type, shape, buffer_ptr)` / `bind_output(...)`)
and prepares one binding per row of the timestep table, so `run(step)` is a single
`run_with_iobinding` call: no per-step binding, allocation of I/O or copy at the graph boundary.

What ORT still copies or allocates per step (CPU provider; the CUDA provider is the same on the
device when the buffers are CUDA tensors):
- inputs: nothing (latents, text embeddings, mask and the timestep row are read in place);
- output: the graph ends in a Reshape, whose kernel copies its result into the bound `velocity`
  buffer (one device-local copy of B*C*F*H*W elements; it would otherwise alias its input);
- intermediates: activations come from ORT's arena with a memory pattern planned on the first run
  (static shapes), so later steps reuse the same blocks; nothing crosses host <-> device.
With the CUDA provider, ORT runs on torch's current stream (`user_compute_stream`), so the
runtime's in-place solver ops and ORT's kernels are ordered without extra synchronisation, and
Run() returns after the stream is synchronised (ORT's default).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import torch

from flowblend.errors import FlowblendError

from .base import TIMESTEP, VELOCITY, check_bindings

if TYPE_CHECKING:
    from .iospec import IOSpec

# ONNX TensorProto element types (ORT's bind_input takes them as ints, which also covers bfloat16)
_ELEMENT_TYPE = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16, torch.int64: 7}
_ORT_TYPE = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
             "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64}


def session_providers(device: torch.device | str = "cpu") -> list:
    """ORT providers for a device: CPU, or CUDA on torch's current stream (needs onnxruntime-gpu)."""
    import onnxruntime as ort

    device = torch.device(device)
    if device.type == "cpu":
        return ["CPUExecutionProvider"]
    if device.type != "cuda":
        raise FlowblendError(f"the onnxruntime backend runs on cpu or cuda, not {device.type}")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise FlowblendError("this onnxruntime has no CUDA provider: pip install onnxruntime-gpu (instead of "
                             "onnxruntime) on a machine with an NVIDIA GPU, or use --device cpu")
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index).cuda_stream
    return [("CUDAExecutionProvider", {"device_id": index, "user_compute_stream": str(stream)}), "CPUExecutionProvider"]


def _session(path: Path, providers: list, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    # The two engines of a pair alternate; a session whose idle workers keep spinning steals the
    # cores the other session's step needs.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(str(path), opts, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises several types; all mean "cannot run this graph here"
        hint = ""
        if providers == ["CPUExecutionProvider"] and _takes_bf16(path):
            hint = ("; ONNX Runtime's CPU provider has no BF16 kernels: export --dtype fp32 or fp16 for CPU, "
                    "or run BF16 with the CUDA provider or TensorRT")
        raise FlowblendError(f"ONNX Runtime cannot load {path}: {str(exc).strip()}{hint}") from exc


def _takes_bf16(path: Path) -> bool:
    try:
        import onnx

        graph = onnx.load(str(path), load_external_data=False).graph
        return any(i.type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16 for i in graph.input)
    except Exception:  # noqa: BLE001 - only a hint; the load error itself is reported anyway
        return False


class OrtEngine:
    """An Engine over `onnxruntime.InferenceSession` on `device` ("cpu" or "cuda[:i]").

    `providers` (ORT's list) overrides the choice made from `device`; the device then follows it.
    """

    def __init__(self, path: str | Path, device: torch.device | str | None = None, name: str = "onnxruntime",
                 providers: list | None = None, intra_op_threads: int = 0):
        path = Path(path)
        if not path.is_file():
            raise FlowblendError(f"ONNX model {path} does not exist: run `flowblend export` and `flowblend build`")
        if device is None:
            first = providers[0] if providers else "CPUExecutionProvider"
            device = "cuda" if (first if isinstance(first, str) else first[0]) == "CUDAExecutionProvider" else "cpu"
        self.name = name
        self.device = torch.device(device)
        self.session = _session(path, providers or session_providers(self.device), intra_op_threads)
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._meta = {m.name: m for m in (*self.session.get_inputs(), *self.session.get_outputs())}
        if VELOCITY not in self.output_names or TIMESTEP not in self.input_names:
            raise FlowblendError(f"{path} does not have flowblend's signature (inputs {self.input_names}, outputs "
                                 f"{self.output_names}): export it with `flowblend export`")
        self.dtype = _ORT_TYPE.get(self._meta[self.input_names[0]].type, torch.float32)
        self._bindings: list = []

    def _check(self, name: str, tensor: torch.Tensor) -> None:
        meta = self._meta[name]
        want = _ORT_TYPE.get(meta.type)
        if tensor.dtype != want:
            raise FlowblendError(f"{self.name}: graph {name!r} is {meta.type} but the runtime buffer is "
                                 f"{tensor.dtype}; export with the runtime's --dtype")
        dims = list(meta.shape)  # ints for static dims, names (str) or None for dynamic ones
        if len(dims) != tensor.dim() or any(isinstance(d, int) and d != s for d, s in zip(dims, tensor.shape)):
            raise FlowblendError(f"{self.name}: graph {name!r} has shape {dims} but the runtime buffer is "
                                 f"{list(tensor.shape)}; re-export for this shape (batch 2 with CFG, 1 without)")
        if tensor.device.type != self.device.type or not tensor.is_contiguous():
            raise FlowblendError(f"{self.name}: buffer {name!r} must be a contiguous {self.device.type} tensor "
                                 f"(got {tensor.device}); allocate the runtime's buffers on the engine's device")

    def _binding_for(self, tensors: Mapping[str, torch.Tensor], timestep_row: torch.Tensor):
        binding = self.session.io_binding()
        for name in (*self.input_names, VELOCITY):
            tensor = timestep_row if name == TIMESTEP else tensors[name]
            bind = binding.bind_output if name == VELOCITY else binding.bind_input
            bind(name, tensor.device.type, tensor.device.index or 0, _ELEMENT_TYPE[tensor.dtype],
                 tuple(tensor.shape), tensor.data_ptr())
        return binding

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Bind by pointer: one IOBinding per timestep-table row, all sharing the other buffers."""
        check_bindings(self.name, self.input_names + self.output_names, tensors)
        table = tensors[TIMESTEP]
        for name in (*self.input_names, VELOCITY):
            self._check(name, table[0] if name == TIMESTEP else tensors[name])
        self._buffers = dict(tensors)  # keep the bound storage alive as long as the bindings
        self._bindings = [self._binding_for(tensors, table[step]) for step in range(table.shape[0])]

    def run(self, step: int) -> None:
        self.session.run_with_iobinding(self._bindings[step])


def load_engines(paths: dict, device: torch.device | str | None = None) -> dict[str, OrtEngine]:
    """The onnxruntime engine kind's loader (engines/kinds.py): one session per model's built graph."""
    return {name: OrtEngine(path, device=device, name=name) for name, path in paths.items()}


def build_onnxruntime_model(onnx_path: Path, out_path: Path) -> None:
    """ORT's offline-optimized graph (constant folding, fusions): what a session would do at load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(out_path)
    ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])


def build_onnxruntime_engine(onnx_path: Path, spec: IOSpec, out_path: Path, **_options) -> None:
    """The onnxruntime engine kind's builder (engines/kinds.py names it): its graph takes every shape of the export."""
    build_onnxruntime_model(onnx_path, out_path)
