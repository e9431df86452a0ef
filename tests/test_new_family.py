"""A new model family from one module, without editing flowblend: CogVideoX, two tiny random configs.

This module is the whole family: its `Architecture` (signature wrapper around diffusers'
`CogVideoXTransformer3DModel`, FLOP model, prompt encoding and decoding) and its `PairFamily` entry,
registered with `register_family`, with this module as the family's provider (the loader of its two
tiny models, their reference configs, the prompt check). Then `flowblend plan`, `generate`,
`export` + `verify` + `build` on ONNX Runtime, `generate --backend onnxruntime` and `bench` run on it.

References: the FLOP model against torch's FlopCounterMode on the module; the ONNX Runtime video
against the PyTorch backend's; the plan's FLOPs against the counts of the models built here.
What is stood in for, and why: CogVideoX's T5 text encoder and VAE (tens of GB, not in this
machine's cache) by a fixed random embedding per word and a nearest-neighbour "VAE"; and
CogVideoX is a v-prediction DDIM model, while flowblend samples flow matching: the tiny random
models here are driven by flowblend's flow-matching solvers, which tests the plumbing of a new
family (every step above), not CogVideoX's own sampling quality. No step is left out: ONNX export
of this class works with the opset-18 dynamo exporter.
"""
from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from torch import nn

from flowblend.cli.main import main
from flowblend.families import ARCHITECTURES, FAMILIES, Architecture, LoadedPair, PairFamily, register_family

NAME = "cogvideox-tiny"
TEXT_LEN, TEXT_DIM = 8, 16
COMMON = dict(num_attention_heads=2, in_channels=4, out_channels=4, time_embed_dim=16, text_embed_dim=TEXT_DIM,
              sample_width=4, sample_height=4, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
              max_text_seq_length=TEXT_LEN)
REFERENCE_CONFIGS = {"large": dict(COMMON, attention_head_dim=16, num_layers=2),
                     "small": dict(COMMON, attention_head_dim=8, num_layers=1)}
PROMPT = "a cat walking on grass"


class CogVideoXSignature(nn.Module):
    """CogVideoXTransformer3DModel on the runtime's [B, C, F, H, W] latents (it takes [B, F, C, H, W])."""

    input_names = ("latents", "timestep", "text_embeds")
    output_names = ("velocity",)

    def __init__(self, transformer: nn.Module):
        super().__init__()
        self.transformer = transformer

    def forward(self, latents, timestep, text_embeds):
        out = self.transformer(hidden_states=latents.transpose(1, 2), encoder_hidden_states=text_embeds,
                               timestep=timestep, return_dict=False)[0]
        return out.transpose(1, 2)


