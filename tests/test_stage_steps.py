"""Stages with their own step counts and CFG scales (`L8,D4/8@1,L4`) against diffusers' own schedulers.

The reference schedule of a plan is assembled from diffusers' schedules, not from runtime/solvers.py: a
stage of k steps over s of the N base steps runs at the density of a (k * N / s)-step run, so its sigmas
and timesteps are a slice of what the scheduler's own set_timesteps gives for that many steps (the
plans here are chosen so that this is a whole number). The reference loop then runs diffusers' step()
over that one sequence, swapping the transformer per stage, with each stage's own guidance (a stage at
guidance 1 calls its model on the conditional prompt only). One scheduler serves the whole run: its
multistep history crosses every stage boundary, as in a pipeline that swaps the transformer per step
(setting each stage's timesteps afresh would restart UniPC / DPM++ at first order).
"""
import numpy as np
import pytest
import torch
from fake_cuda_graph import FakeGraphBackend
from tiny_models import TEXT, latent_shape, tiny_pair

from flowblend.engines.torch_engine import TorchEngine
from flowblend.runtime.graph import GraphRunner
from flowblend.runtime.plan import BlendPlan, ModelSet
from flowblend.runtime.sampler import Sampler, SamplerOptions
from flowblend.runtime.solvers import make_solver_table

LSD = ModelSet(("large", "small", "distilled"), ("L", "S", "D"))
MU = 0.9  # LTX's dynamic shift for the euler runs


