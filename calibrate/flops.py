"""Analytic FLOP counts of one transformer forward (2 FLOPs per multiply-accumulate).

Counted: every linear layer and the two attention matmuls (scores and weighted sum), per sample;
norms, activations, RoPE and softmax are left out (under 1% at real sizes). CFG doubles a step.
"""
from __future__ import annotations


def wan_forward_flops(config: dict, latent_shape, text_len: int) -> float:
    """One WanTransformer3DModel forward at batch 1 for latents (C, F, H, W)."""
    c, f, h, w = latent_shape
    pt, ph, pw = config["patch_size"]
    n = (f // pt) * (h // ph) * (w // pw)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    ffn, layers, text_dim = config["ffn_dim"], config["num_layers"], config["text_dim"]
    freq = config.get("freq_dim", 256)
    patch_in = c * pt * ph * pw
    per_layer = (4 * n * d * d + 2 * n * n * d          # self-attention
                 + 2 * n * d * d + 2 * text_len * d * d + 2 * n * text_len * d  # cross-attention
                 + 2 * n * d * ffn)                     # feed-forward
    embed = n * patch_in * d + text_len * (text_dim * d + d * d) + (freq * d + d * d + d * 6 * d)
    head = n * d * config["out_channels"] * pt * ph * pw
    return 2.0 * (layers * per_layer + embed + head)


def ltx_forward_flops(config: dict, latent_shape, text_len: int) -> float:
    """One LTXVideoTransformer3DModel forward at batch 1 for unpacked latents (C, F, H, W)."""
    c, f, h, w = latent_shape
    n = f * h * w
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers, caption = config["num_layers"], config["caption_channels"]
    per_layer = (4 * n * d * d + 2 * n * n * d
                 + 2 * n * d * d + 2 * text_len * d * d + 2 * n * text_len * d
                 + 2 * n * d * 4 * d)
    embed = n * c * d + text_len * (caption * d + d * d) + (256 * d + d * d + d * 6 * d)
    head = n * d * config["out_channels"]
    return 2.0 * (layers * per_layer + embed + head)


def forward_flops(transformer_class: str, config: dict, latent_shape, text_len: int) -> float:
    if transformer_class == "WanTransformer3DModel":
        return wan_forward_flops(config, latent_shape, text_len)
    if transformer_class == "LTXVideoTransformer3DModel":
        return ltx_forward_flops(config, latent_shape, text_len)
    raise ValueError(f"no FLOP model for {transformer_class}")


def step_flops(transformer_class: str, config: dict, latent_shape, text_len: int, cfg: bool) -> float:
    """FLOPs of one denoising step (two forwards with CFG)."""
    return forward_flops(transformer_class, config, latent_shape, text_len) * (2 if cfg else 1)
