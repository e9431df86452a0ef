"""torch.compile as an engine option (engines/compile.py): none / regional / whole keep the family's
step split (rotary tables and timestep embeddings once per binding), leave the user's model as it
was, refuse inductor modes that would capture CUDA graphs inside ours, and equal eager in FP32."""
import pytest
import torch
from tiny_models import tiny_pair

from flowblend.bench.tiny import TEXT, WAN_LATENT
from flowblend.engines.compile import CompiledStep, check_compile
from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.families.toy_model import load_toy_transformer
from flowblend.families.wan_step import WanStep
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions


def loop(engines: dict, noise, text, steps=3):
    plan = BlendPlan(tuple(next(iter(engines)) for _ in range(steps)))
    return Sampler(engines, plan, SamplerOptions(guidance_scale=4.0)).sample(noise, *text)


@pytest.mark.parametrize("compile", ["none", "regional", "whole"])
def test_every_compile_option_keeps_the_step_split_and_the_users_model(compile):
    model = tiny_pair("wan")["large"]
    blocks = list(model.blocks)
    engine = TorchEngine(model, compile=compile)
    split = engine.step_split.split if compile == "whole" else engine.step_split
    assert isinstance(split, WanStep)
    assert isinstance(engine.step_split, CompiledStep) == (compile == "whole")
    assert list(model.blocks) == blocks and all(type(b).__name__ == "WanTransformerBlock" for b in model.blocks)
    if compile == "regional":  # the split runs over the compiled blocks of a copy that shares the weights
        assert all(isinstance(b, torch._dynamo.eval_frame.OptimizedModule) for b in split.transformer.blocks)
        assert split.transformer.blocks[0]._orig_mod is model.blocks[0]


@pytest.mark.parametrize("compile", ["regional", "whole"])
def test_compiled_equals_eager_on_tiny_wan_in_fp32(compile):
    model = tiny_pair("wan")["large"]
    g = torch.Generator().manual_seed(0)
    noise, text = torch.randn((1, *WAN_LATENT), generator=g), [torch.randn((1, *TEXT), generator=g) for _ in range(2)]
    eager = loop({"large": TorchEngine(model, name="large")}, noise, text)
    compiled = loop({"large": TorchEngine(model, name="large", compile=compile)}, noise, text)
    assert ((compiled - eager).norm() / eager.norm()).item() <= 1e-5


def test_regional_compile_equals_eager_on_the_toy_model():
    model = load_toy_transformer("small")
    g = torch.Generator().manual_seed(1)
    config = model.config
    noise = torch.randn((1, config.in_channels, 3, 32, 32), generator=g)
    text = [torch.randn((1, 8, config.text_dim), generator=g) for _ in range(2)]
    eager = loop({"small": TorchEngine(model, name="small")}, noise, text, steps=2)
    compiled = loop({"small": TorchEngine(model, name="small", compile="regional")}, noise, text, steps=2)
    assert ((compiled - eager).norm() / eager.norm()).item() <= 1e-5


def test_compile_refusals_name_the_fix():
    with pytest.raises(FlowblendError, match="unknown compile option 'partial': choose one of none, regional, whole"):
        check_compile("partial")
    for mode in ("reduce-overhead", "max-autotune"):
        with pytest.raises(FlowblendError, match="captures CUDA graphs of its own.*use max-autotune-no-cudagraphs"):
            check_compile("whole", mode)
    wrapped = torch.nn.Linear(2, 2)
    with pytest.raises(FlowblendError, match="declares no repeated blocks"):
        TorchEngine(_Signed(wrapped), compile="regional")


class _Signed(torch.nn.Module):
    """A module that already speaks the engine signature and has no repeated blocks."""

    input_names, output_names = ("latents", "timestep", "text_embeds"), ("velocity",)

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
