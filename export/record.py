"""Where an export lives on disk and what its export.json records: the contract between `export`,
`verify`, `build` and the engine store, read without importing the exporter.
"""
from __future__ import annotations

import json
from pathlib import Path

from flowblend.engines.iospec import IOSpec
from flowblend.engines.store import check_files, file_sha256, sidecars
from flowblend.errors import FlowblendError

EXPORT_RECORD = "export.json"


def onnx_dir(artifacts: str | Path, pair: str) -> Path:
    return Path(artifacts) / pair / "onnx"


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
