"""The `wan22` family end to end on tiny random checkpoints of the real WanTransformer3DModel.

A tiny "A14B" folder holds two experts (transformer/, transformer_2/), a tiny "1.3B" folder the
small model; the text encoder and VAE need real checkpoints, so they are stood in for (as in
tests/test_cli_calibrate.py), with the family's real text shape (512 x 4096) so that export and
engines see what a real pair gives them. Every command runs: plan, generate (PyTorch and ONNX
Runtime), export / verify / build, bench, calibrate divergence / plan; TensorRT builds and the
whole-loop graph run through the stand-ins of tests/fake_tensorrt.py and tests/test_graph.py.
"""
import json
import sys

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from diffusers import WanTransformer3DModel
from test_metrics import save_tiny_dino
from tiny_models import stand_in_decode

from flowblend.calibrate.divergence import SamplingSetup, make_requests, measure_divergence
from flowblend.cli.main import main
from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.families import loading as pairs
from flowblend.runtime.guidance import expert_schedule_for, guidance_table
from flowblend.runtime.plan import EXPERTS_AND_SMALL, BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions
from flowblend.runtime.solvers import scheduler_for

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16,
            text_dim=4096, freq_dim=16, ffn_dim=32, num_layers=1, rope_max_seq_len=32)
VIDEO = ["--frames", "5", "--height", "32", "--width", "32"]  # latents 16 x 2 x 4 x 4
STEPS = 6


def _diffusers_switch(steps=STEPS, shift=12.0, ratio=0.875):
    """WanPipeline's rule on UniPC's own timesteps: `transformer` while t >= ratio * 1000."""
    sched = scheduler_for("unipc", shift)
    sched.set_timesteps(steps)
    return int((sched.timesteps >= ratio * 1000).sum())


SWITCH = _diffusers_switch()  # 4 high-noise steps, then 2 low-noise
EXPERTS = ["high"] * SWITCH + ["low"] * (STEPS - SWITCH)


def _model(seed, heads):
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**dict(TINY, num_attention_heads=heads))
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model.eval()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan22")
    models = {"high": _model(0, 2), "low": _model(1, 2), "small": _model(2, 1)}
    models["high"].save_pretrained(root / "a14b" / "transformer")
    models["low"].save_pretrained(root / "a14b" / "transformer_2")
    models["small"].save_pretrained(root / "small" / "transformer")
    return root, models


@pytest.fixture
def fake_shared(monkeypatch):
    """Text encoder and VAE stand-ins: prompts -> [n, 512, 4096] (first 7 tokens set), latents -> frames."""
    def encode(self, prompts):
        out = torch.zeros(len(prompts), 512, 4096)
        for i, p in enumerate(prompts):
            out[i, :7] = torch.randn(7, 4096, generator=torch.Generator().manual_seed(sum(map(ord, p)))) * (p != "")
        return out, None

    monkeypatch.setattr(pairs._SharedComponents, "encode", encode)
    monkeypatch.setattr(pairs._SharedComponents, "decode", stand_in_decode)


def ckpt_args(root):
    return ["--pair", "wan22", "--large", str(root / "a14b"), "--small", str(root / "small")]


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


# -- loading and the compatibility check -------------------------------------------------------------------------
def test_load_wan22_gives_three_named_models_from_two_checkpoints(checkpoints):
    root, saved = checkpoints
    pair = pairs.load_pair("wan22", str(root / "a14b"), str(root / "small"))
    assert list(pair.transformers) == ["high", "low", "small"]
    for name in saved:
        for (k, a), (_, b) in zip(saved[name].state_dict().items(), pair.transformers[name].state_dict().items()):
            assert torch.equal(a, b), (name, k)
    assert pair.sources == {"large": str(root / "a14b"), "small": str(root / "small")}


def test_ti2v_5b_is_refused_in_one_line(checkpoints, tmp_path, capsys):
    root, _ = checkpoints
    ti2v = WanTransformer3DModel(**dict(TINY, in_channels=48, out_channels=48))  # the 5B's 48-channel latents
    ti2v.save_pretrained(tmp_path / "ti2v" / "transformer")
    with pytest.raises(FlowblendError, match="has no transformer_2/ folder.*TI2V-5B has a 48-channel VAE"):
        pairs.load_pair("wan22", str(tmp_path / "ti2v"), str(root / "small"))
    with pytest.raises(FlowblendError, match=r"in_channels differs \(high 16, small 48\).*TI2V-5B"):
        pairs.load_pair("wan22", str(root / "a14b"), str(tmp_path / "ti2v"))
    assert main(["generate", "--pair", "wan22", "--large", str(root / "a14b"), "--small", str(tmp_path / "ti2v"),
                 "--prompt", "a cat", "--out", str(tmp_path / "x.mp4"), "--no-progress"] + VIDEO) == 2
    assert "TI2V-5B" in one_line_error(capsys) and not (tmp_path / "x.mp4").exists()


