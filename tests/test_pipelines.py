"""The diffusers-style pipelines against diffusers' own: WanPipeline (Wan 2.1; Wan 2.2 with transformer_2 and
boundary_ratio) and LTXPipeline, loaded from tiny checkpoints written with save_pretrained.

The references are diffusers' pipelines run on the same folders with the same generator seed; with plan
LLL (Wan 2.2: experts) ours must equal them to 1e-5 on the latents and on the decoded frames. With a
blended plan the class must equal flowblend's own TextToVideo over load_pair of the same folders.
"""
import numpy as np
import pytest
import torch
from diffusers import LTXPipeline, WanPipeline
from tiny_checkpoints import save_ltx, save_wan

from flowblend.pipelines import FlowBlendLTXPipeline, FlowBlendWanPipeline

WAN_CALL = dict(prompt="a red circle moving left", negative_prompt="a blue square", height=32, width=32,
                num_frames=5, num_inference_steps=6)
LTX_CALL = dict(prompt="a red circle moving left", negative_prompt="a blue square", height=32, width=32,
                num_frames=9, num_inference_steps=6, decode_timestep=0.05, decode_noise_scale=0.025)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {"wan": str(save_wan(root / "wan_large")), "wan_small": str(save_wan(root / "wan_small", small=True)),
            "wan22": str(save_wan(root / "wan22", experts=True)), "ltx": str(save_ltx(root / "ltx_large")),
            "ltx_small": str(save_ltx(root / "ltx_small", small=True))}


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generator(seed=0):
    return torch.Generator().manual_seed(seed)


def rel(a, b):
    a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def max_abs(a, b):
    return np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max()


@pytest.mark.parametrize("guidance", [5.0, 1.0])
def test_wan21_lll_equals_diffusers_wan_pipeline(checkpoints, guidance):
    ref_pipe = quiet(WanPipeline.from_pretrained(checkpoints["wan"]))
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    call = dict(WAN_CALL, guidance_scale=guidance)
    ref = ref_pipe(**call, generator=generator(), output_type="latent").frames
    got = ours(**call, generator=generator(), output_type="latent", plan="LLL").frames
    assert got.shape == ref.shape == (1, 4, 2, 4, 4)
    assert rel(got, ref) <= 1e-5, f"latents: relative error {rel(got, ref):.2e}"
    ref_frames = ref_pipe(**call, generator=generator()).frames  # output_type "np", WanPipeline's default
    frames = ours(**call, generator=generator(), plan="LLL").frames
    assert frames.shape == ref_frames.shape == (1, 5, 32, 32, 3)
    assert max_abs(frames, ref_frames) <= 1e-5 and frames.std() > 0.01
    # the blend is not the large model: the same call with LSL differs (the test can fail)
    ten = dict(call, num_inference_steps=10)
    blended = ours(**ten, generator=generator(), output_type="latent").frames  # default plan LSL:0.4,0.2
    large_only = ref_pipe(**ten, generator=generator(), output_type="latent").frames
    assert rel(blended, large_only) > 1e-3


def test_wan22_experts_equal_diffusers_wan_pipeline_with_transformer_2(checkpoints):
    ref_pipe = quiet(WanPipeline.from_pretrained(checkpoints["wan22"]))
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan22"], small=checkpoints["wan_small"]))
    assert ref_pipe.transformer_2 is not None and ours.config.boundary_ratio == 0.9
    call = dict(WAN_CALL, num_inference_steps=8, guidance_scale=4.0, guidance_scale_2=2.5)
    sched = ref_pipe.scheduler
    sched.set_timesteps(8)
    switch = sum(1 for t in sched.timesteps if t >= 0.9 * sched.config.num_train_timesteps)
    assert 0 < switch < 8  # both experts run
    ref = ref_pipe(**call, generator=generator(), output_type="latent").frames
    got = ours(**call, generator=generator(), output_type="latent").frames  # default plan: the experts'
    assert rel(got, ref) <= 1e-5, f"latents: relative error {rel(got, ref):.2e}"
    explicit = ours(**call, generator=generator(), output_type="latent", plan="experts").frames
    assert torch.equal(explicit, got)
    ref_frames = ref_pipe(**call, generator=generator(), output_type="pt").frames
    frames = ours(**call, generator=generator(), output_type="pt", plan="experts").frames
    assert max_abs(frames, ref_frames) <= 1e-5
    # one scale for both experts would not pass: guidance_scale_2 reaches the low-noise steps
    same_scale = ours(**dict(call, guidance_scale_2=4.0), generator=generator(), output_type="latent").frames
    assert rel(same_scale, ref) > 1e-4
    small_steps = ours(**call, generator=generator(), output_type="latent", plan="experts:1,1").frames
    assert rel(small_steps, ref) > 1e-4


