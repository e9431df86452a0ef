"""GPU checks (marker `gpu`) and TensorRT checks (marker `tensorrt`); skipped with the reason on CPU.

References are independent of the path under test: the eager PyTorch loop for CUDA graphs, the
PyTorch step for the fused kernel, the FP32 PyTorch model for FP16 and for TensorRT engines.
scripts/gpu_checks.py runs the same checks at the real Wan 2.1 sizes and writes a report.
"""
import copy
import importlib.util
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from tiny_models import TEXT, WAN_LATENT, tiny_pair

from flowblend.engines.torch_engine import TorchEngine
from flowblend.runtime import fused
from flowblend.runtime.graph import GraphRunner
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

ROOT = Path(__file__).resolve().parents[1]
HAS_CUDA = torch.cuda.is_available()


def _tensorrt_missing() -> str | None:
    if not HAS_CUDA:
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"needs TensorRT's Python package ({exc}): pip install 'flowblend[trt]'"
    return None


needs_gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
needs_trt = pytest.mark.skipif(_tensorrt_missing() is not None, reason=str(_tensorrt_missing()))
pytestmark = [pytest.mark.gpu]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()


def request(seed, shape=WAN_LATENT, device="cuda"):
    g = torch.Generator().manual_seed(seed)
    noise, text, neg = (torch.randn((1, *s), generator=g) for s in (shape, TEXT, TEXT))
    return noise, text.to(device), neg.to(device)


def no_fused(**kw):
    return SamplerOptions(**kw, fused_kernel=False)


# -- whole-loop and per-step CUDA graphs over PyTorch engines ------------------------------------------
@needs_gpu
@pytest.mark.parametrize("mode", ["whole", "per_step"])
def test_graph_replay_equals_the_eager_loop_fp32(mode):
    engines = {n: TorchEngine(m, device="cuda") for n, m in tiny_pair("wan").items()}
    plan = BlendPlan.parse("LSL:0.4,0.2", 10)
    opts = no_fused(solver="unipc", shift=3.0, guidance_scale=4.0)
    eager = Sampler(engines, plan, options=opts, device="cuda")
    runner = GraphRunner(Sampler(engines, plan, options=opts, device="cuda"), mode=mode)
    first = runner.sample(*request(1))
    assert rel(first, eager.sample(*request(1))) <= 1e-5
    second = runner.sample(*request(2))  # a replay with new noise and text
    assert rel(second, eager.sample(*request(2))) <= 1e-5
    assert rel(second, first) > 1e-3
    assert len(runner.cache) == 1 and len(runner.current.graphs) == (1 if mode == "whole" else 10)


@needs_gpu
@pytest.mark.parametrize("compile", ["regional", "whole"])
def test_compiled_engines_inside_the_whole_loop_graph_equal_the_eager_loop(compile):
    """Issue 24: compiled engines (inductor's own CUDA graphs off) captured in ours replay == eager, FP32."""
    models = tiny_pair("wan")
    eager_engines = {n: TorchEngine(m, device="cuda") for n, m in models.items()}
    compiled = {n: TorchEngine(m, device="cuda", compile=compile) for n, m in models.items()}
    plan = BlendPlan.parse("LSL:0.4,0.2", 6)
    opts = no_fused(solver="unipc", shift=3.0, guidance_scale=4.0)
    reference = Sampler(eager_engines, plan, options=opts, device="cuda").sample(*request(1))
    runner = GraphRunner(Sampler(compiled, plan, options=opts, device="cuda"), mode="whole")
    assert rel(runner.sample(*request(1)), reference) <= 1e-5
    assert rel(runner.sample(*request(2)), Sampler(eager_engines, plan, options=opts, device="cuda")
               .sample(*request(2))) <= 1e-5  # a replay with new inputs


