"""The tiny random pairs the tests use: defined once in the package (flowblend.bench.tiny), shared with
the runtime-overhead measurement and scripts/export_figures.py; and the VAE stand-in of CLI tests."""
import torch

from flowblend.bench.tiny import LTX_LATENT, LTX_TINY, TEXT, WAN_LATENT, WAN_TINY, latent_shape, tiny_pair

__all__ = ["LTX_LATENT", "LTX_TINY", "TEXT", "WAN_LATENT", "WAN_TINY", "latent_shape", "tiny_pair",
           "stand_in_decode"]


def stand_in_decode(self, latents):
    """What a real VAE's decode returns in shape and range ([B, 3, F, 32, 32] in [-1, 1]), for CLI tests whose
    checkpoints hold only transformers (patched over the pair's shared components' decode)."""
    b, c, f, h, w = latents.shape
    x = torch.tanh(latents[:, :3]).permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
    x = torch.nn.functional.interpolate(x, size=(32, 32), mode="nearest")
    return x.reshape(b, f, 3, 32, 32).permute(0, 2, 1, 3, 4)