def test_ltx_lll_equals_diffusers_ltx_pipeline(checkpoints):
    ref_pipe = quiet(LTXPipeline.from_pretrained(checkpoints["ltx"]))
    ours = quiet(FlowBlendLTXPipeline.from_pretrained(checkpoints["ltx"], small=checkpoints["ltx_small"]))
    assert ours.scheduler.config.shift_terminal == 0.1  # the checkpoint's own schedule, not diffusers' defaults
    ref = ref_pipe(**LTX_CALL, generator=generator(), output_type="latent").frames
    got = ours(**LTX_CALL, generator=generator(), output_type="latent", plan="LLL").frames
    assert got.shape == ref.shape == (1, 3 * 8 * 8, 8)  # LTX's packed tokens
    assert rel(got, ref) <= 1e-5, f"latents: relative error {rel(got, ref):.2e}"
    ref_frames = ref_pipe(**LTX_CALL, generator=generator(), output_type="np").frames  # decode noise: same generator
    frames = ours(**LTX_CALL, generator=generator(), output_type="np", plan="LLL").frames
    assert frames.shape == ref_frames.shape == (1, 9, 32, 32, 3)
    assert max_abs(frames, ref_frames) <= 1e-5 and frames.std() > 0.01
    pil = ours(**LTX_CALL, generator=generator(), plan="LLL").frames[0]  # LTXPipeline's default output: PIL frames
    assert len(pil) == 9 and pil[0].size == (32, 32)
    blended = ours(**LTX_CALL, generator=generator(), output_type="latent").frames  # default plan LSL:0.4,0.2
    assert rel(blended, ref) > 1e-3


def test_lsl_equals_flowblend_blend_pipeline(checkpoints):
    from flowblend.engines.torch_engine import TorchEngine
    from flowblend.families import load_pair
    from flowblend.runtime.plan import BlendPlan
    from flowblend.runtime.sampler import Sampler, SamplerOptions
    from flowblend.runtime.text_to_video import TextToVideo

    pair = load_pair("wan", large=checkpoints["wan"], small=checkpoints["wan_small"])
    steps, seed = 10, 3
    sampler = Sampler({n: TorchEngine(m) for n, m in pair.transformers.items()}, BlendPlan.parse("LSL:0.4,0.2", steps),
                      SamplerOptions(solver="unipc", shift=3.0, guidance_scale=5.0))
    video, latents = TextToVideo(sampler, pair.encode_prompt, pair.decode)(
        WAN_CALL["prompt"], (4, 2, 4, 4), seed=seed, negative_prompt=WAN_CALL["negative_prompt"])
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    call = dict(WAN_CALL, num_inference_steps=steps, guidance_scale=5.0, plan="LSL:0.4,0.2")
    got = ours(**call, generator=generator(seed), output_type="latent").frames
    assert rel(got, latents) <= 1e-5
    frames = ours(**call, generator=generator(seed), output_type="pt").frames  # [B, F, C, H, W] in [0, 1]
    assert max_abs(frames[0], ((video + 1) / 2).clamp(0, 1).permute(1, 0, 2, 3)) <= 1e-5


def test_from_pipe_shares_the_text_encoder_vae_and_transformer(checkpoints):
    from diffusers import WanTransformer3DModel

    from flowblend.pipelines.loading import load_small_transformer

    base = quiet(WanPipeline.from_pretrained(checkpoints["wan"]))
    small = load_small_transformer(WanTransformer3DModel, checkpoints["wan_small"])
    ours = quiet(FlowBlendWanPipeline.from_pipe(base, small_transformer=small))
    for name in ("text_encoder", "vae", "transformer", "tokenizer"):
        assert getattr(ours, name) is getattr(base, name), name
    assert dict(ours.scheduler.config) == dict(base.scheduler.config)

    def storages(pipe):
        return {p.untyped_storage().data_ptr() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                for p in m.parameters()}
    assert storages(ours) - storages(base) == {p.untyped_storage().data_ptr() for p in small.parameters()}
    ref = base(**WAN_CALL, generator=generator(), output_type="latent").frames
    got = ours(**WAN_CALL, generator=generator(), output_type="latent", plan="LLL").frames
    assert rel(got, ref) <= 1e-5
    base.scheduler.set_timesteps(3)  # ours works on a copy of the shared scheduler: the base is not moved
    ours(**WAN_CALL, generator=generator(), output_type="latent", plan="LLL")
    assert len(base.scheduler.timesteps) == 3


