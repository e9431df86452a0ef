"""engines/wan_step.py against diffusers' own WanTransformer3DModel.forward: bitwise, every step."""
import pytest
import torch
from diffusers import WanTransformer3DModel

from flowblend.engines.base import LATENTS, TEXT_EMBEDS, TIMESTEP, VELOCITY
from flowblend.engines.torch_engine import TorchEngine
from flowblend.engines.wan_step import WanStep, supports_step_split
from flowblend.export.toy import TEXT_DIM, TEXT_LEN, TOY_FRAMES, load_toy_transformer
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler
from tiny_models import TEXT, WAN_LATENT, WAN_TINY, tiny_pair


def _bindings(latent_shape, text_shape, timesteps, batch=2, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    table = torch.tensor(timesteps, dtype=torch.float32)[:, None].repeat(1, batch)
    return {LATENTS: torch.randn((batch, *latent_shape), generator=gen).to(dtype), TIMESTEP: table,
            TEXT_EMBEDS: torch.randn((batch, *text_shape), generator=gen).to(dtype),
            VELOCITY: torch.zeros((batch, *latent_shape), dtype=dtype)}


def _diffusers_velocity(model, tensors, step):
    with torch.no_grad():
        return model(hidden_states=tensors[LATENTS], timestep=tensors[TIMESTEP][step],
                     encoder_hidden_states=tensors[TEXT_EMBEDS], return_dict=False)[0]


CASES = {
    "toy large": (lambda: load_toy_transformer("large"), (3, TOY_FRAMES, 32, 32), (TEXT_LEN, TEXT_DIM)),
    "toy small": (lambda: load_toy_transformer("small"), (3, TOY_FRAMES, 32, 32), (TEXT_LEN, TEXT_DIM)),
    "tiny wan": (lambda: tiny_pair("wan")["large"], WAN_LATENT, TEXT),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_step_is_bitwise_diffusers_forward(case):
    build, latent_shape, text_shape = CASES[case]
    model = build()
    engine = TorchEngine(model)
    assert engine.step_split is not None
    tensors = _bindings(latent_shape, text_shape, [999.0, 871.5, 500.0, 12.25])
    engine.bind(tensors)
    for step in range(4):
        tensors[LATENTS].normal_()  # the solver moves the latents between steps
        engine.run(step)
        assert torch.equal(tensors[VELOCITY], _diffusers_velocity(model, tensors, step)), step


def test_bfloat16_step_matches_diffusers():
    model = tiny_pair("wan")["small"].to(torch.bfloat16)
    engine = TorchEngine(model)
    tensors = _bindings(WAN_LATENT, TEXT, [900.0, 100.0], dtype=torch.bfloat16)
    engine.bind(tensors)
    for step in range(2):
        engine.run(step)
        assert torch.equal(tensors[VELOCITY], _diffusers_velocity(model, tensors, step))


def test_rebinding_follows_the_new_buffers_and_returns_to_the_old():
    model = tiny_pair("wan")["large"]
    engine = TorchEngine(model)
    first = _bindings(WAN_LATENT, TEXT, [999.0, 500.0], seed=1)
    second = _bindings((4, 2, 6, 4), TEXT, [700.0, 300.0, 50.0], batch=1, seed=2)  # other shape, schedule, batch
    for tensors in (first, second, first):
        engine.bind(tensors)
        for step in range(len(tensors[TIMESTEP])):
            engine.run(step)
            assert torch.equal(tensors[VELOCITY], _diffusers_velocity(model, tensors, step))
    assert len(engine._constants_by_binding) == 2  # the second visit of `first` reused its constants


def test_new_text_in_the_same_buffers_is_used():
    """Text is not a constant: a new request writes it into the bound buffer without rebinding."""
    model = tiny_pair("wan")["small"]
    engine = TorchEngine(model)
    tensors = _bindings(WAN_LATENT, TEXT, [999.0, 500.0])
    engine.bind(tensors)
    engine.run(1)
    tensors[TEXT_EMBEDS].normal_()
    engine.run(1)
    assert torch.equal(tensors[VELOCITY], _diffusers_velocity(model, tensors, 1))


def test_image_conditioned_wan_keeps_the_plain_forward():
    model = WanTransformer3DModel(**WAN_TINY["small"], image_dim=16).eval()
    assert not supports_step_split(model)
    assert TorchEngine(model).step_split is None
    with pytest.raises(TypeError, match="text-to-video"):
        WanStep(model)


def test_blended_sampling_matches_the_unsplit_engines():
    """The whole LSL loop over split engines equals the loop over engines running diffusers' forward."""
    models = tiny_pair("wan")
    plan = BlendPlan.parse("LSL:0.4,0.2", 10)
    gen = torch.Generator().manual_seed(3)
    noise, cond, uncond = torch.randn(1, *WAN_LATENT, generator=gen), torch.randn(1, *TEXT, generator=gen), \
        torch.randn(1, *TEXT, generator=gen)
    outs = []
    for split in (True, False):
        engines = {m: TorchEngine(models[m], name=m, split_constants=split) for m in models}
        assert all((e.step_split is not None) == split for e in engines.values())
        outs.append(Sampler(engines, plan, guidance_scale=5.0).sample(noise, cond, uncond))
    assert torch.equal(outs[0], outs[1])
