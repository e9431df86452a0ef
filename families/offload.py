"""Where a pair's text encoder and VAE sit while the transformers sample: the `--offload` engine option.

The loop needs neither: the text encoder runs once per request before it, the VAE once after it. On a
card that holds the transformers with little to spare (Wan 14B + 1.3B in FP8 on 24 GiB) UMT5-XXL's
10.6 GiB of BF16 weights beside the loop decide whether the run fits (bench/memory_plan.py plans each
phase with the placement here). Kept free of torch: flag checks read it.

diffusers' `enable_model_cpu_offload` hooks do not serve here: a hooked component stays on the device
until the next one in `model_cpu_offload_seq` runs, so the text encoder would sit through the whole loop
(the transformers are not in the sequence). The loader (families/loading.py) moves the parts itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from flowblend.errors import FlowblendError

PARK = "cpu"  # where a part waits while it is not running


@dataclass(frozen=True)
class Placement:
    """Where the text encoder and the VAE are in each phase of a run on a device."""

    encode_on_device: bool  # the text encoder encodes on --device (else on the CPU, the embeddings then moved)
    text_encoder_in_loop: bool  # the text encoder's weights stay on --device during the loop
    vae_in_loop: bool  # the VAE's weights stay on --device during the loop (it decodes on --device in every mode)


OFFLOAD_MODES = {
    "none": Placement(encode_on_device=True, text_encoder_in_loop=True, vae_in_loop=True),
    "swap": Placement(encode_on_device=True, text_encoder_in_loop=False, vae_in_loop=False),
    "cpu": Placement(encode_on_device=False, text_encoder_in_loop=False, vae_in_loop=False),
}


def check_offload(mode: str) -> Placement:
    """The placement of an `--offload` mode, or FlowblendError naming the modes."""
    try:
        return OFFLOAD_MODES[mode]
    except KeyError:
        raise FlowblendError(f"unknown --offload {mode!r}: choose one of {', '.join(OFFLOAD_MODES)}") from None
