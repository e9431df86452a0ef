"""ONNX Runtime backend: an ONNX graph bound by pointer to the runtime's shared buffers.

IOBinding hands ORT the data pointers of the shared tensors, so inputs are read and the velocity
is written in place: no per-step copies at the graph boundary (CPU provider with CPU tensors,
CUDA provider with CUDA tensors). The only per-step call besides `run` is re-pointing the
timestep input at row `step` of the timestep table.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from .base import TIMESTEP, VELOCITY, FlowblendError, check_bindings

_ORT_TYPES = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16,
              "tensor(bfloat16)": torch.bfloat16, "tensor(int64)": torch.int64}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.int64: np.int64}


def default_providers() -> list[str]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


class OrtEngine:
    """An Engine over `onnxruntime.InferenceSession`; pass `providers` to choose CPU or CUDA."""

    def __init__(self, path: str | Path, providers: list[str] | None = None, name: str = "onnxruntime",
                 intra_op_threads: int = 0):
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise FlowblendError(f"ONNX file {path} does not exist: run `flowblend export` / `flowblend build` first")
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.intra_op_num_threads = intra_op_threads
        self.session = ort.InferenceSession(str(path), opts, providers=providers or default_providers())
        self.name = name
        self.input_names = tuple(i.name for i in self.session.get_inputs())
        self.output_names = tuple(o.name for o in self.session.get_outputs())
        self._meta = {m.name: m for m in (*self.session.get_inputs(), *self.session.get_outputs())}
        self.dtype = _ORT_TYPES.get(self._meta[self.input_names[0]].type, torch.float32)
        self.device = torch.device("cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu")

    def _check(self, name: str, tensor: torch.Tensor, shape) -> None:
        meta = self._meta[name]
        want = _ORT_TYPES.get(meta.type)
        if tensor.dtype != want:
            raise FlowblendError(f"{self.name}: graph input {name!r} is {meta.type} but the runtime buffer is "
                                 f"{tensor.dtype}; export with the runtime's dtype (--dtype) or change it")
        static = [d for d in meta.shape]
        if len(static) != len(shape) or any(isinstance(d, int) and d != s for d, s in zip(static, shape)):
            raise FlowblendError(f"{self.name}: graph {name!r} has shape {static} but the runtime buffer is "
                                 f"{list(shape)}; re-export for this shape (batch 2 with CFG, 1 without)")
        if not tensor.is_contiguous():
            raise FlowblendError(f"{self.name}: buffer {name!r} must be contiguous")

    def _bind_tensor(self, name: str, tensor: torch.Tensor, output: bool = False) -> None:
        device = "cuda" if tensor.is_cuda else "cpu"
        index = tensor.device.index or 0
        bind = self._binding.bind_output if output else self._binding.bind_input
        bind(name, device, index, _NUMPY[tensor.dtype], tuple(tensor.shape), tensor.data_ptr())

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        check_bindings(self.name, self.input_names + self.output_names, tensors)
        self._binding = self.session.io_binding()
        self._table = tensors[TIMESTEP]
        for name in self.input_names:
            if name == TIMESTEP:
                self._check(name, self._table[0], self._table[0].shape)
                continue
            self._check(name, tensors[name], tensors[name].shape)
            self._bind_tensor(name, tensors[name])
        self._check(VELOCITY, tensors[VELOCITY], tensors[VELOCITY].shape)
        self._bind_tensor(VELOCITY, tensors[VELOCITY], output=True)

    def run(self, step: int) -> None:
        self._bind_tensor(TIMESTEP, self._table[step])
        self.session.run_with_iobinding(self._binding)