@needs_gpu
def test_fp8_attention_tracks_its_emulation_and_replays_in_the_whole_loop_graph():
    """--attention fp8 (torchao's FA3 FP8 SDPA, Hopper): one forward against the exact emulation and BF16
    attention, then the whole loop captured in one CUDA graph (no host sync, no allocation outside its pool)
    replays equal to the eager FP8 loop. Head dim 64 (FA3's kernels take multiples of 8 up to 256)."""
    from diffusers import WanTransformer3DModel

    from flowblend.engines.fp8_attention import check_fp8_attention

    try:
        check_fp8_attention(torch.device("cuda"))
    except Exception as exc:  # noqa: BLE001 - the refusal is the documented behaviour off Hopper
        pytest.skip(str(exc))
    torch.manual_seed(0)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=32, ffn_dim=256, num_layers=2, rope_max_seq_len=32)
    model = WanTransformer3DModel(**config).to("cuda", torch.bfloat16).eval()
    outputs = {}
    for attention in ("cudnn", "fp8", "fp8-emulated"):
        engine = TorchEngine(model, name=attention, attention=attention)
        sampler = Sampler({"large": engine}, BlendPlan(("large",)), no_fused(guidance_scale=4.0), device="cuda",
                          dtype=torch.bfloat16)
        bufs = sampler.load_request(*request(3))
        engine.run(0)
        outputs[attention] = bufs.velocity.clone()
    assert cosine(outputs["fp8"], outputs["cudnn"]) >= 0.99
    assert cosine(outputs["fp8"], outputs["fp8-emulated"]) >= 0.999
    engines = {"large": TorchEngine(model, name="large", attention="fp8")}
    plan, opts = BlendPlan(("large",) * 4), no_fused(guidance_scale=4.0)
    eager = Sampler(engines, plan, options=opts, device="cuda", dtype=torch.bfloat16).sample(*request(4))
    runner = GraphRunner(Sampler(engines, plan, options=opts, device="cuda", dtype=torch.bfloat16), mode="whole")
    assert rel(runner.sample(*request(4)), eager) <= 1e-2  # FA3 FP8 is deterministic per input; BF16 buffers


@needs_gpu
def test_fp8_linears_track_bf16_where_the_gpu_has_them():
    """torchao's FP8 path (compute capability >= 8.9) against the BF16 engine and the exact emulation."""
    from flowblend.engines.fp8 import check_fp8_device, fp8_copy

    try:
        check_fp8_device(torch.device("cuda"))
    except Exception as exc:  # noqa: BLE001 - the refusal is the documented behaviour here
        pytest.skip(str(exc))
    model = tiny_pair("wan")["large"].to("cuda", torch.bfloat16)
    outputs = {}
    for name, module in (("bf16", model), ("fp8", fp8_copy(model)), ("emulated", fp8_copy(model, emulate=True))):
        engine = TorchEngine(module, name=name)
        sampler = Sampler({"large": engine}, BlendPlan(("large",)), no_fused(guidance_scale=4.0), device="cuda",
                          dtype=torch.bfloat16)
        bufs = sampler.load_request(*request(3))
        engine.run(0)
        outputs[name] = bufs.velocity.clone()
    assert cosine(outputs["fp8"], outputs["bf16"]) >= 0.99
    assert cosine(outputs["fp8"], outputs["emulated"]) >= 0.999


@needs_gpu
def test_a_failing_capture_leaves_no_stream_capturing():
    class SyncingEngine(TorchEngine):
        def run(self, step):
            super().run(step)
            if torch.cuda.is_current_stream_capturing():
                self._velocity.sum().item()  # a host sync: illegal inside a capture

    engines = {n: SyncingEngine(m, device="cuda", name=n) for n, m in tiny_pair("wan").items()}
    runner = GraphRunner(Sampler(engines, BlendPlan.parse("LLL", 3), options=no_fused(guidance_scale=4.0),
                                 device="cuda"))
    from flowblend.errors import FlowblendError

    with pytest.raises(FlowblendError, match="capture failed at step 0"):
        runner.sample(*request(1))
    assert not runner.backend.is_capturing()
    torch.cuda.synchronize()  # the device is still usable
    assert torch.ones(4, device="cuda").sum().item() == 4.0


# -- fused step kernel on the device ----------------------------------------------------------------
@pytest.fixture(scope="module")
def kernel_library(tmp_path_factory):
    if not (shutil.which("nvcc") and shutil.which("cmake")):
        pytest.skip("nvcc and cmake are needed to build csrc/")
    build = tmp_path_factory.mktemp("kernels")
    for cmd in (["cmake", "-S", str(ROOT), "-B", str(build)], ["cmake", "--build", str(build), "-j"]):
        subprocess.run(cmd, check=True, capture_output=True)
    return fused.load_library(build / fused.LIBRARY_NAME)


