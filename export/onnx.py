"""ONNX export of both transformers of a pair, in a fixed I/O signature, verified against PyTorch.

The torch.export-based exporter (`torch.onnx.export(..., dynamo=True)`) traces the same signature
module that TorchEngine runs, so the graph and the eager reference compute one function. FP16 and
BF16 exports keep diffusers' `_keep_in_fp32_modules` (norms, modulation table, time embedding,
RoPE) in FP32; the graph then carries explicit Cast nodes around them, which a strongly typed
TensorRT build preserves.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from flowblend.engines.base import FlowblendError
from flowblend.engines.iospec import IOSpec
from flowblend.engines.signature import signature_for

OPSET = 18
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3  # protobuf's 2 GB limit


def cast_for_export(transformer: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Cast to `dtype` but keep the model's FP32 islands (diffusers' `_keep_in_fp32_modules`) in FP32."""
    # nn.Module.to, not diffusers' override: the FP32 islands are handled right below
    transformer = torch.nn.Module.to(transformer, dtype)
    if dtype == torch.float32:
        return transformer
    keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    for name, module in transformer.named_modules():
        if keep & set(name.split(".")):
            module.float()
    for name, param in transformer.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return transformer


def model_hash(transformer: torch.nn.Module) -> str:
    """Content hash of the weights and config (identifies the source of an export)."""
    h = hashlib.sha256()
    config = getattr(transformer, "config", None)
    h.update(json.dumps(dict(config) if config is not None else {}, sort_keys=True, default=str).encode())
    for name, tensor in sorted(transformer.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _dynamic_shapes(spec: IOSpec):
    """torch.export dynamic dims for the latents' frames/height/width (None when static)."""
    if spec.static:
        return None
    from torch.export import Dim

    axis = {"frames": 2, "height": 3, "width": 4}
    latents = {axis[name]: Dim(name, min=lo, max=hi) for name, (lo, hi) in spec.dynamic.items()}
    shapes = {"latents": latents, "timestep": None, "text_embeds": None}
    if spec.with_mask:
        shapes["text_mask"] = None
    return shapes


@dataclass
class ExportResult:
    path: Path
    spec: IOSpec
    source_hash: str
    bytes: int
    external_data: bool


def export_transformer(transformer: torch.nn.Module, spec: IOSpec, path: str | Path,
                       external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, **signature_kwargs) -> ExportResult:
    """Export one transformer to `path` (atomically: a temp folder renamed into place)."""
    import onnx

    path = Path(path)
    source = model_hash(transformer)
    module = signature_for(cast_for_export(copy.deepcopy(transformer), spec.torch_dtype), **signature_kwargs).eval()
    args = spec.sample_inputs()
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, args, dynamo=True, opset_version=OPSET,
                                        input_names=list(spec.input_names), output_names=list(spec.output_names),
                                        dynamic_shapes=_dynamic_shapes(spec), optimize=True, verbose=False)
        model = program.model_proto
        size = sum(t.ByteSize() for t in model.graph.initializer)
        external = size >= external_data_threshold
        if external:
            onnx.save_model(model, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=f"{path.name}.data", size_threshold=1024)
        else:
            onnx.save_model(model, str(tmp))
        # move the .onnx (and its data file) into place; the data file first, so the graph never
        # points at a missing file
        data = tmp_dir / f"{path.name}.data"
        if data.exists():
            os.replace(data, path.parent / data.name)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return ExportResult(path, spec, source, path.stat().st_size, external)


def library_versions() -> dict[str, str]:
    import diffusers
    import onnx
    import onnxruntime

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__, "exporter": "torch.onnx.export(dynamo=True)", "opset": OPSET}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def onnx_dir(artifacts: str | Path, pair: str) -> Path:
    return Path(artifacts) / pair / "onnx"


def export_pair(loaded_pair, spec: IOSpec, artifacts: str | Path = "artifacts", verify: bool = True,
                external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, progress: bool = True,
                signature_kwargs: dict | None = None) -> dict:
    """Export both transformers of a loaded pair into artifacts/<pair>/onnx/, verify, write export.json."""
    from tqdm.auto import tqdm

    from .verify import verify_onnx

    out = onnx_dir(artifacts, loaded_pair.family.name)
    out.mkdir(parents=True, exist_ok=True)
    record = {"pair": loaded_pair.family.name, "spec": spec.to_dict(), "spec_key": spec.key(),
              "versions": library_versions(), "sources": loaded_pair.sources, "models": {}}
    names = list(loaded_pair.transformers)
    bar = tqdm(names, desc="export", unit="model", disable=not progress)
    for name in bar:
        bar.set_postfix_str(name)
        transformer = loaded_pair.transformers[name]
        result = export_transformer(transformer, spec, out / f"{name}.onnx", external_data_threshold,
                                    **(signature_kwargs or {}))
        entry = {"file": result.path.name, "bytes": result.bytes, "external_data": result.external_data,
                 "source_hash": result.source_hash, "sha256": file_sha256(result.path)}
        if verify:
            report = verify_onnx(result.path, transformer, spec, **(signature_kwargs or {}))
            entry["verify"] = report.to_dict()
            if not report.passed:  # never leave a graph that failed its check where engines look
                result.path.unlink()
                (out / f"{name}.onnx.data").unlink(missing_ok=True)
                raise FlowblendError(f"ONNX graph of {name} failed verification: {report.summary()}")
        record["models"][name] = entry
    write_json_atomic(out / "export.json", record)
    return record


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_export_record(artifacts: str | Path, pair: str) -> dict:
    path = onnx_dir(artifacts, pair) / "export.json"
    if not path.is_file():
        raise FlowblendError(f"no export found at {path}: run `flowblend export --pair {pair}` first")
    return json.loads(path.read_text())
