"""One transformer traced to ONNX and written to disk, weights streamed, nothing materialised twice.

The torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`) traces the same signature
module that TorchEngine runs. Its program holds the initializers as views of the module's own
tensors; onnx_ir's `save` writes them one by one to the external `.data` file, so a 28 GB model
never exists a second time in memory (`program.model_proto` would build a protobuf copy of it).

A "twin" is the same module traced again at a reduced shape (verify.py runs it where the export
shape's attention would not fit in host memory). Its weight initializers point into the main
graph's `.data` file instead of being written again, weights and the constants the exporter folds
from them (transposed weights) alike: a tensor is shared only after its bytes compared equal to the
file's. Unshared ones would be serialised inline, a second copy of the model in memory.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import logging
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from flowblend.errors import FlowblendError

from ..engines.base import LATENTS, TEXT_EMBEDS, TEXT_MASK, TIMESTEP
from ..engines.iospec import IOSpec
from ..engines.signature import signature_for
from .precision import layout_dtype, region_precision, to_layout

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's 2 GB limit on one file
DATA_ALIGNMENT = 65536  # large tensors start on 64 KiB boundaries, so runtimes can map them from the file
TWIN_UNSHARED = "flowblend.twin_unshared"  # twin metadata: its tensors whose twins in the .data hold other bytes
SHARE_MIN_BYTES = 1024  # the main graph keeps smaller tensors inline (ir.save's size_threshold_bytes)


class ExportDtype(torch.nn.Module):
    """A signature module in the export layout: inputs widened to FP32 (the residual stream's dtype),
    regions in low precision, velocity narrowed to the export dtype at the end."""

    def __init__(self, signature: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.signature, self.dtype = signature, dtype

    def forward(self, *inputs):
        out = self.signature(*[x.float() if x.is_floating_point() else x for x in inputs])
        return out.to(self.dtype)


def export_layout(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The transformer in the export layout for `dtype`: itself when it already is (loaded from disk by
    load_pair_for_export), else a converted copy (in-memory FP32 models: tests, the toy pair)."""
    if dtype == torch.float32:
        odd = any(t.is_floating_point() and t.dtype != torch.float32
                  for t in (*transformer.parameters(), *transformer.buffers()))
        return torch.nn.Module.float(copy.deepcopy(transformer)) if odd else transformer
    return transformer if layout_dtype(transformer) == dtype else to_layout(transformer, dtype)


@contextlib.contextmanager
def traceable(transformer: torch.nn.Module, dtype: torch.dtype, reference: bool = False, **signature_kwargs):
    """The signature module to trace or run: FP32 as is, low precision through region_precision.

    reference=True gives the FP32 computation of the same weights (the verification reference).
    """
    model = export_layout(transformer, dtype)
    if dtype == torch.float32:
        yield signature_for(model, **signature_kwargs).eval()
        return
    with region_precision(model, dtype, reference=reference):
        module = signature_for(model, **signature_kwargs)
        yield (module if reference else ExportDtype(module, dtype)).eval()


def _dynamic_shapes(spec: IOSpec):
    """torch.export dims for the latents' frames/height/width of a min/max profile (None: static)."""
    if spec.static:
        return None
    from torch.export import Dim

    axis = {"frames": 2, "height": 3, "width": 4}
    latents = {}
    for name, (lo, hi) in spec.dynamic.items():
        step = spec.dim_multiple(name)  # a patched dim is step x a free one, as torch.export requires
        latents[axis[name]] = (Dim(name, min=lo, max=hi) if step == 1
                               else step * Dim(f"{name}_tokens", min=lo // step, max=hi // step))
    shapes = {LATENTS: latents, TIMESTEP: None, TEXT_EMBEDS: None}
    if spec.with_mask:
        shapes[TEXT_MASK] = None
    return shapes


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a line per skipped torchvision op and per unfoldable Split: noise here."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnxscript", "onnx_ir", "torch.export")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def float64_values(model) -> list[str]:
    """Names of float64 initializers, constants, casts and typed values in an ONNX model (must be none)."""
    import onnx

    double = onnx.TensorProto.DOUBLE
    graph = model.graph
    found = [t.name for t in graph.initializer if t.data_type == double]
    for node in graph.node:
        for attr in node.attribute:
            if (node.op_type == "Cast" and attr.name == "to" and attr.i == double) or \
                    (attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == double):
                found.append(node.name or node.output[0])
    found += [v.name for v in (*graph.input, *graph.output, *graph.value_info)
              if v.type.tensor_type.elem_type == double]
    return found


def export_transformer(transformer: torch.nn.Module, spec: IOSpec, path: str | Path,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, twin_of: str | Path | None = None,
                       **signature_kwargs) -> Path:
    """Export one transformer in its signature to `path` (+ `<name>.data` if its weights reach the threshold).

    twin_of: the main graph this one is a reduced-shape twin of; its weights are shared, not written.
    """
    path = Path(path)
    weights = []  # every initializer the exporter made, those the optimizer folds away (W before W^T) too
    with traceable(transformer, spec.torch_dtype, **signature_kwargs) as module, torch.no_grad(), _quiet_exporter():
        try:
            program = torch.onnx.export(module, spec.sample_inputs(), dynamo=True, opset_version=OPSET,
                                        input_names=list(spec.input_names), output_names=list(spec.output_names),
                                        dynamic_shapes=_dynamic_shapes(spec), optimize=False, verbose=False)
            weights += program.model.graph.initializers.values()
            _optimize(program.model)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the message is what helps
            _drop_tensors(weights)
            raise FlowblendError(f"torch.onnx.export failed for {type(transformer).__name__} at {spec.key()} "
                                 f"({spec.dtype}): {_root_cause(exc)}") from exc
        try:
            _save(program.model, path, external_data_threshold, twin_of)
        finally:
            _drop_tensors([*weights, *program.model.graph.initializers.values()])
    _finish(path, spec, stamp=twin_of is None)
    return path


def _drop_tensors(values) -> None:
    """Detach the exported graph's values from the module's tensors once written. onnxscript's rewrite
    rules (module globals) keep the last graph they matched, whose initializers are views of the
    parameters: without this, freeing the model after export (export_pair's release_models) left most of
    its weights alive (measured on the 1-layer real-width Wan 14B: 0.7 of 1.4 GiB)."""
    for value in values:
        value.const_value = None


FOLD_LIMIT = 512 * 512  # elements: onnxscript's own output limit for a folded constant
BROADCASTS = {"Expand", "Tile", "ConstantOfShape", "Range"}


def _should_fold(node) -> bool | None:
    """onnxscript's constant folder evaluates a node before it checks the result's size: an Expand of a
    scalar to the export shape (`torch.empty_like` in diffusers' RoPE) allocates gigabytes just to be
    dropped. Broadcasts to more than FOLD_LIMIT elements (or to an unknown size) are left to the runtime."""
    if node.op_type not in BROADCASTS:
        return None
    shape = node.outputs[0].shape if node.outputs else None
    if shape is None or not shape.is_static():
        return False
    size = 1
    for d in shape:
        size *= int(d)
    return None if size <= FOLD_LIMIT else False


def _optimize(model) -> None:
    """The exporter's own optimization (onnxscript's optimize_ir), with _should_fold."""
    import onnxscript.optimizer

    onnxscript.optimizer.optimize_ir(model, should_fold=_should_fold)


def _save(model, path: Path, threshold: int, twin_of: Path | None) -> None:
    import onnx_ir as ir

    if twin_of is not None:
        _share_weights(model, Path(twin_of))
        ir.save(model, path)  # shared tensors stay references into the main graph's .data
        return
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)
    if weights >= threshold:
        ir.save(model, path, external_data=f"{path.name}.data", size_threshold_bytes=SHARE_MIN_BYTES, alignment=DATA_ALIGNMENT)
    else:
        ir.save(model, path)


def _finish(path: Path, spec: IOSpec, stamp: bool = True) -> None:
    """Refuse float64; stamp the weights' hash and the spec into the graph file (its sha256 is what
    engine keys cite, so it must change with the weights even when they sit in a .data file). A twin
    (stamp=False) is a temporary file: hashing the main graph's .data again would only cost time."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # the graph and its inline constants only
    doubles = float64_values(model)
    if doubles:
        raise FlowblendError(f"the exported graph still holds float64 values {doubles[:5]}; TensorRT does not take "
                             "float64: cast the model's float64 buffers before export")
    if not stamp:
        return
    onnx.helper.set_model_props(model, {"flowblend.weights_sha256": weights_sha256(model, path.parent),
                                        "flowblend.spec": spec.key(), "flowblend.dtype": spec.dtype})
    onnx.save_model(model, str(path))  # external tensors keep their references; their data is not touched


def weights_sha256(model, directory: Path) -> str:
    """sha256 over inline initializers and, streamed from disk, every external data file they use."""
    from .record import external_references

    h = hashlib.sha256()
    for t in model.graph.initializer:
        h.update(t.name.encode())
        if not t.external_data:
            h.update(t.SerializeToString())
    for location in sorted({ref.location for ref in external_references(model)}):
        with open(directory / location, "rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _share_weights(model, main_path: Path) -> None:
    """Point each of the twin's initializers at the main graph's external data where its bytes are there.

    A candidate is the main initializer of the same name, else any of the same dtype and shape whose first
    bytes match (constants the exporter folds, e.g. transposed weights, are named val_N and the numbering
    differs between the two traces); it is shared only after a full byte comparison with the file.
    """
    import onnx
    import onnx_ir as ir

    from .record import external_references

    main = onnx.load(str(main_path), load_external_data=False)
    kinds = {t.name: (t.data_type, tuple(t.dims)) for t in main.graph.initializer}
    refs = {ref.name: ref for ref in external_references(main)}
    by_kind: dict[tuple, list] = {}
    for ref in refs.values():
        by_kind.setdefault(kinds[ref.name], []).append(ref)
    heads: dict[str, bytes] = {}
    differ = []  # twin tensors with candidates in the .data, none of them byte-equal: the file is not the model
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        if tensor is None or tensor.nbytes < SHARE_MIN_BYTES:
            continue
        kind = (int(tensor.dtype), tuple(int(d) for d in tensor.shape))
        named = [refs[name]] if name in refs and kinds[name] == kind else []
        data = np.ascontiguousarray(tensor.numpy()).reshape(-1).view(np.uint8)
        for ref in named + [r for r in by_kind.get(kind, []) if r.name != name]:
            if ref.length != data.size:
                continue
            if ref.name not in heads:
                heads[ref.name] = ref.read(main_path.parent, 0, 64)
            if heads[ref.name] == data[:64].tobytes() and _same_bytes(main_path.parent, ref, data):
                value.const_value = ir.ExternalTensor(ref.location, ref.offset, ref.length, dtype=tensor.dtype,
                                                      shape=tensor.shape, name=name, base_dir=str(main_path.parent))
                break
        else:
            if named or by_kind.get(kind):
                differ.append(name)
        del data
    model.metadata_props[TWIN_UNSHARED] = ",".join(differ)


def _same_bytes(directory: Path, ref, data: np.ndarray, chunk: int = 1 << 26) -> bool:
    """Whether the file region of `ref` holds exactly `data` (uint8), read in chunks."""
    with open(Path(directory) / ref.location, "rb") as f:
        f.seek(ref.offset)
        for start in range(0, data.size, chunk):
            block = f.read(min(chunk, data.size - start))
            if len(block) != min(chunk, data.size - start) or \
                    not np.array_equal(np.frombuffer(block, np.uint8), data[start:start + len(block)]):
                return False
    return True


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's first line, without the exporter's terminal colours."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
