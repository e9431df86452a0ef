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


def forward_macs(transformer_class: str, config: dict, latent_shape, text_len: int) -> dict[str, float]:
    """MACs of one forward at batch 1, split into `projections` (linear/conv) and `attention` (matmuls): the FLOP
    model of the class's family module (families/)."""
    from ..families import ARCHITECTURES

    arch = ARCHITECTURES.get(transformer_class)
    model = arch.forward_macs if arch is not None else None
    if model is None:
        known = [name for name, a in ARCHITECTURES.items() if a.forward_macs is not None]
        raise ValueError(f"no FLOP model for {transformer_class}: flowblend counts {' and '.join(known)} "
                         "(a family module gives its Architecture a forward_macs)")
    return model(config, latent_shape, text_len)


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


def cached_step_flops(transformer_class: str, config: dict, latent_shape, text_len: int, cfg: bool) -> float:
    """FLOPs of a cached step (engines/step_cache.py): the forward without its repeated blocks (embeddings, head)."""
    macs = forward_macs(transformer_class, config, latent_shape, text_len)
    return 2.0 * (macs["projections"] + macs["attention"] - macs.get("blocks", 0.0)) * (2 if cfg else 1)


def plan_cost(models, per_step: dict[str, float]) -> float:
    """Cost of a per-step model list (a BlendPlan's `models`): sum of the running model's step cost."""
    return float(sum(per_step[m] for m in models))