def _gpu_checks():
    spec = importlib.util.spec_from_file_location("gpu_checks", ROOT / "scripts" / "gpu_checks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# velocity = row scale * model input; rows of one sign within 2x, so cond - uncond is exact (Sterbenz).
# The same stand-in the report's fused-kernel check runs at the real sizes.
ScaleEngine = _gpu_checks().ScaleEngine


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("solver,guidance", [("unipc", 5.0), ("unipc", 1.0), ("euler", 5.0)])
def test_fused_kernel_equals_the_pytorch_step(kernel_library, dtype, solver, guidance):
    plan = BlendPlan.parse("LSL:0.4,0.2", 12)
    shape = (16, 5, 30, 52)  # Wan latents of a 480x832, 17-frame clip
    noise, text, neg = request(3, shape)

    def run(kernel: bool):
        engines = {"large": ScaleEngine("cuda", dtype), "small": ScaleEngine("cuda", dtype)}
        sampler = Sampler(engines, plan, no_fused(solver=solver, guidance_scale=guidance))
        bufs = sampler.load_request(noise, text, neg if guidance > 1 else None)
        steps = fused.FusedSteps(kernel_library, bufs, sampler.table, guidance) if kernel else None
        for i, name in enumerate(plan.models):
            if steps is None:
                sampler.step(i)
            else:
                engines[name].run(i)
                steps.step(i)
        return bufs.latents.clone(), bufs.model_input.clone()

    (ref, ref_in), (got, got_in) = run(False), run(True)
    assert torch.isfinite(got).all()
    assert rel(got, ref) <= (1e-6 if dtype == torch.float32 else 1e-5)
    assert rel(got_in, ref_in) <= (1e-6 if dtype == torch.float32 else 1e-2)


@needs_gpu
def test_the_load_time_probe_passes_on_the_gpu(kernel_library):
    assert fused.probe_library(kernel_library, torch.device("cuda")) is None


@needs_gpu
def test_whole_graph_with_the_fused_kernel_equals_the_eager_pytorch_loop(kernel_library, monkeypatch):
    monkeypatch.setattr(fused, "load_library", lambda path=None: kernel_library)
    fused._usable.cache_clear()
    engines = {n: TorchEngine(m, device="cuda") for n, m in tiny_pair("wan").items()}
    plan = BlendPlan.parse("LSL:0.4,0.2", 8)
    eager = Sampler(engines, plan, options=no_fused(guidance_scale=4.0), device="cuda")
    with_kernel = Sampler(engines, plan, SamplerOptions(guidance_scale=4.0), device="cuda")
    runner = GraphRunner(with_kernel, mode="whole")
    out = runner.sample(*request(1))
    assert with_kernel._fused is not None  # the kernel really ran inside the graph
    assert rel(out, eager.sample(*request(1))) <= 1e-5


# -- FP16 at the real Wan 2.1 1.3B block sizes --------------------------------------------------------
@needs_gpu
def test_fp16_with_fp32_islands_tracks_fp32_at_wan_1_3b_width():
    from diffusers import WanTransformer3DModel

    from flowblend.export.onnx import cast_for_export

    torch.manual_seed(0)
    config = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
                  out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=3)
    model = WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    fp32 = TorchEngine(copy.deepcopy(model), device="cuda")
    fp16 = TorchEngine(cast_for_export(copy.deepcopy(model), torch.float16), device="cuda")
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 16, 5, 32, 32, generator=g)  # 5 x 16 x 16 = 1280 tokens per sample
    text = torch.randn(2, 128, 4096, generator=g)
    for t in (999.0, 500.0, 50.0):
        outs = []
        for engine, dtype in ((fp32, torch.float32), (fp16, torch.float16)):
            bufs = {"latents": latents.to("cuda", dtype), "timestep": torch.full((1, 2), t, device="cuda"),
                    "text_embeds": text.to("cuda", dtype), "velocity": torch.empty(2, 16, 5, 32, 32, device="cuda",
                                                                                   dtype=dtype)}
            engine.bind(bufs)
            engine.run(0)
            outs.append(bufs["velocity"].float())
        assert torch.isfinite(outs[1]).all(), f"t={t}: NaN/Inf in FP16"
        assert cosine(outs[1], outs[0]) >= 0.999, f"t={t}: cosine {cosine(outs[1], outs[0]):.6f}"


