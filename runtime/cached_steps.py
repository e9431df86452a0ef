"""The cached steps of a plan (issue 34): how they are spelled and which ones a plan may have.

A cached step runs its model's forward with the repeated blocks replaced by the residual of that
model's last full step (engines/step_cache.py). Spelled as lower-case letters in a per-step or
stage spelling that also has capitals (`LLllSSsLL`, `L2,l2,S2,s1,L2`); an all-lower-case spelling
keeps its old, case-insensitive meaning. Each run of one model must start with a full step: the
residual is of that model, at a nearby noise level, so it cannot come from before a switch.
"""
from __future__ import annotations

from typing import Callable


def mixed_case(text: str) -> bool:
    """True when a spelling has both cases: then lower-case letters are cached steps."""
    letters = [c for c in text if c.isalpha()]
    return any(c.islower() for c in letters) and any(c.isupper() for c in letters)


def cached_flags(indices, steps: int) -> tuple[bool, ...]:
    """A plan JSON's `cached` step indices as per-step flags (() when none)."""
    indices = {int(i) for i in indices}
    bad = sorted(i for i in indices if not 0 <= i < steps)
    if bad:
        raise ValueError(f"plan JSON caches step(s) {bad} outside its {steps} steps")
    return tuple(i in indices for i in range(steps)) if indices else ()


def check_cached(models: tuple[str, ...], cached: tuple[bool, ...], letter_of: Callable[[str], str]) -> None:
    """ValueError naming the step when a run of one model starts with a cached step (no full step to reuse)."""
    for i, c in enumerate(cached):
        if c and (i == 0 or models[i - 1] != models[i]):
            letter = letter_of(models[i])
            where = "the start" if i == 0 else f"its switch at step {i}"
            raise ValueError(f"step {i} ({letter.lower()}) is a cached step of {models[i]} with no full step of it "
                             f"since {where}: make step {i} a full step ({letter})")
