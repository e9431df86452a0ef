"""TrtEngine's binding logic against the recording TensorRT stand-in (tests/fake_tensorrt.py), on CPU.

What a GPU run cannot show cheaply is checked here, with the stand-in enforcing TensorRT's documented
rules (256-byte-aligned addresses, no enqueue on the default stream, no change to a captured context,
version >= 10.1): every I/O tensor of a context points at the runtime's shared buffers, set once;
the step's timestep reaches the context's fixed timestep input by a copy of its table row; every
context gets one activation block sized to the larger need; every failure is a clear error.
"""
import sys

import fake_tensorrt
import pytest
import torch

from flowblend.engines.trt_engine import TrtEngine, share_activation_memory, shared_activation_bytes
from flowblend.errors import FlowblendError
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

LATENT, TEXT = (4, 3, 4, 6), (7, 16)
IN, OUT = fake_tensorrt.TensorIOMode.INPUT, fake_tensorrt.TensorIOMode.OUTPUT
HALF, FLOAT = fake_tensorrt.DataType.HALF, fake_tensorrt.DataType.FLOAT


def plan_bytes(batch=2, dtype=HALF, frames=LATENT[1], device_memory=1 << 20, profile=None):
    lat = (batch, LATENT[0], frames, *LATENT[2:])
    io = [("latents", IN, dtype, lat), ("timestep", IN, FLOAT, (batch,)), ("text_embeds", IN, dtype, (batch, *TEXT)),
          ("velocity", OUT, dtype, lat)]
    return fake_tensorrt.make_plan(io, profile=profile, device_memory=device_memory)


@pytest.fixture
def trt(monkeypatch):
    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    return fake_tensorrt


def make_pair(large_bytes=3000, small_bytes=5000, **kw):
    return {"large": TrtEngine(plan_bytes(device_memory=large_bytes, **kw), name="large", device="cpu"),
            "small": TrtEngine(plan_bytes(device_memory=small_bytes, **kw), name="small", device="cpu")}


def test_one_activation_block_sized_to_the_larger_engine(trt):
    engines = make_pair(3000, 5000)
    assert shared_activation_bytes(engines.values()) == 5000
    block = share_activation_memory(engines)
    assert block.numel() >= 5000 and block.data_ptr() % 256 == 0
    sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", 4), SamplerOptions(guidance_scale=4.0))
    text = torch.randn(1, *TEXT)
    sampler.sample(torch.randn(1, *LATENT), text, text)
    assert trt.events("create_execution_context") == [("create_execution_context", "USER_MANAGED")] * 2
    given = trt.events("set_device_memory")
    assert [(ptr, size) for _, ptr, size, _ in given] == [(block.data_ptr(), 5000)] * 2
    assert {ctx for *_, ctx in given} == {id(engines["large"].context), id(engines["small"].context)}


def test_addresses_are_set_once_aligned_and_the_timestep_row_is_copied_per_step(trt):
    engines = make_pair()
    share_activation_memory(engines)
    plan = BlendPlan.parse("LSL:0.4,0.2", 6)
    sampler = Sampler(engines, plan, SamplerOptions(guidance_scale=4.0))
    assert (sampler.device, sampler.dtype) == (torch.device("cpu"), torch.float16)  # taken from the engines
    text = torch.randn(1, *TEXT)
    noise = torch.randn(1, *LATENT)
    out = sampler.sample(noise, text, text)
    bufs = sampler.buffers
    table = bufs.timestep_table
    assert table.shape == (6, 2) and table.dtype == torch.float32
    addresses = trt.events("set_tensor_address")
    assert len(addresses) == 8 and all(ptr % 256 == 0 for _, _, ptr, _ in addresses)  # 4 per context, once
    runs = trt.events("execute_async_v3")
    assert len(runs) == 6
    contexts = {id(e.context): name for name, e in engines.items()}
    for step, (_, stream, bound, ctx) in enumerate(runs):
        assert contexts[ctx] == plan.models[step] and stream != 0  # never the legacy default stream
        assert bound["latents"] == bufs.model_input.data_ptr()
        assert bound["text_embeds"] == bufs.text_embeds.data_ptr()
        assert bound["velocity"] == bufs.velocity.data_ptr()
        assert bound["timestep"] == engines[plan.models[step]]._current.timestep_input.data_ptr()
    # the stand-in computes from what the addresses hold: a stale timestep row would change the result
    from test_graph import _trt_reference

    assert ((out - _trt_reference(plan, noise, text)).norm() / out.norm()).item() <= 1e-3
    # a second request sets no address at all
    before = len(trt.events("set_tensor_address"))
    sampler.sample(torch.randn(1, *LATENT), text, text)
    assert len(trt.events("set_tensor_address")) == before


