"""TensorRT builds on CPU: the optimization profile, the builder settings, the store keys and the whole
build orchestration, driven through a recording stand-in of TensorRT (tests/fake_tensorrt.py), plus
`flowblend build --backend tensorrt` saying exactly what is missing on this machine."""
import dataclasses
import json
import sys
from types import SimpleNamespace

import fake_tensorrt
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from flowblend.cli.main import main
from flowblend.engines import build as build_mod
from flowblend.engines import store as store_mod
from flowblend.engines.iospec import IOSpec
from flowblend.engines.store import EngineStore, file_sha256
from flowblend.engines.trt_build import build_plan_bytes, build_settings, optimization_profile
from flowblend.errors import FlowblendError

H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
SPEC = IOSpec(batch=2, latent=(4, 3, 4, 6), text_len=7, text_dim=16, dtype="fp16")
_ONNX_TYPES = {"fp32": TensorProto.FLOAT, "fp16": TensorProto.FLOAT16, "bf16": TensorProto.BFLOAT16}


def write_onnx(path, spec: IOSpec):
    """A real ONNX graph with the export's I/O contract (velocity = latents; the fake computes nothing)."""
    dims = dict(zip(("frames", "height", "width"), range(2, 5)))
    lat = list(spec.shapes("opt")["latents"])
    for name in spec.dynamic:
        lat[dims[name]] = name  # symbolic dim, as torch.export writes dynamic axes
    t = _ONNX_TYPES[spec.dtype]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["latents"], ["velocity"])], "tiny",
        [helper.make_tensor_value_info("latents", t, lat),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [spec.batch]),
         helper.make_tensor_value_info("text_embeds", t, [spec.batch, spec.text_len, spec.text_dim])],
        [helper.make_tensor_value_info("velocity", t, lat)])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))


def write_export(root, spec=SPEC, pair="toy", corrupt=False):
    """artifacts/<pair>/onnx/{large,small}.onnx + export.json, as export/onnx.py lays them out."""
    onnx_dir = root / pair / "onnx"
    onnx_dir.mkdir(parents=True)
    models = {}
    for name in ("large", "small"):
        path = onnx_dir / f"{name}.onnx"
        if corrupt:
            path.write_bytes(b"not an onnx graph")
        else:
            write_onnx(path, spec)
        models[name] = {"file": path.name, "sha256": file_sha256(path), "bytes": path.stat().st_size}
    (onnx_dir / "export.json").write_text(json.dumps({"pair": pair, "spec": spec.to_dict(), "models": models,
                                                      "sources": {"large": "shipped", "small": "shipped"}}))
    return onnx_dir


def pretend_gpu(monkeypatch, identity):
    """Every name the build path asks "which GPU is this?" through answers `identity` (None: no GPU)."""
    for module, name in ((build_mod, "gpu_identity"), (store_mod, "gpu_identity"), (store_mod, "current_gpu_identity")):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, lambda: None if identity is None else dict(identity))


@pytest.fixture
def trt(monkeypatch):
    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    pretend_gpu(monkeypatch, H100)
    return fake_tensorrt


class Report(SimpleNamespace):
    def summary(self):
        return f"min cosine {self.cosine}"


# -- pure functions -------------------------------------------------------------------------------
def test_profile_of_a_static_export_is_one_point():
    record = {"spec": {"batch": 2, "latent": [16, 5, 60, 104], "text_len": 512, "text_dim": 4096, "dtype": "fp16"}}
    lat, ts, txt = (2, 16, 5, 60, 104), (2,), (2, 512, 4096)
    assert optimization_profile(record) == {"latents": (lat, lat, lat), "timestep": (ts, ts, ts),
                                            "text_embeds": (txt, txt, txt)}


def test_profile_of_a_dynamic_export_spans_its_ranges():
    record = {"spec": {"batch": 1, "latent": [128, 4, 8, 12], "text_len": 128, "text_dim": 4096, "dtype": "bf16",
                       "with_mask": True, "dynamic": {"frames": [1, 9], "width": [8, 16]}}}
    profile = optimization_profile(record)
    assert profile["latents"] == ((1, 128, 1, 8, 8), (1, 128, 4, 8, 12), (1, 128, 9, 8, 16))
    assert profile["text_mask"] == ((1, 128),) * 3
    assert set(profile) == {"latents", "timestep", "text_embeds", "text_mask"}  # inputs only, never velocity


