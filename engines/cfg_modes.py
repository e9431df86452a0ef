"""How a PyTorch engine runs the CFG batch: `batched` (cond and uncond rows in one batch-2 forward) or
`sequential` (two batch-1 forwards into the same shared buffers: the same numbers, half the activations
at the forward's peak, which is what fits a large model on a smaller card; bench/memory_plan.py).
Kept free of torch: flag checks read it."""
from __future__ import annotations

from flowblend.errors import FlowblendError

CFG_MODES = ("batched", "sequential")


def check_cfg(cfg: str) -> str:
    if cfg not in CFG_MODES:
        raise FlowblendError(f"unknown --cfg {cfg!r}: choose one of {', '.join(CFG_MODES)}")
    return cfg


def cfg_rows(cfg: str, batch: int) -> int:
    """Rows one forward computes at once: the whole CFG batch, or one when sequential."""
    return 1 if check_cfg(cfg) == "sequential" else batch
