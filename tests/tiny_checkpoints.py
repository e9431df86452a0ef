"""Tiny but complete diffusers checkpoints (tokenizer, text encoder, VAE, scheduler, transformers), written
with `save_pretrained`, for tests that load pipelines the way a user does (`from_pretrained` of a folder).

The classes are the real ones (UMT5 / T5 encoders, AutoencoderKLWan / AutoencoderKLLTXVideo,
WanTransformer3DModel / LTXVideoTransformer3DModel); only the sizes are tiny. The tokenizer is a
word-level `PreTrainedTokenizerFast` built here, as no tokenizer file can be downloaded in tests.
"""
from __future__ import annotations

from pathlib import Path

import torch

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "right", "cat",
         "dog", "video", "of"]
TEXT_DIM = 16
WAN_CHANNELS = 4
LTX_CHANNELS = 8
WAN_SHIFT = 3.0


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=word_level, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>", model_max_length=16)


def _lift(model, seed):
    """Zero-initialised output layers get small random weights, so every model really computes something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def wan_transformer(size: str, seed: int):
    from diffusers import WanTransformer3DModel

    heads, layers, ffn = (2, 2, 48) if size == "large" else (1, 1, 24)
    torch.manual_seed(seed)
    return _lift(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=12,
                                       in_channels=WAN_CHANNELS, out_channels=WAN_CHANNELS, text_dim=TEXT_DIM,
                                       freq_dim=32, ffn_dim=ffn, num_layers=layers, rope_max_seq_len=32), seed)


def wan_parts(seed: int = 0) -> dict:
    """Tokenizer, UMT5 encoder, Wan VAE and Wan's UniPC scheduler, tiny."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1,
                                          num_heads=2, relative_attention_num_buckets=8, pad_token_id=0,
                                          eos_token_id=1, decoder_start_token_id=0)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=8, z_dim=WAN_CHANNELS, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.05, 0.3],
                           latents_std=[1.5, 0.8, 1.2, 2.0]).eval()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=WAN_SHIFT,
                                        num_train_timesteps=1000, solver_order=2, solver_type="bh2", predict_x0=True,
                                        lower_order_final=True, final_sigmas_type="zero")
    return dict(tokenizer=tokenizer(), text_encoder=encoder, vae=vae, scheduler=scheduler)


def save_wan(folder: Path, *, experts: bool = False, small: bool = False, seed: int = 0) -> Path:
    """A WanPipeline checkpoint: Wan 2.1 (one transformer; `small` the 1.3B-like size) or Wan 2.2 A14B-like
    (`experts`: transformer + transformer_2 and boundary_ratio 0.9)."""
    from diffusers import WanPipeline

    parts = wan_parts(seed)
    if experts:
        pipe = WanPipeline(**parts, transformer=wan_transformer("large", seed + 10),
                           transformer_2=wan_transformer("large", seed + 20), boundary_ratio=0.9)
    else:
        pipe = WanPipeline(**parts, transformer=wan_transformer("small" if small else "large", seed + 30))
    pipe.save_pretrained(folder)
    return Path(folder)


def ltx_transformer(size: str, seed: int):
    from diffusers import LTXVideoTransformer3DModel

    dim, layers = (8, 2) if size == "large" else (4, 1)
    torch.manual_seed(seed)
    return _lift(LTXVideoTransformer3DModel(in_channels=LTX_CHANNELS, out_channels=LTX_CHANNELS, patch_size=1,
                                            patch_size_t=1, num_attention_heads=2, attention_head_dim=dim,
                                            cross_attention_dim=2 * dim, num_layers=layers,
                                            caption_channels=TEXT_DIM), seed)


def save_ltx(folder: Path, *, small: bool = False, seed: int = 0, timestep_conditioning: bool = True) -> Path:
    """An LTXPipeline checkpoint with a T5 encoder, a 4x spatial / 4x temporal LTX VAE and LTX's dynamic-shift
    Euler scheduler (its base/max shift and shift_terminal differ from diffusers' defaults, as LTX-Video's do)."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXPipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    encoder = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=TEXT_DIM, d_kv=4, d_ff=32, num_layers=1,
                                      num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1,
                                      decoder_start_token_id=0)).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLLTXVideo(in_channels=3, out_channels=3, latent_channels=LTX_CHANNELS,
                                block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
                                layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
                                spatio_temporal_scaling=(True, True, False, False),
                                decoder_spatio_temporal_scaling=(True, True, False, False),
                                decoder_inject_noise=(False, False, False, False, False),
                                upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
                                timestep_conditioning=timestep_conditioning, patch_size=1, patch_size_t=1,
                                encoder_causal=True, decoder_causal=False).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True,
                                                base_shift=0.95, max_shift=2.05, base_image_seq_len=1024,
                                                max_image_seq_len=4096, shift_terminal=0.1)
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=encoder, tokenizer=tokenizer(),
                       transformer=ltx_transformer("small" if small else "large", seed + 30))
    pipe.save_pretrained(folder)
    return Path(folder)
