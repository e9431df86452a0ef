"""A run's device weights planned before loading (issue 32, item 2: the weights term, per model and precision).

Each model is made from its family's reference config on the meta device (no memory, no checkpoint), and
its parameters are counted as the run holds them: the precision's dtype, diffusers' _keep_in_fp32_modules
in FP32 (what `from_pretrained(torch_dtype=...)` keeps), and under FP8 the block linears engines/fp8.py
chooses as one e4m3 byte per weight plus an FP32 scale per output row (the FP8 run replaces its BF16
weights: engines/fp8.py fp8_for_engine). The other terms of bench/memory.py's MemoryBound (activations,
buffers, graph pool, workspaces) are not planned here yet (docs/STATUS.md).
"""
from __future__ import annotations

GIB = 2**30


def planned_weight_bytes(family, model: str, dtype: str, fp8_keep_blocks: int = 0) -> int:
    """Bytes of `model`'s weights (parameters and buffers) on the device in precision `dtype`."""
    import torch

    from flowblend.engines.fp8 import Fp8Options, fp8_linear_names
    from flowblend.engines.kinds import precision

    prec = precision(dtype)
    with torch.device("meta"):
        transformer = family.architecture.model_class()(**family.reference_configs[model])
    kept_fp32 = tuple(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    fp8 = set(fp8_linear_names(transformer, Fp8Options(keep_blocks=fp8_keep_blocks))) if prec.quantizer else set()
    element = torch.empty((), dtype=prec.torch_dtype).element_size()
    total = 0
    for name, module in transformer.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if name in fp8:
            weight = module.weight
            total += weight.numel() + 4 * weight.shape[0] + (module.bias.numel() * element if module.bias is not None
                                                             else 0)
            continue
        for own_name, tensor in own:  # a kept name may be a module (norm1) or a parameter (scale_shift_table)
            fp32 = any(part in kept_fp32 for part in f"{name}.{own_name}".split("."))
            size = (4 if fp32 else element) if tensor.is_floating_point() else tensor.element_size()
            total += tensor.numel() * size
    return total


def planned_weights(family, dtype: str, fp8_keep_blocks: int = 0, models=None) -> dict[str, int]:
    """{model: planned weight bytes} for the family's models (or `models`)."""
    return {m: planned_weight_bytes(family, m, dtype, fp8_keep_blocks) for m in (models or family.models)}
