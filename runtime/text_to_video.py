"""Text -> latents -> video around a Sampler: encode once for both models, seed, sample, decode."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from flowblend.errors import FlowblendError

from .sampler import LatentSampler


@dataclass
class TextToVideo:
    """Glue only (as a diffusers pipeline): the sampler moves latents, the callables encode and decode.

    `sampler` is a `Sampler` or a `GraphRunner` over one (both are LatentSamplers).
    """

    sampler: LatentSampler
    encode_prompt: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]]
    decode: Callable[[torch.Tensor], torch.Tensor]

    @torch.no_grad()
    def __call__(self, prompt: str, latent_shape, seed: int = 0, negative_prompt: str = "",
                 progress: bool = False, on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (video [3, F, H, W] in [-1, 1], final latents); `on_step` as in `LatentSampler.sample`."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt is empty: give the text to generate from")
        latent_shape = tuple(latent_shape)
        if len(latent_shape) != 4:
            hint = ": drop the batch, the pipeline makes one video per call" if len(latent_shape) == 5 else ""
            raise FlowblendError(f"latent_shape is one video's [C, F, H, W], got {list(latent_shape)}{hint}")
        embeds, mask = self.encode_prompt([prompt, negative_prompt])
        noise = torch.randn((1, *latent_shape), generator=torch.Generator("cpu").manual_seed(seed))
        kwargs = {}
        if mask is not None:
            kwargs = dict(prompt_mask=mask[0:1], negative_prompt_mask=mask[1:2])
        latents = self.sampler.sample(noise, embeds[0:1], embeds[1:2], progress=progress, on_step=on_step, **kwargs)
        return self.decode(latents)[0], latents