def test_toy_pair_runs_through_the_class_and_equals_blend_pipeline():
    from flowblend.engines.torch_engine import TorchEngine
    from flowblend.families import load_pair
    from flowblend.runtime.plan import BlendPlan
    from flowblend.runtime.sampler import Sampler, SamplerOptions
    from flowblend.runtime.text_to_video import TextToVideo

    pipe = quiet(FlowBlendWanPipeline.from_pretrained("toy"))
    out = pipe(prompt="A red circle, moving left.", generator=generator(0), output_type="pt")
    assert out.frames.shape == (1, 9, 3, 32, 32)  # the toy family's defaults: 9 frames of 32x32, 20 steps
    pair = load_pair("toy")
    sampler = Sampler({"large": TorchEngine(pair.large), "small": TorchEngine(pair.small)},
                      BlendPlan.parse("LSL:0.4,0.2", 20), SamplerOptions(solver="unipc", shift=3.0, guidance_scale=4.0))
    video, _ = TextToVideo(sampler, pair.encode_prompt, pair.decode)("a red circle moving left", (3, 9, 32, 32))
    assert max_abs(out.frames[0], ((video + 1) / 2).permute(1, 0, 2, 3)) <= 1e-5
    embeds, _ = pair.encode_prompt(["a red circle moving left"])  # prompt_embeds in place of the prompt
    given = pipe(prompt_embeds=embeds, generator=generator(0), output_type="pt").frames
    assert torch.equal(given, out.frames)


def test_callback_on_step_end_equals_diffusers_and_is_refused_inside_a_whole_loop_graph(checkpoints):
    seen = {"ref": [], "ours": []}

    def halve_at_step_2(who):
        def callback(pipe, i, t, kwargs):
            seen[who].append((i, float(t), tuple(kwargs["latents"].shape)))
            return {"latents": kwargs["latents"] * 0.5} if i == 2 else {}
        return callback

    ref_pipe = quiet(WanPipeline.from_pretrained(checkpoints["wan"]))
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    ref = ref_pipe(**WAN_CALL, generator=generator(), output_type="latent",
                   callback_on_step_end=halve_at_step_2("ref")).frames
    got = ours(**WAN_CALL, generator=generator(), output_type="latent", plan="LLL",
               callback_on_step_end=halve_at_step_2("ours")).frames
    assert seen["ours"] == seen["ref"] and len(seen["ours"]) == WAN_CALL["num_inference_steps"]
    assert rel(got, ref) <= 1e-5
    plain = ours(**WAN_CALL, generator=generator(), output_type="latent", plan="LLL").frames
    assert rel(plain, ref) > 1e-3  # the callback's latents were used
    with pytest.raises(ValueError, match="callback_on_step_end.*cuda_graph='per_step'"):
        ours(**WAN_CALL, callback_on_step_end=halve_at_step_2("ours"), cuda_graph=True)

    def stop_after_1(pipe, i, t, kwargs):
        pipe._interrupt = i == 1
        return {}
    stopped = ours(**WAN_CALL, generator=generator(), output_type="latent", plan="LLL",
                   callback_on_step_end=stop_after_1).frames
    ref_stopped = ref_pipe(**WAN_CALL, generator=generator(), output_type="latent",
                           callback_on_step_end=stop_after_1).frames
    assert rel(stopped, ref_stopped) <= 1e-5


