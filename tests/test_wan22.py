"""Wan 2.2 A14B: two experts and a small stand-in, against diffusers' own WanPipeline.

The references are diffusers' code: `WanPipeline(transformer=high, transformer_2=low,
boundary_ratio=...)` run on tiny random configs of the real WanTransformer3DModel (its latents,
output_type="latent"), and a plain loop over diffusers' schedulers that swaps among the three
transformers per step. The expert boundary step is taken from the schedulers' own timesteps.
"""
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel
from tiny_models import TEXT, WAN_LATENT, WAN_TINY

from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.runtime.guidance import expert_schedule_for, guidance_table
from flowblend.runtime.plan import EXPERTS_AND_SMALL, BlendPlan, ExpertSchedule
from flowblend.runtime.sampler import Sampler, SamplerOptions

STEPS, SHIFT, BOUNDARY = 8, 5.0, 0.9  # UniPC and Euler both switch experts mid-loop at 8 steps (3-4 high steps)
HIGH_G, LOW_G = 4.0, 2.5


def diffusers_scheduler(solver, shift):
    """Wan 2.2 A14B's scheduler config (UniPC, flow sigmas, bh2, order 2), or the flow-matching Euler."""
    if solver == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                                       lower_order_final=True, final_sigmas_type="zero")
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def tiny_experts_and_small(seed=0):
    out = {}
    for i, (name, cfg) in enumerate((("high", WAN_TINY["large"]), ("low", WAN_TINY["large"]),
                                     ("small", WAN_TINY["small"]))):
        torch.manual_seed(seed + 10 * i)
        model = WanTransformer3DModel(**cfg).eval()
        with torch.no_grad():  # lift zero-initialised output layers so the three models really differ
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        out[name] = model
    return out


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((1, *WAN_LATENT), generator=g), torch.randn((1, *TEXT), generator=g),
            torch.randn((1, *TEXT), generator=g))


def diffusers_switch_step(solver, steps, shift, ratio):
    sched = diffusers_scheduler(solver, shift)
    sched.set_timesteps(steps)
    boundary = ratio * sched.config.num_train_timesteps
    return sum(1 for t in sched.timesteps if t >= boundary)


def flowblend_sampler(models, plan, experts, solver, guidance):
    scales = {"high": HIGH_G, "low": LOW_G} if guidance else {"high": 1.0, "low": 1.0}
    table = guidance_table(plan, 1.0, scales, experts)
    options = SamplerOptions(solver=solver, shift=SHIFT, guidance_scale=max(table), guidance_table=table)
    return Sampler({n: TorchEngine(m) for n, m in models.items()}, plan, options=options)


@pytest.mark.parametrize("solver", ["unipc", "euler"])
@pytest.mark.parametrize("guidance", [True, False])
def test_expert_plan_equals_diffusers_wan_pipeline(solver, guidance):
    models = tiny_experts_and_small()
    noise, cond, uncond = inputs()
    experts = expert_schedule_for(solver, STEPS, SHIFT, BOUNDARY)
    switch = diffusers_switch_step(solver, STEPS, SHIFT, BOUNDARY)
    assert experts.switch_step == switch and 0 < switch < STEPS  # both experts run
    plan = BlendPlan.parse("experts", STEPS, EXPERTS_AND_SMALL, experts)
    assert plan.models == ("high",) * switch + ("low",) * (STEPS - switch)
    ours = flowblend_sampler(models, plan, experts, solver, guidance).sample(noise, cond, uncond if guidance else None)

    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=diffusers_scheduler(solver, SHIFT),
                       transformer=models["high"], transformer_2=models["low"], boundary_ratio=BOUNDARY)
    pipe.set_progress_bar_config(disable=True)
    c, f, h, w = WAN_LATENT
    kw = dict(guidance_scale=HIGH_G, guidance_scale_2=LOW_G, negative_prompt_embeds=uncond) if guidance \
        else dict(guidance_scale=1.0, guidance_scale_2=1.0)
    with torch.no_grad():
        ref = pipe(prompt_embeds=cond, latents=noise.clone(), num_inference_steps=STEPS, height=h * 8, width=w * 8,
                   num_frames=(f - 1) * 4 + 1, output_type="latent", return_dict=False, **kw)[0]
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel <= 1e-5, f"{solver} cfg={guidance}: relative error {rel:.2e} against WanPipeline"
    if guidance:  # the experts' scales differ, so a single scale for every step would not pass
        one_scale = flowblend_sampler(models, plan, experts, solver, guidance)
        one_scale = Sampler(one_scale.engines, plan, options=SamplerOptions(solver=solver, shift=SHIFT,
                                                                            guidance_scale=HIGH_G))
        wrong = one_scale.sample(noise, cond, uncond)
        assert ((wrong - ref).norm() / ref.norm()).item() > 1e-4


