"""Tiny random configs of the real diffusers classes (the same code paths as Wan 2.1 / LTX-Video).

One definition for everything that needs a pair in milliseconds: the runtime-overhead measurement
(bench/runtime_cost.py), scripts/export_figures.py and the test suite (tests/tiny_models.py).
"""
from __future__ import annotations

import torch

WAN_TINY = {
    "large": dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=48, num_layers=2, rope_max_seq_len=32),
    "small": dict(patch_size=(1, 2, 2), num_attention_heads=1, attention_head_dim=12, in_channels=4,
                  out_channels=4, text_dim=16, freq_dim=32, ffn_dim=24, num_layers=1, rope_max_seq_len=32),
}
LTX_TINY = {
    "large": dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                  attention_head_dim=8, cross_attention_dim=16, num_layers=2, caption_channels=16),
    "small": dict(in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2,
                  attention_head_dim=4, cross_attention_dim=8, num_layers=1, caption_channels=16),
}
WAN_LATENT = (4, 3, 4, 6)   # C, F, H, W
LTX_LATENT = (8, 2, 3, 4)
TEXT = (7, 16)              # L, D


def tiny_pair(family: str, seed: int = 0) -> dict:
    """Both transformers of a tiny random pair, seeded; zero-initialised output layers lifted so they differ."""

    return tiny_models(family, WAN_TINY if family == "wan" else LTX_TINY, seed)


def tiny_models(family: str, configs: dict[str, dict], seed: int = 0) -> dict:
    """One seeded random transformer of `family`'s class per named config (model i seeded seed + i)."""
    from ..families import get_family

    cls = get_family(family).architecture.model_class()
    out = {}
    for i, (name, cfg) in enumerate(configs.items()):
        torch.manual_seed(seed + i)
        model = cls(**cfg).eval()
        with torch.no_grad():  # lift zero-initialised output layers so both models really differ
            for p in model.parameters():
                if p.abs().sum() == 0:
                    p.normal_(0, 0.02)
        out[name] = model
    return out


def latent_shape(family: str) -> tuple[int, int, int, int]:
    """The latent (C, F, H, W) the tiny configs of `family` take."""
    return WAN_LATENT if family == "wan" else LTX_LATENT