def test_misaligned_buffers_are_refused_before_tensorrt_sees_them(trt):
    engine = make_pair()["large"]
    from flowblend.engines.base import aligned_zeros

    lat = (2, *LATENT)
    raw = aligned_zeros((2 * 4 * 3 * 4 * 6 + 8,), torch.float16, "cpu")
    tensors = {"latents": raw[8:].view(lat), "timestep": aligned_zeros((3, 2), torch.float32, "cpu"),
               "text_embeds": aligned_zeros((2, *TEXT), torch.float16, "cpu"),
               "velocity": aligned_zeros(lat, torch.float16, "cpu")}
    with pytest.raises(FlowblendError, match="'latents' starts at an address that is not 256-byte aligned"):
        engine.bind(tensors)
    ctx = engine.engine.create_execution_context()
    assert not ctx.set_tensor_address("latents", raw[8:].data_ptr())  # the stand-in refuses it too


def test_direct_runs_leave_the_default_stream(trt):
    """An engine run outside the sampler (checks, benchmarks) still enqueues on a stream of its own."""
    engines = make_pair()
    share_activation_memory(engines)
    sampler = Sampler(engines, BlendPlan.parse("LLL", 2), SamplerOptions(guidance_scale=4.0))
    text = torch.randn(1, *TEXT)
    sampler.load_request(torch.randn(1, *LATENT), text, text)
    engines["large"].run(0)
    assert trt.events("execute_async_v3")[-1][1] != 0
    with pytest.raises(trt.ContractViolation, match="default stream"):
        engines["large"].context.execute_async_v3(0)


def test_tensorrt_older_than_10_1_is_refused_naming_the_fix(trt, monkeypatch):
    monkeypatch.setattr(trt, "__version__", "10.0.1.6")
    with pytest.raises(FlowblendError, match=r"TensorRT 10.0.1.6 is too old.*tensorrt>=10.1"):
        TrtEngine(plan_bytes(), device="cpu")
    monkeypatch.setattr(trt, "__version__", "11.1.0")
    assert TrtEngine(plan_bytes(), device="cpu").dtype == torch.float16


def test_enqueue_failure_is_a_clear_error_naming_the_step(trt):
    engines = make_pair()
    share_activation_memory(engines)
    sampler = Sampler(engines, BlendPlan.parse("LLL", 5), SamplerOptions(guidance_scale=4.0))
    text = torch.randn(1, *TEXT)
    trt.KNOBS.fail_enqueue_at = 3
    with pytest.raises(FlowblendError, match="enqueue of engine 'large' failed at step 3"):
        sampler.sample(torch.randn(1, *LATENT), text, text)


def test_running_without_activation_memory_is_refused(trt):
    engines = make_pair()
    sampler = Sampler(engines, BlendPlan.parse("LLL", 2), SamplerOptions(guidance_scale=4.0))
    text = torch.randn(1, *TEXT)
    with pytest.raises(FlowblendError, match="share_activation_memory"):
        sampler.sample(torch.randn(1, *LATENT), text, text)
    with pytest.raises(FlowblendError, match="needs 5000 bytes"):
        engines["small"].set_activation_memory(0, 4999)
    with pytest.raises(FlowblendError, match="give it activation memory once, before binding"):
        share_activation_memory(engines)  # after binding: a captured context must keep its memory


