"""The written-down interfaces are true: one way to configure a Sampler, and every engine (real or
stand-in) really has what the `Engine` protocol of engines/base.py promises."""
import dataclasses
import inspect
import sys

import fake_tensorrt
import pytest
import torch
from test_ort_engine import write_graph
from tiny_models import tiny_pair

from flowblend.engines.base import Engine
from flowblend.engines.ort_engine import OrtEngine
from flowblend.engines.torch_engine import TorchEngine, _placement
from flowblend.engines.trt_engine import TrtEngine
from flowblend.errors import FlowblendError
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

# -- one way to configure a Sampler -------------------------------------------------------------


def test_sampler_takes_its_numerics_from_options_only():
    params = list(inspect.signature(Sampler).parameters)
    assert params == ["engines", "plan", "options", "device", "dtype"]
    assert {f.name for f in dataclasses.fields(SamplerOptions)} == {"solver", "shift", "guidance_scale", "mu",
                                                                     "fused_kernel", "guidance_table", "schedule"}
    engines = {n: TorchEngine(m) for n, m in tiny_pair("wan").items()}
    plan = BlendPlan.parse("LLL", 3)
    for loose in ({"solver": "euler"}, {"shift": 5.0}, {"guidance_scale": 1.0}, {"mu": 0.7}, {"fused_kernel": False},
                  {"guidance_table": (1.0,) * 3}, {"schedule": ((999.0, 500.0, 1.0), (1.0, 0.5, 0.001, 0.0))}):
        with pytest.raises(TypeError):
            Sampler(engines, plan, **loose)
    with pytest.raises(FlowblendError, match="options must be a SamplerOptions.*SamplerOptions\\(solver="):
        Sampler(engines, plan, {"solver": "euler"})
    sampler = Sampler(engines, plan, SamplerOptions(solver="euler", guidance_scale=1.0))
    assert sampler.table.name == "euler" and not sampler.cfg and sampler.guidance_scales == (1.0,) * 3


