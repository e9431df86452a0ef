"""Cached steps (issue 34): a model skips its repeated blocks and adds the residual of its last full step.

At a full step that a later cached step of the same model reuses, the family's step split writes
the blocks' output minus their input into a residual buffer ("store"); at a cached step it adds
that buffer to the blocks' input instead of running them ("reuse"); the rest of the forward
(patch and text embedding, output norm and head) runs at the current step, as MagCache and
TeaCache do for Wan in diffusers. Which steps store and which reuse is fixed by the plan before
the loop, so the choice is a Python decision on the step index, never on device data, and the
whole loop stays one CUDA graph. The buffer is made once per binding, at the bound batch (both
CFG halves cache together), so the loop allocates nothing for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

STORE, REUSE = "store", "reuse"


@dataclass(frozen=True)
class CacheSchedule:
    """Per step index of the plan: STORE (a full step whose residual a cached step reuses), REUSE, or absent."""

    actions: dict[int, str]

    @classmethod
    def for_model(cls, models: tuple[str, ...], cached: tuple[bool, ...], model: str) -> "CacheSchedule":
        """The schedule of `model` in a plan (its per-step models and cached flags): each cached step reuses the
        residual of the last full step of the model before it, which therefore stores."""
        actions: dict[int, str] = {}
        last_full = None
        for i, (m, c) in enumerate(zip(models, cached or (False,) * len(models))):
            if m != model:
                continue
            if not c:
                last_full = i
            else:
                if last_full is None:
                    raise ValueError(f"step {i}: a cached step of {model} with no full step before it")
                actions[last_full], actions[i] = STORE, REUSE
        return cls(actions)

    def __bool__(self) -> bool:
        return bool(self.actions)


def run_blocks(held: list[torch.Tensor], blocks: Callable[[torch.Tensor], torch.Tensor],
               residual: torch.Tensor | None, reuse: bool) -> torch.Tensor:
    """The repeated blocks of a step: run them (storing their residual when `residual` is given), or reuse it.

    The blocks' input comes in a one-item list that is emptied here: a plain step then holds no reference to
    it while the blocks run (a caller's local or an argument would keep one whole activation alive, 670 MB at
    Wan 14B's CFG batch); only a storing step needs it after the blocks, for the subtraction."""
    if residual is None:
        return blocks(held.pop())
    hidden = held.pop()
    if reuse:
        return hidden + residual
    out = blocks(hidden)
    torch.sub(out, hidden, out=residual)  # into the preallocated buffer
    return out


def residual_nbytes(rows: int, tokens: int, hidden_dim: int, element_size: int) -> int:
    """Bytes of one model's residual buffer: rows (2 under CFG) x tokens x the blocks' width."""
    return rows * tokens * hidden_dim * element_size
