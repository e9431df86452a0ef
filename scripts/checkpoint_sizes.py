"""What the real pairs' checkpoints need: parameters counted from the published configs, bytes derived.

Builds every model on torch's meta device (no memory, no download) from the configs in
families/ reference_configs and the text encoders' published sizes (UMT5-XXL for Wan 2.1, T5-XXL
for LTX-Video), counts parameters and prints disk and memory at 2 bytes (bf16/fp16) and 4 bytes (fp32)
per parameter. Usage: python scripts/checkpoint_sizes.py [--markdown]
"""
from __future__ import annotations

import argparse

import diffusers
import torch
from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

from flowblend.families import FAMILIES, reference_configs

XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")


def count(build) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in build().parameters())


def sizes() -> list[tuple[str, str, int]]:
    rows = []
    for name, text, vae in (("wan", lambda: UMT5EncoderModel(UMT5Config(vocab_size=256384, **XXL)),
                             diffusers.AutoencoderKLWan),
                            ("ltx", lambda: T5EncoderModel(T5Config(vocab_size=32128, **XXL)),
                             diffusers.AutoencoderKLLTXVideo)):
        cls = getattr(diffusers, FAMILIES[name].transformer_class)
        for size, config in reference_configs(name).items():
            rows.append((name, f"{size} transformer", count(lambda: cls(**config))))
        rows.append((name, "text encoder", count(text)))
        rows.append((name, "VAE", count(vae)))
    return rows


def main() -> None:
    argparse.ArgumentParser(description=__doc__).parse_args()
    print("| pair | part | parameters | bf16 GB | fp32 GB |\n|---|---|---|---|---|")
    totals = {}
    for pair, part, n in sizes():
        totals[pair] = totals.get(pair, 0) + n
        print(f"| {pair} | {part} | {n / 1e9:.2f} B | {2 * n / 1e9:.1f} | {4 * n / 1e9:.1f} |")
    for pair, n in totals.items():
        print(f"| {pair} | all | {n / 1e9:.2f} B | {2 * n / 1e9:.1f} | {4 * n / 1e9:.1f} |")


if __name__ == "__main__":
    main()
