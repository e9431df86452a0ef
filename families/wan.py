"""Wan 2.1 T2V (14B + 1.3B): the family entry and everything flowblend knows of WanTransformer3DModel.

The architecture (shared by the wan22 and toy families): the positional signature and the step with
the schedule constants taken out (wan_step.py beside this module, which imports torch: loaded lazily),
when that split reproduces the forward exactly, the FP32 islands of the export layout, the FLOP model,
and how WanPipeline's UMT5 encodes prompts and its VAE decodes latents.
"""
from __future__ import annotations

from .registry import Architecture, PairFamily, register_family

CLASS = "WanTransformer3DModel"


def _tokens(latent_shape, patch) -> int:
    _, f, h, w = latent_shape
    pt, ph, pw = patch
    return (f // pt) * (h // ph) * (w // pw)


def supports_wan_step_split(transformer) -> bool:
    """True for a plain text-to-video WanTransformer3DModel, the case WanStep reproduces exactly."""
    from diffusers.models.transformers.transformer_wan import WanTransformer3DModel

    config = getattr(transformer, "config", None)
    return (type(transformer) is WanTransformer3DModel
            and getattr(config, "image_dim", None) is None
            and getattr(config, "added_kv_proj_dim", None) is None
            and getattr(transformer.condition_embedder, "image_embedder", None) is None
            and not hasattr(transformer, "_hf_hook"))


def signature(transformer, **kwargs):
    """The positional engine signature (wan_step.py's WanSignature); torch loads here, not at start-up."""
    from .wan_step import WanSignature

    return WanSignature(transformer, **kwargs)


def step_split(signed):
    """WanStep over a plain T2V transformer's signature; None keeps the plain forward (image conditioning...)."""
    from .wan_step import WanStep

    return WanStep(signed.transformer) if supports_wan_step_split(signed.transformer) else None


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
    return {"projections": float(layers * per_layer_proj + embed + head), "attention": float(layers * per_layer_attn),
            "blocks": float(layers * (per_layer_proj + per_layer_attn))}  # what a cached step skips


def encode_prompt(pipe, prompts: list[str], family, device):
    """UMT5 through WanPipeline.encode_prompt: (embeddings, None): Wan takes no text mask."""
    embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, max_sequence_length=family.text_len,
                                   device=device)
    return embeds, None


def decode(vae, latents):
    """WanPipeline's de-normalisation (latents_mean / latents_std of the VAE config), then the VAE."""
    import torch

    z = vae.config.z_dim
    mean = torch.tensor(vae.config.latents_mean).view(1, z, 1, 1, 1).to(latents)
    std = torch.tensor(vae.config.latents_std).view(1, z, 1, 1, 1).to(latents)
    return vae.decode(latents * std + mean, return_dict=False)[0].float()


WAN = Architecture(
    transformer_class=CLASS, class_module="diffusers.models.transformers.transformer_wan", signature=signature,
    step_split=step_split, wrapper_name="WanSignature",
    # diffusers' own _keep_in_fp32_modules plus the modulation projection, the output norm and the attention q/k norms
    fp32_islands=("rope", "time_embedder", "time_proj", "scale_shift_table", "norm1", "norm2", "norm3", "norm_out",
                  "norm_q", "norm_k", "norm_added_k"),
    forward_macs=wan_forward_macs, encode_prompt=encode_prompt, decode=decode)

# Published architectures, for cost estimates without loading weights (`flowblend plan`).
COMMON = dict(patch_size=(1, 2, 2), in_channels=16, out_channels=16, text_dim=4096, freq_dim=256)
WAN_14B = dict(COMMON, num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40)
WAN_1B = dict(COMMON, num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30)


def frozen(config: dict) -> tuple:
    return tuple(config.items())


# UMT5-XXL's encoder (google/umt5-xxl, the Wan checkpoints' text_encoder/config.json) and the Wan 2.1 VAE
# (diffusers' AutoencoderKLWan defaults are its config): what the memory plan counts for the shared parts.
UMT5_XXL = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                feed_forward_proj="gated-gelu")


def umt5_xxl():
    from transformers import UMT5Config, UMT5EncoderModel

    return UMT5EncoderModel(UMT5Config(**UMT5_XXL))


def wan21_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan()


WAN_FAMILY = register_family(PairFamily(
    name="wan", transformer_class=CLASS,
    large="Wan-AI/Wan2.1-T2V-14B-Diffusers", small="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    latent_channels=16, spatial_factor=8, temporal_factor=4, patch=(1, 2, 2),
    solver="unipc", shift=3.0, steps=50, guidance=5.0, height=480, width=832, frames=81,
    text_len=512, text_dim=4096,
    compat_fields=("in_channels", "out_channels", "text_dim", "patch_size"),
    description="Wan 2.1 T2V 14B + 1.3B, shared UMT5-XXL and Wan VAE",
    architecture=WAN, reference=(("large", frozen(WAN_14B)), ("small", frozen(WAN_1B))),
    text_encoder_reference=umt5_xxl, vae_reference=wan21_vae))
