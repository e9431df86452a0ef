"""One video over several processes: the process groups of a layout, the collectives, and CFG-parallel engines.

Layout and its checks: engines/parallel_layout.py. Collectives are torch.distributed's (gloo on the CPU, NCCL on
GPUs): the CFG exchange gathers in place into the shared velocity buffer; the Ulysses all-to-all and gather
write into an output made per call beside the forward's own activations (inside a CUDA graph they come from
the graph's pool, like every activation; they are not yet preallocated buffers). A CUDA graph captures them with
no host sync: NCCL enqueues on the capturing stream, and nothing here reads a device value on the host. diffusers' own context parallelism
(`enable_parallelism`, 0.42) was the first choice; it builds its device mesh from `torch.accelerator` and
divides by its device count, which is 0 on a CPU (ZeroDivisionError in `_resolve_parallel_config`), and it
hooks `forward`s the family's step split never calls, so the gloo tests could not run it; these few
collectives run under the step split on both.

CFG-parallel: `CfgParallelEngine` binds its engine to its rank's CFG row only (a batch-1 forward), then
all-gathers the two velocity rows into the shared velocity buffer; every rank then runs the same guidance and
solver update on the same numbers, so the latents stay identical on every rank without a broadcast. A model
that never guides (guidance 1) has no second row: both CFG ranks run it redundantly, no exchange (the stage
costs what it costs on one process; docs/parallel-projection.md).

Faults: `join` gives the process group `timeout`; every collective then fails on each rank within it when a
peer is dead or hung (gloo: the peer's closed socket fails at once; a hung peer at the timeout).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Mapping

import torch
import torch.distributed as dist

from .base import TIMESTEP, VELOCITY
from .parallel_layout import ParallelLayout, check_launch

# torch 2.13 renamed all_gather_into_tensor (deprecated there); the project supports torch >= 2.4
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _collective(call, group_name: str, timeout_s: float, *args, group=None) -> None:
    """One c10d collective; a failed one (a peer died, or hung past the timeout) says so on this rank."""
    from flowblend.errors import FlowblendError

    try:
        call(*args, group=group)
    except (RuntimeError, dist.DistBackendError) as error:
        rank = dist.get_rank() if dist.is_initialized() else "?"
        raise FlowblendError(f"rank {rank}: the {group_name} collective failed: another rank died or hung past "
                             f"--parallel-timeout {timeout_s:g} s ({str(error).splitlines()[0][:300]}); the job "
                             "stops on every rank") from error


@dataclass
class CommCounter:
    """Bytes this rank sends to other ranks, per collective kind (the tests hold them to the analytic formula)."""

    sent: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)

    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()


@dataclass(frozen=True)
class SequenceShard:
    """This rank's place in its Ulysses group: which of `degree` equal token shards it holds."""

    group: object  # a torch.distributed ProcessGroup
    index: int
    degree: int
    counter: CommCounter
    timeout_s: float

    def all_to_all(self, x: torch.Tensor) -> torch.Tensor:
        """x [degree, ...] -> [degree, ...]: slice j goes to rank j, slice j of the result came from rank j."""
        x = x.contiguous()
        out = torch.empty_like(x)
        _collective(dist.all_to_all_single, "Ulysses all-to-all", self.timeout_s, out, x, group=self.group)
        self.counter.add("ulysses_all_to_all", x.numel() * x.element_size() * (self.degree - 1) // self.degree)
        return out

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x stacked along a new first dim [degree, *x.shape], in shard order."""
        x = x.contiguous()
        out = x.new_empty((self.degree * x.shape[0], *x.shape[1:]))  # the c10d form: concatenated along dim 0
        _collective(_all_gather, "Ulysses gather", self.timeout_s, out, x, group=self.group)
        self.counter.add("ulysses_gather", x.numel() * x.element_size() * (self.degree - 1))
        return out.view(self.degree, *x.shape)


@dataclass(frozen=True)
class ParallelGroups:
    """The process groups of a layout as this rank sees them."""

    layout: ParallelLayout
    rank: int
    cfg_group: object | None       # ranks holding the same sequence shard of each CFG row (None at CFG degree 1)
    sequence: SequenceShard | None  # this rank's Ulysses group (None at Ulysses degree 1)
    counter: CommCounter
    timeout_s: float

    @property
    def cfg_row(self) -> int:
        return self.layout.cfg_row(self.rank)

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone decodes and writes (DESIGN.md: rank 0 owns I/O)."""
        return self.rank == 0


_JOINED: dict[str, ParallelGroups] = {}  # the process's groups per layout: torch.distributed's world is per process


def join(layout: ParallelLayout, device: str, timeout_s: float, env: Mapping[str, str] | None = None) -> ParallelGroups:
    """Join the torchrun world of `layout` (once per process) and make its CFG and Ulysses groups; every rank
    makes every group in the same order, as torch.distributed.new_group requires."""
    env = os.environ if env is None else env
    rank, world = check_launch(layout, env)
    if layout.spelling in _JOINED:
        return _JOINED[layout.spelling]
    timeout = timedelta(seconds=float(timeout_s))
    if not dist.is_initialized():
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(env.get("LOCAL_RANK", rank)))
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=timeout)
    counter = CommCounter()
    cfg_group = sequence = None
    for shard in range(layout.ulysses) if layout.cfg > 1 else ():
        members = layout.cfg_group(shard)
        group = dist.new_group(list(members), timeout=timeout)
        if rank in members:
            cfg_group = group
    for row in range(layout.cfg) if layout.ulysses > 1 else ():
        members = layout.ulysses_group(row * layout.ulysses)
        group = dist.new_group(list(members), timeout=timeout)
        if rank in members:
            sequence = SequenceShard(group, layout.shard(rank), layout.ulysses, counter, timeout_s)
    groups = ParallelGroups(layout, rank, cfg_group, sequence, counter, float(timeout_s))
    _JOINED[layout.spelling] = groups
    return groups