@pytest.mark.parametrize("changes,match", [
    ({"solver": "ddim"}, "unknown solver 'ddim': choose one of euler, unipc"),
    ({"guidance_scale": -1.0}, "guidance_scale must be >= 0 \\(1 disables CFG\\)"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be >= 0"),
    ({"shift": 0.0}, "shift must be > 0"),
    ({"schedule": ((999.0, 500.0), (1.0, 0.5))}, "one sigma more than timesteps"),
])
def test_bad_options_are_refused_with_the_fix(changes, match):
    with pytest.raises(FlowblendError, match=match):
        SamplerOptions(**changes)
    with pytest.raises(FlowblendError, match=match):  # a changed copy is validated again
        SamplerOptions().replace(**changes)


def test_options_are_frozen():
    options = SamplerOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.guidance_scale = 1.0
    assert options.replace(guidance_scale=1.0).guidance_scale == 1.0 and options.guidance_scale == 5.0


# -- the Engine protocol: device and dtype are real, and the Sampler's buffers follow them ---------


def _engines(tmp_path, monkeypatch):
    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    half = fake_tensorrt.DataType.HALF
    io = [("latents", fake_tensorrt.TensorIOMode.INPUT, half, (2, 4, 3, 4, 6)),
          ("timestep", fake_tensorrt.TensorIOMode.INPUT, fake_tensorrt.DataType.FLOAT, (2,)),
          ("text_embeds", fake_tensorrt.TensorIOMode.INPUT, half, (2, 7, 16)),
          ("velocity", fake_tensorrt.TensorIOMode.OUTPUT, half, (2, 4, 3, 4, 6))]
    large = tiny_pair("wan")["large"]
    return {
        "torch fp32": (TorchEngine(large), torch.float32),
        "torch bf16 (cast at construction)": (TorchEngine(large, dtype=torch.bfloat16), torch.bfloat16),
        "torch fp16 (module already cast)": (TorchEngine(tiny_pair("wan")["small"].half()), torch.float16),
        "onnxruntime fp16": (OrtEngine(write_graph(tmp_path / "h.onnx", dtype=torch.float16)), torch.float16),
        "tensorrt fp16 (stand-in)": (TrtEngine(fake_tensorrt.make_plan(io), device="cpu"), torch.float16),
    }


def test_every_engine_has_what_the_protocol_promises(tmp_path, monkeypatch):
    for label, (engine, dtype) in _engines(tmp_path, monkeypatch).items():
        assert isinstance(engine, Engine), label
        assert (engine.device, engine.dtype) == (torch.device("cpu"), dtype), label
        sampler = Sampler({"large": engine}, BlendPlan.parse("LLL", 2))
        assert (sampler.device, sampler.dtype) == (engine.device, engine.dtype), label


def test_a_torch_engine_reports_where_its_weights_are():
    assert _placement(torch.nn.Linear(2, 2).to(torch.float64)) == (torch.device("cpu"), torch.float64)
    assert _placement(torch.nn.ReLU()) == (torch.device("cpu"), torch.float32)  # no weights: the runtime's default


def test_the_stand_ins_keep_the_protocol_too():
    from test_graph import FailingEngine
    from test_kernels_build import ScaleEngine
    from test_no_allocation import InPlaceEngine

    from flowblend.bench.run import TimedEngine

    wrapped = TorchEngine(tiny_pair("wan")["large"], dtype=torch.bfloat16)
    stand_ins = [InPlaceEngine(0.5), ScaleEngine(dtype=torch.float16), FailingEngine(wrapped, None, 0),
                 TimedEngine(wrapped, "large", [], torch.device("cpu"))]
    assert not isinstance(object(), Engine)
    for engine in stand_ins:
        assert isinstance(engine, Engine), type(engine).__name__
    assert [e.dtype for e in stand_ins] == [torch.float32, torch.float16, torch.bfloat16, torch.bfloat16]


# -- the graph backend and the sampler a pipeline drives ----------------------------------------


def test_graph_backend_protocol_lists_every_method_the_runner_calls():
    import re
    from pathlib import Path

    from fake_cuda_graph import FakeGraphBackend
    from test_bench import CountingGraphBackend

    from flowblend.runtime import graph

    called = set(re.findall(r"self\.backend\.(\w+)\(", Path(graph.__file__).read_text()))
    promised = {name for name in vars(graph.GraphBackend) if not name.startswith("_")}
    assert called and called == promised
    assert issubclass(graph.TorchGraphBackend, graph.GraphBackend)  # the CUDA one (not constructible on CPU)
    for stand_in in (FakeGraphBackend(), CountingGraphBackend()):
        assert isinstance(stand_in, graph.GraphBackend), type(stand_in).__name__


def test_sampler_and_graph_runner_are_the_latent_sampler_a_pipeline_takes():
    from flowblend.runtime.graph import GraphRunner
    from flowblend.runtime.sampler import LatentSampler
    from flowblend.runtime.text_to_video import TextToVideo

    def params(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()]

    assert inspect.get_annotations(TextToVideo, eval_str=True)["sampler"] is LatentSampler
    sampler = Sampler({n: TorchEngine(m) for n, m in tiny_pair("wan").items()}, BlendPlan.parse("LLL", 2))
    for implementation in (sampler, GraphRunner(sampler, mode="eager")):
        assert isinstance(implementation, LatentSampler)
        assert params(implementation.sample) == params(LatentSampler.sample)[1:], type(implementation).__name__


# -- written once ----------------------------------------------------------------------------------


def test_graph_modes_are_defined_once_and_every_spelling_maps_onto_them():
    from flowblend.bench import run as bench
    from flowblend.cli.main import build_parser
    from flowblend.runtime import graph, graph_modes

    assert graph.MODES is graph_modes.MODES and bench.MODES is graph_modes.BENCH_MODES
    for spelling in (graph_modes.GRAPH_FLAGS, graph_modes.BENCH_MODES):
        assert sorted(spelling.values()) == sorted(graph_modes.MODES)
    parser = build_parser(["generate"])
    for flag, mode in graph_modes.GRAPH_FLAGS.items():
        assert parser.parse_args(["generate", "--graph", flag]).graph == flag
    with pytest.raises(SystemExit):
        parser.parse_args(["generate", "--graph", "per_step"])  # the runtime's name is not a CLI spelling


def test_a_family_makes_its_io_spec_in_one_place():
    from pathlib import Path

    from flowblend.engines.iospec import IOSpec
    from flowblend.families import get_family

    ltx = get_family("ltx")
    spec = ltx.io_spec((128, 2, 4, 6), guidance=3.0, dtype=torch.bfloat16, dynamic={"frames": (1, 4)})
    assert spec == IOSpec(batch=2, latent=(128, 2, 4, 6), text_len=ltx.text_len, text_dim=ltx.text_dim, dtype="bf16",
                          with_mask=True, dynamic={"frames": (1, 4)}, patch=(1, 1, 1))
    wan = get_family("wan")
    assert wan.io_spec((16, 3, 4, 6), guidance=1.0, dtype="fp16").batch == 1  # no CFG: one row
    with pytest.raises(FlowblendError, match="unsupported dtype torch.float64: choose one of fp32, fp16, bf16"):
        wan.io_spec((16, 3, 4, 6), 5.0, torch.float64)
    root = Path(__file__).resolve().parents[1]
    for folder in ("cli", "bench", "calibrate", "toy"):
        for path in (root / folder).glob("*.py"):
            assert "IOSpec(" not in path.read_text(), f"{path}: build the spec with PairFamily.io_spec"


def test_tiny_pairs_are_defined_once_in_the_package():
    from pathlib import Path

    import tiny_models

    from flowblend.bench import runtime_cost, tiny

    assert tiny_models.WAN_TINY is tiny.WAN_TINY and tiny_models.tiny_pair is tiny.tiny_pair
    assert "num_attention_heads" not in Path(runtime_cost.__file__).read_text()
