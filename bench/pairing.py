"""Paired, rotated repeats: how the benchmark compares cases on a machine whose speed drifts.

Every case runs once per round, rounds rotate which case goes first, and a speedup is the median
over rounds of the ratio within each round, so drift common to a round cancels.
"""
from __future__ import annotations

import statistics


def round_order(cases: list, round_index: int) -> list:
    """The cases of one round, rotated by the round's index: each case is first as often as the others,
    so no case always runs right after the same one (a fixed order can bias the paired ratios)."""
    shift = round_index % len(cases) if cases else 0
    return cases[shift:] + cases[:shift]


def paired_speedup(reference: list[float], case: list[float]) -> float:
    """Median over repeats of reference time / case time, each pair from the same round-robin round.

    A shared CPU drifts in speed by 10-20% over a run (the reference's loop spans 0.45-0.61 s in
    one toy run); cases of one round run back to back, so their ratio cancels what the round had
    in common, which a ratio of two medians taken over the whole run does not."""
    return statistics.median(paired_ratios(reference, case))


def paired_ratios(reference: list[float], case: list[float]) -> list[float]:
    """Reference time / case time per round (what paired_speedup takes the median of)."""
    if len(reference) != len(case) or not case:
        raise ValueError(f"paired repeats differ in number: {len(reference)} vs {len(case)}")
    return [r / c for r, c in zip(reference, case)]
