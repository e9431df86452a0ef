"""FP8 linears (engines/fp8.py): the exact emulation against torch._scaled_mm, which linears are chosen,
and the one-line refusals where FP8 cannot run."""
import sys

import pytest
import torch

from flowblend.bench.tiny import tiny_pair
from flowblend.engines import fp8
from flowblend.errors import FlowblendError


def scaled_mm_reference(x, linear, granularity):
    """What an FP8 GEMM computes: e4m3 operands, FP32 scales, FP32 output (torch._scaled_mm runs on the CPU)."""
    if granularity == "row":
        sx = x.abs().amax(-1, keepdim=True).float() / 448
        sw = linear.weight.abs().amax(-1, keepdim=True).float() / 448
    else:
        sx = (x.abs().amax().float() / 448).reshape(1, 1)
        sw = (linear.weight.abs().amax().float() / 448).reshape(1, 1)
    xq, wq = (x / sx).to(torch.float8_e4m3fn), (linear.weight / sw).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw.t(), out_dtype=torch.float32) + linear.bias


@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_the_emulation_equals_an_fp8_scaled_matmul(granularity):
    g = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=g) * 0.05)
    x = torch.randn(16, 64, generator=g) * 3
    got = fp8.EmulatedFp8Linear(linear, granularity)(x)
    want = scaled_mm_reference(x, linear, granularity)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain = linear(x)
    assert (got - plain).abs().max() > 1e-3  # it really quantizes: FP8 differs from the FP32 linear


def test_only_the_block_linears_between_the_kept_blocks_are_chosen():
    model = tiny_pair("wan")["large"]  # 2 blocks
    names = fp8.fp8_linear_names(model, fp8.Fp8Options())
    assert {n.split(".")[1] for n in names} == {"0", "1"} and all(n.startswith("blocks.") for n in names)
    assert {n.split(".", 2)[2] for n in names} == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                                                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
                                                  "ffn.net.0.proj", "ffn.net.2"}
    model.blocks.append(type(model.blocks[0])(24, 48, 2))
    kept = fp8.fp8_linear_names(model, fp8.Fp8Options(keep_blocks=1))
    assert {n.split(".")[1] for n in kept} == {"1"}  # first and last stay out
    with pytest.raises(FlowblendError, match="keeps all 3 blocks out of FP8: use at most 1"):
        fp8.fp8_linear_names(model, fp8.Fp8Options(keep_blocks=2))


def test_quantizing_keeps_embeddings_norms_and_head_and_tracks_the_model():
    model = tiny_pair("wan")["large"]
    g = torch.Generator().manual_seed(1)
    args = dict(hidden_states=torch.randn(2, 4, 3, 4, 6, generator=g), timestep=torch.tensor([500.0, 500.0]),
                encoder_hidden_states=torch.randn(2, 7, 16, generator=g), return_dict=False)
    with torch.no_grad():
        reference = model(**args)[0]
        names = fp8.quantize_fp8(model, emulate=True)
        got = model(**args)[0]
    assert all(isinstance(model.get_submodule(n), fp8.EmulatedFp8Linear) for n in names)
    for kept in ("proj_out", "condition_embedder.time_embedder.linear_1", "condition_embedder.text_embedder.linear_1"):
        assert isinstance(model.get_submodule(kept), torch.nn.Linear)
    cosine = torch.nn.functional.cosine_similarity(got.flatten(), reference.flatten(), dim=0)
    assert 0.99 < cosine < 1.0


def test_fp8_refusals_are_one_line_each(monkeypatch):
    with pytest.raises(FlowblendError, match="FP8 runs on a CUDA GPU with compute capability >= 8.9, not cpu") as cpu:
        fp8.check_fp8_device(torch.device("cpu"))
    assert "\n" not in str(cpu.value)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(FlowblendError, match="NVIDIA A100 has 8.0: use --dtype bf16"):
        fp8.check_fp8_device(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setitem(sys.modules, "torchao", None)
    with pytest.raises(FlowblendError, match="need torchao, which is not installed: pip install torchao"):
        fp8.check_fp8_device(torch.device("cuda"))
    with pytest.raises(FlowblendError, match="unknown FP8 granularity 'block'"):
        fp8.Fp8Options(granularity="block")


def test_an_fp8_copy_shares_every_other_weight_and_leaves_the_model_as_it_was():
    model = tiny_pair("wan")["large"]
    before = {n: p.clone() for n, p in model.named_parameters()}
    copy = fp8.fp8_copy(model, emulate=True)
    assert all(type(m) is torch.nn.Linear for n, m in model.named_modules() if ".ffn.net.2" in n)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert isinstance(copy.get_submodule("blocks.0.ffn.net.2"), fp8.EmulatedFp8Linear)
    assert copy.patch_embedding.weight is model.patch_embedding.weight  # shared, not copied
    assert copy.blocks[0].norm2 is model.blocks[0].norm2 and copy.blocks[0] is not model.blocks[0]