@pytest.mark.parametrize("kwargs,match", [
    (dict(output_type="gif"), "`output_type` has to be one of"),
    (dict(plan="LXL"), "`plan` 'LXL'"),
    (dict(plan=7), "`plan` has to be a plan spelling"),
    (dict(engines="fp9"), "`engines` has to be one of"),
    (dict(engines="compiled"), r"`engines` has to be one of \['torch', 'torch-compile'"),  # no second spelling
    (dict(cuda_graph="sometimes"), "`cuda_graph` has to be"),
    (dict(cuda_graph=True), "captures CUDA graphs, but the pipeline runs on cpu"),
    (dict(num_inference_steps=0), "`num_inference_steps` has to be a positive integer"),
    (dict(guidance_scale=-1.0), "`guidance_scale` has to be a number >= 0"),
    (dict(height=30), "divisible by 16"),  # diffusers' own check_inputs
    (dict(guidance_scale_2=3.0), "guidance_scale_2"),  # Wan 2.1 has no second expert (diffusers' message)
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(attention_kwargs={"scale": 1.0}), "`attention_kwargs`"),
    (dict(num_videos_per_prompt=0), "`num_videos_per_prompt`"),
    (dict(num_frames=0), "`num_frames`"),
])
def test_bad_arguments_are_refused_with_a_value_error_naming_them(checkpoints, kwargs, match):
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    with pytest.raises(ValueError, match=match):
        ours(**dict(WAN_CALL, **kwargs))


def test_loading_and_model_refusals(checkpoints, tmp_path):
    from diffusers import WanTransformer3DModel

    with pytest.raises(ValueError, match="`small` .*does not exist"):
        FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="`small` .*holds a LTXVideoTransformer3DModel, not a WanTransformer3DModel"):
        FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["ltx_small"])
    other_text = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=12,
                                       in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=24,
                                       num_layers=1)
    with pytest.raises(ValueError, match="`small_transformer`: incompatible wan pair: text_dim differs"):
        FlowBlendWanPipeline.from_pipe(WanPipeline.from_pretrained(checkpoints["wan"]), small_transformer=other_text)
    alone = quiet(FlowBlendWanPipeline.from_pipe(WanPipeline.from_pretrained(checkpoints["wan"])))
    with pytest.raises(ValueError, match="no transformer for.*small_transformer="):
        alone(**WAN_CALL)  # LSL needs the small model
    assert alone(**WAN_CALL, plan="LLL", output_type="latent").frames.shape == (1, 4, 2, 4, 4)
    toy = quiet(FlowBlendWanPipeline.from_pretrained("toy"))
    with pytest.raises(ValueError, match="`prompt`.*unknown word"):
        toy(prompt="a purple circle moving left")
    with pytest.raises(ValueError, match="`height`, `width`, `num_frames`"):
        toy(prompt="a red circle moving left", num_frames=8)
    ltx = quiet(FlowBlendLTXPipeline.from_pretrained(checkpoints["ltx"], small=checkpoints["ltx_small"]))
    with pytest.raises(ValueError, match="`guidance_rescale`"):
        ltx(**LTX_CALL, guidance_rescale=0.7)
    with pytest.raises(ValueError, match="`timesteps`"):
        ltx(**LTX_CALL, timesteps=[999, 500])
    with pytest.raises(ValueError, match="divisible by 32"):  # LTXPipeline's own check_inputs
        ltx(**dict(LTX_CALL, height=48))
    with pytest.raises(ValueError, match="`plan` 'HSL:0.4,0.2'"):  # H is Wan 2.2's letter, not LTX's
        ltx(**LTX_CALL, plan="HSL:0.4,0.2")


