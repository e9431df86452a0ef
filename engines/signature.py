"""Fixed I/O signatures around diffusers video transformers.

Each family's transformer takes different keyword arguments (LTX packs tokens and wants the grid
size and a text mask; Wan takes 5-D latents). Wrapping them in one positional signature
(latents, timestep, text_embeds[, text_mask]) -> velocity gives the ONNX export, the engines and
the runtime one contract to bind to; it is the same module that TorchEngine runs and that
export/onnx.py traces, so the eager and compiled paths compute the same function.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from .architectures import entry_for, registered_classes
from .base import LATENTS, TEXT_EMBEDS, TEXT_MASK, TIMESTEP, VELOCITY


@runtime_checkable
class SignedModule(Protocol):
    """A module that already takes the positional signature and names its inputs and outputs (the wrappers
    below, a test's stand-in, a custom model): it is run and exported as it is."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __call__(self, *inputs): ...


class WanSignature(nn.Module):
    """WanTransformer3DModel: latents [B,C,F,H,W], timestep [B], text [B,L,D] -> velocity."""

    input_names = (LATENTS, TIMESTEP, TEXT_EMBEDS)
    output_names = (VELOCITY,)

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, timestep, text_embeds):
        return self.transformer(hidden_states=latents, timestep=timestep,
                                encoder_hidden_states=text_embeds, return_dict=False)[0]


class LtxSignature(nn.Module):
    """LTXVideoTransformer3DModel on unpacked latents [B,C,F,H,W] (patch size 1, as LTX-Video 0.9.x).

    Packing to [B, F*H*W, C] happens inside, as LTXPipeline._pack_latents does, so the runtime's
    buffers keep one layout for every family. `rope_interpolation_scale` is the pipeline's
    (temporal_compression / frame_rate, spatial_compression, spatial_compression).
    """

    input_names = (LATENTS, TIMESTEP, TEXT_EMBEDS, TEXT_MASK)
    output_names = (VELOCITY,)

    def __init__(self, transformer: nn.Module, rope_interpolation_scale=(8 / 25, 32, 32)):
        super().__init__()
        self.transformer = transformer
        self.rope_interpolation_scale = tuple(float(x) for x in rope_interpolation_scale)

    def forward(self, latents, timestep, text_embeds, text_mask):
        b, c, f, h, w = latents.shape
        tokens = latents.permute(0, 2, 3, 4, 1).reshape(b, f * h * w, c)
        out = self.transformer(hidden_states=tokens, encoder_hidden_states=text_embeds, timestep=timestep,
                               encoder_attention_mask=text_mask, num_frames=f, height=h, width=w,
                               rope_interpolation_scale=self.rope_interpolation_scale, return_dict=False)[0]
        return out.reshape(b, f, h, w, c).permute(0, 4, 1, 2, 3)


def signature_for(transformer: nn.Module, **kwargs) -> nn.Module:
    """Wrap a diffusers transformer in the signature of its family (already-wrapped modules pass through)."""
    entry = entry_for(type(transformer).__name__)
    if entry is not None:
        return entry.wrap(transformer, **kwargs)  # the wrappers themselves pass through
    if isinstance(transformer, SignedModule):
        return transformer  # tests' stand-ins, custom models
    raise TypeError(f"no I/O signature for {type(transformer).__name__}: flowblend supports "
                    f"{' and '.join(c for c in registered_classes() if not c.endswith('Signature'))} (flowblend/families/), or a module with input_names/output_names")


def step_split_for(transformer: nn.Module, signed: nn.Module) -> nn.Module | None:
    """The family's forward of `signed` with schedule constants taken out, if it has one (else None)."""
    entry = entry_for(type(transformer).__name__)
    return entry.step_split(signed) if entry is not None else None
