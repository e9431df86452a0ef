"""LTX-Video 13B + 2B (0.9.7 / 0.9.8): the family entry and what flowblend knows of LTXVideoTransformer3DModel.

The signature packs tokens inside (ltx_step.py's LtxSignature); the step split computes the rotary
tables and AdaLayerNormSingle's embeddings once per binding (ltx_step.py's LtxStep; that module imports
torch, so it is loaded lazily); the text mask and the VAE's de-normalisation follow LTXPipeline.
"""
from __future__ import annotations

from .registry import Architecture, PairFamily, register_family
from .wan import _tokens, frozen

CLASS = "LTXVideoTransformer3DModel"


def supports_ltx_step_split(transformer) -> bool:
    """True for a plain LTXVideoTransformer3DModel, the case LtxStep reproduces exactly."""
    from diffusers.models.transformers.transformer_ltx import LTXVideoTransformer3DModel

    return type(transformer) is LTXVideoTransformer3DModel and not hasattr(transformer, "_hf_hook")


def signature(transformer, **kwargs):
    """The positional engine signature (ltx_step.py's LtxSignature); torch loads here, not at start-up."""
    from .ltx_step import LtxSignature

    return LtxSignature(transformer, **kwargs)


def step_split(signed):
    """LtxStep over a plain transformer's signature (its rope interpolation scale), else None."""
    from .ltx_step import LtxStep

    if not supports_ltx_step_split(signed.transformer):
        return None
    return LtxStep(signed.transformer, signed.rope_interpolation_scale)


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
    return {"projections": float(layers * per_layer_proj + embed + head), "attention": float(layers * per_layer_attn),
            "blocks": float(layers * (per_layer_proj + per_layer_attn))}  # what a cached step skips


def encode_prompt(pipe, prompts: list[str], family, device):
    """T5 through LTXPipeline.encode_prompt: (embeddings, attention mask as int64)."""
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                            max_sequence_length=family.text_len, device=device)
    return embeds, mask.long()


def decode(vae, latents):
    """LTXPipeline's de-normalisation, then the VAE (timestep-conditioned VAEs decode at t = 0)."""
    import torch

    mean, std = vae.latents_mean.view(1, -1, 1, 1, 1).to(latents), vae.latents_std.view(1, -1, 1, 1, 1).to(latents)
    latents = latents * std / vae.config.scaling_factor + mean
    timestep = torch.zeros(latents.shape[0], device=latents.device, dtype=latents.dtype) \
        if vae.config.timestep_conditioning else None
    return vae.decode(latents, timestep, return_dict=False)[0].float()


LTX = Architecture(
    transformer_class=CLASS, class_module="diffusers.models.transformers.transformer_ltx", signature=signature,
    step_split=step_split, wrapper_name="LtxSignature",
    # diffusers declares none for LTX; these are the same roles as Wan's
    fp32_islands=("rope", "time_embed", "scale_shift_table", "norm1", "norm2", "norm_out", "norm_q", "norm_k"),
    forward_macs=ltx_forward_macs, encode_prompt=encode_prompt, decode=decode)

COMMON = dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, caption_channels=4096)

LTX_FAMILY = register_family(PairFamily(
    name="ltx", transformer_class=CLASS,
    large="Lightricks/LTX-Video-0.9.7-dev", small="Lightricks/LTX-Video-0.9.8-2B-distilled",
    latent_channels=128, spatial_factor=32, temporal_factor=8, patch=(1, 1, 1),
    solver="euler", shift=1.0, steps=40, guidance=3.0, height=512, width=704, frames=121,
    text_len=128, text_dim=4096, takes_text_mask=True, dynamic_shift=True,
    compat_fields=("in_channels", "out_channels", "caption_channels", "patch_size", "patch_size_t"),
    description="LTX-Video 13B + 2B (0.9.7/0.9.8), shared T5-XXL and LTX VAE", pipeline_class="LTXPipeline",
    architecture=LTX,
    # The step- and guidance-distilled model D (issue 27): LTX-Video 0.9.8 distilled (2B here; the 13B distilled
    # has the 13B's config). diffusers' LTX docs run it at guidance_scale=1.0 over a few explicit timesteps, so D
    # runs batch 1 (no unconditional half); plans give it its own steps over its interval (`L20,D4,L10`).
    models=("large", "small", "distilled"), letters=("L", "S", "D"),
    checkpoint_of=("large", "small", "distilled"), subfolders=(None, None, None),
    optional_checkpoints=(("distilled", "Lightricks/LTX-Video-0.9.8-2B-distilled"),),
    expert_guidance=(("distilled", 1.0),),
    # 13B: 48 layers, 32 x 128; 2B (and the 2B distilled): 28 layers, 32 x 64 (model cards)
    reference=(("large", frozen(dict(COMMON, num_attention_heads=32, attention_head_dim=128, num_layers=48))),
               ("small", frozen(dict(COMMON, num_attention_heads=32, attention_head_dim=64, num_layers=28))),
               ("distilled", frozen(dict(COMMON, num_attention_heads=32, attention_head_dim=64, num_layers=28))))))