def swapping_reference_loop(models, plan, experts, solver, guidance, noise, cond, uncond):
    """A plain diffusers loop: per step, the plan's transformer with the scale of the step's expert."""
    sched = diffusers_scheduler(solver, SHIFT)
    sched.set_timesteps(len(plan))
    latents = noise.clone()
    boundary = BOUNDARY * 1000
    for i, t in enumerate(sched.timesteps):
        model = models[plan.models[i]]
        scale = (HIGH_G if t >= boundary else LOW_G) if guidance else 1.0

        def call(text):
            return model(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=text, return_dict=False)[0]
        v = call(cond)
        if guidance:
            v_u = call(uncond)
            v = v_u + scale * (v - v_u)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents


@pytest.mark.parametrize("solver", ["unipc", "euler"])
@pytest.mark.parametrize("guidance", [True, False])
def test_small_steps_around_the_boundary_equal_a_swapping_diffusers_loop(solver, guidance):
    models = tiny_experts_and_small()
    noise, cond, uncond = inputs(2)
    experts = expert_schedule_for(solver, STEPS, SHIFT, BOUNDARY)
    switch = experts.switch_step
    for spec in ("experts:1,2", "experts:2,0", "HSSLLLLL", "H2,S3,L3"):
        plan = BlendPlan.parse(spec, STEPS, EXPERTS_AND_SMALL, experts)
        assert plan.count("small") > 0
        ours = flowblend_sampler(models, plan, experts, solver, guidance).sample(noise, cond,
                                                                                 uncond if guidance else None)
        with torch.no_grad():
            ref = swapping_reference_loop(models, plan, experts, solver, guidance, noise, cond, uncond)
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, f"{spec} {solver} cfg={guidance}: relative error {rel:.2e}"
    plan = BlendPlan.parse("experts:1,2", STEPS, EXPERTS_AND_SMALL, experts)
    assert plan.models[switch - 1:switch + 2] == ("small",) * 3 and plan.models[switch - 2] == "high"


def test_expert_plan_spellings_and_errors():
    experts = ExpertSchedule((999.0, 950.0, 900.0, 874.0, 500.0, 100.0), 0.875)
    assert experts.switch_step == 3 and experts.boundary_timestep == 875.0
    ms = EXPERTS_AND_SMALL
    assert BlendPlan.parse("experts", 6, ms, experts).label == "H3,L3"
    assert BlendPlan.parse("experts:1,1", 6, ms, experts).label == "H2,S2,L2"
    assert BlendPlan.parse("HSL:0.5,0.25", 8, ms).label == "H4,S2,L2"  # the paper's fraction form, any letters
    assert BlendPlan.parse("H2,S2,L2", 6, ms).models == ("high",) * 2 + ("small",) * 2 + ("low",) * 2
    for spec, match in (("experts:4,0", "only 3 high-noise"), ("experts:0,4", "only 3 low-noise"),
                        ("LSX", "cannot read"), ("G2,S4", "not of the form")):
        with pytest.raises(ValueError, match=match):
            BlendPlan.parse(spec, 6, ms, experts)
    with pytest.raises(ValueError, match="--pair wan22"):
        BlendPlan.parse("experts:1,1", 6)
    plan = BlendPlan.parse("experts:1,1", 6, ms, experts)
    assert BlendPlan.from_json(plan.to_json()) == plan


