"""FP8 attention: torchao's FlashAttention-3 FP8 SDPA on Hopper, and its exact emulation anywhere.

Chosen: torchao's `torchao.prototype.attention` FP8 SDPA (`fp8_fa3_sdpa`; docs.pytorch.org/ao/stable/
api_reference/api_ref_prototype_attention.html), over nvidia-cudnn-frontend's `sdpa_fp8` and SageAttention:
it is a torch op (it runs inside our engines' forward and under torch.compile and CUDA graph capture,
where cuDNN frontend's graphs are built and executed outside torch's dispatcher), it computes Q, K and V's
per-(batch, head) scales on the device each call (amax / 448, torchao/prototype/attention/fp8_fa3/
quantization.py `_quantize_per_head`: no host sync, no calibration), and torchao already runs our FP8
linears (engines/fp8.py), so one maintained library covers both. FlashAttention-3's FP8 kernel is Hopper's
(sm_90; FA3 paper, arXiv 2407.08608): elsewhere the option is refused in one line.

`emulated_fp8_sdpa` computes the same quantisation exactly in FP32 on any device: Q, K, V in e4m3 with
per-(batch, head) amax/448 scales, scores and softmax in FP32, the unnormalised probabilities
exp(s - rowmax) in [0, 1] quantised to e4m3 with the fixed scale 448 (FA3's P operand), P V accumulated in
FP32 and divided by the FP32 row sum. FA3 takes the row maximum per tile (online softmax), this takes it
over the whole row: the same quantisation of each probability up to that rescaling.
"""
from __future__ import annotations

import math

import torch

from flowblend.errors import FlowblendError

from .fp8 import E4M3, E4M3_MAX, TORCHAO_HINT

HOPPER = 9  # compute capability major of FA3's FP8 kernels
FP8_ATTENTION = "fp8"  # --attention values (engines/attention.py ATTENTION_NAMES)
FP8_ATTENTION_EMULATED = "fp8-emulated"


def _per_head_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D] through e4m3 with one amax/448 scale per (batch, head), back in FP32."""
    scale = (x.abs().amax(dim=(-2, -1), keepdim=True).float() / E4M3_MAX).clamp_min(1e-12)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3).float() * scale


def emulated_fp8_sdpa(query, key, value, attn_mask=None, dropout_p: float = 0.0, is_causal: bool = False,
                      scale: float | None = None, enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention's contract (inference: no dropout) with FP8 attention's arithmetic."""
    if dropout_p:
        raise FlowblendError("FP8 attention is for inference: dropout_p must be 0")
    q, k, v = _per_head_e4m3(query), _per_head_e4m3(key), _per_head_e4m3(value)
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool \
            else scores + attn_mask.float()
    probabilities = torch.exp(scores - scores.amax(dim=-1, keepdim=True))  # in [0, 1]
    row_sum = probabilities.sum(dim=-1, keepdim=True)  # FP32, before P is quantised
    quantized = (probabilities * E4M3_MAX).to(E4M3).float() / E4M3_MAX
    return ((quantized @ v) / row_sum).to(query.dtype)


def check_fp8_attention(device: torch.device) -> None:
    """FlowblendError, one line, where torchao's FA3 FP8 attention cannot run: CPU, not Hopper, no library."""
    if device.type != "cuda":
        raise FlowblendError(f"--attention fp8 runs on a Hopper GPU (torchao's FlashAttention-3 FP8 SDPA), not "
                             f"{device}: pass --attention fp8-emulated to measure its quality on the CPU")
    major, minor = torch.cuda.get_device_capability(device)
    if major != HOPPER:
        raise FlowblendError(f"--attention fp8 needs a Hopper GPU (sm_90: FlashAttention-3's FP8 kernels); "
                             f"{torch.cuda.get_device_name(device)} is sm_{major}{minor}: use --attention auto")
    try:
        from torch.nn.attention import activate_flash_attention_impl  # noqa: F401
        from torchao.prototype.attention.fp8_fa3.attention import fp8_fa3_sdpa  # noqa: F401
    except ImportError as exc:
        raise FlowblendError(f"--attention fp8 needs torchao's FP8 attention and torch's FA3 hook ({exc}): "
                             f"{TORCHAO_HINT}") from None


class Fp8AttentionMode:
    """Every F.scaled_dot_product_attention inside runs as FP8 attention: torchao's FA3 kernel (`emulate`
    False, on Hopper) or the exact emulation. A TorchFunctionMode, so diffusers' processors need no change."""

    def __init__(self, emulate: bool):
        self.emulate = emulate

    def __enter__(self):
        from torch.overrides import TorchFunctionMode

        sdpa = torch.nn.functional.scaled_dot_product_attention
        if self.emulate:
            kernel = emulated_fp8_sdpa
        else:
            from torch.nn.attention import activate_flash_attention_impl
            from torchao.prototype.attention.fp8_fa3.attention import fp8_fa3_sdpa as kernel

            activate_flash_attention_impl("FA3")

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is sdpa:
                    return kernel(*args, **(kwargs or {}))
                return func(*args, **(kwargs or {}))

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        if not self.emulate:
            from torch.nn.attention import restore_flash_attention_impl

            restore_flash_attention_impl()
