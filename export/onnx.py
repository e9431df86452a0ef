"""ONNX export of both transformers of a pair, in the fixed I/O signature, verified before it lands.

Tracing and writing one graph is export/trace.py (weights streamed to the .data file); precision is
export/precision.py: FP16/BF16 graphs run the matmuls and attention in the low precision and keep the
residual stream, norms, modulation, timestep embedding and RoPE in FP32, with explicit Casts a strongly
typed TensorRT build keeps. Verification (export/verify.py) runs the graph, or at real sizes a
reduced-shape twin of it, against an FP32 reference. The graph is checked to hold no float64.

Output: `<artifacts>/<pair>/onnx/{large,small}.onnx` (+ `.data` above the external-data threshold)
and `export.json`. Everything is written and verified in a staging directory first and moved into
place only when both graphs pass, so a failed export never replaces a good one.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from flowblend.errors import FlowblendError

from ..engines.iospec import IOSpec
from ..engines.kinds import precision
from ..engines.store import sidecars, write_json_atomic
from .precision import islands_of
from .record import EXPORT_RECORD, graph_files, onnx_dir
from .trace import EXTERNAL_DATA_THRESHOLD, OPSET, export_transformer, float64_values  # noqa: F401 - re-exported
from .verify import verify_onnx

EXPORTER = "torch.onnx.export(dynamo=True)"


def cast_for_export(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Whole-model cast keeping `_keep_in_fp32_modules` in FP32, in place: what TorchEngine runs for an
    FP16/BF16 eager backend. Exports do not use it (see export/precision.py for why)."""
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
    return sorted(islands_of(transformer))


def model_hash(transformer: torch.nn.Module) -> str:
    """Content hash of a source model's config and weights (raw bytes, any dtype)."""
    h = hashlib.sha256()
    config = getattr(transformer, "config", None)
    h.update(json.dumps(dict(config) if config is not None else {}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(transformer.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy())  # no copy of the bytes
    return h.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime
    import onnxscript

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__,
            "onnxscript": onnxscript.__version__, "onnxruntime": onnxruntime.__version__}


def export_pair(loaded_pair, spec: IOSpec, artifacts: str | Path = "artifacts", verify: bool = True,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, progress: bool = True,
                signature_kwargs: dict | None = None, release_models: bool = False) -> dict:
    """Export and verify every transformer of a loaded pair into artifacts/<pair>/onnx/; returns export.json.

    Raises FlowblendError (leaving any previous export untouched) if a graph fails verification.
    release_models=True (the CLI, whose pair is not used afterwards) frees each transformer's weights
    (moved to the meta device) as soon as its graph is written and hashed, and with verification once its
    twin is traced and its reference outputs computed, before ONNX Runtime loads the graph: the
    PyTorch model and the graph's session are then never in memory together. The pair's transformers
    cannot run afterwards.
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
                     "fp32_islands": fp32_islands(transformer) if precision(spec.dtype).fp32_islands else [], "verify": None}
            release = _releaser(transformer) if release_models else None
            if verify:
                bar.set_postfix_str(f"{name}: verifying")
                report = verify_onnx(path, transformer, spec, before_run=release, **(signature_kwargs or {}))
                entry["verify"] = report.to_dict()
                if not report.passed:
                    raise FlowblendError(f"the exported {name} graph failed verification, nothing was written: "
                                         f"{report.summary()}. {precision(spec.dtype).remedy}")
            elif release is not None:
                release()
            record["models"][name] = entry
        _move_into_place(staging, out, record)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return record


def _releaser(transformer: torch.nn.Module):
    """A call that frees a transformer's weights: every parameter and buffer moved to the meta device
    (export_transformer has already dropped the graph's references to them)."""

    def release() -> None:
        torch.nn.Module.to(transformer, "meta")
        gc.collect()

    return release


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
