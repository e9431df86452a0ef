"""The toy pair: two tiny Wan-architecture models trained on procedural shape videos (ships in the repo).

Its models, text encoder, VAE and vocabulary live in flowblend.toy (toy/model.py), a package that sits
above this one: the entry names that module as its provider, resolved by name when the pair loads.
"""
from __future__ import annotations

from .registry import PairFamily, register_family
from .wan import CLASS, WAN

TOY_FAMILY = register_family(PairFamily(
    name="toy", transformer_class=CLASS, large="<shipped>", small="<shipped>",
    latent_channels=3, spatial_factor=1, temporal_factor=1, patch=(3, 4, 4),
    solver="unipc", shift=3.0, steps=20, guidance=4.0, height=32, width=32, frames=9,
    text_len=8, text_dim=32,
    compat_fields=("in_channels", "out_channels", "text_dim", "patch_size"),
    description="two tiny Wan-architecture models trained on procedural shape videos (ships in the repo)",
    provider="flowblend.toy.model", architecture=WAN))
