"""The toy pair: two tiny Wan-architecture models trained on procedural shape videos (ships in the repo).

Its models, text encoder, VAE and vocabulary are the family's torch half (toy_model.py and toy_vocab.py
beside this module, weights in toy_weights/): loaded lazily by `_provider`, so the registry stays torch-free.
flowblend.toy (data, probes, demo, training) sits above and imports them; nothing here imports it.
"""
from __future__ import annotations

from .registry import PairFamily, register_family
from .wan import CLASS, WAN


def _provider():
    """The toy family's loader (load_pair, REFERENCE_CONFIGS, normalise_prompt): imports torch, so only on use."""
    from . import toy_model

    return toy_model


TOY_FAMILY = register_family(PairFamily(
    name="toy", transformer_class=CLASS, large="<shipped>", small="<shipped>",
    latent_channels=3, spatial_factor=1, temporal_factor=1, patch=(3, 4, 4),
    solver="unipc", shift=3.0, steps=20, guidance=4.0, height=32, width=32, frames=9,
    text_len=8, text_dim=32,
    compat_fields=("in_channels", "out_channels", "text_dim", "patch_size"),
    description="two tiny Wan-architecture models trained on procedural shape videos (ships in the repo)",
    provider=_provider, architecture=WAN))