def test_guidance_table_small_takes_the_replaced_experts_scale_or_its_own():
    experts = ExpertSchedule((999.0, 950.0, 900.0, 874.0, 500.0, 100.0), 0.875)
    plan = BlendPlan.parse("experts:1,1", 6, EXPERTS_AND_SMALL, experts)
    assert guidance_table(plan, 5.0, {"high": 4.0, "low": 3.0}, experts) == (4.0, 4.0, 4.0, 3.0, 3.0, 3.0)
    assert guidance_table(plan, 5.0, {"high": 4.0, "low": 3.0, "small": 6.0}, experts) == (4, 4, 6, 6, 3, 3)
    assert guidance_table(BlendPlan.parse("LSL:0.4,0.2", 5), 5.0) == (5.0,) * 5
    with pytest.raises(FlowblendError, match="one scale per step"):
        SamplerOptions(guidance_table=(1.0, 2.0)).guidance_for(3)


# -- `flowblend plan --pair wan22` reproduces the pipeline's expert switch --------------------------------------
def _plan_output(capsys, *extra):
    from flowblend.cli.main import main

    assert main(["plan", "--pair", "wan22", *extra]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line[:4].strip().isdigit()]
    return out, rows


@pytest.mark.parametrize("steps", [40, 50])
@pytest.mark.parametrize("ratio,shift", [(0.875, 12.0), (0.9, 5.0), (0.9, 3.0)])  # T2V, I2V, and a t == 900 case
def test_plan_command_reproduces_diffusers_expert_boundary(capsys, steps, ratio, shift):
    switch = diffusers_switch_step("unipc", steps, shift, ratio)
    out, rows = _plan_output(capsys, "--steps", str(steps), "--boundary-ratio", str(ratio), "--shift", str(shift))
    assert f"expert switch at step {switch}:" in out
    assert [r[1] for r in rows] == ["high"] * switch + ["low"] * (steps - switch)
    assert [float(r[2]) for r in rows] == [4.0] * switch + [3.0] * (steps - switch)  # each expert's own CFG scale
    assert "0.0% fewer, FLOP-ideal speedup 1.00x" in out  # the experts' plan is its own reference


def test_boundary_exactly_on_a_timestep_goes_to_the_high_expert():
    sched = diffusers_scheduler("unipc", 3.0)
    sched.set_timesteps(8)
    assert 900 in sched.timesteps.tolist()  # WanPipeline: t >= boundary runs `transformer`
    assert expert_schedule_for("unipc", 8, 3.0, 0.9).switch_step == diffusers_switch_step("unipc", 8, 3.0, 0.9) == 3


def test_plan_command_small_around_the_switch(capsys):
    switch = diffusers_switch_step("unipc", 40, 12.0, 0.875)
    out, rows = _plan_output(capsys, "--plan", "experts:4,2", "--small-guidance", "3.5")
    models = [r[1] for r in rows]
    assert models == ["high"] * (switch - 4) + ["small"] * 6 + ["low"] * (40 - switch - 2)
    assert [float(r[2]) for r in rows if r[1] == "small"] == [3.5] * 6
    tflops = {r[1]: float(r[3]) for r in rows}
    assert tflops["high"] == tflops["low"] > 5 * tflops["small"]  # both experts are Wan 2.1 14B-sized
    out, rows = _plan_output(capsys, "--plan", "experts:4,2")  # the small model takes the replaced expert's scale
    assert [float(r[2]) for r in rows if r[1] == "small"] == [4.0] * 4 + [3.0] * 2


@pytest.mark.parametrize("extra,message", [
    (["--plan", "experts:40,0"], "high-noise steps come before the switch"),
    (["--boundary-ratio", "1.5"], "must be in (0, 1)"),
    (["--plan", "LSX"], "cannot read plan"),
])
def test_plan_command_bad_input(capsys, extra, message):
    from flowblend.cli.main import main

    assert main(["plan", "--pair", "wan22", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert main(["plan", "--pair", "wan", "--guidance-2", "3"]) == 2
    assert "--pair wan22" in capsys.readouterr().err
