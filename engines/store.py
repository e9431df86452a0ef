"""The engine store: the one place that names, writes and finds built engines, per machine.

An engine is valid only for what it was built from and on: the ONNX graph (its hash), the shape
profile, the precision and, for GPU engines, the GPU model, its compute capability and the
TensorRT version. All of that is the `EngineKey`. Engines live in
`<root>/<pair>/engines/<device-tag>/` (`cpu`, or e.g. `nvidia-h100-80gb-hbm3-sm90-trt10.9.0`), each
directory with a `manifest.json` recording every engine's key and the sha256 and size of its files.

Writes go to a temp file beside the target and are renamed into place under a per-key file lock
(`filelock`), so two concurrent builds of one key build once and never clobber each other; `load`
re-hashes the files, so a truncated or corrupted engine is reported, never used. A builder plugs in
as `builder(tmp_path)` (engines/build.py: ORT models and TensorRT plans) or as bytes (`write`).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Union

from filelock import FileLock

from flowblend.atomic import write_atomic
from flowblend.errors import FlowblendError

from .kinds import built_kind

MANIFEST = "manifest.json"
Payload = Union[bytes, Callable[[Path], None]]  # engine bytes, or builder(tmp_path) writing the file there


@dataclass(frozen=True)
class EngineKey:
    """Everything an engine depends on; two engines with equal keys are interchangeable."""

    pair: str
    model: str  # "large" | "small"
    backend: str  # "onnxruntime" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "bf16"
    spec_key: str  # IOSpec.key(): the shape profile
    onnx_sha256: str
    gpu_name: str | None = None  # None: a CPU engine
    compute_capability: str | None = None
    trt_version: str | None = None

    def __post_init__(self):
        if built_kind(self.backend).keyed_by_gpu and not (self.gpu_name and self.compute_capability and self.trt_version):
            raise FlowblendError("a TensorRT engine key needs gpu_name, compute_capability and trt_version")

    @property
    def device_tag(self) -> str:
        """Directory name: `cpu`, or GPU slug + compute capability (+ TensorRT version for plans)."""
        if self.gpu_name is None:
            return "cpu"
        slug = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")
        trt = f"-trt{self.trt_version}" if self.trt_version else ""
        return f"{slug}-sm{self.compute_capability.replace('.', '')}{trt}"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def filename(self) -> str:
        return f"{self.model}-{self.precision}-{self.spec_key}-{self.digest()}.{built_kind(self.backend).store_suffix}"

    def identity(self) -> tuple:
        """What names an engine's role regardless of where and from which export it was built."""
        return (self.pair, self.model, self.backend, self.precision, self.spec_key)


def describe_difference(stored: EngineKey, wanted: EngineKey) -> str:
    """`gpu_name 'A' (this machine/export: 'B'); ...` for every key field that differs."""
    return "; ".join(f"{f.name} {getattr(stored, f.name)!r} (this machine/export: {getattr(wanted, f.name)!r})"
                     for f in fields(EngineKey) if getattr(stored, f.name) != getattr(wanted, f.name))


