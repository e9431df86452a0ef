"""A run's parallel layout: CFG degree x sequence (Ulysses) degree = the torchrun world size.

One engine option (`--parallel 2x4`: CFG over 2 ranks, each of those over 4 Ulysses ranks, 8 in all) read
by generate, serve, bench and the pipelines through EngineChoice. Everything a layout can get wrong is
refused here in one line naming the fix, before a model loads: a degree out of range, a world size that
does not match, a layout without torchrun, a Ulysses degree that does not divide a model's head count.
Kept free of torch: flag parsing and refused requests stay torch-free. engines/parallel.py runs it.

Rank r of the world is CFG row r // ulysses and sequence shard r % ulysses: the Ulysses group (the ranks
of one CFG row) is contiguous, so on an 8-GPU node its all-to-alls, the chattiest traffic, stay on
neighbouring GPUs; the CFG exchange pairs rank k with rank k + ulysses.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from flowblend.errors import FlowblendError

CFG_DEGREES = (1, 2)  # cond and uncond: there is no third half to place
MAX_ULYSSES = 64  # arithmetic bound before any loop over degrees (a node has 8 GPUs; this is generous)


@dataclass(frozen=True)
class ParallelLayout:
    """`cfg` ranks split the CFG batch (one row each); `ulysses` ranks split every sequence inside a row."""

    cfg: int = 1
    ulysses: int = 1

    @property
    def world_size(self) -> int:
        return self.cfg * self.ulysses

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    @property
    def spelling(self) -> str:
        return f"{self.cfg}x{self.ulysses}"

    def cfg_row(self, rank: int) -> int:
        """Which CFG row (0 conditional, 1 unconditional) `rank` computes."""
        return rank // self.ulysses

    def shard(self, rank: int) -> int:
        """Which sequence shard `rank` holds inside its CFG row."""
        return rank % self.ulysses

    def cfg_group(self, rank: int) -> tuple[int, ...]:
        """The ranks that exchange velocity halves with `rank` (same shard, every CFG row)."""
        return tuple(row * self.ulysses + self.shard(rank) for row in range(self.cfg))

    def ulysses_group(self, rank: int) -> tuple[int, ...]:
        """The ranks that split `rank`'s sequence (same CFG row, every shard)."""
        start = self.cfg_row(rank) * self.ulysses
        return tuple(range(start, start + self.ulysses))


def parse_layout(text: str) -> ParallelLayout:
    """'CxU' (e.g. '2x4', '1x2', '2x1'; '1x1' is one process) -> ParallelLayout, or one line naming the fix."""
    parts = str(text).lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise FlowblendError(f"--parallel {text!r} is not CFGxULYSSES: write e.g. 2x4 (CFG over 2 ranks x Ulysses "
                             "over 4 = 8 ranks), 1x2, 2x1, or 1x1 for one process")
    cfg, ulysses = (int(p) for p in parts)
    if cfg not in CFG_DEGREES:
        raise FlowblendError(f"--parallel {text}: the CFG degree is 1 or 2 (conditional and unconditional halves), "
                             f"got {cfg}: put the other ranks in the Ulysses degree, e.g. 2x{max(1, cfg * ulysses // 2)}")
    if not 1 <= ulysses <= MAX_ULYSSES:
        raise FlowblendError(f"--parallel {text}: the Ulysses degree is 1..{MAX_ULYSSES}, got {ulysses}")
    return ParallelLayout(cfg, ulysses)


def check_launch(layout: ParallelLayout, env: Mapping[str, str]) -> tuple[int, int]:
    """(rank, world size) from torchrun's environment, checked against the layout; one line naming the fix."""
    launched = "WORLD_SIZE" in env and "RANK" in env
    if layout.is_single:
        if launched and int(env["WORLD_SIZE"]) > 1:
            raise FlowblendError(f"torchrun started {env['WORLD_SIZE']} ranks but --parallel is 1x1: every rank would "
                                 f"run the whole video alone; pass --parallel (e.g. 2x{int(env['WORLD_SIZE']) // 2 or 1}"
                                 f" or 1x{env['WORLD_SIZE']}) or run without torchrun")
        return 0, 1
    if not launched:
        raise FlowblendError(f"--parallel {layout.spelling} runs {layout.world_size} processes: launch it with "
                             f"`torchrun --nproc-per-node {layout.world_size} -m flowblend ...` (or drop --parallel)")
    world = int(env["WORLD_SIZE"])
    if world != layout.world_size:
        raise FlowblendError(f"--parallel {layout.spelling} needs {layout.world_size} ranks but torchrun started "
                             f"{world}: use --nproc-per-node {layout.world_size} or a layout whose degrees multiply "
                             f"to {world} (e.g. {_layouts_for(world)})")
    return int(env["RANK"]), world


def _layouts_for(world: int) -> str:
    return " or ".join(f"{c}x{world // c}" for c in CFG_DEGREES if world % c == 0 and world // c <= MAX_ULYSSES)


def check_heads(layout: ParallelLayout, heads: Mapping[str, int]) -> None:
    """Every model of the plan runs under the same Ulysses group, so its degree divides every head count."""
    bad = {name: h for name, h in heads.items() if h % layout.ulysses}
    if bad:
        common = [d for d in range(1, min(heads.values()) + 1) if all(h % d == 0 for h in heads.values())]
        raise FlowblendError(f"--parallel {layout.spelling}: Ulysses degree {layout.ulysses} does not divide the head "
                             f"count of {', '.join(f'{n} ({h} heads)' for n, h in bad.items())}; degrees that serve "
                             f"every model: {', '.join(map(str, common))}")


def check_tokens(layout: ParallelLayout, tokens: int, where: str) -> None:
    """Each Ulysses rank holds an equal share of the tokens (no padding: a padded key would change attention)."""
    if tokens % layout.ulysses:
        works = [d for d in range(1, min(tokens, MAX_ULYSSES) + 1) if tokens % d == 0]
        raise FlowblendError(f"--parallel {layout.spelling}: {where} has {tokens} tokens, which {layout.ulysses} "
                             f"ranks cannot share equally: choose a size whose token count divides, or a Ulysses "
                             f"degree among {', '.join(map(str, works[:8]))}")


def step_comm_bytes(layout: ParallelLayout, *, guided: bool, tokens: int, heads: int, head_dim: int, layers: int,
                    out_dim: int, latent_numel: int, elem_bytes: int = 4) -> dict[str, int]:
    """Bytes ONE rank sends to other ranks in one step of one Wan-class model (engines/parallel.CommCounter's kinds).

    CFG exchange (guided steps at CFG degree 2): the rank's velocity row, latent_numel values. Ulysses, per
    self-attention layer: q, k, v out and the attention output back, each all-to-all keeping 1/U of its
    [B, tokens/U, heads, head_dim] at home; then the output gather sends its [B, tokens/U, out_dim] to U-1
    ranks. B is the rows one forward computes: 2 when guided on one CFG rank, else 1."""
    u = layout.ulysses
    rows = 2 if guided and layout.cfg == 1 else 1
    out = {}
    if guided and layout.cfg == 2:
        out["cfg_exchange"] = latent_numel * elem_bytes
    if u > 1:
        shard = rows * (tokens // u)
        out["ulysses_all_to_all"] = layers * 4 * (shard * heads * head_dim * elem_bytes * (u - 1) // u)
        out["ulysses_gather"] = shard * out_dim * elem_bytes * (u - 1)
    return out
