"""Velocity divergence on the runtime, against a plain diffusers loop that evaluates both models itself."""
import json

import numpy as np
import pytest
import torch
from tiny_models import TEXT, latent_shape, tiny_pair

from flowblend.calibrate.divergence import (
    DivergenceCurve,
    SamplingSetup,
    make_requests,
    measure_divergence,
    plot_divergence,
    save_curve,
)
from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.solvers import scheduler_for

STEPS = 6


def encoder(family):
    """A deterministic stand-in text encoder: prompt -> [L, D] embeddings (+ mask for LTX)."""
    calls = []

    def encode(prompts):
        calls.append(list(prompts))
        rows = [torch.randn(TEXT, generator=torch.Generator().manual_seed(sum(map(ord, p)) + 1)) for p in prompts]
        mask = torch.ones(len(prompts), TEXT[0], dtype=torch.int64) if family == "ltx" else None
        if mask is not None:
            mask[:, 5:] = 0
        return torch.stack(rows), mask

    encode.calls = calls
    return encode


def reference_divergence(models, request, solver, guidance, steps):
    """WanPipeline's loop on the large model, also calling the small one on each step's latents."""
    sched = scheduler_for(solver, 3.0)
    sched.set_timesteps(steps)
    latents = request.noise.clone()
    cond, uncond = request.embeds[0:1], request.embeds[1:2]
    cos, rel, cos_cond = [], [], []

    def velocity(model, t):
        call = lambda text: model(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=text,  # noqa: E731
                                  return_dict=False)[0]
        v_c = call(cond)
        if guidance <= 1:
            return v_c, v_c
        v_u = call(uncond)
        return v_u + guidance * (v_c - v_u), v_c

    for t in sched.timesteps:
        v_large, c_large = velocity(models["large"], t)
        v_small, c_small = velocity(models["small"], t)
        a, b = v_small.flatten().double().numpy(), v_large.flatten().double().numpy()
        cos.append(1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        rel.append(np.linalg.norm(a - b) / np.linalg.norm(b))
        ac, bc = c_small.flatten().double().numpy(), c_large.flatten().double().numpy()
        cos_cond.append(1 - ac @ bc / np.linalg.norm(ac) / np.linalg.norm(bc))
        latents = sched.step(v_large, t, latents, return_dict=False)[0]
    return np.array(cos), np.array(rel), np.array(cos_cond), latents


@pytest.mark.parametrize("solver,guidance", [("unipc", 4.0), ("euler", 1.0)])
def test_divergence_equals_a_diffusers_loop_evaluating_both_models(solver, guidance):
    models = tiny_pair("wan")
    engines = {n: TorchEngine(m, name=n) for n, m in models.items()}
    setup = SamplingSetup(STEPS, solver, 3.0, guidance, latent_shape("wan"))
    requests = make_requests(encoder("wan"), ["a red circle", "a blue square"], [0, 1], setup.latent_shape)
    curve, finals = measure_divergence(engines, requests, setup)
    assert np.asarray(curve.values["cosine_guided"]).shape == (4, STEPS)
    for k, request in enumerate(requests):
        with torch.no_grad():
            cos, rel, cos_cond, lll = reference_divergence(models, request, solver, guidance, STEPS)
        np.testing.assert_allclose(curve.values["cosine_guided"][k], cos, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(curve.values["rel_l2_guided"][k], rel, rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(curve.values["cosine_cond"][k], cos_cond, rtol=1e-3, atol=1e-6)
        # the trajectory is the large model's alone: evaluating the small engine left no trace
        assert ((finals[k] - lll).norm() / lll.norm()).item() < 1e-5
    assert (curve.mean("cosine_guided") > 1e-4).all()  # the two tiny models really differ
    if guidance <= 1:
        assert curve.values["cosine_guided"] == curve.values["cosine_cond"]


def test_same_model_twice_has_zero_divergence_and_ltx_mask_path():
    models = tiny_pair("ltx")
    engines = {"large": TorchEngine(models["large"]), "small": TorchEngine(models["large"])}
    setup = SamplingSetup(4, "euler", 1.0, 3.0, latent_shape("ltx"), mu=0.7)
    requests = make_requests(encoder("ltx"), ["a cat"], [3], setup.latent_shape)
    curve, _ = measure_divergence(engines, requests, setup)
    assert np.abs(curve.mean("cosine_guided")).max() < 1e-6
    assert np.abs(curve.mean("rel_l2_cond")).max() < 1e-5
    assert curve.setup["mu"] == 0.7 and len(curve.sigmas) == 5


def test_prompts_are_encoded_in_one_batch_and_requests_cover_every_seed():
    enc = encoder("wan")
    requests = make_requests(enc, ["a", " ", "b"], [0, 5, 7], latent_shape("wan"))
    assert enc.calls == [["a", "b", ""]]  # one batch: prompts + the negative
    assert [(r.prompt, r.seed) for r in requests] == [(p, s) for p in "ab" for s in (0, 5, 7)]
    torch.testing.assert_close(requests[1].noise, torch.randn((1, *latent_shape("wan")),
                                                              generator=torch.Generator().manual_seed(5)))
    assert torch.equal(requests[0].embeds[1], requests[4].embeds[1])  # shared negative


@pytest.mark.parametrize("prompts,seeds", [([], [0]), (["  ", ""], [0]), (["a"], [])])
def test_empty_prompts_or_seeds_raise(prompts, seeds):
    with pytest.raises(FlowblendError, match="no (prompt|seed) given"):
        make_requests(encoder("wan"), prompts, seeds, latent_shape("wan"))


def test_curve_json_round_trip_and_plot(tmp_path):
    models = tiny_pair("wan")
    engines = {n: TorchEngine(m) for n, m in models.items()}
    setup = SamplingSetup(5, "unipc", 3.0, 2.0, latent_shape("wan"))
    curve, _ = measure_divergence(engines, make_requests(encoder("wan"), ["x", "y"], [0], setup.latent_shape), setup)
    path = save_curve(curve, tmp_path / "d" / "divergence.json")
    data = json.loads(path.read_text())
    back = DivergenceCurve.from_dict(data)
    np.testing.assert_allclose(back.mean("rel_l2_guided"), curve.mean("rel_l2_guided"))
    assert data["summary"]["cosine_guided"]["std"] == pytest.approx(curve.spread("cosine_guided").tolist(), abs=1e-6)
    png = plot_divergence(curve, tmp_path / "d" / "divergence.png", BlendPlan.parse("LSL:0.4,0.2", 5), 0.1)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == ["divergence.json", "divergence.png"]
