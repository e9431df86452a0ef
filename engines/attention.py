"""Which attention kernel a PyTorch engine runs: chosen and reported, not left to SDPA's default.

On the H200 (docs/gpu-runs/2026-12-04-h200/fullsize.json) SDPA at the Wan 14B attention shape ran
cuDNN attention at 572 TFLOP/s against flash attention's 367: on Hopper and newer, FP16/BF16 (and
FP8-linear engines, whose attention stays BF16) take cuDNN; Ampere/Ada take flash; FP32 on CUDA
takes memory-efficient attention (neither cuDNN's nor flash's kernels take FP32); the CPU keeps
PyTorch's own choice. FP8 attention is asked for, never automatic: `fp8` (torchao's FlashAttention-3
FP8 SDPA, Hopper only, refused in one line elsewhere) and `fp8-emulated` (its exact arithmetic in FP32,
any device: the CPU's quality check); engines/fp8_attention.py says why that library. Its capture inside
our whole-loop graph has not been run on a GPU (docs/STATUS.md).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the names are read by argument checks before torch loads
    import torch

ATTENTION_NAMES = ("auto", "cudnn", "flash", "efficient", "math", "default", "fp8", "fp8-emulated")
FP8_NAMES = ("fp8", "fp8-emulated")  # engines/fp8_attention.py


@dataclass(frozen=True)
class AttentionChoice:
    """One SDPA backend (or PyTorch's default choice) and why it was taken."""

    name: str  # cudnn | flash | efficient | math | default | fp8 | fp8-emulated
    reason: str

    def backends(self):
        from torch.nn.attention import SDPBackend

        return {"cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH]}.get(self.name)

    def context(self):
        """The context every forward of the engine runs in (a no-op for PyTorch's default)."""
        if self.name in FP8_NAMES:
            from .fp8_attention import Fp8AttentionMode

            return Fp8AttentionMode(emulate=self.name == "fp8-emulated")
        backends = self.backends()
        if backends is None:
            return contextlib.nullcontext()
        from torch.nn.attention import sdpa_kernel

        return sdpa_kernel(backends)

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"


def choose_attention(device: torch.device, dtype: torch.dtype, requested: str = "auto") -> AttentionChoice:
    """The attention kernel for an engine on `device` computing in `dtype` (`requested` overrides auto)."""
    import torch

    device = torch.device(device)
    if requested not in ATTENTION_NAMES:
        from flowblend.errors import FlowblendError

        raise FlowblendError(f"unknown attention {requested!r}: choose one of {', '.join(ATTENTION_NAMES)}")
    if requested == "fp8":
        from .fp8_attention import check_fp8_attention

        check_fp8_attention(device)  # one line where it cannot run
        return AttentionChoice("fp8", "requested: torchao FlashAttention-3 FP8 SDPA, per-head Q/K/V scales")
    if requested == "fp8-emulated":
        return AttentionChoice("fp8-emulated", "requested: FP8 attention's arithmetic emulated exactly in FP32")
    if requested != "auto":
        return AttentionChoice(requested, "requested")
    if device.type != "cuda":
        return AttentionChoice("default", f"PyTorch's own choice on {device.type}")
    major, minor = torch.cuda.get_device_capability(device)
    if dtype == torch.float32:
        return AttentionChoice("efficient", "FP32: cuDNN and flash attention take FP16/BF16 only")
    if major >= 9:
        return AttentionChoice("cudnn", f"sm_{major}{minor}: cuDNN attention was 1.55x flash on the H200")
    if major >= 8:
        return AttentionChoice("flash", f"sm_{major}{minor}")
    return AttentionChoice("efficient", f"sm_{major}{minor}: before Ampere")