def test_buffers_that_do_not_match_the_plan_are_refused(trt):
    text = torch.randn(1, *TEXT)
    fp32 = Sampler(make_pair(), BlendPlan.parse("LLL", 2), SamplerOptions(guidance_scale=4.0), dtype=torch.float32)
    with pytest.raises(FlowblendError, match="torch.float16 but the runtime buffer is torch.float32"):
        fp32.sample(torch.randn(1, *LATENT), text, text)
    no_cfg = Sampler(make_pair(), BlendPlan.parse("LLL", 2), SamplerOptions(guidance_scale=1.0))
    with pytest.raises(FlowblendError, match="rebuild for this shape \\(batch 2 with CFG, 1 without\\)"):
        no_cfg.sample(torch.randn(1, *LATENT), text)


def test_dynamic_plan_takes_shapes_inside_its_profile_only(trt):
    lat = lambda f: (2, LATENT[0], f, *LATENT[2:])  # noqa: E731
    profile = {"latents": [lat(1), lat(3), lat(5)], "timestep": [(2,)] * 3, "text_embeds": [(2, *TEXT)] * 3}
    engines = {m: TrtEngine(plan_bytes(frames=-1, profile=profile), name=m, device="cpu") for m in ("large", "small")}
    share_activation_memory(engines)
    sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", 5), SamplerOptions(guidance_scale=4.0))
    text = torch.randn(1, *TEXT)
    sampler.sample(torch.randn(1, LATENT[0], 4, *LATENT[2:]), text, text)
    assert ("set_input_shape", "latents", lat(4)) in trt.EVENTS
    assert len(trt.events("execute_async_v3")) == 5
    with pytest.raises(FlowblendError, match="outside the plan's profile .*--dynamic"):
        sampler.sample(torch.randn(1, LATENT[0], 7, *LATENT[2:]), text, text)


def test_unloadable_plans_and_missing_tensorrt_are_clear_errors(trt, tmp_path, monkeypatch):
    with pytest.raises(FlowblendError, match="could not deserialize .*--force"):
        TrtEngine(b"garbage", device="cpu")
    with pytest.raises(FlowblendError, match="does not exist: run `flowblend build --backend tensorrt`"):
        TrtEngine(tmp_path / "large.plan", device="cpu")
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    with pytest.raises(FlowblendError, match="TensorRT is not installed.*flowblend\\[trt\\]"):
        TrtEngine(plan_bytes(), device="cpu")


def test_generate_with_tensorrt_on_this_machine_says_what_is_missing(tmp_path, monkeypatch, capsys):
    from flowblend.cli.main import main

    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = main(["generate", "--backend", "tensorrt", "--prompt", "a red circle moving left", "--steps", "2",
                 "--artifacts", str(tmp_path), "--out", str(tmp_path / "v.mp4"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "flowblend export" in err or "TensorRT is not installed" in err
    assert not (tmp_path / "v.mp4").exists()


@pytest.mark.parametrize("backend", ["onnxruntime", "tensorrt"])
def test_compiled_backends_never_load_the_pytorch_transformers(tmp_path, monkeypatch, capsys, backend):
    """generate --backend onnxruntime/tensorrt loads text encoder + VAE only: the engines replace the transformers."""
    from flowblend.cli.main import main
    from flowblend.families import toy_model

    loaded = []
    real = toy_model.load_toy_transformer
    monkeypatch.setattr(toy_model, "load_toy_transformer", lambda *a, **k: loaded.append(a) or real(*a, **k))
    monkeypatch.setitem(sys.modules, "tensorrt", None)
    code = main(["generate", "--backend", backend, "--prompt", "a red circle moving left", "--steps", "2",
                 "--artifacts", str(tmp_path), "--out", str(tmp_path / "v.mp4"), "--no-progress"])
    assert code == 2 and "flowblend export" in capsys.readouterr().err  # no engines here: it stops there
    assert loaded == []
    main(["generate", "--backend", "torch", "--prompt", "a red circle moving left", "--steps", "1",
          "--out", str(tmp_path / "t.gif"), "--no-progress"])
    assert len(loaded) == 2  # the PyTorch backend does load them (the spy works)