def test_build_settings_are_strongly_typed_without_tf32_and_check_options():
    s = build_settings(SPEC, opt_level=5, workspace_gib=1.5)
    assert (s.strongly_typed, s.tf32, s.opt_level, s.workspace_bytes) == (True, False, 5, 3 * 2**29)
    for bad in (dict(opt_level=6), dict(opt_level=-1), dict(workspace_gib=0)):
        with pytest.raises(FlowblendError, match="--opt-level|--workspace-gib"):
            build_settings(SPEC, **bad)


# -- builds through the stand-in --------------------------------------------------------------------
def test_build_goes_through_the_store_keyed_by_gpu_and_tensorrt(tmp_path, trt):
    write_export(tmp_path)
    checked = []

    def verify(onnx_path, plan_path):
        checked.append((onnx_path.name, plan_path.name, plan_path.read_bytes()[:8]))
        return Report(passed=True, cosine=0.9999)

    out = build_mod.build_pair_engines("toy", "tensorrt", tmp_path, progress=False, opt_level=2, workspace_gib=0.5,
                                       verify=verify)
    assert set(out) == {"large", "small"} and all(built for _, built in out.values())
    for path, _ in out.values():
        assert path.parent.name == "nvidia-h100-80gb-hbm3-sm90-trt10.99.0" and path.suffix == ".plan"
        assert path.read_bytes().startswith(fake_tensorrt.PLAN_MAGIC)
    entries = EngineStore(tmp_path).entries("toy")
    assert {(k.model, k.gpu_name, k.compute_capability, k.trt_version, k.precision) for _, k, _ in entries} == \
        {(m, H100["gpu_name"], "9.0", "10.99.0", "fp16") for m in ("large", "small")}
    # each plan was checked while still the store's temp file, before it was accepted
    assert [(o, p.startswith(".") and p.endswith(".partial"), head) for o, p, head in checked] == \
        [("large.onnx", True, fake_tensorrt.PLAN_MAGIC), ("small.onnx", True, fake_tensorrt.PLAN_MAGIC)]
    # what the builder was told
    # 1 << STRONGLY_TYPED, with TensorRT 10's enum values (STRONGLY_TYPED = 1; 1 would be EXPLICIT_BATCH)
    assert trt.events("create_network") == [("create_network", 2), ("create_network", 2)]
    assert trt.events("set_memory_pool_limit") == [("set_memory_pool_limit", "WORKSPACE", 2**29)] * 2
    assert ("clear_flag", "TF32") in trt.EVENTS
    assert all(e[1] == 2 and "FP16" not in e[2] for e in trt.events("build_serialized_network"))
    lat = (2, 4, 3, 4, 6)
    assert ("set_shape", "latents", lat, lat, lat) in trt.EVENTS
    assert ("set_shape", "text_embeds", (2, 7, 16), (2, 7, 16), (2, 7, 16)) in trt.EVENTS
    # second run with the same settings: nothing rebuilt
    again = build_mod.build_pair_engines("toy", "tensorrt", tmp_path, progress=False, opt_level=2, workspace_gib=0.5,
                                         verify=verify)
    assert not any(built for _, built in again.values()) and len(trt.events("build_serialized_network")) == 2
    # another optimization level is not in the key (the runtime cannot know it) but must not reuse the old plan
    other = build_mod.build_pair_engines("toy", "tensorrt", tmp_path, progress=False, opt_level=4, workspace_gib=0.5,
                                         verify=verify)
    assert all(built for _, built in other.values()) and len(trt.events("build_serialized_network")) == 4
    assert {e["build_settings"]["opt_level"] for _, _, e in EngineStore(tmp_path).entries("toy")} == {4}


def test_timing_cache_is_shared_by_builds_on_one_gpu(tmp_path, trt):
    write_export(tmp_path)
    out = build_mod.build_pair_engines("toy", "tensorrt", tmp_path, progress=False)
    cache = out["large"][0].parent / "timing.cache"
    assert cache.is_file() and cache.read_bytes().startswith(fake_tensorrt.CACHE_MAGIC)
    loads = [e[1] for e in trt.events("create_timing_cache")]
    after_first = fake_tensorrt.ITimingCache({"latents:HALF|timestep:FLOAT|text_embeds:HALF"}).serialize()
    assert loads[0] == b""  # the first build starts empty ...
    assert loads[1] == after_first  # ... the second starts from what the first saved
    assert trt.events("timing_cache_combine")  # and saving merges with what is on disk by then