# -- generate ----------------------------------------------------------------------------------------------------
def test_generate_equals_the_sampler_over_the_three_models(checkpoints, fake_shared, tmp_path):
    root, models = checkpoints
    out = tmp_path / "v.gif"
    assert main(["generate", *ckpt_args(root), "--plan", "experts:1,1", "--steps", str(STEPS), "--prompt", "a cat",
                 "--guidance-2", "2.5", "--out", str(out), "--no-progress"] + VIDEO) == 0
    record = json.loads(out.with_suffix(".json").read_text())
    experts = expert_schedule_for("unipc", STEPS, 12.0, 0.875)
    switch = experts.switch_step
    assert record["expert_switch_step"] == switch == SWITCH and 0 < switch < STEPS
    assert record["plan"]["models"] == ["high"] * (switch - 1) + ["small"] * 2 + ["low"] * (STEPS - switch - 1)
    assert record["guidance_per_step"] == [4.0] * switch + [2.5] * (STEPS - switch)  # small: the replaced expert's
    # the same run through the Python API, decoded by the same stand-in
    plan = BlendPlan.parse("experts:1,1", STEPS, EXPERTS_AND_SMALL, experts)
    table = guidance_table(plan, 4.0, {"high": 4.0, "low": 2.5}, experts)
    sampler = Sampler({n: TorchEngine(m) for n, m in models.items()}, plan,
                      options=SamplerOptions("unipc", 12.0, 4.0, guidance_table=table))
    embeds, _ = pairs._SharedComponents.encode(None, ["a cat", ""])
    noise = torch.randn((1, 16, 2, 4, 4), generator=torch.Generator("cpu").manual_seed(0))
    latents = sampler.sample(noise, embeds[0:1], embeds[1:2])
    frames = pairs._SharedComponents.decode(None, latents)[0]
    expected = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 3, 0).numpy()
    written = iio.imread(out, index=None)
    assert written.shape == expected.shape and np.abs(written.astype(int) - expected.astype(int)).max() <= 1


# -- export, verify, build, generate with ONNX Runtime ----------------------------------------------------------
def test_export_verify_build_generate_with_three_engines(checkpoints, fake_shared, tmp_path, capsys):
    root, _ = checkpoints
    art = tmp_path / "artifacts"
    common = [*ckpt_args(root), "--artifacts", str(art)] + VIDEO
    assert main(["export", *common, "--no-progress"]) == 0
    record = json.loads((art / "wan22" / "onnx" / "export.json").read_text())
    assert set(record["models"]) == {"high", "low", "small"} and record["spec"]["batch"] == 2
    assert main(["verify", *ckpt_args(root), "--artifacts", str(art)]) == 0
    out = capsys.readouterr().out
    assert all(f"PASS {m} [fp32" in out for m in ("high", "low", "small"))
    assert main(["build", "--pair", "wan22", "--backend", "onnxruntime", "--artifacts", str(art), "--no-progress"]) == 0
    assert capsys.readouterr().out.count(": built ") == 3
    videos = {}
    for backend in ("onnxruntime", "torch"):
        video = tmp_path / f"{backend}.gif"
        assert main(["generate", *common, "--backend", backend, "--plan", "experts:1,1", "--steps", str(STEPS),
                     "--prompt", "a cat", "--out", str(video), "--no-progress"]) == 0
        videos[backend] = iio.imread(video, index=None).astype(int)
    assert np.abs(videos["onnxruntime"] - videos["torch"]).max() <= 1