def current_gpu_identity() -> dict | None:
    """{'gpu_name', 'compute_capability'} of the current CUDA device (torch, else cuda-python); None on CPU."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return {"gpu_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
        if torch.version.cuda is not None:
            return None  # a CUDA build of torch that sees no device: cuda-python would not either
    except Exception:  # noqa: BLE001 - a broken CUDA setup means "no usable GPU" here
        pass
    try:  # cuda-python (the trt extra) next to a CPU build of torch
        from cuda.bindings import runtime as cudart

        err, device = cudart.cudaGetDevice()
        if err != cudart.cudaError_t.cudaSuccess:
            return None
        err, props = cudart.cudaGetDeviceProperties(device)
        if err != cudart.cudaError_t.cudaSuccess:
            return None
        return {"gpu_name": props.name.decode(errors="replace").rstrip("\x00"),
                "compute_capability": f"{props.major}.{props.minor}"}
    except Exception:  # noqa: BLE001 - not installed, or no driver
        return None


gpu_identity = current_gpu_identity  # the name engines/build.py imports


def tensorrt_version() -> str | None:
    try:
        import tensorrt

        return tensorrt.__version__
    except Exception:  # noqa: BLE001 - absent or broken install: no TensorRT here
        return None


def tensorrt_key(pair: str, model: str, precision: str, spec_key: str, onnx_sha256: str, trt_version: str,
                 gpu: dict | None = None) -> EngineKey:
    """The key of a TensorRT plan for TensorRT `trt_version` on `gpu` (default: this machine's GPU)."""
    gpu = gpu or current_gpu_identity()
    if gpu is None:
        raise FlowblendError("TensorRT plans are built on, and for, the GPU that runs them, and no CUDA GPU is "
                             "visible here (torch.cuda.is_available() is False); use --backend onnxruntime")
    return EngineKey(pair, model, "tensorrt", precision, spec_key, onnx_sha256, gpu["gpu_name"],
                     gpu["compute_capability"], trt_version)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sidecars(path: Path) -> list[Path]:
    """External-data files that belong to an engine or graph file (`<name>.data`)."""
    return sorted(p for p in path.parent.glob(f"{path.name}.*") if p.is_file() and not p.name.endswith(".lock"))


def check_files(directory: Path, files: dict[str, dict], fix: str) -> None:
    """FlowblendError if a recorded file is missing, truncated or altered; `fix` says what to run."""
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            raise FlowblendError(f"{path} is missing; {fix}")
        size = path.stat().st_size
        if size != want["bytes"]:
            raise FlowblendError(f"{path} is truncated or altered ({size} bytes, recorded {want['bytes']}); {fix}")
        if file_sha256(path) != want["sha256"]:
            raise FlowblendError(f"{path} is corrupted (its sha256 differs from the record); {fix}")


def write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))


def rebuild_command(key: EngineKey) -> str:
    return f"flowblend build --pair {key.pair} --backend {key.backend} --force"


@dataclass(frozen=True)
class StoredEngine:
    path: Path
    key: EngineKey
    entry: dict  # the manifest entry: key, files and the builder's metadata