def test_dynamic_profile_reaches_the_builder(tmp_path, trt):
    spec = IOSpec(batch=1, latent=(4, 3, 4, 6), text_len=7, text_dim=16, dtype="fp32", dynamic={"frames": (1, 5)})
    write_export(tmp_path, spec)
    build_mod.build_pair_engines("toy", "tensorrt", tmp_path, progress=False)
    assert ("set_shape", "latents", (1, 4, 1, 4, 6), (1, 4, 3, 4, 6), (1, 4, 5, 4, 6)) in trt.EVENTS
    assert not trt.events("build_error")


def test_the_deprecated_explicit_batch_flag_is_refused(tmp_path, trt, monkeypatch):
    """Control: code passing TensorRT 8's EXPLICIT_BATCH bit (or shifting the wrong member) fails here."""
    flags = trt.NetworkDefinitionCreationFlag
    assert (int(flags.EXPLICIT_BATCH), int(flags.STRONGLY_TYPED)) == (0, 1)  # TensorRT 10's Python enum
    builder = trt.Builder(trt.Logger())
    for bad in (1 << int(flags.EXPLICIT_BATCH), (1 << int(flags.EXPLICIT_BATCH)) | (1 << int(flags.STRONGLY_TYPED))):
        with pytest.raises(trt.ContractViolation, match="EXPLICIT_BATCH"):
            builder.create_network(bad)
    assert builder.create_network(1 << int(flags.STRONGLY_TYPED)).strongly_typed
    # the stand-in as it was (STRONGLY_TYPED = 0) makes engines/trt_build.py pass bit 0: refused now
    write_export(tmp_path)
    monkeypatch.setattr(flags, "STRONGLY_TYPED", 0)
    with pytest.raises(trt.ContractViolation, match="EXPLICIT_BATCH"):
        build_plan_bytes(tmp_path / "toy" / "onnx" / "large.onnx", build_settings(SPEC), progress=False)


def test_set_shape_refuses_an_inconsistent_profile(tmp_path, trt):
    """Control: TensorRT's set_shape raises ValueError unless min <= opt <= max in one rank."""
    profile = trt.IOptimizationProfile()
    for lo, opt, hi in (((1, 4), (2, 4), (1, 4)), ((2, 4), (1, 4), (3, 4)), ((1, 4), (1, 4, 1), (1, 4)),
                        ((-1, 4), (1, 4), (1, 4))):
        with pytest.raises(ValueError, match="set_shape"):
            profile.set_shape("latents", lo, opt, hi)
    profile.set_shape("latents", (1, 4), (2, 4), (3, 4))
    write_export(tmp_path)
    settings = build_settings(SPEC)
    _, opt, hi = settings.profile["latents"]
    above = opt[:2] + (opt[2] + 1,) + opt[3:]  # min frames above opt (and above max)
    bad = dataclasses.replace(settings, profile={**settings.profile, "latents": (above, opt, hi)})
    with pytest.raises(ValueError, match="set_shape"):
        build_plan_bytes(tmp_path / "toy" / "onnx" / "large.onnx", bad, progress=False)


def test_failed_check_stores_nothing(tmp_path, trt):
    write_export(tmp_path)
    with pytest.raises(FlowblendError, match="failed its check against PyTorch.*min cosine 0.9"):
        build_mod.build_pair_engines("toy", "tensorrt", tmp_path, progress=False,
                                     verify=lambda o, p: Report(passed=False, cosine=0.95))
    engines = tmp_path / "toy" / "engines"
    assert not list(engines.rglob("*.plan")) and not list(engines.rglob("*.partial"))
    assert EngineStore(tmp_path).entries("toy") == []


def test_builder_failure_and_parser_failure_are_clear_errors(tmp_path, trt):
    write_export(tmp_path)
    trt.KNOBS.fail_build = True
    with pytest.raises(FlowblendError, match="could not build .*--workspace-gib"):
        build_mod.build_pair_engines("toy", "tensorrt", tmp_path, progress=False)
    assert not list((tmp_path / "toy" / "engines").rglob("*.plan"))
    bad = tmp_path / "bad"
    write_export(bad, corrupt=True)
    with pytest.raises(FlowblendError, match="ONNX parser rejected .*large.onnx.*re-export"):
        build_mod.build_pair_engines("toy", "tensorrt", bad, progress=False)