# -- TensorRT -------------------------------------------------------------------------------------------
@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_tiny_engine_matches_pytorch_and_its_loop_captures(tmp_path, dtype):
    from flowblend.engines.iospec import IOSpec
    from flowblend.engines.signature import signature_for
    from flowblend.engines.trt_build import build_plan_bytes, build_settings
    from flowblend.engines.trt_engine import TrtEngine, run_plan, share_activation_memory
    from flowblend.export.onnx import export_transformer

    models = tiny_pair("wan")
    spec = IOSpec(batch=2, latent=WAN_LATENT, text_len=TEXT[0], text_dim=TEXT[1], dtype=dtype)
    plans = {}
    for name, model in models.items():
        onnx_path = tmp_path / f"{name}.onnx"
        export_transformer(model, spec, onnx_path)
        plans[name] = build_plan_bytes(onnx_path, build_settings(spec, opt_level=1, workspace_gib=1),
                                       timing_cache=tmp_path / "timing.cache", progress=False)
    assert (tmp_path / "timing.cache").stat().st_size > 0
    # one forward against the FP32 PyTorch model
    inputs = spec.sample_inputs(timestep=500.0)
    out = run_plan(plans["large"], dict(zip(spec.input_names, inputs)))
    with torch.no_grad():
        ref = signature_for(models["large"])(*[x.float() for x in inputs])
    assert torch.isfinite(out).all() and cosine(out, ref) >= (0.99999 if dtype == "fp32" else 0.999)
    # the blended loop: TensorRT eager vs PyTorch, then the whole-loop graph vs TensorRT eager
    engines = {n: TrtEngine(p, name=n) for n, p in plans.items()}
    share_activation_memory(engines)
    plan = BlendPlan.parse("LSL:0.4,0.2", 8)
    trt_eager = Sampler(engines, plan, options=no_fused(guidance_scale=4.0))
    torch_ref = Sampler({n: TorchEngine(m, device="cuda") for n, m in models.items()}, plan,
                        options=no_fused(guidance_scale=4.0), device="cuda")
    a = trt_eager.sample(*request(1))
    assert rel(a, torch_ref.sample(*request(1))) <= (1e-4 if dtype == "fp32" else 2e-2)
    runner = GraphRunner(Sampler(engines, plan, options=no_fused(guidance_scale=4.0)), mode="whole")
    assert rel(runner.sample(*request(2)), trt_eager.sample(*request(2))) <= 1e-5
    # a second plan over the same engines binds new contexts; the first graph still replays correctly
    other = BlendPlan.parse("LLL", 8)
    per_step = GraphRunner(Sampler(engines, other, options=no_fused(guidance_scale=4.0)), mode="per_step")
    b = per_step.sample(*request(3))
    assert rel(runner.sample(*request(3)), trt_eager.sample(*request(3))) <= 1e-5
    assert rel(b, Sampler(engines, other, options=no_fused(guidance_scale=4.0)).sample(*request(3))) <= 1e-5
    assert all(len(e.contexts) == 4 for e in engines.values())  # eager, whole, per-step, second eager sampler


@pytest.mark.tensorrt
@needs_trt
def test_cli_export_build_generate_with_tensorrt_and_a_whole_loop_graph(tmp_path, capsys):
    from flowblend.cli.main import main

    art = str(tmp_path / "artifacts")
    shape = ["--frames", "5", "--height", "32", "--width", "32"]
    assert main(["export", "--pair", "toy", "--artifacts", art, "--dtype", "fp16", "--no-progress", *shape]) == 0
    assert main(["build", "--pair", "toy", "--backend", "tensorrt", "--artifacts", art, "--opt-level", "1",
                 "--no-progress"]) == 0  # includes the check against PyTorch
    out = tmp_path / "v.mp4"
    assert main(["generate", "--pair", "toy", "--backend", "tensorrt", "--device", "cuda", "--dtype", "fp16",
                 "--graph", "whole", "--artifacts", art, "--prompt", "a red circle moving left", "--out", str(out),
                 "--no-progress", *shape]) == 0
    assert out.is_file() and out.stat().st_size > 0
