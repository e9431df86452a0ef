"""Analytic FLOP counts of one transformer forward, per model config and latent shape.

Counted: every linear layer and convolution (patch embedding, attention projections, feed-forward,
time/text embedders, output head) and the two attention matmuls (scores and weighted sum), at
batch 1; norms, activations, RoPE and softmax are left out (under 1% at real sizes). This is what
torch.utils.flop_counter.FlopCounterMode counts (tests/test_flops.py checks it within 2%).
CFG doubles a step.

Two conventions, because published video-model costs use another one than ours:
- `flops` (ours): 2 FLOPs per multiply-accumulate, attention matmuls included;
- `paper`: multiply-accumulates of the projections only, attention matmuls left out (what
  fvcore/thop-style counters report: they do not see fused attention kernels). FlowBlending's
  cost table follows it exactly; scripts/flops_table.py shows that (docs/flops.md).
"""
from __future__ import annotations

CONVENTIONS = ("flops", "paper")


def _tokens(latent_shape, patch) -> int:
    _, f, h, w = latent_shape
    pt, ph, pw = patch
    return (f // pt) * (h // ph) * (w // pw)


def wan_forward_macs(config: dict, latent_shape, text_len: int) -> dict[str, float]:
    """Multiply-accumulates of one WanTransformer3DModel (T2V) forward at batch 1 for latents (C, F, H, W)."""
    if config.get("image_dim") or config.get("added_kv_proj_dim"):
        raise ValueError("the Wan FLOP model covers text-to-video only (image_dim/added_kv_proj_dim are set)")
    c = latent_shape[0]
    patch = tuple(config["patch_size"])
    n = _tokens(latent_shape, patch)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    ffn, layers, text_dim = config["ffn_dim"], config["num_layers"], config["text_dim"]
    freq = config.get("freq_dim", 256)
    patch_volume = patch[0] * patch[1] * patch[2]
    per_layer_proj = (4 * n * d * d                      # self-attention q, k, v, out
                      + 2 * n * d * d + 2 * text_len * d * d  # cross-attention q, out on video; k, v on text
                      + 2 * n * d * ffn)                  # feed-forward up and down
    per_layer_attn = 2 * n * n * d + 2 * n * text_len * d  # QK^T and PV, self and cross
    embed = (n * c * patch_volume * d                     # patch embedding (Conv3d)
             + text_len * (text_dim * d + d * d)          # text embedder (two linears)
             + freq * d + d * d + d * 6 * d)              # time embedder + modulation projection
    head = n * d * config["out_channels"] * patch_volume
    return {"projections": float(layers * per_layer_proj + embed + head), "attention": float(layers * per_layer_attn)}


def ltx_forward_macs(config: dict, latent_shape, text_len: int) -> dict[str, float]:
    """Multiply-accumulates of one LTXVideoTransformer3DModel forward at batch 1 for unpacked latents (C, F, H, W)."""
    c = latent_shape[0]
    n = _tokens(latent_shape, (config.get("patch_size_t", 1),) + (config.get("patch_size", 1),) * 2)
    d = config["num_attention_heads"] * config["attention_head_dim"]
    layers, caption = config["num_layers"], config["caption_channels"]
    per_layer_proj = 4 * n * d * d + 2 * n * d * d + 2 * text_len * d * d + 2 * n * d * 4 * d  # ffn mult 4
    per_layer_attn = 2 * n * n * d + 2 * n * text_len * d
    embed = n * c * d + text_len * (caption * d + d * d) + (256 * d + d * d + d * 6 * d)
    head = n * d * config["out_channels"]
    return {"projections": float(layers * per_layer_proj + embed + head), "attention": float(layers * per_layer_attn)}


def forward_macs(transformer_class: str, config: dict, latent_shape, text_len: int) -> dict[str, float]:
    """MACs of one forward at batch 1, split into `projections` (linear/conv) and `attention` (matmuls)."""
    if transformer_class == "WanTransformer3DModel":
        return wan_forward_macs(config, latent_shape, text_len)
    if transformer_class == "LTXVideoTransformer3DModel":
        return ltx_forward_macs(config, latent_shape, text_len)
    raise ValueError(f"no FLOP model for {transformer_class}: flowblend counts WanTransformer3DModel and "
                     "LTXVideoTransformer3DModel")


def forward_cost(transformer_class: str, config: dict, latent_shape, text_len: int, convention: str = "flops") -> float:
    """Cost of one forward at batch 1 under a convention (see the module docstring)."""
    macs = forward_macs(transformer_class, config, latent_shape, text_len)
    if convention == "flops":
        return 2.0 * (macs["projections"] + macs["attention"])
    if convention == "paper":
        return macs["projections"]
    raise ValueError(f"unknown FLOP convention {convention!r}: choose one of {', '.join(CONVENTIONS)}")


def forward_flops(transformer_class: str, config: dict, latent_shape, text_len: int) -> float:
    """FLOPs (2 per MAC, attention included) of one forward at batch 1."""
    return forward_cost(transformer_class, config, latent_shape, text_len, "flops")


def step_flops(transformer_class: str, config: dict, latent_shape, text_len: int, cfg: bool) -> float:
    """FLOPs of one denoising step (two forwards with CFG)."""
    return forward_flops(transformer_class, config, latent_shape, text_len) * (2 if cfg else 1)


def step_cost(transformer_class: str, config: dict, latent_shape, text_len: int, cfg: bool,
              convention: str = "flops") -> float:
    """Cost of one denoising step under a convention (two forwards with CFG)."""
    return forward_cost(transformer_class, config, latent_shape, text_len, convention) * (2 if cfg else 1)


def plan_cost(models, per_step: dict[str, float]) -> float:
    """Cost of a per-step model list (a BlendPlan's `models`): sum of the running model's step cost."""
    return float(sum(per_step[m] for m in models))