def test_cuda_graph_modes_through_the_graph_runner_with_the_stand_in(checkpoints, monkeypatch):
    """The recording graph stand-in (tests/fake_cuda_graph.py: replays only what was captured) in place of CUDA:
    whole-loop and per-step graphs equal the eager loop, capture once per warm shape, and with per-step graphs a
    callback still sees and changes every step's latents (== diffusers' loop with the same callback)."""
    from fake_cuda_graph import FakeGraphBackend

    import flowblend.pipelines.blending as blending
    import flowblend.runtime.graph as graph
    from flowblend.pipelines.runner import check_cuda_graph

    backends, real_runner = [], graph.GraphRunner

    def runner_with_stand_in(sampler, mode="whole"):
        backends.append(FakeGraphBackend() if mode != "eager" else None)
        return real_runner(sampler, mode, backend=backends[-1])

    monkeypatch.setattr(graph, "GraphRunner", runner_with_stand_in)
    monkeypatch.setattr(blending, "check_cuda_graph",  # the real check asks for a CUDA device
                        lambda value, device, with_callback: check_cuda_graph(value, torch.device("cuda"), with_callback))
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    eager = ours(**WAN_CALL, generator=generator(), output_type="latent", cuda_graph=False).frames
    for mode in (True, "per_step"):
        first = ours(**WAN_CALL, generator=generator(), output_type="latent", cuda_graph=mode).frames
        again = ours(**WAN_CALL, generator=generator(5), output_type="latent", cuda_graph=mode).frames
        assert rel(first, eager) <= 1e-6 and rel(again, first) > 1e-3  # the second request is replayed, not frozen
        captures = backends[-1].events.count("begin")
        assert captures == (1 if mode is True else WAN_CALL["num_inference_steps"])  # once per shape, not per call

    def halve_at_step_2(pipe, i, t, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if i == 2 else {}
    ref = quiet(WanPipeline.from_pretrained(checkpoints["wan"]))(
        **WAN_CALL, generator=generator(), output_type="latent", callback_on_step_end=halve_at_step_2).frames
    got = ours(**WAN_CALL, generator=generator(), output_type="latent", plan="LLL", cuda_graph="per_step",
               callback_on_step_end=halve_at_step_2).frames
    assert rel(got, ref) <= 1e-5


def test_engine_options_reach_the_engine_factory(checkpoints, tmp_path):
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    call = dict(WAN_CALL, num_inference_steps=3, output_type="latent", plan="LLL")
    eager = ours(**call, generator=generator()).frames
    compiled = ours(**call, generator=generator(), engines="torch-compile").frames  # torch.compile of the same modules
    assert rel(compiled, eager) <= 1e-4
    ours.artifacts = str(tmp_path / "artifacts")
    with pytest.raises(ValueError, match="flowblend export"):  # nothing exported: the store says what to run
        ours(**call, engines="onnxruntime")


def test_torch_dtype_reaches_both_transformers(checkpoints):
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"],
                                                      torch_dtype=torch.bfloat16))
    assert ours.transformer.dtype == ours.small_transformer.dtype == ours.vae.dtype == torch.bfloat16
    ref_pipe = quiet(WanPipeline.from_pretrained(checkpoints["wan"], torch_dtype=torch.bfloat16))
    ref = ref_pipe(**WAN_CALL, generator=generator(), output_type="latent").frames
    got = ours(**WAN_CALL, generator=generator(), output_type="latent", plan="LLL").frames
    # diffusers combines CFG in bf16, the runtime in fp32: close, not equal (the fp32 parity is tested above)
    assert got.dtype == ref.dtype == torch.float32 and rel(got, ref) <= 2e-2
    # the engines run the pipeline's own modules as loaded: diffusers' FP32 modules (_keep_in_fp32_modules) stay FP32
    assert ours.transformer.scale_shift_table.dtype == ref_pipe.transformer.scale_shift_table.dtype == torch.float32


def test_given_latents_batches_and_a_saved_flowblend_pipeline(checkpoints, tmp_path):
    """`latents=` (LTX: packed tokens), several prompts x num_videos_per_prompt (diffusers draws the batch's noise at
    once; the runtime samples one video at a time) and save_pretrained -> from_pretrained with the small model."""
    wan_ref = quiet(WanPipeline.from_pretrained(checkpoints["wan"]))
    wan = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    noise = torch.randn((1, 4, 2, 4, 4), generator=generator(7))
    call = dict(WAN_CALL, output_type="latent")
    assert rel(wan(**call, latents=noise, plan="LLL").frames, wan_ref(**call, latents=noise).frames) <= 1e-5
    batch = dict(call, prompt=["a red circle", "a blue square moving right"], negative_prompt=["", "a dog"],
                 num_videos_per_prompt=2)
    ref = wan_ref(**batch, generator=generator()).frames
    got = wan(**batch, generator=generator(), plan="LLL").frames
    assert got.shape == ref.shape == (4, 4, 2, 4, 4) and rel(got, ref) <= 1e-5

    ltx_ref = quiet(LTXPipeline.from_pretrained(checkpoints["ltx"]))
    ltx = quiet(FlowBlendLTXPipeline.from_pretrained(checkpoints["ltx"], small=checkpoints["ltx_small"]))
    packed = torch.randn((1, 3 * 8 * 8, 8), generator=generator(8))
    call = dict(LTX_CALL, output_type="latent")
    assert rel(ltx(**call, latents=packed, plan="LLL").frames, ltx_ref(**call, latents=packed).frames) <= 1e-5

    wan.save_pretrained(tmp_path / "saved")
    reloaded = quiet(FlowBlendWanPipeline.from_pretrained(tmp_path / "saved"))  # small_transformer/ saved beside
    assert reloaded.small_transformer is not None
    blended = dict(WAN_CALL, output_type="latent")  # the default plan LSL:0.4,0.2: the small model runs
    assert torch.equal(reloaded(**blended, generator=generator()).frames, wan(**blended, generator=generator()).frames)