class EngineStore:
    """Engines under `root`: `.path_for(key)`, `.build(key, builder)`, `.write(key, bytes)`, `.load(key)`, `.find()`."""

    def __init__(self, root: str | Path = "artifacts"):
        self.root = Path(root)

    def directory(self, key: EngineKey) -> Path:
        return self.root / key.pair / "engines" / key.device_tag

    def path_for(self, key: EngineKey) -> Path:
        return self.directory(key) / key.filename()

    def lock(self, key: EngineKey) -> FileLock:
        """The per-key lock `build` holds; hold it around a `write` of your own to keep builds exclusive."""
        directory = self.directory(key)
        directory.mkdir(parents=True, exist_ok=True)
        return FileLock(str(directory / f".{key.digest()}.lock"))

    # -- manifest -------------------------------------------------------------------------------------
    def manifest(self, directory: Path) -> dict:
        path = directory / MANIFEST
        if not path.is_file():
            return {"engines": {}}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FlowblendError(f"{path} is corrupted ({exc}); delete it and rebuild the engines listed "
                                 "there") from exc

    def _record(self, directory: Path, name: str, entry: dict) -> None:
        with FileLock(str(directory / f".{MANIFEST}.lock")):  # other keys' builds update the same manifest
            data = self.manifest(directory)
            data["engines"][name] = entry
            write_json_atomic(directory / MANIFEST, data)

    def find(self, pair: str, **match) -> list[StoredEngine]:
        """Engines recorded for `pair` on any machine, filtered by key fields (e.g. `model="large"`)."""
        out = []
        for directory in sorted((self.root / pair / "engines").glob("*")):
            for name, entry in self.manifest(directory).get("engines", {}).items():
                key = EngineKey(**entry["key"])
                if all(getattr(key, k) == v for k, v in match.items()):
                    out.append(StoredEngine(directory / name, key, entry))
        return out

    def entries(self, pair: str) -> list[tuple[Path, EngineKey, dict]]:
        """`find(pair)` as (path, key, entry) tuples."""
        return [(s.path, s.key, s.entry) for s in self.find(pair)]

    # -- write ----------------------------------------------------------------------------------------
    def write(self, key: EngineKey, payload: Payload, metadata: dict | None = None) -> Path:
        """Write the engine for `key` atomically and record it (callers that may race hold `lock(key)`).

        `payload` is the engine's bytes or `builder(tmp_path)`, which writes the engine at `tmp_path`
        (a hidden `.partial` file beside the target) and may put external data at `<target name>.data`.
        Only a complete, non-empty result is renamed into place and recorded.
        """
        directory = self.directory(key)
        directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        tmp = directory / f".{path.name}.partial"
        try:
            if isinstance(payload, (bytes, bytearray, memoryview)):
                tmp.write_bytes(payload)
            else:
                payload(tmp)
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise FlowblendError(f"building {key.pair}/{key.model} ({key.backend}) produced no engine file")
            files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sidecars(path)}
            files[path.name] = {"sha256": file_sha256(tmp), "bytes": tmp.stat().st_size}
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self._record(directory, path.name, {"key": asdict(key), "files": files, **(metadata or {})})
        return path

    def build(self, key: EngineKey, builder: Payload, metadata: dict | None = None,
              force: bool = False) -> tuple[Path, bool]:
        """Reuse a valid engine for `key`, else write one; returns (path, built_now). Safe across processes.

        A `build_settings` entry in `metadata` (TensorRT's optimization level and workspace) is not part
        of the key, since the runtime loads an engine without knowing how it was built; a stored engine
        built with other settings is rebuilt instead of reused, so a new --opt-level takes effect."""
        with self.lock(key):
            if not force:
                try:
                    path = self.load(key)
                    wanted = (metadata or {}).get("build_settings")
                    stored = self.manifest(self.directory(key))["engines"][path.name].get("build_settings")
                    if wanted is None or stored == wanted:
                        return path, False
                except FlowblendError:
                    pass  # missing, stale or damaged: (re)build below
            return self.write(key, builder, metadata), True

    # -- read -----------------------------------------------------------------------------------------
    def load(self, key: EngineKey) -> Path:
        """The path of the engine for `key`, after checking its manifest key and every file's size and sha256."""
        path = self.path_for(key)
        entry = self.manifest(self.directory(key)).get("engines", {}).get(path.name)
        if entry is None:
            raise FlowblendError(self._explain_missing(key))
        stored = EngineKey(**entry["key"])
        if stored != key:
            raise FlowblendError(f"{path} is recorded for another key: {describe_difference(stored, key)}; "
                                 f"rebuild: {rebuild_command(key)}")
        if not entry.get("files"):
            raise FlowblendError(f"the manifest entry of {path} records no file hashes (an older flowblend wrote "
                                 f"it); rebuild: {rebuild_command(key)}")
        check_files(path.parent, entry["files"], f"rebuild: {rebuild_command(key)}")
        return path

    def _explain_missing(self, key: EngineKey) -> str:
        others = [s.key for s in self.find(key.pair) if s.key.identity() == key.identity()]
        if not others:
            return (f"no {key.backend} engine for {key.pair}/{key.model} ({key.precision}, {key.spec_key}) on this "
                    f"machine ({key.device_tag}); build it: flowblend build --pair {key.pair} --backend {key.backend}")
        diffs = " | ".join(describe_difference(other, key) for other in others)
        return (f"the {key.backend} engine for {key.pair}/{key.model} was built for another setup: {diffs}. "
                f"Rebuild on this machine: {rebuild_command(key)}")
