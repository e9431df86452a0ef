"""The engine store: one place that names, writes and finds built engines, per machine.

An engine is only valid for what it was built from and on: the ONNX graph (its hash), the shape
profile, the precision and, for TensorRT plans, the GPU model, compute capability and TensorRT
version. All of that is the key; a manifest.json per engine directory records each entry with the
artifact's sha256. Writes go to a temp file renamed into place under a per-key file lock, so two
concurrent builds of one key build once and never clobber each other; a truncated or corrupted
file is caught by its hash, never silently used.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

from filelock import FileLock

from .base import FlowblendError

BACKEND_EXT = {"onnxruntime": "onnx", "tensorrt": "plan"}


@dataclass(frozen=True)
class EngineKey:
    pair: str
    model: str  # "large" | "small"
    backend: str  # "onnxruntime" | "tensorrt"
    precision: str  # "fp32" | "fp16" | "bf16"
    spec_key: str  # IOSpec.key(): the shape profile
    onnx_sha256: str
    gpu_name: str | None = None
    compute_capability: str | None = None
    trt_version: str | None = None

    def __post_init__(self):
        if self.backend not in BACKEND_EXT:
            raise FlowblendError(f"unknown backend {self.backend!r}: choose one of {', '.join(BACKEND_EXT)}")
        if self.backend == "tensorrt" and not (self.gpu_name and self.compute_capability and self.trt_version):
            raise FlowblendError("a TensorRT engine key needs gpu_name, compute_capability and trt_version")

    @property
    def device_tag(self) -> str:
        if self.backend != "tensorrt":
            return "cpu-portable"
        slug = re.sub(r"[^a-z0-9]+", "-", self.gpu_name.lower()).strip("-")
        return f"{slug}-sm{self.compute_capability.replace('.', '')}-trt{self.trt_version}"

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]

    def filename(self) -> str:
        return f"{self.model}-{self.precision}-{self.spec_key}-{self.digest()}.{BACKEND_EXT[self.backend]}"

    def identity(self) -> tuple:
        """What names an engine regardless of where it was built."""
        return (self.pair, self.model, self.backend, self.precision, self.spec_key)


def gpu_identity() -> dict | None:
    """{'gpu_name', 'compute_capability'} of the current CUDA device, or None without one."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        major, minor = torch.cuda.get_device_capability()
        return {"gpu_name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}"}
    except Exception:  # noqa: BLE001 - any failure means no usable GPU
        return None


def tensorrt_version() -> str | None:
    try:
        import tensorrt

        return tensorrt.__version__
    except Exception:  # noqa: BLE001
        return None


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def rebuild_command(key: EngineKey) -> str:
    return f"flowblend build --pair {key.pair} --backend {key.backend} --dtype {key.precision} --force"


class EngineStore:
    """Artifacts under <root>/<pair>/engines/<device-tag>/ with a manifest.json in each directory."""

    def __init__(self, root: str | Path = "artifacts"):
        self.root = Path(root)

    def directory(self, key: EngineKey) -> Path:
        return self.root / key.pair / "engines" / key.device_tag

    def path_for(self, key: EngineKey) -> Path:
        return self.directory(key) / key.filename()

    # -- manifest -----------------------------------------------------------------------------
    def _manifest_path(self, directory: Path) -> Path:
        return directory / "manifest.json"

    def manifest(self, directory: Path) -> dict:
        path = self._manifest_path(directory)
        if not path.is_file():
            return {"engines": {}}
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise FlowblendError(f"{path} is corrupted ({exc}); delete it and rebuild") from exc

    def _update_manifest(self, directory: Path, name: str, entry: dict) -> None:
        with FileLock(str(directory / ".manifest.lock")):
            data = self.manifest(directory)
            data["engines"][name] = entry
            tmp = directory / ".manifest.json.partial"
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, self._manifest_path(directory))

    def entries(self, pair: str) -> list[tuple[Path, EngineKey, dict]]:
        """Every engine recorded for a pair, on any machine."""
        out = []
        for directory in sorted((self.root / pair / "engines").glob("*")):
            for name, entry in self.manifest(directory).get("engines", {}).items():
                out.append((directory / name, EngineKey(**entry["key"]), entry))
        return out

    # -- write --------------------------------------------------------------------------------
    def build(self, key: EngineKey, builder: Callable[[Path], None], metadata: dict | None = None,
              force: bool = False) -> tuple[Path, bool]:
        """Run `builder(tmp_path)` unless a valid engine for `key` exists; returns (path, built)."""
        directory = self.directory(key)
        directory.mkdir(parents=True, exist_ok=True)
        path = self.path_for(key)
        with FileLock(str(directory / f".{key.digest()}.lock")):
            if not force:
                try:
                    return self.load(key), False
                except FlowblendError:
                    pass
            tmp = directory / f".{path.name}.partial"
            try:
                builder(tmp)
                if not tmp.is_file() or tmp.stat().st_size == 0:
                    raise FlowblendError(f"building {key.model} produced no engine file")
                digest = file_sha256(tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            self._update_manifest(directory, path.name, {"key": asdict(key), "sha256": digest,
                                                         "bytes": path.stat().st_size, **(metadata or {})})
        return path, True

    # -- read ---------------------------------------------------------------------------------
    def load(self, key: EngineKey) -> Path:
        """The path of the engine for `key`, checked against its manifest entry and hash."""
        directory = self.directory(key)
        path = self.path_for(key)
        entry = self.manifest(directory).get("engines", {}).get(path.name)
        if entry is None:
            raise FlowblendError(self._explain_missing(key))
        if not path.is_file():
            raise FlowblendError(f"engine file {path} listed in the manifest is missing; rebuild: {rebuild_command(key)}")
        size = path.stat().st_size
        if size != entry.get("bytes", size):
            raise FlowblendError(f"engine file {path} is truncated ({size} of {entry['bytes']} bytes); "
                                 f"rebuild: {rebuild_command(key)}")
        if file_sha256(path) != entry["sha256"]:
            raise FlowblendError(f"engine file {path} is corrupted (sha256 differs from the manifest); "
                                 f"rebuild: {rebuild_command(key)}")
        return path

    def _explain_missing(self, key: EngineKey) -> str:
        same = [k for _, k, _ in self.entries(key.pair) if k.identity() == key.identity()]
        if not same:
            return (f"no {key.backend} engine for {key.pair}/{key.model} ({key.precision}, {key.spec_key}); "
                    f"build it: flowblend build --pair {key.pair} --backend {key.backend} --dtype {key.precision}")
        diffs = []
        for other in same:
            d = [f"{f.name} {getattr(other, f.name)!r} (this machine/export: {getattr(key, f.name)!r})"
                 for f in fields(EngineKey) if getattr(other, f.name) != getattr(key, f.name)]
            diffs.append("; ".join(d))
        return (f"the {key.backend} engine for {key.pair}/{key.model} was built for a different setup: "
                f"{' | '.join(diffs)}. Rebuild on this machine: {rebuild_command(key)}")
