"""families/wan_step.py and ltx_step.py against diffusers' own forwards: bitwise, every step.

The references call WanTransformer3DModel / LTXVideoTransformer3DModel directly (LTX's tokens
packed and unpacked with LTXPipeline's own static methods), not flowblend's signature modules.
"""
import pytest
import torch
from diffusers import LTXPipeline, WanTransformer3DModel
from tiny_models import LTX_LATENT, TEXT, WAN_LATENT, WAN_TINY, tiny_pair

from flowblend.engines.base import LATENTS, TEXT_EMBEDS, TEXT_MASK, TIMESTEP, VELOCITY
from flowblend.engines.torch_engine import TorchEngine
from flowblend.families.toy_model import TEXT_DIM, TEXT_LEN, TOY_FRAMES, load_toy_transformer
from flowblend.families.wan import supports_wan_step_split
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions

LTX_ROPE_SCALE = (8 / 25, 32, 32)  # LtxSignature's default: the pipeline's at 25 fps


def _bindings(latent_shape, text_shape, timesteps, batch=2, dtype=torch.float32, seed=0, mask=False):
    gen = torch.Generator().manual_seed(seed)
    table = torch.tensor(timesteps, dtype=torch.float32)[:, None].repeat(1, batch)
    out = {LATENTS: torch.randn((batch, *latent_shape), generator=gen).to(dtype), TIMESTEP: table,
           TEXT_EMBEDS: torch.randn((batch, *text_shape), generator=gen).to(dtype),
           VELOCITY: torch.zeros((batch, *latent_shape), dtype=dtype)}
    if mask:  # the conditional prompt shorter than the buffer, the unconditional one shorter still
        out[TEXT_MASK] = torch.zeros((batch, text_shape[0]), dtype=torch.int64)
        for row, length in enumerate((5, 2)[:batch]):
            out[TEXT_MASK][row, :length] = 1
    return out


def _diffusers_velocity(model, tensors, step):
    latents, timestep = tensors[LATENTS], tensors[TIMESTEP][step]
    with torch.no_grad():
        if isinstance(model, WanTransformer3DModel):
            return model(hidden_states=latents, timestep=timestep, encoder_hidden_states=tensors[TEXT_EMBEDS],
                         return_dict=False)[0]
        _, _, f, h, w = latents.shape
        out = model(hidden_states=LTXPipeline._pack_latents(latents), encoder_hidden_states=tensors[TEXT_EMBEDS],
                    timestep=timestep, encoder_attention_mask=tensors[TEXT_MASK], num_frames=f, height=h, width=w,
                    rope_interpolation_scale=LTX_ROPE_SCALE, return_dict=False)[0]
        return LTXPipeline._unpack_latents(out, f, h, w)


CASES = {
    "toy large": (lambda: load_toy_transformer("large"), (3, TOY_FRAMES, 32, 32), (TEXT_LEN, TEXT_DIM)),
    "toy small": (lambda: load_toy_transformer("small"), (3, TOY_FRAMES, 32, 32), (TEXT_LEN, TEXT_DIM)),
    "tiny wan": (lambda: tiny_pair("wan")["large"], WAN_LATENT, TEXT),
    "tiny ltx large": (lambda: tiny_pair("ltx")["large"], LTX_LATENT, TEXT),
    "tiny ltx small": (lambda: tiny_pair("ltx")["small"], LTX_LATENT, TEXT),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_engine_step_is_bitwise_diffusers_forward(case):
    build, latent_shape, text_shape = CASES[case]
    model = build()
    engine = TorchEngine(model)
    assert engine.step_split is not None
    tensors = _bindings(latent_shape, text_shape, [999.0, 871.5, 500.0, 12.25], mask="ltx" in case)
    engine.bind(tensors)
    for step in range(4):
        tensors[LATENTS].normal_()  # the solver moves the latents between steps
        engine.run(step)
        assert torch.equal(tensors[VELOCITY], _diffusers_velocity(model, tensors, step)), step


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_bfloat16_step_matches_diffusers(family):
    model = tiny_pair(family)["small"].to(torch.bfloat16)
    engine = TorchEngine(model)
    assert engine.step_split is not None
    tensors = _bindings(WAN_LATENT if family == "wan" else LTX_LATENT, TEXT, [900.0, 100.0], dtype=torch.bfloat16,
                        mask=family == "ltx")
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
    assert not supports_wan_step_split(model)
    assert TorchEngine(model).step_split is None
    from flowblend.engines.signature import signature_for, step_split_for
    from flowblend.families.ltx import supports_ltx_step_split

    assert step_split_for(model, signature_for(model)) is None  # the family module decides (families/wan.py)
    assert not supports_ltx_step_split(model)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_blended_sampling_matches_the_unsplit_engines(family):
    """The whole LSL loop over split engines equals the loop over engines running the whole forward."""
    models = tiny_pair(family)
    plan = BlendPlan.parse("LSL:0.4,0.2", 10)
    gen = torch.Generator().manual_seed(3)
    latent = WAN_LATENT if family == "wan" else LTX_LATENT
    noise, cond, uncond = (torch.randn(1, *shape, generator=gen) for shape in (latent, TEXT, TEXT))
    masks = {} if family == "wan" else {"prompt_mask": torch.tensor([[1] * 5 + [0] * 2]),
                                        "negative_prompt_mask": torch.tensor([[1] * 2 + [0] * 5])}
    outs = []
    for split in (True, False):
        engines = {m: TorchEngine(models[m], name=m, split_constants=split) for m in models}
        assert all((e.step_split is not None) == split for e in engines.values())
        outs.append(Sampler(engines, plan, SamplerOptions(guidance_scale=5.0)).sample(noise, cond, uncond, **masks))
    assert torch.equal(outs[0], outs[1])