def test_model_cpu_offload_moves_the_text_encoder_and_vae_only(checkpoints):
    """diffusers' offload hooks (accelerate) on the text encoder and VAE; the transformers stay where the runtime's
    buffers are bound (no hook: the engines' step split still applies). CPU as the 'accelerator' here."""
    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    before = ours(**WAN_CALL, generator=generator()).frames
    ours.enable_model_cpu_offload(device="cpu")
    hooked = {name for name in ("text_encoder", "vae", "transformer", "small_transformer")
              if hasattr(getattr(ours, name), "_hf_hook")}
    assert hooked == {"text_encoder", "vae"}
    assert max_abs(ours(**WAN_CALL, generator=generator()).frames, before) == 0


def test_ltx_lsl_equals_ltx_pipeline_swapping_its_transformer_per_step(checkpoints):
    """The blended plan against diffusers' own loop: LTXPipeline whose step-end callback puts the plan's next model
    in place of `pipe.transformer` (the loop reads it every step), on the same checkpoint and generator."""
    from flowblend.runtime.plan import BlendPlan

    ours = quiet(FlowBlendLTXPipeline.from_pretrained(checkpoints["ltx"], small=checkpoints["ltx_small"]))
    steps = 10
    plan = BlendPlan.parse("LSL:0.4,0.2", steps)
    assert plan.models.count("small") == 4
    ref_pipe = quiet(LTXPipeline.from_pretrained(checkpoints["ltx"]))
    models = {"large": ref_pipe.transformer, "small": ours.small_transformer}

    def swap(pipe, i, t, kwargs):
        pipe.transformer = models[plan.models[min(i + 1, steps - 1)]]
        return {}
    call = dict(LTX_CALL, num_inference_steps=steps)
    ref = ref_pipe(**call, generator=generator(), output_type="latent", callback_on_step_end=swap).frames
    ref_pipe.transformer = models["large"]
    got = ours(**call, generator=generator(), output_type="latent", plan="LSL:0.4,0.2").frames
    assert rel(got, ref) <= 1e-5, f"relative error {rel(got, ref):.2e}"
    large_only = ref_pipe(**call, generator=generator(), output_type="latent").frames
    assert rel(large_only, ref) > 1e-3  # the swap changed the reference: the comparison can fail


def test_wan22_small_steps_around_the_switch_equal_wan_pipeline_swapping_its_experts(checkpoints):
    """experts:1,1 against WanPipeline(transformer, transformer_2, boundary_ratio) whose callback puts the small
    model in place of whichever expert the next step would run: each step keeps its expert's CFG scale."""
    from flowblend.runtime.plan import EXPERTS_AND_SMALL, BlendPlan, ExpertSchedule

    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan22"], small=checkpoints["wan_small"]))
    ref_pipe = quiet(WanPipeline.from_pretrained(checkpoints["wan22"]))
    steps = 8
    sched = type(ref_pipe.scheduler).from_config(ref_pipe.scheduler.config)
    sched.set_timesteps(steps)
    plan = BlendPlan.parse("experts:1,1", steps, EXPERTS_AND_SMALL,
                           ExpertSchedule(tuple(float(t) for t in sched.timesteps), 0.9))
    assert plan.models.count("small") == 2
    experts = (ref_pipe.transformer, ref_pipe.transformer_2)

    def place(pipe, step):
        small = plan.models[step] == "small"
        pipe.transformer, pipe.transformer_2 = (ours.small_transformer,) * 2 if small else experts

    def swap(pipe, i, t, kwargs):
        place(pipe, min(i + 1, steps - 1))
        return {}
    call = dict(WAN_CALL, num_inference_steps=steps, guidance_scale=4.0, guidance_scale_2=2.5)
    place(ref_pipe, 0)
    ref = ref_pipe(**call, generator=generator(), output_type="latent", callback_on_step_end=swap).frames
    got = ours(**call, generator=generator(), output_type="latent", plan="experts:1,1").frames
    assert rel(got, ref) <= 1e-5, f"relative error {rel(got, ref):.2e}"


