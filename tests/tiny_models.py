"""The tiny random pairs the tests use: defined once in the package (flowblend.bench.tiny), shared with
the runtime-overhead measurement and scripts/export_figures.py."""
from flowblend.bench.tiny import LTX_LATENT, LTX_TINY, TEXT, WAN_LATENT, WAN_TINY, latent_shape, tiny_pair

__all__ = ["LTX_LATENT", "LTX_TINY", "TEXT", "WAN_LATENT", "WAN_TINY", "latent_shape", "tiny_pair"]
