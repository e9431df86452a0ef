"""FP8 (e4m3) linears for the attention and FFN of a transformer's repeated blocks.

On a GPU with FP8 tensor cores (compute capability >= 8.9: Ada, Hopper, Blackwell) the linears go
through torchao's `Float8DynamicActivationFloat8WeightConfig` (dynamic per-row or per-tensor scales
for activations and weights, `torch._scaled_mm` underneath): a maintained library, not our kernels.
Everything the FP16 export keeps in FP32 stays in the model's own precision here (norms, modulation,
the timestep and text embedders, the patch embedding and the output head are not block linears),
and `keep_blocks=N` leaves the first and last N blocks unquantized, as published FP8 recipes for
Wan do. `emulate=True` computes the same arithmetic exactly on any device (quantize to float8_e4m3fn
and back with the same scales, FP32 accumulation): the CPU's quality check of FP8.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowblend.errors import FlowblendError

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
MIN_CAPABILITY = (8, 9)  # FP8 tensor cores: Ada (8.9), Hopper (9.0) and newer
GRANULARITIES = ("row", "tensor")
TORCHAO_HINT = "pip install torchao (0.18 or newer)"


@dataclass(frozen=True)
class Fp8Options:
    """Which linears go to FP8 and how they are scaled."""

    granularity: str = "row"  # per-row (token / output channel) or per-tensor dynamic scales
    keep_blocks: int = 0  # the first and last N repeated blocks stay in the model's precision

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise FlowblendError(f"unknown FP8 granularity {self.granularity!r}: choose one of {', '.join(GRANULARITIES)}")
        if self.keep_blocks < 0:
            raise FlowblendError(f"--fp8-keep-blocks must be >= 0, got {self.keep_blocks}")


def repeated_blocks(transformer: nn.Module) -> list[nn.Module]:
    """The transformer's repeated blocks, in order, by diffusers' own `_repeated_blocks` class names."""
    names = set(getattr(transformer, "_repeated_blocks", None) or ())
    blocks = [m for m in transformer.modules() if type(m).__name__ in names]
    if not blocks:
        raise FlowblendError(f"{type(transformer).__name__} declares no repeated blocks (_repeated_blocks): FP8 and "
                             "regional compile need them; use --compile whole and a BF16/FP16 precision")
    return blocks


def fp8_linear_names(transformer: nn.Module, options: Fp8Options) -> list[str]:
    """Qualified names of the linears to quantize: every nn.Linear inside the kept-out-of-BF16 blocks."""
    blocks = repeated_blocks(transformer)
    if 2 * options.keep_blocks >= len(blocks):
        raise FlowblendError(f"--fp8-keep-blocks {options.keep_blocks} keeps all {len(blocks)} blocks out of FP8: "
                             f"use at most {(len(blocks) - 1) // 2}")
    chosen = {id(b) for b in blocks[options.keep_blocks: len(blocks) - options.keep_blocks]}
    names = []
    for block_name, block in transformer.named_modules():
        if id(block) in chosen:
            names += [f"{block_name}.{n}" for n, m in block.named_modules() if _unquantized_linear(m)]
    return names


def _unquantized_linear(module: nn.Module) -> bool:
    """An nn.Linear whose weight is a plain tensor: torchao's FP8 weights are tensor subclasses, and the
    emulation replaces the module, so a model quantized once is not quantized twice."""
    return isinstance(module, nn.Linear) and type(module.weight) in (nn.Parameter, torch.Tensor)


def check_fp8_device(device: torch.device) -> None:
    """FlowblendError, one line, where FP8 linears cannot run: no CUDA, compute capability < 8.9, no torchao."""
    if device.type != "cuda":
        raise FlowblendError(f"FP8 runs on a CUDA GPU with compute capability >= 8.9, not {device}: pass --device cuda, "
                             "or --dtype fp8-emulated to check its quality on the CPU")
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_CAPABILITY:
        raise FlowblendError(f"FP8 needs compute capability >= 8.9 (Ada, Hopper or newer); "
                             f"{torch.cuda.get_device_name(device)} has {capability[0]}.{capability[1]}: use --dtype bf16")
    try:
        import torchao  # noqa: F401
    except ImportError:
        raise FlowblendError(f"FP8 linears need torchao, which is not installed: {TORCHAO_HINT}") from None


def fp8_copy(transformer: nn.Module, options: Fp8Options = Fp8Options(), *, emulate: bool = False) -> nn.Module:
    """A copy of `transformer` with the chosen linears in FP8; every other weight is shared, the original untouched.

    Only the modules on the way to a chosen linear are copied (shallowly), so the copy costs the FP8
    weights alone: the benchmark and the real-size stage keep the BF16 model beside its FP8 variant.
    """
    import copy

    names = fp8_linear_names(transformer, options)
    def own_copy(module: nn.Module) -> nn.Module:
        clone = copy.copy(module)  # shares parameters and buffers; its own dicts, so replacing a child or
        clone._modules, clone._parameters = dict(module._modules), dict(module._parameters)  # weight stays here
        copied.add(id(clone))
        return clone

    copied: set[int] = set()
    clone = own_copy(transformer)
    for name in names:
        parent = clone
        for part in name.split("."):
            child = parent._modules[part]
            if id(child) not in copied:  # siblings share the path: each module on it is copied once
                child = parent._modules[part] = own_copy(child)
            parent = child
    quantize_fp8(clone, options, emulate=emulate, names=names)
    return clone


def quantize_fp8(transformer: nn.Module, options: Fp8Options = Fp8Options(), *, emulate: bool = False,
                 names: list[str] | None = None) -> list[str]:
    """Put the chosen linears in FP8 in place (torchao, or the exact emulation); returns their names."""
    names = fp8_linear_names(transformer, options) if names is None else names
    if emulate:
        for name in names:
            owner, _, attr = name.rpartition(".")
            parent = transformer.get_submodule(owner)
            setattr(parent, attr, EmulatedFp8Linear(getattr(parent, attr), options.granularity))
        return names
    check_fp8_device(next(transformer.parameters()).device)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_

    granularity = PerRow() if options.granularity == "row" else PerTensor()
    chosen = set(names)
    quantize_(transformer, Float8DynamicActivationFloat8WeightConfig(granularity=granularity),
              filter_fn=lambda module, fqn: fqn in chosen)
    return names


def _scales(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """Dynamic symmetric scales, amax / 448 per row (last dim reduced) or per tensor, in FP32."""
    amax = x.abs().amax(dim=-1, keepdim=True) if granularity == "row" else x.abs().amax()
    return (amax.float() / E4M3_MAX).clamp_min(1e-12)


def fake_quantize(x: torch.Tensor, granularity: str) -> torch.Tensor:
    """x quantized to float8_e4m3fn with its dynamic scales and back, in FP32 (saturating at +-448)."""
    quantized, scale = quantize_e4m3(x, granularity)
    return quantized.float() * scale


def quantize_e4m3(x: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / scale as float8_e4m3fn, the FP32 scale): what an FP8 kernel stores, saturating at +-448."""
    scale = _scales(x, granularity)
    return (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


class EmulatedFp8Linear(nn.Module):
    """nn.Linear computed as an FP8 scaled matmul would: weights per output row and activations per
    token (or per tensor) quantized to e4m3 with dynamic scales, products accumulated in FP32.

    The weight is held as a GPU kernel holds it, e4m3 (1 byte) plus its FP32 scales, so the emulated
    run's memory is FP8's; each forward widens it to FP32 (e4m3 x FP32 scale is exact in FP32)."""

    def __init__(self, linear: nn.Linear, granularity: str = "row"):
        super().__init__()
        self.granularity = granularity
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight, scale = quantize_e4m3(linear.weight.detach(), granularity)
        self.register_buffer("weight_e4m3", weight, persistent=False)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone(), persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight in FP32 (what the scaled matmul multiplies by)."""
        return self.weight_e4m3.float() * self.weight_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(fake_quantize(x, self.granularity), self.weight,
                                   None if self.bias is None else self.bias.float())
        return out.to(x.dtype)


def fp8_for_engine(transformer: nn.Module, device, keep_blocks: int = 0, keep_original: bool = False) -> nn.Module:
    """The `fp8` precision's quantizer (engines/kinds.py): torchao on CUDA (refused in one line where it
    cannot run), the exact emulation elsewhere: the CPU runs FP8's arithmetic for its quality, not speed.

    A run quantizes `transformer` in place, so its BF16 block linears are freed and FP8 holds less than
    BF16; `keep_original` (bench, the real-size stage, a pipeline's own transformer) quantizes a copy and
    keeps both. Linears already in FP8 are left as they are (a second run over the same model)."""
    device = torch.device(device)
    if device.type == "cuda":
        check_fp8_device(device)
    options, emulate = Fp8Options(keep_blocks=keep_blocks), device.type != "cuda"
    if keep_original:
        return fp8_copy(transformer, options, emulate=emulate)
    quantize_fp8(transformer, options, emulate=emulate)
    return transformer
