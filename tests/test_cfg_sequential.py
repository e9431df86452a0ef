"""`--cfg sequential` (issue 32): CFG as two batch-1 forwards per step equals the batch-2 forward of
`--cfg batched` to 1e-5 in FP32, on tiny Wan and the toy pair, and each forward really runs one row."""
import pytest
import torch
from tiny_models import TEXT, WAN_LATENT, tiny_pair

from flowblend.assembly import EngineChoice
from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.families import get_family, load_pair
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions


def _models(name):
    if name == "tiny-wan":
        return tiny_pair("wan"), WAN_LATENT, TEXT
    family = get_family("toy")
    latent = family.latent_shape(family.frames, family.height, family.width)
    return load_pair("toy").transformers, latent, (family.text_len, family.text_dim)


@pytest.mark.parametrize("name", ["tiny-wan", "toy"])
def test_sequential_cfg_equals_batched_cfg_in_fp32(name):
    models, latent, text = _models(name)
    g = torch.Generator().manual_seed(3)
    noise, cond, uncond = torch.randn(1, *latent, generator=g), torch.randn(1, *text, generator=g), \
        torch.randn(1, *text, generator=g)
    out, batches = {}, {}
    for cfg in ("batched", "sequential"):
        engines = {n: TorchEngine(m.float(), name=n, cfg=cfg) for n, m in models.items()}
        seen = batches[cfg] = []
        # the first block's hidden states: the batch each forward computes (the step split skips forward())
        hooks = [m.blocks[0].register_forward_hook(lambda mod, args, res: seen.append(args[0].shape[0]))
                 for m in models.values()]
        sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", 5), SamplerOptions(guidance_scale=4.0))
        out[cfg] = sampler.sample(noise, cond, uncond).clone()
        for h in hooks:
            h.remove()
    assert set(batches["batched"]) == {2} and set(batches["sequential"]) == {1}
    assert len(batches["sequential"]) == 2 * len(batches["batched"])
    torch.testing.assert_close(out["sequential"], out["batched"], rtol=1e-5, atol=1e-5)
    assert out["batched"].abs().max() > 0.1  # a real sample, not zeros


def test_cfg_choices_are_checked_in_one_line():
    with pytest.raises(FlowblendError, match="unknown --cfg 'split': choose one of batched, sequential"):
        EngineChoice(cfg="split")
    with pytest.raises(FlowblendError, match="--cfg sequential runs in PyTorch engines; --backend onnxruntime"):
        EngineChoice(backend="onnxruntime", cfg="sequential")
