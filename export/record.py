"""Where an export lives on disk and what its export.json records: the contract between `export`,
`verify`, `build` and the engine store, read without importing the exporter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from flowblend.errors import FlowblendError

from ..engines.build import EXPORT_RECORD, onnx_dir  # noqa: F401 - re-exported
from ..engines.iospec import IOSpec
from ..engines.store import check_files, file_sha256, sidecars


def graph_files(path: Path) -> dict[str, dict]:
    """{file name: {"sha256", "bytes"}} of a graph and its external data, as export.json records them."""
    return {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in (*sidecars(path), path)}


def read_export_record(artifacts: str | Path, pair: str) -> dict:
    path = onnx_dir(artifacts, pair) / EXPORT_RECORD
    if not path.is_file():
        raise FlowblendError(f"no export found at {path}: run `flowblend export --pair {pair}` first")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FlowblendError(f"{path} is corrupted ({exc}); re-run `flowblend export --pair {pair}`") from exc


def checked_export(artifacts: str | Path, pair: str) -> tuple[dict, IOSpec, Path]:
    """A pair's export.json, its spec and directory, after re-hashing every graph and weights file."""
    record = read_export_record(artifacts, pair)
    directory = onnx_dir(artifacts, pair)
    for entry in record["models"].values():
        check_files(directory, entry.get("files") or {entry["file"]: entry}, f"re-run `flowblend export --pair {pair}`")
    return record, IOSpec.from_dict(record["spec"]), directory


@dataclass(frozen=True)
class ExternalRef:
    """Where one initializer's bytes sit outside the graph file (the ONNX external-data fields)."""

    name: str
    location: str
    offset: int
    length: int

    def read(self, directory: Path, start: int, size: int) -> bytes:
        with open(Path(directory) / self.location, "rb") as f:
            f.seek(self.offset + start)
            return f.read(size)


def external_references(model) -> list[ExternalRef]:
    """Every initializer of a loaded ModelProto (external data not loaded) that lives in a .data file."""
    refs = []
    for t in model.graph.initializer:
        if t.external_data:
            fields = {e.key: e.value for e in t.external_data}
            refs.append(ExternalRef(t.name, fields["location"], int(fields.get("offset", 0)),
                                    int(fields.get("length", 0))))
    return refs


def check_external_data(path: str | Path, fix: str = "re-run `flowblend export`") -> None:
    """One-line FlowblendError if a graph's external weights file is missing or shorter than the graph says."""
    import onnx

    path = Path(path)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - protobuf/onnx raise several types for a damaged file
        raise FlowblendError(f"{path} is not a readable ONNX graph ({type(exc).__name__}); {fix}") from exc
    ends: dict[str, int] = {}
    for ref in external_references(model):
        ends[ref.location] = max(ends.get(ref.location, 0), ref.offset + ref.length)
    for location, end in sorted(ends.items()):
        data = path.parent / location
        if not data.is_file():
            raise FlowblendError(f"{path.name}'s weights file {data} is missing (it must sit beside the graph); {fix}")
        if data.stat().st_size < end:
            raise FlowblendError(f"{path.name}'s weights file {data} is truncated ({data.stat().st_size} bytes, the "
                                 f"graph reads up to byte {end}); {fix}")
