"""What a family's split step (families/wan_step.py, ltx_step.py) computes once per binding instead of per step."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StepConstants:
    """Per-binding inputs of every step: rotary tables and, per step, the timestep's two embeddings."""

    rotary: tuple[torch.Tensor, torch.Tensor]  # (cos, sin)
    block_modulation: torch.Tensor            # [steps, ...] the timestep embedding every block takes
    output_modulation: torch.Tensor           # [steps, ...] the one the output norm's shift/scale take

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.rotary, self.block_modulation, self.output_modulation))
