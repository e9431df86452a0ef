"""Fixed I/O signatures around diffusers video transformers, found through the family that owns each class.

Each family's transformer takes different keyword arguments (LTX packs tokens and wants the grid
size and a text mask; Wan takes 5-D latents). Wrapping them in one positional signature
(latents, timestep, text_embeds[, text_mask]) -> velocity gives the ONNX export, the engines and
the runtime one contract to bind to; it is the same module that TorchEngine runs and that
export/onnx.py traces, so the eager and compiled paths compute the same function. The wrappers and
step splits live in their family's modules (families/wan_step.py, ltx_step.py), registered
by class name in engines/architectures.py: engines/ never imports a family.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import nn

from .architectures import entry_for, registered_classes


@runtime_checkable
class SignedModule(Protocol):
    """A module that already takes the positional signature and names its inputs and outputs (a family's
    wrapper, a test's stand-in, a custom model): it is run and exported as it is."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]

    def __call__(self, *inputs): ...


def signature_for(transformer: nn.Module, **kwargs) -> nn.Module:
    """Wrap a diffusers transformer in the signature of its family (already-wrapped modules pass through)."""
    entry = entry_for(type(transformer).__name__)
    if entry is not None:
        return entry.wrap(transformer, **kwargs)  # the wrappers themselves pass through
    if isinstance(transformer, SignedModule):
        return transformer  # tests' stand-ins, custom models
    known = [c for c in registered_classes() if not c.endswith("Signature")]
    if not known:
        raise TypeError(f"no I/O signature for {type(transformer).__name__}: no model family is registered yet; "
                        "import flowblend.families (it registers the built-in families) before making engines")
    raise TypeError(f"no I/O signature for {type(transformer).__name__}: flowblend supports "
                    f"{' and '.join(known)} (families/), or a module with input_names/output_names")


def step_split_for(transformer: nn.Module, signed: nn.Module) -> nn.Module | None:
    """The family's forward of `signed` with schedule constants taken out, if it has one (else None)."""
    entry = entry_for(type(transformer).__name__)
    return entry.step_split(signed) if entry is not None else None
