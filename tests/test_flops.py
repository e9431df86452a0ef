"""Analytic FLOP counts against torch's own counter, and against FlowBlending's published cost table."""
import pytest
import torch
from tiny_models import TEXT, latent_shape, tiny_pair
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from flowblend.bench.flops import cached_step_flops, forward_flops, step_cost, step_flops
from flowblend.engines.signature import signature_for
from flowblend.families import get_family, reference_configs
from flowblend.families.toy_model import build_toy_transformer
from flowblend.runtime.plan import BlendPlan

CLASSES = {"wan": "WanTransformer3DModel", "ltx": "LTXVideoTransformer3DModel"}


def counted_flops(model, latent, text_len, text_dim, batch=1, mask=False):
    """FLOPs torch's FlopCounterMode sees in one forward. The math SDPA backend is forced because the
    counter has no formula for the fused CPU attention kernel and would silently skip attention."""
    inputs = [torch.randn(batch, *latent), torch.full((batch,), 500.0), torch.randn(batch, text_len, text_dim)]
    if mask:
        inputs.append(torch.ones(batch, text_len, dtype=torch.int64))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        signature_for(model)(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("family", ["wan", "ltx"])
@pytest.mark.parametrize("size", ["large", "small"])
def test_analytic_count_matches_flop_counter_on_tiny_models(family, size):
    model = tiny_pair(family)[size]
    measured = counted_flops(model, latent_shape(family), *TEXT, mask=family == "ltx")
    analytic = forward_flops(CLASSES[family], dict(model.config), latent_shape(family), TEXT[0])
    assert analytic == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("size", ["large", "small"])
def test_analytic_count_matches_flop_counter_on_toy_configs(size):
    toy = get_family("toy")
    latent = toy.latent_shape(toy.frames, toy.height, toy.width)
    model = build_toy_transformer(size)
    measured = counted_flops(model, latent, toy.text_len, toy.text_dim)
    analytic = forward_flops(toy.transformer_class, reference_configs("toy")[size], latent, toy.text_len)
    assert analytic == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize("family", ["wan", "ltx"])
def test_a_cached_step_costs_the_forward_without_its_blocks(family):
    """Issue 34: counted on diffusers' forward with its block list swapped for one residual add (no FLOPs)."""
    model = tiny_pair(family)["large"]
    attr = "blocks" if hasattr(model, "blocks") else "transformer_blocks"
    blocks = getattr(model, attr)

    class AddResidual(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return (args[0] if args else kwargs["hidden_states"]) + 1.0

    setattr(model, attr, torch.nn.ModuleList([AddResidual()]))
    try:
        measured = counted_flops(model, latent_shape(family), *TEXT, batch=2, mask=family == "ltx")
    finally:
        setattr(model, attr, blocks)
    analytic = cached_step_flops(CLASSES[family], dict(model.config), latent_shape(family), TEXT[0], cfg=True)
    assert analytic == pytest.approx(measured, rel=0.02)
    assert analytic < 0.5 * step_flops(CLASSES[family], dict(model.config), latent_shape(family), TEXT[0], cfg=True)


def test_cfg_step_is_a_batch_two_forward():
    model = tiny_pair("wan")["large"]
    measured = counted_flops(model, latent_shape("wan"), *TEXT, batch=2)
    assert step_flops(CLASSES["wan"], dict(model.config), latent_shape("wan"), TEXT[0], cfg=True) == \
        pytest.approx(measured, rel=0.02)


def test_paper_convention_reproduces_the_published_wan_cost_table():
    # FlowBlending project page, Wan 832x480, 61 frames, 50 steps (TFLOPs); SLL fits S10,L40.
    published = {"LLL": 29950, "LSL:0.4,0.2": 19222, "LSS:0.4,0": 13858, "SLL:0.2,0": 24586, "SSS": 3129}
    wan = get_family("wan")
    latent = wan.latent_shape(61, 480, 832)
    per_step = {m: step_cost(wan.transformer_class, c, latent, wan.text_len, True, "paper")
                for m, c in reference_configs("wan").items()}
    for spec, tflops in published.items():
        assert BlendPlan.parse(spec, 50).flops(per_step) / 1e12 == pytest.approx(tflops, rel=1e-3), spec


def test_plan_costs_order_and_unknown_inputs():
    toy = get_family("toy")
    latent = toy.latent_shape(toy.frames, toy.height, toy.width)
    per_step = {m: step_flops(toy.transformer_class, c, latent, toy.text_len, True)
                for m, c in reference_configs("toy").items()}
    lll, lsl, sss = (BlendPlan.parse(s, 20).flops(per_step) for s in ("LLL", "LSL", "SSS"))
    assert lll > lsl > sss > 0
    with pytest.raises(ValueError, match="convention"):
        step_cost(toy.transformer_class, reference_configs("toy")["large"], latent, 8, True, "macs")
    with pytest.raises(ValueError, match="no FLOP model"):
        forward_flops("UNet2DConditionModel", {}, latent, 8)