# -- TensorRT (stand-in): three plans, one activation block, every step on its own engine ----------------------
def test_tensorrt_three_engines_share_one_activation_block_sized_to_the_largest(monkeypatch):
    import fake_tensorrt

    from flowblend.engines.trt_engine import TrtEngine, share_activation_memory

    fake_tensorrt.reset()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt)
    IN, OUT = fake_tensorrt.TensorIOMode.INPUT, fake_tensorrt.TensorIOMode.OUTPUT
    F32 = fake_tensorrt.DataType.FLOAT
    lat, text = (2, 4, 3, 4, 6), (2, 7, 16)

    def plan(device_memory):
        io = [("latents", IN, F32, lat), ("timestep", IN, F32, (2,)), ("text_embeds", IN, F32, text),
              ("velocity", OUT, F32, lat)]
        return fake_tensorrt.make_plan(io, device_memory=device_memory)

    engines = {name: TrtEngine(plan(size), name=name, device="cpu")
               for name, size in (("high", 7000), ("low", 9000), ("small", 2000))}
    block = share_activation_memory(engines)
    experts = expert_schedule_for("unipc", STEPS, 12.0, 0.875)
    plan_ = BlendPlan.parse("experts:1,1", STEPS, EXPERTS_AND_SMALL, experts)
    table = guidance_table(plan_, 4.0, {"high": 4.0, "low": 3.0}, experts)
    sampler = Sampler(engines, plan_, options=SamplerOptions("unipc", 12.0, 4.0, guidance_table=table))
    t = torch.randn(1, 7, 16)
    sampler.sample(torch.randn(1, *lat[1:]), t, t)
    given = fake_tensorrt.events("set_device_memory")  # each context gets the block when it is bound
    assert [(ptr, size) for _, ptr, size, _ in given] == [(block.data_ptr(), 9000)] * 3
    contexts = {id(e.context): name for name, e in engines.items()}
    runs = fake_tensorrt.events("execute_async_v3")
    assert [contexts[ctx] for *_, ctx in runs] == list(plan_.models)
    assert sampler.buffers.guidance_table.tolist() == list(table)


def test_whole_loop_graph_over_three_engines_replays_the_eager_loop(checkpoints):
    from fake_cuda_graph import FakeGraphBackend

    from flowblend.runtime.graph import GraphRunner

    _, models = checkpoints
    engines = {n: TorchEngine(m) for n, m in models.items()}
    experts = expert_schedule_for("unipc", STEPS, 12.0, 0.875)
    plan = BlendPlan.parse("experts:1,1", STEPS, EXPERTS_AND_SMALL, experts)
    options = SamplerOptions("unipc", 12.0, 4.0, guidance_table=guidance_table(plan, 4.0, {"high": 4.0, "low": 3.0},
                                                                                experts))
    backend = FakeGraphBackend()
    runner = GraphRunner(Sampler(engines, plan, options=options), mode="whole", backend=backend)
    g = torch.Generator().manual_seed(3)
    noise, text, neg = torch.randn(1, 16, 2, 4, 4, generator=g), torch.randn(1, 9, 4096, generator=g), \
        torch.randn(1, 9, 4096, generator=g)
    replayed = runner.sample(noise, text, neg)
    assert backend.events == ["warm_up", "begin", "end", "replay"]
    eager = Sampler(engines, plan, options=options).sample(noise, text, neg)
    assert ((replayed - eager).norm() / eager.norm()).item() <= 1e-6
    other = GraphRunner(Sampler(engines, plan, options=SamplerOptions("unipc", 12.0, 4.0)), backend=FakeGraphBackend())
    assert other.key((16, 2, 4, 4), (9, 4096)) != runner.key((16, 2, 4, 4), (9, 4096))  # the table is in the key


# -- bench -------------------------------------------------------------------------------------------------------
def test_bench_measures_against_the_experts_plan(checkpoints, fake_shared, tmp_path):
    root, _ = checkpoints
    out = tmp_path / "bench"
    assert main(["bench", *ckpt_args(root), "--backend", "torch", "--plan", "experts", "--plan", "experts:1,1",
                 "--steps", str(STEPS), "--repeats", "1", "--overhead-repeats", "0", "--out", str(out),
                 "--no-progress"] + VIDEO) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = {r["plan"]: r for r in report["cases"]}
    assert rows["experts"]["reference"] and rows["experts"]["ideal_speedup"] == pytest.approx(1.0)
    flops = report["flops"]["per_step"]
    blended = rows["experts:1,1"]
    assert blended["ideal_speedup"] == pytest.approx(STEPS * flops["high"] / (
        (STEPS - 2) * flops["high"] + 2 * flops["small"]))
    assert blended["steps_per_model"] == {"high": SWITCH - 1, "low": STEPS - SWITCH - 1, "small": 2}
    assert set(blended["step_ms"]) == {"high", "low", "small"}
    assert report["pair"]["expert_switch_step"] == SWITCH and "small step ms" in (out / "bench.md").read_text()


