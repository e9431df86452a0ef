"""The toy pair's fixed parts: transformer configs, a word-level text encoder and a pixel "VAE".

The toy pair uses the same diffusers class as Wan 2.1 (WanTransformer3DModel), so every export,
engine and runtime path it exercises is the real one; only the sizes are small enough for a CPU.
Latents are pixels: a video of 3 x F x 32 x 32 in [-1, 1] is its own latent (identity VAE).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .loading import LoadedPair, check_compatible, load_transformer

# Vocabulary of the procedural world (toy/data.py draws prompts from it); normalise_prompt is what
# the family's provider offers families.PairFamily.normalise_prompt.
from .toy_vocab import COLOURS, DIRECTIONS, FILLER_WORDS, SHAPES, VOCAB, check_words, normalise_prompt, words

if TYPE_CHECKING:
    import torch

__all__ = ["COLOURS", "DIRECTIONS", "FILLER_WORDS", "SHAPES", "VOCAB", "normalise_prompt"]

TEXT_LEN = 8
TEXT_DIM = 32
TEXT_SEED = 20251231

# Both share the Wan 2.1 architecture. Patch (3, 4, 4) on 9 frames of 32x32 pixels gives 3 x 8 x 8 =
# 192 tokens, a third of a (1, 4, 4) patch's, which made a training step 4x faster on a 2-core CPU;
# the toy "VAE" has no temporal compression, so the patch does it instead. A token then carries
# 3 x 4 x 4 x 3 = 144 velocity values through proj_out, so both widths are >= 144: a narrower model
# cannot even pass the noise through (a 64-wide small model's loss stalled at 0.72).
# "large" is ~6x the per-step FLOPs of "small" (Wan 14B/1.3B: ~6-10x): 4 layers of 192 vs 1 of 144.
TOY_FRAMES = 9
_COMMON = dict(
    patch_size=(3, 4, 4),
    in_channels=3,
    out_channels=3,
    text_dim=TEXT_DIM,
    freq_dim=64,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)
TOY_LARGE_CONFIG = dict(_COMMON, num_attention_heads=6, attention_head_dim=32, ffn_dim=384, num_layers=4)
TOY_SMALL_CONFIG = dict(_COMMON, num_attention_heads=3, attention_head_dim=48, ffn_dim=288, num_layers=1)
REFERENCE_CONFIGS = {"large": TOY_LARGE_CONFIG, "small": TOY_SMALL_CONFIG}  # what `flowblend plan` costs

WEIGHTS_DIR = Path(__file__).parent / "toy_weights"


class ToyTextEncoder:
    """Word tokens -> fixed embeddings, zero-padded to TEXT_LEN, like UMT5 output in Wan's pipeline.

    The table is drawn once from a fixed numpy seed (PCG64 is stable across numpy versions), so the
    encoder needs no weights file and both toy models see identical conditioning. Case, punctuation
    and articles are read as in the training prompts; a word outside the vocabulary is refused
    (FlowblendError), as it would reach the model as <unk> and give a near-black video.
    """

    def __init__(self, text_len: int = TEXT_LEN, dim: int = TEXT_DIM, seed: int = TEXT_SEED):
        import torch

        self.text_len = text_len
        self.dim = dim
        rng = np.random.default_rng(seed)
        table = rng.standard_normal((len(VOCAB), dim)).astype(np.float32)
        table[0] = 0.0  # <pad>
        self.table = torch.from_numpy(table)
        self.index = {word: i for i, word in enumerate(VOCAB)}

    def tokenize(self, prompt: str) -> list[int]:
        check_words(prompt)
        return [self.index[w] for w in words(prompt)][: self.text_len]

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (embeddings [B, TEXT_LEN, TEXT_DIM] float32, mask [B, TEXT_LEN] int64)."""
        import torch

        if isinstance(prompts, str):
            raise TypeError("encode_prompt takes a list of prompts, e.g. [prompt, negative_prompt]")
        embeds = torch.zeros(len(prompts), self.text_len, self.dim)
        mask = torch.zeros(len(prompts), self.text_len, dtype=torch.int64)
        for row, prompt in enumerate(prompts):
            ids = self.tokenize(prompt)
            if ids:
                embeds[row, : len(ids)] = self.table[torch.tensor(ids)]
                mask[row, : len(ids)] = 1
        return embeds, mask


@dataclass(frozen=True)
class PixelVAE:
    """Identity "VAE": the latent of a toy video is the video itself, in [-1, 1]."""

    channels: int = 3

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [B, 3, F, H, W] -> video [B, 3, F, H, W] in [-1, 1]."""
        return latents.clamp(-1.0, 1.0)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        return video


def _wan_class():
    """The toy family's transformer class (Wan 2.1's), from its family module (families/toy.py)."""
    from .registry import get_family

    return get_family("toy").architecture.model_class()


def build_toy_transformer(size: str, dtype: torch.dtype | None = None):
    """A toy transformer with random weights (size 'large' or 'small')."""
    import torch

    dtype = dtype or torch.float32
    config = {"large": TOY_LARGE_CONFIG, "small": TOY_SMALL_CONFIG}[size]
    model = _wan_class()(**config).eval()
    return model if dtype == torch.float32 else model.to(dtype)


def trained_weights_available(weights_dir: Path = WEIGHTS_DIR) -> bool:
    return all((weights_dir / size / "config.json").is_file() for size in ("large", "small"))


def load_toy_transformer(size: str, weights_dir: Path = WEIGHTS_DIR, dtype: torch.dtype | None = None):
    """The shipped trained toy transformer, or random weights if none are shipped yet."""
    import torch

    dtype = dtype or torch.float32
    path = Path(weights_dir) / size
    if not (path / "config.json").is_file():
        return build_toy_transformer(size, dtype)
    return _wan_class().from_pretrained(path, torch_dtype=dtype).eval()


def load_pair(family, large: str | None, small: str | None, dtype: torch.dtype, device,
              load_transformers: bool = True) -> LoadedPair:
    """The toy family's loader (flowblend.families resolves it by module name): shipped weights unless overridden."""
    models = {}
    for size, override in (("large", large), ("small", small)) if load_transformers else ():
        models[size] = load_transformer(family, override, dtype, False) if override else \
            load_toy_transformer(size, dtype=dtype)
    if models:
        check_compatible(family, dict(models["large"].config), dict(models["small"].config))
    for m in models.values():
        m.to(device)
    encoder, vae = ToyTextEncoder(), PixelVAE()
    source = "shipped" if trained_weights_available() else "random (no shipped weights yet)"
    return LoadedPair(family, models, lambda prompts: encoder.encode(prompts), vae.decode,
                      {"large": large or source, "small": small or source})
