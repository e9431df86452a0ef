"""FP8 attention (engines/fp8_attention.py): the exact emulation against FP8 GEMMs (torch._scaled_mm runs on
the CPU), an engine running it, and the one-line refusals of `--attention fp8` where it cannot run."""
import math
import sys

import pytest
import torch
from tiny_models import TEXT, WAN_LATENT, tiny_pair

from flowblend.engines import fp8_attention
from flowblend.engines.attention import choose_attention
from flowblend.engines.torch_engine import TorchEngine
from flowblend.errors import FlowblendError
from flowblend.runtime.plan import BlendPlan
from flowblend.runtime.sampler import Sampler, SamplerOptions


def scaled_mm_attention(q, k, v):
    """FP8 attention per (batch, head) through e4m3 GEMMs: S = Q K^T with per-head scales, P = exp(S - max)
    as e4m3 with scale 1/448, O = P V / rowsum, every product accumulated in FP32 by torch._scaled_mm."""
    e4m3 = torch.float8_e4m3fn
    out = torch.empty(q.shape, dtype=torch.float32)
    for b in range(q.shape[0]):
        for h in range(q.shape[1]):
            sq, sk, sv = (x[b, h].abs().amax().float().reshape(1, 1) / 448 for x in (q, k, v))
            qq, kq, vq = (x[b, h].float() / s for x, s in ((q, sq), (k, sk), (v, sv)))
            scores = torch._scaled_mm(qq.to(e4m3), kq.to(e4m3).t(), scale_a=sq, scale_b=sk, out_dtype=torch.float32)
            p = torch.exp(scores / math.sqrt(q.shape[-1]) - (scores / math.sqrt(q.shape[-1])).amax(-1, keepdim=True))
            one = torch.ones(1, 1)
            pv = torch._scaled_mm((p * 448).to(e4m3), vq.to(e4m3).t().contiguous().t(), scale_a=one / 448,
                                  scale_b=sv, out_dtype=torch.float32)
            out[b, h] = pv / p.sum(-1, keepdim=True)
    return out


def test_the_emulation_equals_fp8_gemms_and_differs_from_fp32():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 32, 32, generator=g) * s for s in (2.0, 1.0, 0.5))
    got = fp8_attention.emulated_fp8_sdpa(q, k, v)
    torch.testing.assert_close(got, scaled_mm_attention(q, k, v), rtol=1e-5, atol=1e-5)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    assert (got - exact).abs().max() > 1e-3  # it really quantizes
    assert torch.nn.functional.cosine_similarity(got.flatten(), exact.flatten(), dim=0) > 0.99


def test_an_engine_runs_emulated_fp8_attention_close_to_bf16_attention():
    models = tiny_pair("wan")
    g = torch.Generator().manual_seed(1)
    noise, text = torch.randn(1, *WAN_LATENT, generator=g), torch.randn(1, *TEXT, generator=g)
    out = {}
    for attention in ("default", "fp8-emulated"):
        engines = {n: TorchEngine(m, name=n, attention=attention) for n, m in models.items()}
        sampler = Sampler(engines, BlendPlan.parse("LSL:0.4,0.2", 4), SamplerOptions(guidance_scale=4.0))
        out[attention] = sampler.sample(noise, text, text).clone()
        assert engines["large"].attention.name == attention
    a, b = out["fp8-emulated"].flatten(), out["default"].flatten()
    assert not torch.equal(a, b) and torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def test_fp8_attention_is_refused_in_one_line_where_it_cannot_run(monkeypatch):
    with pytest.raises(FlowblendError, match="runs on a Hopper GPU .* not cpu: pass --attention fp8-emulated") as cpu:
        choose_attention(torch.device("cpu"), torch.bfloat16, "fp8")
    assert "\n" not in str(cpu.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 9))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40S")
    with pytest.raises(FlowblendError, match="needs a Hopper GPU .* NVIDIA L40S is sm_89: use --attention auto"):
        fp8_attention.check_fp8_attention(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(FlowblendError, match="needs torchao's FP8 attention .*pip install torchao"):
        fp8_attention.check_fp8_attention(torch.device("cuda"))