# -- calibrate ---------------------------------------------------------------------------------------------------
def test_divergence_compares_the_small_model_with_the_expert_of_each_step(checkpoints):
    _, models = checkpoints
    engines = {n: TorchEngine(m) for n, m in models.items()}
    setup = SamplingSetup(STEPS, "unipc", 12.0, 4.0, (16, 2, 4, 4), None, 0.875, (("high", 4.0), ("low", 2.5)),
                          EXPERTS_AND_SMALL.names, EXPERTS_AND_SMALL.letters)

    def encode(prompts):
        return torch.stack([torch.randn(9, 4096, generator=torch.Generator().manual_seed(len(p))) for p in prompts]), None
    request = make_requests(encode, ["a cat"], [0], setup.latent_shape)[0]
    curve, finals = measure_divergence(engines, [request], setup)
    # reference: diffusers' loop over the experts (WanPipeline's switch), also calling the small model
    sched = scheduler_for("unipc", 12.0)
    sched.set_timesteps(STEPS)
    latents, cond, uncond = request.noise.clone(), request.embeds[0:1], request.embeds[1:2]
    expected = []
    with torch.no_grad():
        for t in sched.timesteps:
            expert, scale = ("high", 4.0) if t >= 875 else ("low", 2.5)

            def guided(model):
                c, u = (model(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=x,
                              return_dict=False)[0] for x in (cond, uncond))
                return u + scale * (c - u)
            v, v_small = guided(models[expert]), guided(models["small"])
            expected.append(1 - torch.nn.functional.cosine_similarity(v_small.flatten().double(),
                                                                      v.flatten().double(), dim=0).item())
            latents = sched.step(v, t, latents, return_dict=False)[0]
    assert np.allclose(curve.values["cosine_guided"][0], expected, rtol=1e-4, atol=1e-7)
    assert ((finals[0] - latents).norm() / latents.norm()).item() <= 1e-5
    assert curve.setup["reference"] == EXPERTS


def test_calibrate_divergence_and_plan_commands(checkpoints, fake_shared, tmp_path):
    root, _ = checkpoints
    out = tmp_path / "cal"
    assert main(["calibrate", "divergence", *ckpt_args(root), "--steps", str(STEPS), "--prompt", "a cat",
                 "--out-dir", str(out), "--no-progress"] + VIDEO) == 0
    data = json.loads((out / "divergence.json").read_text())
    assert data["setup"]["reference"] == EXPERTS and data["setup"]["boundary_ratio"] == 0.875
    dino = save_tiny_dino(tmp_path / "dino")
    assert main(["calibrate", "plan", *ckpt_args(root), "--steps", str(STEPS), "--dino", dino, "--prompt", "a cat",
                 "--prompt", "a dog", "--out-dir", str(out), "--no-progress"] + VIDEO) == 0
    result = json.loads((out / "calibration.json").read_text())
    experts = EXPERTS
    assert len(result["candidates"]) >= 3  # the experts' plan, SSS, and windows of the search
    for row in result["candidates"]:  # every window replaces the expert of its steps, never moves the switch
        plan = BlendPlan.from_stages(row["stages"], STEPS, EXPERTS_AND_SMALL)
        assert all(m == e for m, e in zip(plan.models, experts) if m != "small"), row["stages"]
    chosen = result["chosen"]["models"]
    assert len(chosen) == STEPS and all(m in (e, "small") for m, e in zip(chosen, experts))
    plan_file = out / "plan.json"
    video = tmp_path / "v.gif"
    assert main(["generate", *ckpt_args(root), "--plan-file", str(plan_file), "--prompt", "a cat", "--out", str(video),
                 "--no-progress"] + VIDEO) == 0


def test_gpu_bench_script_dry_run_for_wan22(tmp_path):
    """scripts/gpu_bench.py --pair wan22 (random weights at real sizes on a GPU) checked end to end at tiny sizes."""
    from test_bench import load_script

    script = load_script("gpu_bench")
    assert script.main(["--dry-run", "--pair", "wan22", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu-bench.json").read_text())
    assert set(report["model_depth"]) == {"high", "low", "small"}
    switch = _diffusers_switch(6)
    expected = {f"H{switch},L{6 - switch}", f"H{switch - 1},S2,L{6 - switch - 1}"}
    assert {r["stages"] for r in report["cases"]} == expected
    assert next(r for r in report["cases"] if r["plan"] == "experts")["reference"]
