"""The engine store: layout, keys per machine, every refusal (wrong GPU, wrong TensorRT, damaged files,
foreign manifest entries) and two processes building one key at once."""
import json
import multiprocessing as mp
import os
import time

import pytest
import torch

from flowblend.engines.store import EngineKey, EngineStore, current_gpu_identity, file_sha256, tensorrt_key
from flowblend.errors import FlowblendError

H100 = {"gpu_name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0"}
A100 = {"gpu_name": "NVIDIA A100-SXM4-80GB", "compute_capability": "8.0"}


def ort_key(onnx_sha256="a" * 64, model="large"):
    return EngineKey("toy", model, "onnxruntime", "fp32", "b2-c3f9h32w32-t8x32", onnx_sha256)


def trt_key(gpu=H100, version="10.5.0", onnx_sha256="a" * 64):
    return tensorrt_key("toy", "large", "fp16", "b2-c3f9h32w32-t8x32", onnx_sha256, version, gpu=gpu)


def test_layout_manifest_and_round_trip(tmp_path):
    store = EngineStore(tmp_path)
    cpu, gpu = ort_key(), trt_key()
    assert store.write(cpu, b"ort model bytes") == store.path_for(cpu)
    assert store.path_for(cpu).parent == tmp_path / "toy" / "engines" / "cpu"
    assert store.path_for(gpu).parent.name == "nvidia-h100-80gb-hbm3-sm90-trt10.5.0"
    assert store.path_for(gpu).suffix == ".plan" and store.path_for(cpu).suffix == ".onnx"
    assert store.load(cpu).read_bytes() == b"ort model bytes"
    entry = json.loads((store.directory(cpu) / "manifest.json").read_text())["engines"][store.path_for(cpu).name]
    assert EngineKey(**entry["key"]) == cpu
    assert entry["files"][store.path_for(cpu).name]["sha256"] == file_sha256(store.path_for(cpu))
    # every key field is part of the name: a different export is a different engine
    assert store.path_for(ort_key("b" * 64)) != store.path_for(cpu)
    assert [s.key for s in store.find("toy", backend="onnxruntime")] == [cpu]