class CfgParallelEngine:
    """An engine that computes only its rank's CFG row, then exchanges velocity rows with the other CFG rank.

    Bound to a batch-1 binding (a model at guidance 1) it runs that binding whole, as every CFG rank does:
    there is no other half to exchange. Everything else is its engine's (`inner`)."""

    def __init__(self, inner, groups: ParallelGroups):
        self.inner = inner
        self.groups = groups
        self._row_views: list[tuple[tuple[torch.Tensor, ...], dict]] = []
        self._exchange: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getattr__(self, name):  # the inner engine's names (input_names, device, dtype, module, ...)
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def bind(self, tensors: Mapping[str, torch.Tensor]) -> None:
        velocity = tensors[VELOCITY]
        if velocity.shape[0] == 1:
            self._exchange = None
            self.inner.bind(tensors)
            return
        self.inner.bind(self._row_of(tensors))
        row = self.groups.cfg_row
        self._exchange = (velocity, velocity[row:row + 1])

    def _row_of(self, tensors: Mapping[str, torch.Tensor]) -> dict:
        """This rank's CFG row of a binding, as views made once per binding (the inner engine keys its
        constants by tensor identity)."""
        whole = tuple(tensors.values())
        for seen, views in self._row_views:
            if len(seen) == len(whole) and all(a is b for a, b in zip(seen, whole)):
                return views
        r = self.groups.cfg_row
        views = {k: v[:, r:r + 1] if k == TIMESTEP else v[r:r + 1] for k, v in tensors.items()}
        self._row_views.append((whole, views))
        return views

    def run(self, step: int) -> None:
        self.inner.run(step)
        if self._exchange is not None:
            velocity, own = self._exchange
            # in place: own is this rank's slot of velocity, the layout the all-gather gathers into
            _collective(_all_gather, "CFG exchange", self.groups.timeout_s, velocity, own, group=self.groups.cfg_group)
            self.groups.counter.add("cfg_exchange", own.numel() * own.element_size())
