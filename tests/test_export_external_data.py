"""External data end to end: a graph above the threshold is written with its .data, verified, built from
(ONNX Runtime; TensorRT's `parse_from_file` through the stand-in, with the data beside the graph), and
refused in one line when the .data is missing or truncated, at verify and at build time."""
import sys

import fake_tensorrt
import onnx
import pytest
from test_trt_build import H100, pretend_gpu
from tiny_models import TEXT, latent_shape, tiny_pair

from flowblend.cli.main import main
from flowblend.engines import build as build_mod
from flowblend.engines.iospec import IOSpec
from flowblend.errors import FlowblendError
from flowblend.export.onnx import export_pair
from flowblend.export.record import check_external_data, external_references
from flowblend.export.verify import verify_export, verify_onnx
from flowblend.families import LoadedPair, get_family

SPEC = IOSpec(batch=2, latent=latent_shape("wan"), text_len=TEXT[0], text_dim=TEXT[1], dtype="fp16")


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    models = {"small": tiny_pair("wan")["small"]}
    pair = LoadedPair(get_family("wan"), models, None, None, {"small": "tiny"})
    record = export_pair(pair, SPEC, root, external_data_threshold=1, progress=False)
    return root, models, record


def test_a_graph_above_the_threshold_is_written_with_its_data_and_verified(export):
    root, _, record = export
    entry = record["models"]["small"]
    graph = root / "wan" / "onnx" / "small.onnx"
    assert entry["external_data"] and set(entry["files"]) == {"small.onnx", "small.onnx.data"}
    model = onnx.load(graph, load_external_data=False)
    refs = external_references(model)
    assert refs and {r.location for r in refs} == {"small.onnx.data"}
    assert max(r.offset + r.length for r in refs) <= (graph.parent / "small.onnx.data").stat().st_size
    assert entry["verify"]["passed"] and entry["verify"]["min_cosine"] >= 0.999
    assert onnx.load(graph).graph.initializer[0].raw_data  # onnx itself resolves the data beside the graph


def test_ort_and_tensorrt_builds_read_the_data_beside_the_graph(export, monkeypatch):
    root, _, _ = export
    out = build_mod.build_pair_engines("wan", "onnxruntime", root, progress=False, force=True)
    assert out["small"][0].is_file()
    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    pretend_gpu(monkeypatch, H100)
    seen = []
    original = fake_tensorrt.OnnxParser.parse_from_file

    def parse(self, path):
        seen.append((path, (root / "wan" / "onnx" / "small.onnx.data").is_file()))
        return original(self, path)

    monkeypatch.setattr(fake_tensorrt.OnnxParser, "parse_from_file", parse)
    build_mod.build_pair_engines("wan", "tensorrt", root, progress=False, verify=None)
    assert seen == [(str(root / "wan" / "onnx" / "small.onnx"), True)]


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_a_missing_or_truncated_data_file_is_refused_in_one_line(export, tmp_path, damage, capsys):
    import shutil

    root, models, _ = export
    copy = tmp_path / "artifacts"
    shutil.copytree(root / "wan", copy / "wan")
    data = copy / "wan" / "onnx" / "small.onnx.data"
    if damage == "missing":
        data.unlink()
    else:
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    graph = copy / "wan" / "onnx" / "small.onnx"
    with pytest.raises(FlowblendError, match=f"small.onnx.data is {damage}") as exc:
        check_external_data(graph)
    assert "\n" not in str(exc.value)
    with pytest.raises(FlowblendError, match=f"{damage}"):
        verify_onnx(graph, models["small"], SPEC)
    pair = LoadedPair(get_family("wan"), models, None, None, {})
    with pytest.raises(FlowblendError, match=f"small.onnx.data is {damage}"):
        verify_export(copy, pair)
    assert main(["build", "--pair", "wan", "--artifacts", str(copy), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"small.onnx.data is {damage}" in err[0] and "flowblend export --pair wan" in err[0]
