"""Build (or reuse) the engines of an exported pair into the engine store, and find them again.

The export record (artifacts/<pair>/onnx/export.json) is the contract with export/: it names each
ONNX graph, its sha256 and the IOSpec it was exported for. Engines are keyed by all of that plus,
for TensorRT, the GPU and TensorRT version (engines/store.py).
"""
from __future__ import annotations

import json
from pathlib import Path

from flowblend.errors import FlowblendError

from .install_hints import TRT_INSTALL_HINT
from .iospec import IOSpec
from .kinds import built_kind
from .store import EngineKey, EngineStore, check_files, gpu_identity, tensorrt_version

EXPORT_RECORD = "export.json"  # beside the graphs: what export/ wrote, the contract with the engines


def onnx_dir(artifacts: str | Path, pair: str) -> Path:
    """Where a pair's ONNX export lives under an artifact root: the one spelling of that path."""
    return Path(artifacts) / pair / "onnx"


def export_record_path(artifacts: str | Path, pair: str) -> Path:
    return onnx_dir(artifacts, pair) / EXPORT_RECORD


def read_export(artifacts: str | Path, pair: str) -> tuple[dict, IOSpec, Path]:
    path = export_record_path(artifacts, pair)
    folder = path.parent
    if not path.is_file():
        raise FlowblendError(f"no export found at {path}: run `flowblend export --pair {pair}` first")
    record = json.loads(path.read_text())
    return record, IOSpec.from_dict(record["spec"]), folder


def checked_onnx(onnx_dir: Path, entry: dict, pair: str) -> Path:
    """The ONNX file of an export entry, refused in one line if it or its external weights (.data) file is
    missing, truncated or altered since export (both are what the parser reads, `parse_from_file` beside)."""
    check_files(onnx_dir, entry.get("files") or {entry["file"]: entry}, f"re-run `flowblend export --pair {pair}`")
    return onnx_dir / entry["file"]


def tensorrt_target() -> dict:
    """GPU and TensorRT identity for TensorRT keys; FlowblendError saying what is missing otherwise."""
    version = tensorrt_version()
    if version is None:
        raise FlowblendError(f"TensorRT is not installed (import tensorrt failed): {TRT_INSTALL_HINT}")
    gpu = gpu_identity()
    if gpu is None:
        raise FlowblendError("TensorRT is installed but no CUDA GPU is visible (torch.cuda.is_available() is False); "
                             "TensorRT engines are built on, and for, the GPU that will run them")
    return {**gpu, "trt_version": version}


def engine_key(pair: str, model: str, backend: str, spec: IOSpec, onnx_sha256: str,
               target: dict | None = None) -> EngineKey:
    return EngineKey(pair, model, backend, spec.dtype, spec.key(), onnx_sha256, **(target or {}))


def _target(kind) -> dict | None:
    return tensorrt_target() if kind.keyed_by_gpu else None


def build_pair_engines(pair: str, backend: str, artifacts: str | Path = "artifacts", force: bool = False,
                       progress: bool = True, **trt_options) -> dict[str, tuple[Path, bool]]:
    """Build or reuse every model's engine of an exported pair; returns {model: (path, built_now)}."""
    from tqdm.auto import tqdm

    kind = built_kind(backend)
    record, spec, onnx_dir = read_export(artifacts, pair)
    target = _target(kind)
    store = EngineStore(artifacts)
    build = kind.build_function()
    out = {}
    for model in tqdm(list(record["models"]), desc=f"build {backend}", unit="model", disable=not progress):
        entry = record["models"][model]
        onnx_path = checked_onnx(onnx_dir, entry, pair)
        key = engine_key(pair, model, backend, spec, entry["sha256"], target)
        builder = lambda tmp, src=onnx_path: build(src, spec, tmp, **trt_options)  # noqa: E731
        metadata = {"onnx": entry["file"], "spec": spec.to_dict()}
        if kind.keyed_by_gpu:  # what changes the plan but not its key: a different setting rebuilds
            metadata["build_settings"] = {k: trt_options[k] for k in ("opt_level", "workspace_gib") if k in trt_options}
        out[model] = store.build(key, builder, metadata, force=force)
    return out


def locate_pair_engines(pair: str, backend: str, spec: IOSpec, artifacts: str | Path = "artifacts") -> dict[str, Path]:
    """Paths of built engines for the runtime's spec, or a FlowblendError naming what to run."""
    record, exported, onnx_dir = read_export(artifacts, pair)
    if (exported.batch, exported.latent, exported.text_len, exported.dtype) != \
            (spec.batch, spec.latent, spec.text_len, spec.dtype) and exported.static:
        raise FlowblendError(
            f"the {pair} export is for batch {exported.batch}, latents {exported.latent}, {exported.dtype} but this run "
            f"needs batch {spec.batch}, latents {spec.latent}, {spec.dtype}; re-export with matching "
            f"--frames/--height/--width/--guidance/--dtype, then `flowblend build`")
    target = _target(built_kind(backend))
    store = EngineStore(artifacts)
    return {model: store.load(engine_key(pair, model, backend, exported, entry["sha256"], target))
            for model, entry in record["models"].items()}