def write_onnx_with_external_weights(path):
    """latents + bias, the bias stored in `<name>.onnx.data` beside the graph (how large exports keep weights)."""
    import numpy as np
    from onnx import numpy_helper

    lat = list(SPEC.shapes("opt")["latents"])
    bias = numpy_helper.from_array(np.arange(64, dtype=np.float16).reshape(1, 1, 1, 1, 64)[..., :6], "bias")
    graph = helper.make_graph(
        [helper.make_node("Add", ["latents", "bias"], ["velocity"])], "tiny",
        [helper.make_tensor_value_info("latents", TensorProto.FLOAT16, lat),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [SPEC.batch]),
         helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT16, [SPEC.batch, SPEC.text_len, SPEC.text_dim])],
        [helper.make_tensor_value_info("velocity", TensorProto.FLOAT16, lat)], initializer=[bias])
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path),
                    save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data",
                    size_threshold=0)
    return path.with_name(path.name + ".data")


@pytest.mark.parametrize("damage", ["none", "missing", "truncated"])
def test_the_parser_reads_external_weights_beside_the_onnx(tmp_path, trt, damage):
    """TensorRT's parse_from_file loads external data from the .onnx's folder; a missing/short .data fails there."""
    data = write_onnx_with_external_weights(tmp_path / "large.onnx")
    if damage == "missing":
        data.unlink()
    elif damage == "truncated":
        data.write_bytes(data.read_bytes()[:4])
    if damage == "none":
        assert build_plan_bytes(tmp_path / "large.onnx", build_settings(SPEC), progress=False).startswith(trt.PLAN_MAGIC)
        return
    with pytest.raises(FlowblendError, match="ONNX parser rejected .*" + ("does not exist" if damage == "missing"
                                                                          else "truncated")):
        build_plan_bytes(tmp_path / "large.onnx", build_settings(SPEC), progress=False)


def test_progress_is_reported_per_builder_phase(tmp_path, trt, capsys):
    onnx_path = tmp_path / "m.onnx"
    write_onnx(onnx_path, SPEC)
    plan = build_plan_bytes(onnx_path, build_settings(SPEC), timing_cache=None, progress=True)
    assert plan.startswith(fake_tensorrt.PLAN_MAGIC)
    err = capsys.readouterr().err
    assert "Building engine" in err and "Tactic selection" in err


def test_plan_built_on_another_gpu_is_refused_with_a_rebuild_hint(tmp_path, trt, monkeypatch):
    write_export(tmp_path)
    build_mod.build_pair_engines("toy", "tensorrt", tmp_path, progress=False)
    pretend_gpu(monkeypatch, {"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"})
    with pytest.raises(FlowblendError, match="gpu_name.*H100.*A100.*--backend tensorrt.*--force"):
        build_mod.locate_pair_engines("toy", "tensorrt", SPEC, tmp_path)


# -- the CLI on this machine ------------------------------------------------------------------------
def test_cli_build_tensorrt_without_tensorrt_says_so(tmp_path, monkeypatch, capsys):
    write_export(tmp_path)
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError, installed or not
    assert main(["build", "--backend", "tensorrt", "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "TensorRT is not installed" in err and "pip install 'flowblend[trt]'" in err


def test_cli_build_tensorrt_without_a_gpu_says_so(tmp_path, monkeypatch, capsys):
    write_export(tmp_path)
    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pretend_gpu(monkeypatch, None)
    assert main(["build", "--backend", "tensorrt", "--artifacts", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU is visible" in err
    assert not (tmp_path / "toy" / "engines").exists() or not list((tmp_path / "toy" / "engines").rglob("*.plan"))


def test_cli_build_tensorrt_bad_opt_level_and_success_path(tmp_path, trt, capsys):
    write_export(tmp_path)
    assert main(["build", "--backend", "tensorrt", "--artifacts", str(tmp_path), "--opt-level", "9",
                 "--no-progress"]) == 2
    assert "--opt-level must be 0..5" in capsys.readouterr().err
    assert main(["build", "--backend", "tensorrt", "--artifacts", str(tmp_path), "--no-verify", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "large: built" in out and "small: built" in out and ".plan" in out