def test_fp8_and_engine_choices_through_the_assembly(checkpoints):
    """engines=EngineChoice(dtype='fp8'): the FP8 precision of engines/kinds.py (its exact emulation on the CPU) over a BF16 pipeline,
    close to BF16 eager and not equal to it, the pipeline's own transformer untouched; an fp32 pipeline is
    refused rather than converted; an EngineChoice passes every engine option (its device becomes the pipeline's)."""
    from flowblend.assembly import EngineChoice

    ours = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"],
                                                      torch_dtype=torch.bfloat16))
    weights = {n: p.clone() for n, p in ours.transformer.named_parameters()}
    call = dict(WAN_CALL, output_type="latent", plan="LLL")
    bf16 = ours(**call, generator=generator()).frames
    fp8 = ours(**call, generator=generator(), engines=EngineChoice(dtype="fp8")).frames
    assert 0 < rel(fp8, bf16) <= 0.1
    assert all(torch.equal(p, weights[n]) for n, p in ours.transformer.named_parameters())
    chosen = ours(**call, generator=generator(), engines=EngineChoice(backend="torch", dtype="fp8", device="cuda:7")
                  ).frames
    assert torch.equal(chosen, fp8)  # the pipeline's device (cpu), not the choice's, and the same FP8 run
    with pytest.raises(ValueError, match="--fp8-keep-blocks 1 keeps all 2 blocks"):  # the engines' own refusal
        ours(**call, engines=EngineChoice(backend="torch", dtype="fp8", fp8_keep_blocks=1))
    fp32 = quiet(FlowBlendWanPipeline.from_pretrained(checkpoints["wan"], small=checkpoints["wan_small"]))
    with pytest.raises(ValueError, match="`engines` runs fp8.*torch_dtype=torch.bfloat16"):
        fp32(**call, engines=EngineChoice(dtype="fp8"))


def test_dpm_solver_scheduler_is_followed_and_per_stage_steps_refused(checkpoints):
    """A WanPipeline whose scheduler is diffusers' DPMSolverMultistepScheduler (flow sigmas, DPM++ 2M and 3M): plan
    LLL == WanPipeline with the same scheduler config; an unsupported DPM option and stages with their own step
    counts (`L2,S1/2,L2`) are refused naming what to change."""
    from diffusers import DPMSolverMultistepScheduler

    base = quiet(WanPipeline.from_pretrained(checkpoints["wan"]))
    for order in (2, 3):
        config = dict(use_flow_sigmas=True, prediction_type="flow_prediction", flow_shift=3.0,
                      algorithm_type="dpmsolver++", solver_type="midpoint", final_sigmas_type="zero",
                      lower_order_final=True, solver_order=order)
        ref_pipe = quiet(WanPipeline.from_pipe(base, scheduler=DPMSolverMultistepScheduler(**config)))
        ours = quiet(FlowBlendWanPipeline.from_pipe(base, scheduler=DPMSolverMultistepScheduler(**config)))
        ref = ref_pipe(**WAN_CALL, generator=generator(), output_type="latent").frames
        got = ours(**WAN_CALL, generator=generator(), output_type="latent", plan="LLL").frames
        assert rel(got, ref) <= 1e-5, f"DPM++ order {order}: relative error {rel(got, ref):.2e}"
        unipc = quiet(FlowBlendWanPipeline.from_pipe(base))(**WAN_CALL, generator=generator(), output_type="latent",
                                                           plan="LLL").frames
        assert rel(unipc, ref) > 1e-4  # the solver really changed
    odd = quiet(FlowBlendWanPipeline.from_pipe(base, scheduler=DPMSolverMultistepScheduler(
        **dict(config, solver_type="heun"))))
    with pytest.raises(ValueError, match="scheduler DPMSolverMultistepScheduler: the DPM\\+\\+ table supports"):
        odd(**WAN_CALL, plan="LLL")
    with pytest.raises(ValueError, match="stages with their own step counts"):
        quiet(FlowBlendWanPipeline.from_pipe(base))(**WAN_CALL, plan="L2,S1/2,L2")