def test_tensorrt_key_needs_a_gpu_and_records_it(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(FlowblendError, match="no CUDA GPU is visible.*--backend onnxruntime"):
        tensorrt_key("toy", "large", "fp16", "p", "a" * 64, "10.5.0")
    key = trt_key()
    assert (key.gpu_name, key.compute_capability, key.trt_version) == (H100["gpu_name"], "9.0", "10.5.0")
    with pytest.raises(FlowblendError, match="needs gpu_name"):
        EngineKey("toy", "large", "tensorrt", "fp16", "p", "a" * 64)
    with pytest.raises(FlowblendError, match="unknown backend"):
        EngineKey("toy", "large", "openvino", "fp16", "p", "a" * 64)


def test_gpu_identity_from_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H100 80GB HBM3")
    assert current_gpu_identity() == H100


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only answer")
def test_gpu_identity_is_none_on_a_cpu_machine():
    assert current_gpu_identity() is None


def test_plan_from_another_gpu_is_refused_naming_both_and_the_fix(tmp_path):
    store = EngineStore(tmp_path)
    store.write(trt_key(H100), b"plan for h100")
    with pytest.raises(FlowblendError) as err:
        store.load(trt_key(A100))
    msg = str(err.value)
    assert "gpu_name 'NVIDIA H100 80GB HBM3' (this machine/export: 'NVIDIA A100-SXM4-80GB')" in msg
    assert "compute_capability '9.0' (this machine/export: '8.0')" in msg
    assert "flowblend build --pair toy --backend tensorrt --force" in msg


def test_plan_from_another_tensorrt_version_is_refused(tmp_path):
    store = EngineStore(tmp_path)
    store.write(trt_key(version="10.3.0"), b"plan")
    with pytest.raises(FlowblendError, match="trt_version '10.3.0' \\(this machine/export: '10.5.0'\\).*--force"):
        store.load(trt_key(version="10.5.0"))


def test_engine_of_an_older_export_is_refused(tmp_path):
    store = EngineStore(tmp_path)
    store.write(ort_key("a" * 64), b"old")
    with pytest.raises(FlowblendError, match="onnx_sha256 'a+' \\(this machine/export: 'b+'\\)"):
        store.load(ort_key("b" * 64))


def test_nothing_built_says_which_command_builds_it(tmp_path):
    with pytest.raises(FlowblendError, match="no onnxruntime engine .*build --pair toy --backend onnxruntime"):
        EngineStore(tmp_path).load(ort_key())


def test_corrupted_and_truncated_files_are_detected(tmp_path):
    store = EngineStore(tmp_path)
    path = store.write(ort_key(), bytes(range(256)) * 4)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF  # same size, one bit pattern changed
    path.write_bytes(bytes(data))
    with pytest.raises(FlowblendError, match="corrupted .*rebuild: flowblend build"):
        store.load(ort_key())
    path.write_bytes(bytes(data[:500]))
    with pytest.raises(FlowblendError, match="truncated .*500 bytes, recorded 1024"):
        store.load(ort_key())
    path.unlink()
    with pytest.raises(FlowblendError, match="missing"):
        store.load(ort_key())


def test_external_data_sidecar_is_recorded_and_checked(tmp_path):
    store = EngineStore(tmp_path)
    key = ort_key()

    def builder(tmp):  # an ORT model > 2 GB writes its weights beside the final file name
        tmp.write_bytes(b"graph")
        (store.path_for(key).parent / f"{store.path_for(key).name}.data").write_bytes(b"weights" * 10)

    path, built = store.build(key, builder)
    assert built and set(json.loads((path.parent / "manifest.json").read_text())["engines"][path.name]["files"]) == \
        {path.name, f"{path.name}.data"}
    (path.parent / f"{path.name}.data").write_bytes(b"weights")
    with pytest.raises(FlowblendError, match=r"\.data is truncated"):
        store.load(key)


def test_foreign_manifest_entry_and_corrupted_manifest(tmp_path):
    store = EngineStore(tmp_path)
    path = store.write(ort_key(), b"engine")
    manifest = path.parent / "manifest.json"
    data = json.loads(manifest.read_text())
    data["engines"][path.name]["key"]["precision"] = "fp16"  # the file's entry claims another key
    manifest.write_text(json.dumps(data))
    with pytest.raises(FlowblendError, match="recorded for another key: precision 'fp16'"):
        store.load(ort_key())
    manifest.write_text("{not json")
    with pytest.raises(FlowblendError, match="manifest.json is corrupted"):
        store.load(ort_key())


def test_failed_or_empty_build_leaves_nothing(tmp_path):
    store = EngineStore(tmp_path)

    def failing(tmp):
        tmp.write_bytes(b"half an engine")
        raise RuntimeError("builder crashed")

    with pytest.raises(RuntimeError):
        store.build(ort_key(), failing)
    with pytest.raises(FlowblendError, match="produced no engine file"):
        store.build(ort_key(), lambda tmp: tmp.write_bytes(b""))
    directory = store.directory(ort_key())
    assert [p.name for p in directory.iterdir() if not p.name.endswith(".lock")] == []
    assert store.find("toy") == []


def test_build_reuses_a_valid_engine_and_rebuilds_a_damaged_one(tmp_path):
    store = EngineStore(tmp_path)
    path, built = store.build(ort_key(), b"v1")
    assert built
    assert store.build(ort_key(), b"v2") == (path, False) and path.read_bytes() == b"v1"
    path.write_bytes(b"v!")  # damaged: rebuilt, not reused
    assert store.build(ort_key(), b"v3") == (path, True) and store.load(ort_key()).read_bytes() == b"v3"
    assert store.build(ort_key(), b"v4", force=True) == (path, True) and path.read_bytes() == b"v4"


# -- two processes ------------------------------------------------------------------------------------
def _build_in_process(root, log, payload, force, results, barrier):
    def builder(tmp):
        with open(log, "a") as f:  # O_APPEND: one line per builder event, whichever process
            f.write(f"start {os.getpid()} {time.time()}\n")
        with open(tmp, "wb") as f:
            for _ in range(20):  # slow enough that the other process arrives mid-build
                f.write(payload * 1000)
                f.flush()
                time.sleep(0.02)
        with open(log, "a") as f:
            f.write(f"end {os.getpid()} {time.time()}\n")

    barrier.wait(30)  # both processes call build() at the same moment
    entered = time.time()
    path, built = EngineStore(root).build(ort_key(), builder, force=force)
    results.put((str(path), built, os.getpid(), entered, time.time()))


def _race(tmp_path, force, strict=True):
    """Two processes meet at a barrier, then build one key: [(path, built, pid, entered, returned)] and the
    builders' [(event, pid, time)] in the order they were written."""
    # fork: the children only touch the store and files (no torch ops), and start in milliseconds
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    results, barrier = ctx.Queue(), ctx.Barrier(2)
    log = tmp_path / "builds.log"
    procs = [ctx.Process(target=_build_in_process, args=(tmp_path, log, bytes([i + 1]) * 64, force, results, barrier))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0 or not strict
    events = [(e, int(pid), float(t)) for e, pid, t in (line.split() for line in log.read_text().splitlines())]
    return [results.get(timeout=5) for p in procs if p.exitcode == 0], events


def test_two_processes_building_one_key_build_once(tmp_path):
    outcomes, events = _race(tmp_path, force=False)
    assert [e for e, _, _ in events] == ["start", "end"]  # one build
    assert sorted(built for _, built, *_ in outcomes) == [False, True]
    (_, _, pid, _, _), = [o for o in outcomes if o[1]]
    (_, _, _, entered, returned), = [o for o in outcomes if not o[1]]
    (_, builder, _), (_, _, end) = events
    assert builder == pid
    # the second arrived while the first was building and returned only after it ended: it waited on the lock
    assert entered < end <= returned
    assert len({path for path, *_ in outcomes}) == 1
    assert EngineStore(tmp_path).load(ort_key()).stat().st_size == 64 * 1000 * 20


def test_two_forced_builds_of_one_key_never_interleave(tmp_path):
    outcomes, events = _race(tmp_path, force=True)
    assert all(built for _, built, *_ in outcomes)
    assert [e for e, _, _ in events] == ["start", "end", "start", "end"]  # one after the other, never overlapping
    assert events[0][1] == events[1][1] and events[2][1] == events[3][1] != events[0][1]
    second = next(o for o in outcomes if o[2] == events[2][1])
    assert second[3] < events[1][2] <= events[2][2]  # it arrived mid-build and started only after the first ended
    path = EngineStore(tmp_path).load(ort_key())  # the manifest's hash matches the file left in place
    content = path.read_bytes()
    assert len(set(content)) == 1 and len(content) == 64 * 1000 * 20  # one writer's bytes, not a mix
    assert not list(path.parent.glob("*.partial"))


def test_other_build_settings_rebuild_instead_of_reusing(tmp_path):
    store = EngineStore(tmp_path)
    path, _ = store.build(ort_key(), b"o3", {"build_settings": {"opt_level": 3}})
    assert store.build(ort_key(), b"again", {"build_settings": {"opt_level": 3}}) == (path, False)
    assert store.build(ort_key(), b"o5", {"build_settings": {"opt_level": 5}}) == (path, True)
    assert path.read_bytes() == b"o5"
    assert store.manifest(path.parent)["engines"][path.name]["build_settings"] == {"opt_level": 5}
    assert store.build(ort_key(), b"plain") == (path, False)  # a caller that names no settings reuses


def test_the_race_check_sees_builders_that_skip_the_lock(tmp_path, monkeypatch):
    """Control: with the per-key lock gone, the barrier makes the two builds overlap and the order check fails."""
    import contextlib

    monkeypatch.setattr(EngineStore, "lock", lambda self, key: contextlib.nullcontext())  # forked children inherit it
    _, events = _race(tmp_path, force=True, strict=False)  # one may fail: both write the same .partial
    assert [e for e, _, _ in events][:2] == ["start", "start"]  # the second began while the first was building
