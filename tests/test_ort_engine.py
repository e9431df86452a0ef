"""OrtEngine on small hand-built ONNX graphs with the engine contract, against the same function in PyTorch:
zero-copy binding (in-place reads and writes, the timestep row per step), the blended Sampler over two
ORT engines vs two TorchEngines, and every refusal. (Exported diffusers models: test_export_onnx.py.)"""
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from flowblend.engines.ort_engine import OrtEngine
from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

ONNX_TYPE = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16, torch.bfloat16: TensorProto.BFLOAT16}
B, C, F, H, W, L, D = 2, 3, 2, 4, 4, 5, 6


def write_graph(path, gain=1.0, dtype=torch.float32, mask=False, dynamic=False, batch=B):
    """velocity = gain * latents * timestep / 1000 + mean over tokens (masked) of text_embeds, per batch row."""
    t = ONNX_TYPE[dtype]
    lat = [batch, C, "frames", "height", "width"] if dynamic else [batch, C, F, H, W]
    inputs = [helper.make_tensor_value_info("latents", t, lat),
              helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [batch]),
              helper.make_tensor_value_info("text_embeds", t, [batch, L, D])]
    init = [helper.make_tensor("shape5", TensorProto.INT64, [5], [batch, 1, 1, 1, 1]),
            helper.make_tensor("axes", TensorProto.INT64, [2], [1, 2]),
            helper.make_tensor("gain", TensorProto.FLOAT, [], [gain / 1000.0]),
            helper.make_tensor("axis2", TensorProto.INT64, [1], [2])]
    nodes = [helper.make_node("Mul", ["timestep", "gain"], ["t_scaled"]),
             helper.make_node("Reshape", ["t_scaled", "shape5"], ["t5"]),
             helper.make_node("Cast", ["t5"], ["t5_cast"], to=t),
             helper.make_node("Mul", ["latents", "t5_cast"], ["moved"])]
    if mask:
        inputs.append(helper.make_tensor_value_info("text_mask", TensorProto.INT64, [batch, L]))
        nodes += [helper.make_node("Unsqueeze", ["text_mask", "axis2"], ["mask3"]),
                  helper.make_node("Cast", ["mask3"], ["mask_t"], to=t),
                  helper.make_node("Mul", ["text_embeds", "mask_t"], ["text"])]
    else:
        nodes.append(helper.make_node("Identity", ["text_embeds"], ["text"]))
    nodes += [helper.make_node("ReduceMean", ["text", "axes"], ["text_mean"], keepdims=1),
              helper.make_node("Reshape", ["text_mean", "shape5"], ["text5"]),
              helper.make_node("Add", ["moved", "text5"], ["velocity"])]
    graph = helper.make_graph(nodes, "contract", inputs, [helper.make_tensor_value_info("velocity", t, lat)], init)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), str(path))
    return path


class SameFunction(torch.nn.Module):
    """The graph's function in PyTorch: the independent reference."""

    def __init__(self, gain, mask=False):
        super().__init__()
        self.gain = gain
        self.input_names = ("latents", "timestep", "text_embeds") + (("text_mask",) if mask else ())
        self.output_names = ("velocity",)

    def forward(self, latents, timestep, text_embeds, text_mask=None):
        text = text_embeds if text_mask is None else text_embeds * text_mask[:, :, None].to(text_embeds.dtype)
        mean = text.float().mean(dim=(1, 2)).view(-1, 1, 1, 1, 1)
        return (latents.float() * (timestep * self.gain / 1000.0).view(-1, 1, 1, 1, 1) + mean).to(latents.dtype)


def buffers(dtype=torch.float32, steps=3, mask=False, shape=(F, H, W)):
    g = torch.Generator().manual_seed(0)
    out = {"latents": torch.randn(B, C, *shape, generator=g).to(dtype),
           "timestep": torch.linspace(900, 100, steps)[:, None].repeat(1, B).contiguous(),
           "text_embeds": torch.randn(B, L, D, generator=g).to(dtype),
           "velocity": torch.zeros(B, C, *shape, dtype=dtype)}
    if mask:
        out["text_mask"] = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mask", [False, True])
def test_reads_and_writes_the_bound_buffers_in_place_per_step(tmp_path, dtype, mask):
    engine = OrtEngine(write_graph(tmp_path / "g.onnx", 2.0, dtype, mask))
    assert engine.dtype == dtype and engine.input_names[-1] == ("text_mask" if mask else "text_embeds")
    bufs = buffers(dtype, mask=mask)
    pointers = {k: v.data_ptr() for k, v in bufs.items()}
    engine.bind(bufs)
    reference = SameFunction(2.0, mask)
    tol = 1e-6 if dtype == torch.float32 else 2e-3
    for step in (2, 0, 1):
        bufs["latents"].mul_(0.5)  # the runtime changes inputs in place between steps; ORT must see it
        engine.run(step)
        args = [bufs[n] if n != "timestep" else bufs["timestep"][step] for n in reference.input_names]
        expected = reference(*args)
        assert torch.allclose(bufs["velocity"].float(), expected.float(), atol=tol, rtol=tol), f"step {step}"
    assert {k: v.data_ptr() for k, v in bufs.items()} == pointers