def cogvideox_forward_macs(config: dict, latent_shape, text_len: int) -> dict[str, float]:
    """MACs of one forward at batch 1: joint text+video attention blocks (diffusers' CogVideoXBlock)."""
    c, f, h, w = latent_shape
    p = config["patch_size"]
    n = f * (h // p) * (w // p)
    tokens = n + text_len
    d = config["num_attention_heads"] * config["attention_head_dim"]
    t = config["time_embed_dim"]
    per_layer_proj = 4 * tokens * d * d + 2 * tokens * d * 4 * d + 2 * (t * 6 * d)  # qkv+out, ffn, 2 norms' linears
    per_layer_attn = 2 * tokens * tokens * d
    embed = n * c * p * p * d + text_len * config["text_embed_dim"] * d + d * t + t * t
    head = t * 2 * d + n * d * p * p * config["out_channels"]
    return {"projections": float(config["num_layers"] * per_layer_proj + embed + head),
            "attention": float(config["num_layers"] * per_layer_attn)}


def encode_words(prompts: list[str]):
    """A stand-in text encoder: each word a fixed random vector (seeded by the word), padded to TEXT_LEN."""
    out = torch.zeros(len(prompts), TEXT_LEN, TEXT_DIM)
    for i, prompt in enumerate(prompts):
        for j, word in enumerate(prompt.split()[:TEXT_LEN]):
            seed = int.from_bytes(word.encode()[:8].ljust(8, b"\0"), "little") % (2**31)
            out[i, j] = torch.randn(TEXT_DIM, generator=torch.Generator().manual_seed(seed))
    return out, None


def decode_nearest(latents):
    """A stand-in VAE: three latent channels, each latent pixel 8x8 and each latent frame 4 frames."""
    video = latents[:, :3].float().clamp(-1, 1)
    return video.repeat_interleave(8, dim=3).repeat_interleave(8, dim=4).repeat_interleave(4, dim=2)[:, :, 3:]


COGVIDEOX = Architecture(
    transformer_class="CogVideoXTransformer3DModel",
    class_module="diffusers.models.transformers.cogvideox_transformer_3d", signature=CogVideoXSignature,
    wrapper_name="CogVideoXSignature", fp32_islands=("time_embedding", "norm1", "norm2", "norm_final", "norm_out"),
    forward_macs=cogvideox_forward_macs)

FAMILY = PairFamily(
    name=NAME, transformer_class="CogVideoXTransformer3DModel", large="<random>", small="<random>",
    latent_channels=4, spatial_factor=8, temporal_factor=4, patch=(1, 2, 2), solver="unipc", shift=3.0, steps=6,
    guidance=4.0, height=32, width=32, frames=5, text_len=TEXT_LEN, text_dim=TEXT_DIM,
    compat_fields=("in_channels", "out_channels", "text_embed_dim", "patch_size"),
    description="two tiny random CogVideoX transformers (tests/test_new_family.py)", provider=__name__,
    architecture=COGVIDEOX)


# -- the provider's interface (families/registry.py: PairFamily.provider) ----------------------
def normalise_prompt(prompt: str, negative: bool = False) -> str:
    return " ".join(prompt.split())


def load_pair(family, large, small, dtype, device, load_transformers: bool = True) -> LoadedPair:
    models = {}
    for i, (size, config) in enumerate(REFERENCE_CONFIGS.items()) if load_transformers else ():
        torch.manual_seed(100 + i)  # the same weights in every load (export, then generate, in one process)
        models[size] = COGVIDEOX.model_class()(**config).eval().to(device=device, dtype=dtype)
    return LoadedPair(family, models, encode_words, decode_nearest, {"large": "random", "small": "random"})


@pytest.fixture(scope="module")
def family():
    from flowblend.engines import architectures

    register_family(FAMILY)
    yield FAMILY
    FAMILIES.pop(NAME)
    ARCHITECTURES.pop(COGVIDEOX.transformer_class)
    for name in (COGVIDEOX.transformer_class, COGVIDEOX.wrapper_name):
        architectures._ENTRIES.pop(name)


def test_the_flop_model_counts_what_torch_counts(family):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from flowblend.bench.flops import forward_flops
    from flowblend.engines.signature import signature_for

    latent = family.latent_shape(family.frames, family.height, family.width)
    for size, model in load_pair(family, None, None, torch.float32, "cpu").transformers.items():
        inputs = (torch.randn(1, *latent), torch.tensor([500.0]), torch.randn(1, TEXT_LEN, TEXT_DIM))
        # the math SDPA backend: the counter has no formula for the fused CPU kernel (tests/test_flops.py)
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            signature_for(model)(*inputs)
        ours = forward_flops(family.transformer_class, REFERENCE_CONFIGS[size], latent, TEXT_LEN)
        assert ours == pytest.approx(counter.get_total_flops(), rel=0.02), size


def test_plan_generate_export_verify_build_and_bench_run_on_the_new_family(family, tmp_path, capsys):
    assert main(["plan", "--pair", NAME, "--plan", "LSL:0.4,0.2", "--steps", "10"]) == 0
    assert "LSL" in capsys.readouterr().out

    common = ["--pair", NAME, "--prompt", PROMPT, "--steps", "4", "--no-progress"]
    assert main(["generate", *common, "--out", str(tmp_path / "torch.gif")]) == 0
    record = json.loads((tmp_path / "torch.json").read_text())
    assert record["pair"] == NAME and record["plan"]["models"].count("small") > 0

    artifacts = str(tmp_path / "artifacts")
    assert main(["export", "--pair", NAME, "--artifacts", artifacts, "--no-progress"]) == 0
    assert main(["verify", "--pair", NAME, "--artifacts", artifacts]) == 0
    out = capsys.readouterr().out
    assert "PASS large" in out and "PASS small" in out
    assert main(["build", "--pair", NAME, "--backend", "onnxruntime", "--artifacts", artifacts, "--no-progress"]) == 0
    assert main(["generate", *common, "--backend", "onnxruntime", "--artifacts", artifacts,
                 "--out", str(tmp_path / "ort.gif")]) == 0
    a, b = (iio.imread(tmp_path / f"{n}.gif").astype(np.float64) for n in ("torch", "ort"))
    assert a.shape == b.shape and np.abs(a - b).max() <= 2  # 8-bit frames of the same latents

    assert main(["bench", "--pair", NAME, "--backend", "onnxruntime", "--plan", "LLL", "--plan", "LSL:0.4,0.2",
                 "--steps", "4", "--repeats", "1", "--overhead-repeats", "0", "--no-progress",
                 "--artifacts", artifacts, "--out", str(tmp_path / "bench")]) == 0
    report = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert {(c["backend"], c["plan"]) for c in report["cases"]} >= {("torch", "LLL"), ("onnxruntime", "LSL:0.4,0.2")}
