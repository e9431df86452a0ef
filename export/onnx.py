"""ONNX export of both transformers of a pair, in the fixed I/O signature, verified before it lands.

The torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`) traces the same signature
module that TorchEngine runs, so the graph and the eager reference compute one function.

Precision: FP16/BF16 exports keep diffusers' `_keep_in_fp32_modules` (for Wan: norms, modulation
table, time embedding, RoPE) in FP32; the traced graph then carries explicit Cast nodes around them
(and around the FP32 residual adds diffusers' code already makes), which a strongly typed TensorRT
build keeps. Float64 buffers (diffusers before 0.36 kept Wan's RoPE tables in float64) are cast to
FP32 before tracing, and the finished graph is checked to hold no float64, which TensorRT does not take.

Output: `<artifacts>/<pair>/onnx/{large,small}.onnx` (+ `.data` above the external-data threshold)
and `export.json`. Everything is written and verified in a staging directory first and moved into
place only when both graphs pass, so a failed export never replaces a good one.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch

from flowblend.engines.base import LATENTS, TEXT_EMBEDS, TEXT_MASK, TIMESTEP
from flowblend.engines.iospec import IOSpec
from flowblend.engines.signature import signature_for
from flowblend.engines.store import sidecars, write_json_atomic
from flowblend.errors import FlowblendError

from .record import EXPORT_RECORD, graph_files, onnx_dir
from .verify import verify_onnx

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's 2 GB limit on one file
EXPORTER = "torch.onnx.export(dynamo=True)"


def cast_for_export(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to `dtype` (float64 buffers included), keeping `_keep_in_fp32_modules` in FP32. Works in place."""
    torch.nn.Module.to(transformer, dtype)  # the plain nn.Module cast: diffusers' override re-applies its own rules
    if dtype != torch.float32:
        keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
        for name, module in transformer.named_modules():
            if keep & set(name.split(".")):
                module.float()
        for name, param in transformer.named_parameters():  # bare parameters, e.g. scale_shift_table
            if keep & set(name.split(".")):
                param.data = param.data.float()
    return transformer


def fp32_islands(transformer: torch.nn.Module) -> list[str]:
    return sorted(getattr(transformer, "_keep_in_fp32_modules", None) or ())


def model_hash(transformer: torch.nn.Module) -> str:
    """Content hash of a source model's config and weights (raw bytes, any dtype)."""
    h = hashlib.sha256()
    config = getattr(transformer, "config", None)
    h.update(json.dumps(dict(config) if config is not None else {}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(transformer.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


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


def export_transformer(transformer: torch.nn.Module, spec: IOSpec, path: str | Path,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, **signature_kwargs) -> Path:
    """Export one transformer in its signature to `path` (+ `<name>.data` if its weights reach the threshold)."""
    import onnx

    path = Path(path)
    module = signature_for(cast_for_export(copy.deepcopy(transformer), spec.torch_dtype), **signature_kwargs).eval()
    with torch.no_grad(), _quiet_exporter():
        try:
            program = torch.onnx.export(module, spec.sample_inputs(), dynamo=True, opset_version=OPSET,
                                        input_names=list(spec.input_names), output_names=list(spec.output_names),
                                        dynamic_shapes=_dynamic_shapes(spec), optimize=True, verbose=False)
        except Exception as exc:  # noqa: BLE001 - the exporter raises many types; the message is what helps
            raise FlowblendError(f"torch.onnx.export failed for {type(transformer).__name__} at {spec.key()} "
                                 f"({spec.dtype}): {_root_cause(exc)}") from exc
    model = program.model_proto
    doubles = float64_values(model)
    if doubles:
        raise FlowblendError(f"the exported graph still holds float64 values {doubles[:5]}; TensorRT does not take "
                             "float64: cast the model's float64 buffers before export")
    # The graph file's own sha256 is what engine keys cite; recording the weights' hash in it makes that
    # hash change with the weights even when they sit in an external .data file.
    onnx.helper.set_model_props(model, {"flowblend.weights_sha256": _weights_sha256(model),
                                        "flowblend.spec": spec.key(), "flowblend.dtype": spec.dtype})
    weights = sum(t.ByteSize() for t in model.graph.initializer)
    if weights >= external_data_threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{path.name}.data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    return path


def _weights_sha256(model) -> str:
    h = hashlib.sha256()
    for t in model.graph.initializer:
        h.update(t.name.encode())
        h.update(t.SerializeToString())
    return h.hexdigest()


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's first line, without the exporter's terminal colours."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def library_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def export_pair(loaded_pair, spec: IOSpec, artifacts: str | Path = "artifacts", verify: bool = True,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, progress: bool = True,
                signature_kwargs: dict | None = None) -> dict:
    """Export and verify every transformer of a loaded pair into artifacts/<pair>/onnx/; returns export.json.

    Raises FlowblendError (leaving any previous export untouched) if a graph fails verification.
    """
    from tqdm.auto import tqdm

    pair = loaded_pair.family.name
    out = onnx_dir(artifacts, pair)
    out.mkdir(parents=True, exist_ok=True)
    record = {"pair": pair, "spec": spec.to_dict(), "spec_key": spec.key(), "dtype": spec.dtype,
              "profile": {n: [list(s) for s in mmo] for n, mmo in spec.profile().items()},
              "opset": OPSET, "exporter": EXPORTER, "versions": library_versions(),
              "sources": dict(loaded_pair.sources), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "models": {}}
    staging = Path(tempfile.mkdtemp(prefix=".export.", dir=out))
    try:
        bar = tqdm(loaded_pair.transformers.items(), desc=f"export {pair}", unit="model", disable=not progress)
        for name, transformer in bar:
            bar.set_postfix_str(f"{name}: exporting")
            path = export_transformer(transformer, spec, staging / f"{name}.onnx", external_data_threshold,
                                      **(signature_kwargs or {}))
            files = graph_files(path)
            entry = {"file": path.name, "sha256": files[path.name]["sha256"], "bytes": files[path.name]["bytes"],
                     "files": files, "external_data": len(files) > 1, "source_hash": model_hash(transformer),
                     "fp32_islands": fp32_islands(transformer) if spec.dtype != "fp32" else [], "verify": None}
            if verify:
                bar.set_postfix_str(f"{name}: verifying")
                report = verify_onnx(path, transformer, spec, **(signature_kwargs or {}))
                entry["verify"] = report.to_dict()
                if not report.passed:
                    raise FlowblendError(f"the exported {name} graph failed verification, nothing was written: "
                                         f"{report.summary()}. Try --dtype fp32 or bf16")
            record["models"][name] = entry
        _move_into_place(staging, out, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _move_into_place(staging: Path, out: Path, record: dict) -> None:
    """Replace the previous export: drop its record first, so no reader pairs old and new files."""
    (out / EXPORT_RECORD).unlink(missing_ok=True)
    for entry in record["models"].values():
        for stale in sidecars(out / entry["file"]):  # e.g. an old .data the new graph no longer uses
            if stale.name not in entry["files"]:
                stale.unlink()
        for name in sorted(entry["files"], key=lambda n: n == entry["file"]):  # sidecars before the graph
            os.replace(staging / name, out / name)
    write_json_atomic(out / EXPORT_RECORD, record)