def diffusers_scheduler(solver, shift):
    """The schedulers as diffusers' Wan / LTX docs configure them for flow matching (built here, independently)."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True)
    if solver == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       num_train_timesteps=1000, solver_order=2)
    return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift,
                                       num_train_timesteps=1000, solver_order=2 if solver == "dpm++" else 3)


def diffusers_schedule(solver, shift, steps):
    """(sigmas[n + 1], timesteps[n]) of a plain `steps`-step run, from the scheduler itself (LTX passes
    sigmas=linspace(1, 1/n, n) with mu, as LTXPipeline)."""
    sched = diffusers_scheduler(solver, shift)
    if solver == "euler":
        sched.set_timesteps(steps, sigmas=np.linspace(1.0, 1.0 / steps, steps), mu=MU)
    else:
        sched.set_timesteps(steps)
    return sched.sigmas.clone(), sched.timesteps.clone()


def reference_schedule(solver, shift, stages):
    """The whole run's (sigmas, timesteps) from slices of diffusers' own runs: stages are (k, span) over N base steps."""
    base = sum(span for _, span in stages)
    sigmas, timesteps, start = [], [], 0
    for k, span in stages:
        density = k * base
        assert density % span == 0 and (start * k) % span == 0, "pick plans whose stages align with whole runs"
        s, t = diffusers_schedule(solver, shift, density // span)
        first = start * k // span
        sigmas.append(s[first:first + k])
        timesteps.append(t[first:first + k])
        start += span
    return torch.cat(sigmas + [torch.zeros(1)]), torch.cat(timesteps)


@pytest.mark.parametrize("solver", ["euler", "unipc", "dpm++", "dpm++3m"])
@pytest.mark.parametrize("stages", [((8, 8), (4, 8), (4, 4)), ((8, 8), (16, 8), (4, 4)), ((4, 8), (2, 4), (4, 8))])
def test_stage_sigmas_are_slices_of_diffusers_runs_at_the_stage_density(solver, stages):
    plan = BlendPlan(tuple(m for (k, _), m in zip(stages, ("large", "small", "large")) for _ in range(k)),
                     segments=stages)
    table = make_solver_table(solver, len(plan), 3.0, MU if solver == "euler" else None, segments=plan.segments)
    sigmas, timesteps = reference_schedule(solver, 3.0, stages)
    assert table.sigmas == pytest.approx(sigmas.tolist(), rel=1e-6, abs=1e-7)
    assert table.timesteps == pytest.approx([float(t) for t in timesteps], rel=1e-6, abs=1e-4)
    assert all(a > b for a, b in zip(table.sigmas, table.sigmas[1:]))  # one monotone sequence


def test_stages_that_keep_the_base_density_are_the_plain_plan():
    plain = BlendPlan.parse("L8,S8,L4", 20)
    spelled = BlendPlan.parse("L8,S8/8,L4", 20)
    assert (spelled.models, spelled.segments, spelled.label) == (plain.models, (), "L8,S8,L4")
    for solver in ("euler", "unipc", "dpm++"):
        assert make_solver_table(solver, 20, 3.0, segments=((8, 8), (8, 8), (4, 4))) == make_solver_table(solver, 20, 3.0)


def _ltx_call(model, latents, t, text, mask):
    b, c, f, h, w = latents.shape
    packed = latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c).expand(text.shape[0], -1, -1)
    out = model(hidden_states=packed, encoder_hidden_states=text, timestep=t.expand(text.shape[0]),
                encoder_attention_mask=mask, num_frames=f, height=h, width=w,
                rope_interpolation_scale=(8 / 25, 32, 32), return_dict=False)[0].float()
    return out.reshape(text.shape[0], f, h, w, c).permute(0, 4, 1, 2, 3)


def reference_loop(models, stages, solver, shift, noise, cond, uncond, mask):
    """diffusers' step() over the stages' schedule; stages are (model, k, span, guidance)."""
    sigmas, timesteps = reference_schedule(solver, shift, [(k, span) for _, k, span, _ in stages])
    sched = diffusers_scheduler(solver, shift)
    sched.set_timesteps(len(timesteps), **({"mu": MU} if solver == "euler" else {}))
    sched.sigmas, sched.timesteps = sigmas, timesteps  # the scheduler's own attributes, set to the whole run
    sched.set_begin_index(0)
    per_step = [(name, g) for name, k, _, g in stages for _ in range(k)]
    latents = noise.clone()
    for (name, g), t in zip(per_step, timesteps):
        if g > 1:  # [uncond, cond] batched, as LTXPipeline
            u, c = _ltx_call(models[name], latents, t, torch.cat([uncond, cond]), torch.cat([mask, mask])).chunk(2)
            v = u + g * (c - u)
        else:  # no CFG: the conditional forward alone
            v = _ltx_call(models[name], latents, t, cond, mask)
        latents = sched.step(v, t, latents, return_dict=False)[0]
    return latents


@pytest.fixture(scope="module")
def ltx_models():
    pair = tiny_pair("ltx")
    return {**pair, "distilled": tiny_pair("ltx", seed=5)["small"]}


def _request(seed=1):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn((1, *latent_shape("ltx")), generator=g)
    cond, uncond = torch.randn((1, *TEXT), generator=g), torch.randn((1, *TEXT), generator=g)
    mask = torch.ones(1, TEXT[0], dtype=torch.int64)
    mask[:, 5:] = 0
    return noise, cond, uncond, mask


class CountingEngine(TorchEngine):
    """A TorchEngine that records the batch of every forward (a distilled stage at guidance 1 runs batch 1)."""

    def run(self, step):
        self.batches.append(self._velocity.shape[0])
        super().run(step)


@pytest.mark.parametrize("solver", ["euler", "unipc", "dpm++", "dpm++3m"])
def test_per_stage_steps_and_guidance_equal_a_diffusers_loop_over_the_stages(ltx_models, solver):
    noise, cond, uncond, mask = _request()
    engines = {name: CountingEngine(m) for name, m in ltx_models.items()}
    for spec, stages in [("L4,D2/4@1,L2", [("large", 4, 4, 4.0), ("distilled", 2, 4, 1.0), ("large", 2, 2, 4.0)]),
                         ("L2,S4/2,D2/4@1", [("large", 2, 2, 4.0), ("small", 4, 2, 4.0), ("distilled", 2, 4, 1.0)])]:
        plan = BlendPlan.parse(spec, sum(span for _, _, span, _ in stages), LSD)
        from flowblend.runtime.guidance import guidance_table

        options = SamplerOptions(solver=solver, shift=3.0, guidance_scale=4.0, mu=MU if solver == "euler" else None,
                                 guidance_table=guidance_table(plan, 4.0))
        for e in engines.values():
            e.batches = []
        ours = Sampler(engines, plan, options).sample(noise, cond, uncond, prompt_mask=mask, negative_prompt_mask=mask)
        assert engines["distilled"].batches == [1, 1]  # no unconditional half
        assert set(engines["large"].batches) == {2}
        with torch.no_grad():
            ref = reference_loop(ltx_models, stages, solver, 3.0, noise, cond, uncond, mask)
        rel = ((ours - ref).norm() / ref.norm()).item()
        assert rel <= 1e-5, f"{spec} {solver}: relative error {rel:.2e}"
        # the stage's own steps matter: the plain schedule of the same models differs
        plain = BlendPlan.from_steps(plan.models, LSD)
        other = Sampler(engines, plain, options).sample(noise, cond, uncond, prompt_mask=mask, negative_prompt_mask=mask)
        assert ((other - ours).norm() / ours.norm()).item() > 1e-3


@pytest.mark.parametrize("mode", ["whole", "per_step"])
def test_the_loop_graph_captures_a_mixed_cfg_plan(ltx_models, mode):
    from flowblend.runtime.guidance import guidance_table

    noise, cond, uncond, mask = _request(2)
    engines = {name: TorchEngine(m) for name, m in ltx_models.items()}
    plan = BlendPlan.parse("L4,D2/4@1,L2", 10, LSD)
    options = SamplerOptions(solver="dpm++", shift=3.0, guidance_scale=4.0, guidance_table=guidance_table(plan, 4.0))
    eager = Sampler(engines, plan, options).sample(noise, cond, uncond, prompt_mask=mask, negative_prompt_mask=mask)
    backend = FakeGraphBackend()
    runner = GraphRunner(Sampler(engines, plan, options), mode=mode, backend=backend)
    for seed in (2, 3):
        n, c, u, m = _request(seed)
        got = runner.sample(n, c, u, prompt_mask=m, negative_prompt_mask=m)
        want = Sampler(engines, plan, options).sample(n, c, u, prompt_mask=m, negative_prompt_mask=m)
        assert ((got - want).norm() / want.norm()).item() <= 1e-6
    assert backend.events.count("begin") == (1 if mode == "whole" else len(plan))
    assert ((got - eager).norm() / eager.norm()).item() > 1e-3  # the second request really differed


def test_the_graph_cache_key_tells_stage_schedules_apart(ltx_models):
    engines = {name: TorchEngine(m) for name, m in ltx_models.items()}
    a, b = BlendPlan.parse("L4,D2/4,L2", 10, LSD), BlendPlan.parse("L4,D2/5,L2", 11, LSD)
    assert a.models == b.models and a.segments != b.segments
    key = [GraphRunner(Sampler(engines, p, SamplerOptions()), backend=FakeGraphBackend()).key((1,), (1,))
           for p in (a, b)]
    assert key[0] != key[1]


@pytest.mark.parametrize("spec,steps,segments,label", [
    ("L20,D4,L10", 40, ((20, 20), (4, 10), (10, 10)), "L20,D4/10,L10"),
    ("L8,S3,L4", 20, ((8, 8), (3, 8), (4, 4)), "L8,S3/8,L4"),
    ("L20,D4/20@1,L10", 50, ((20, 20), (4, 20), (10, 10)), "L20,D4/20@1,L10"),
    ("l20, d4/20, l10", 50, ((20, 20), (4, 20), (10, 10)), "L20,D4/20,L10"),
    ("L20,S20,L10", 50, (), "L20,S20,L10"),
])
def test_stage_spellings(spec, steps, segments, label):
    plan = BlendPlan.parse(spec, steps, LSD)
    assert plan.segments == segments and plan.label == label
    assert plan.base_steps == steps and len(plan) == sum(k for k, _ in segments or ((steps, steps),))
    assert BlendPlan.from_json(plan.to_json()) == plan


def test_stage_guidance_reaches_the_guidance_table():
    from flowblend.runtime.guidance import guidance_table

    plan = BlendPlan.parse("L2,D2/4@1,S1@2.5", 7, LSD)
    assert guidance_table(plan, 5.0, {"small": 3.0}) == (5.0, 5.0, 1.0, 1.0, 2.5)
    assert guidance_table(BlendPlan.parse("L2,D2/4,L1", 7, LSD), 5.0, {"distilled": 1.0}) == (5.0, 5.0, 1.0, 1.0, 5.0)


@pytest.mark.parametrize("spec,steps,message", [
    ("L20,D4/12,L10", 40, "sum to 42 but steps=40"),
    ("L20,D4,L10,S2", 40, "sum to 36 but steps=40: make them add up$"),
    ("L20,D4,L30", 40, "sum to 54"),
    ("L20,S20", 50, "sum to 40"),
    ("L8,D0/4,L8", 20, "needs >= 1 step"),
    ("L8,D2/0,L8", 10, "needs >= 1 step"),
    ("L8,D2/x,L8", 20, "not of the form"),
    ("L8,D2@,L8", 20, "not of the form"),
])
def test_bad_stage_spellings_are_refused_with_the_fix(spec, steps, message):
    with pytest.raises(ValueError, match=message):
        BlendPlan.parse(spec, steps, LSD)


def test_a_short_middle_stage_spans_the_rest_and_wrong_spans_name_the_fix():
    assert BlendPlan.parse("L20,S4,L10", 46).label == "L20,S4/16,L10"
    with pytest.raises(ValueError, match=r"or give a stage the base steps it spans \(L20,S4/16,L10\)"):
        BlendPlan.from_stages("L20,S4/4,L10", 46)