def test_dynamic_dims_take_any_bound_shape(tmp_path):
    engine = OrtEngine(write_graph(tmp_path / "g.onnx", 1.0, dynamic=True))
    for shape in ((1, 2, 2), (3, 4, 6)):
        bufs = buffers(shape=shape)
        engine.bind(bufs)
        engine.run(1)
        assert torch.allclose(bufs["velocity"], SameFunction(1.0)(bufs["latents"], bufs["timestep"][1],
                                                                   bufs["text_embeds"]), atol=1e-6)


@pytest.mark.parametrize("guidance", [1.0, 4.0])
def test_blended_sampler_over_ort_engines_equals_torch_engines(tmp_path, guidance):
    plan = BlendPlan.parse("LSL:0.4,0.2", 10)
    noise = torch.randn(1, C, F, H, W, generator=torch.Generator().manual_seed(3))
    cond, uncond = torch.randn(1, L, D), torch.randn(1, L, D)
    batch = 2 if guidance > 1 else 1  # the sampler's buffers: cond and uncond stacked with CFG
    ort_engines = {m: OrtEngine(write_graph(tmp_path / f"{m}.onnx", gain, batch=batch), name=m)
                   for m, gain in (("large", 1.5), ("small", 0.7))}
    torch_engines = {"large": TorchEngine(SameFunction(1.5)), "small": TorchEngine(SameFunction(0.7))}
    results = {}
    for name, engines in (("ort", ort_engines), ("torch", torch_engines)):
        sampler = Sampler(engines, plan, SamplerOptions(solver="unipc", shift=3.0, guidance_scale=guidance))
        results[name] = sampler.sample(noise, cond, uncond if guidance > 1 else None)
    rel = ((results["ort"] - results["torch"]).norm() / results["torch"].norm()).item()
    assert rel <= 1e-5
    swapped = Sampler(torch_engines, BlendPlan.parse("SSS", 10), SamplerOptions(guidance_scale=guidance))
    assert ((swapped.sample(noise, cond, uncond if guidance > 1 else None) - results["torch"]).norm()
            / results["torch"].norm()).item() > 1e-2  # the two "models" really differ


def test_refusals_name_the_fix(tmp_path):
    path = write_graph(tmp_path / "g.onnx")
    with pytest.raises(FlowblendError, match="does not exist.*flowblend export"):
        OrtEngine(tmp_path / "missing.onnx")
    engine = OrtEngine(path, name="large")
    with pytest.raises(FlowblendError, match="tensor\\(float\\) but the runtime buffer is torch.float16.*--dtype"):
        engine.bind(buffers(torch.float16))
    with pytest.raises(FlowblendError, match="re-export for this shape"):
        engine.bind(buffers(shape=(F + 1, H, W)))
    bad = buffers()
    del bad["text_embeds"]
    with pytest.raises(FlowblendError, match="needs buffers \\['text_embeds'\\]"):
        engine.bind(bad)
    strided = buffers()
    strided["latents"] = torch.randn(B, C, F, W, H).transpose(3, 4)
    with pytest.raises(FlowblendError, match="contiguous"):
        engine.bind(strided)
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    onnx.save(helper.make_model(other, opset_imports=[helper.make_opsetid("", 18)], ir_version=10),
              str(tmp_path / "o.onnx"))
    with pytest.raises(FlowblendError, match="does not have flowblend's signature"):
        OrtEngine(tmp_path / "o.onnx")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="onnxruntime-gpu is installed")
def test_cuda_without_onnxruntime_gpu_says_what_to_install(tmp_path):
    with pytest.raises(FlowblendError, match="pip install onnxruntime-gpu"):
        OrtEngine(write_graph(tmp_path / "g.onnx"), device="cuda")


def test_bf16_graph_on_the_cpu_provider_is_a_clear_error(tmp_path):
    bf16 = write_graph(tmp_path / "g.onnx", dtype=torch.bfloat16)
    try:
        OrtEngine(bf16)
    except FlowblendError as exc:
        assert "no BF16 kernels" in str(exc) and "fp16" in str(exc)
    else:  # a future ORT with CPU BF16 kernels: then it must compute the right thing
        pytest.skip("this onnxruntime runs BF16 on CPU")


def test_providers_argument_selects_the_device(tmp_path):
    engine = OrtEngine(write_graph(tmp_path / "g.onnx"), providers=["CPUExecutionProvider"])
    assert engine.device == torch.device("cpu") and engine.session.get_providers() == ["CPUExecutionProvider"]


def test_idle_workers_do_not_spin_between_the_pairs_alternating_sessions(tmp_path):
    engine = OrtEngine(write_graph(tmp_path / "g.onnx"), intra_op_threads=2)
    opts = engine.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2
