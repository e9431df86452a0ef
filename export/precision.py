"""Mixed precision for FP16/BF16 exports: low-precision matmuls and attention, FP32 everything between.

Trained video DiTs carry outlier channels whose residual stream passes FP16's 65504 although every
single layer's output fits: a whole-model FP16 cast gives inf/NaN videos. So an FP16 export keeps
the residual stream, the norms, the modulation (shift/scale/gate, the timestep embedding and its
projection) and RoPE in FP32, and runs only the "regions" in the export dtype: every feed-forward
network as a whole, every other Linear/Conv outside the FP32 islands (attention projections, patch
and text embeddings, output projection), and the attention core (scaled dot product). Each region
casts its inputs down and its output up, so the graph carries explicit Casts that a strongly typed
TensorRT build keeps. Nearly all the weight bytes sit in the regions.

The layout on disk/in memory: region weights in the export dtype, everything else FP32.
export/checkpoint.py reads a checkpoint straight into it (islands from the source weights, never via
FP16, one tensor at a time), and
`RegionPrecision` makes such a model runnable, either as exported (regions in low precision) or as
the FP32 reference (regions computed in FP32 from the same weights, one region upcast at a time).
"""
from __future__ import annotations

import contextlib
import copy
from unittest import mock

import torch
from torch import nn

from flowblend.errors import FlowblendError

from ..engines.architectures import entry_for, registered_classes
from ..engines.kinds import PRECISIONS

LOW_PRECISION = tuple(p.torch_dtype for p in PRECISIONS.values() if p.fp32_islands and p.exportable)  # engines/kinds.py


def islands_of(transformer_or_class) -> tuple[str, ...]:
    """The FP32 islands of a transformer class (by name, so loader subclasses match); else diffusers' own list."""
    cls = transformer_or_class if isinstance(transformer_or_class, type) else type(transformer_or_class)
    if not registered_classes():
        raise FlowblendError("no model family is registered: import flowblend.families before exporting "
                             "(its family modules hand export/ their FP32 islands)")
    entry = entry_for(cls.__name__)  # the family module's list (families/), matched against each
    if entry is not None:  # segment of a dotted name, as diffusers' loader matches `_keep_in_fp32_modules`
        return entry.fp32_islands
    return tuple(getattr(cls, "_keep_in_fp32_modules", None) or ())


def in_island(name: str, islands) -> bool:
    return bool(set(islands) & set(name.split(".")))


def _is_region(module: nn.Module) -> bool:
    from diffusers.models.attention import FeedForward

    return isinstance(module, (FeedForward, nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))


def regions(transformer: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, child name, child) of every region: a FeedForward, Linear or Conv outside the islands."""
    islands, out = islands_of(transformer), []

    def visit(module: nn.Module) -> None:
        for name, child in module.named_children():
            if name in islands:
                continue
            if _is_region(child):
                out.append((module, name, child))
            else:
                visit(child)

    visit(transformer)
    return out


def _region_prefixes(transformer: nn.Module) -> list[str]:
    names = {id(m): n for n, m in transformer.named_modules()}
    return [names[id(child)] + "." for _, _, child in regions(transformer)]


def check_coverage(transformer: nn.Module) -> None:
    """Every floating parameter is in a region or an FP32 island; name the first that is neither."""
    prefixes, islands = _region_prefixes(transformer), islands_of(transformer)
    for name, p in transformer.named_parameters():
        if p.is_floating_point() and not in_island(name, islands) and not name.startswith(tuple(prefixes)):
            raise FlowblendError(f"{type(transformer).__name__}.{name} is neither a low-precision region nor an "
                                 "FP32 island; add it to export/precision.py's FP32_ISLANDS or export with --dtype fp32")


def layout_dtype(transformer: nn.Module) -> torch.dtype | None:
    """The low-precision dtype a transformer is laid out in (every region in it, everything else FP32), or
    None (an FP32 model, or any other mix, e.g. a whole-model FP16 cast)."""
    prefixes = tuple(_region_prefixes(transformer))
    inside, outside = set(), set()
    for n, t in (*transformer.named_parameters(), *transformer.named_buffers()):
        if t.is_floating_point():
            (inside if n.startswith(prefixes) else outside).add(t.dtype)
    if len(inside) == 1 and inside <= set(LOW_PRECISION) and outside <= {torch.float32}:
        return next(iter(inside))
    return None


def to_layout(transformer: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A copy of an in-memory FP32 model in the export layout (tests and the toy pair; checkpoints on
    disk are loaded straight into the layout by export/checkpoint.py, without a copy)."""
    check_coverage(transformer)
    model = nn.Module.float(copy.deepcopy(transformer))  # float64 buffers too (Wan's RoPE before diffusers 0.36)
    for _, _, child in regions(model):
        nn.Module.to(child, dtype)
    return model


class _Region(nn.Module):
    """Runs one region in low precision (inputs cast down, output cast up) or, as the FP32 reference,
    in FP32 from the same weights upcast for the call only."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype, reference: bool):
        super().__init__()
        self.inner, self.dtype, self.reference = inner, dtype, reference

    def forward(self, *args, **kwargs):
        if self.reference:
            weights = {n: t.float() for n, t in (*self.inner.named_parameters(), *self.inner.named_buffers())}
            args = [a.float() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
            return torch.func.functional_call(self.inner, weights, tuple(args), kwargs)
        args = [a.to(self.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        return self.inner(*args, **kwargs).float()


def _low_precision_attention(dtype: torch.dtype):
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, *args, **kwargs):
        if attn_mask is not None and attn_mask.is_floating_point():
            attn_mask = attn_mask.to(dtype)
        out = sdpa(query.to(dtype), key.to(dtype), value.to(dtype), attn_mask, *args, **kwargs)
        return out.to(query.dtype)

    return attention


@contextlib.contextmanager
def region_precision(transformer: nn.Module, dtype: torch.dtype, reference: bool = False):
    """Within the block, `transformer` (in the export layout) runs with its regions in `dtype` and the
    attention core in `dtype` (or, reference=True, everything in FP32). The model is restored after.

    The attention core is diffusers' call of torch's scaled_dot_product_attention, replaced for the
    duration of the block (this is what torch.export traces, so the graph holds its Casts).
    """
    swaps = regions(transformer)
    for parent, name, child in swaps:
        parent._modules[name] = _Region(child, dtype, reference)
    try:
        if reference:
            yield transformer
        else:
            with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention",
                                   _low_precision_attention(dtype)):
                yield transformer
    finally:
        for parent, name, child in swaps:
            parent._modules[name] = child
