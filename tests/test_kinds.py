"""engines/kinds.py: the engine kinds and precisions are tables the rest of the code reads, not if-chains.

The references are the libraries' own names (torch dtypes, onnx.TensorProto element types) and the
code that consumes the tables: a new kind registered here from a test module is chosen by the CLI's
check, built into the store by `build_pair_engines` and loaded by `make_engines`, with no flowblend file
edited.
"""
from __future__ import annotations

import sys

import onnx
import pytest
import torch

from flowblend.engines import kinds
from flowblend.engines.factory import check_backend, check_dtype, make_engines, torch_dtype
from flowblend.engines.iospec import DTYPE_NAMES, dtype_name
from flowblend.errors import FlowblendError


def test_each_precision_names_the_libraries_own_types():
    for name, p in kinds.PRECISIONS.items():
        assert torch_dtype(name) is getattr(torch, p.torch_name)
        if p.exportable:  # the names ONNX exports and engine keys use: one torch dtype each
            assert DTYPE_NAMES[name] is torch_dtype(name) and dtype_name(p.torch_dtype) == name
        assert onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, p.onnx_type)) is not None
        assert 0 < p.min_cosine <= 1 and p.remedy and p.onnxruntime_cpu in ("session", "unoptimized", "reference")
    assert not kinds.PRECISIONS["fp32"].fp32_islands  # nothing to keep apart in FP32
    fp8 = kinds.PRECISIONS["fp8"]  # one precision entry plus its quantizer module (engines/fp8.py)
    assert not fp8.exportable and fp8.quantize_function().__module__ == "flowblend.engines.fp8"
    assert "fp8" not in DTYPE_NAMES and kinds.EXPORT_PRECISIONS == ("fp32", "fp16", "bf16")
    assert "fp8" in kinds.engine_kind("torch").precisions and "fp8" not in kinds.engine_kind("tensorrt").precisions


def test_unknown_names_are_refused_with_the_table():
    with pytest.raises(FlowblendError, match="unknown backend 'cuda-magic': choose one of torch, torch-compile, "
                                             "onnxruntime, tensorrt"):
        check_backend("cuda-magic")
    with pytest.raises(FlowblendError, match="unknown dtype 'fp4': choose one of fp32, fp16, bf16, fp8"):
        check_dtype("fp4")
    with pytest.raises(FlowblendError, match="--backend onnxruntime takes --dtype fp32 . fp16 . bf16, not fp8: fp8 "
                                             "runs with --backend torch or torch-compile"):
        kinds.check_kind_precision(kinds.engine_kind("onnxruntime"), "fp8")
    with pytest.raises(FlowblendError, match="choose one of onnxruntime, tensorrt"):
        kinds.built_kind("torch")


# -- a new engine kind from this module alone ---------------------------------------------------------
def build_copy(onnx_path, spec, out_path, **_options):
    """The 'copy' kind's builder: its engine file is the exported graph itself (run by ONNX Runtime)."""
    out_path.write_bytes(onnx_path.read_bytes())


def load_copies(paths, device):
    from flowblend.engines.ort_engine import load_engines

    return load_engines(paths, device)


def test_a_new_engine_kind_is_one_table_entry(tmp_path, monkeypatch):
    from flowblend.cli.main import main
    from flowblend.engines.build import build_pair_engines
    from flowblend.families import load_pair

    here = sys.modules[__name__].__name__
    kind = kinds.EngineKind("copy", runs_transformers=False, store_suffix="onnx", builder=f"{here}:build_copy",
                            loader=f"{here}:load_copies")
    monkeypatch.setitem(kinds.ENGINE_KINDS, "copy", kind)
    assert check_backend("copy") == "copy"
    assert main(["export", "--pair", "toy", "--artifacts", str(tmp_path), "--no-progress", "--no-verify"]) == 0
    built = build_pair_engines("toy", "copy", tmp_path, progress=False)
    assert {m: now for m, (_, now) in built.items()} == {"large": True, "small": True}
    onnx_files = {p.name: p.read_bytes() for p in (tmp_path / "toy" / "onnx").glob("*.onnx")}
    assert all(path.read_bytes() == onnx_files[f"{m}.onnx"] for m, (path, _) in built.items())
    pair = load_pair("toy", load_transformers=False)
    engines = make_engines("copy", pair, latent_shape=(3, 9, 32, 32), guidance=4.0, artifacts=str(tmp_path))
    assert sorted(engines) == ["large", "small"] and all(type(e).__name__ == "OrtEngine" for e in engines.values())
