"""Wan 2.2 T2V A14B's two experts (high, low noise) + Wan 2.1 1.3B as the small stand-in.

Both experts come from one checkpoint (`transformer/`, `transformer_2/`) and have Wan 2.1 14B's
architecture (families/wan.py); the high-noise expert runs t >= boundary_ratio * 1000, as
diffusers' WanPipeline, each expert with its CFG scale (guidance_scale / guidance_scale_2).
"""
from __future__ import annotations

from .registry import PairFamily, register_family
from .wan import CLASS, WAN, WAN_1B, WAN_14B, frozen, umt5_xxl, wan21_vae

WAN22_FAMILY = register_family(PairFamily(
    name="wan22", transformer_class=CLASS,
    large="Wan-AI/Wan2.2-T2V-A14B-Diffusers", small="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    latent_channels=16, spatial_factor=8, temporal_factor=4, patch=(1, 2, 2),
    # Wan2.2-T2V-A14B's own settings: UniPC, flow shift 12, 40 steps, boundary 0.875, CFG 4.0 high / 3.0 low
    solver="unipc", shift=12.0, steps=40, guidance=4.0, height=480, width=832, frames=81,
    text_len=512, text_dim=4096,
    compat_fields=("in_channels", "out_channels", "text_dim", "patch_size"),
    description="Wan 2.2 T2V A14B's two experts (high, low noise) + Wan 2.1 1.3B, shared UMT5-XXL and Wan 2.1 VAE",
    models=("high", "low", "small"), letters=("H", "L", "S"), checkpoint_of=("large", "large", "small"),
    subfolders=("transformer", "transformer_2", None), boundary_ratio=0.875,
    expert_guidance=(("high", 4.0), ("low", 3.0)),
    compat_hint="only Wan2.2-T2V-A14B's experts share Wan 2.1's 16-channel latents and UMT5 with Wan 2.1 1.3B "
                "(TI2V-5B has a 48-channel VAE, the I2V experts take 36 input channels)",
    architecture=WAN, reference=(("high", frozen(WAN_14B)), ("low", frozen(WAN_14B)), ("small", frozen(WAN_1B))),
    text_encoder_reference=umt5_xxl, vae_reference=wan21_vae))
