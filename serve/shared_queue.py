"""The queue every server on one results directory shares: queued jobs indexed, each taken out exactly once.

Each server (a `flowblend serve` process, a Ray Serve replica) accepts jobs into the shared results
directory; whichever server's worker is idle takes the oldest queued job of a live server and runs it,
so N servers keep N workers busy whatever way requests were spread over them (Ray routes a POST to
any replica; a 202 returns at once, so which replica gets a job says nothing about how busy it is).

    <results>/queue/<created_ns>.<owner>.<job_id>   one entry per queued job: its resolved request (JSON)
    <results>/jobs/<id>/claim                       who took the job out of the queue (owner id)

Taking a job out of the queue is a claim: `os.link` of a complete temporary file onto `claim`, which
fails if the name exists (atomic across processes on a POSIX file system, NFS included), so exactly
one process claims each job. Whoever claims runs it, or drops it: the owner's worker and an idle
server claim before running; a cancel claims a queued job to drop it (if someone else claimed first,
the job is already running there and stops through its `cancel` file); a drain claims its queued jobs
to fail them; the reader that finds a dead owner's queued job claims it to report it failed. The
entry is removed after the claim (a claimer that dies in between leaves an entry whose job has a
claim: the next lister removes it). The index holds only queued jobs, so an idle worker lists a few
names, not every finished job.

An entry holds the one value its owner resolved the request into (resolve/resolved.py's ResolvedRequest,
as JSON): a server that adopts the job loads that value and runs it as its owner would have, never
resolving the request again by its own defaults and plans.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from flowblend.atomic import write_atomic
from flowblend.errors import FlowblendError

from ..resolve.blend_request import BlendFamily
from ..resolve.resolved import ResolvedRequest
from .records import JOB_ID, valid_owner

CLAIM = "claim"


@dataclass(frozen=True)
class QueueEntry:
    """One queued job as its index entry names it: oldest first by `created_ns`."""

    name: str
    created_ns: int
    owner: str
    job_id: str

    @staticmethod
    def parse(name: str) -> "QueueEntry | None":
        parts = name.split(".")
        if len(parts) != 3 or not parts[0].isdigit() or not valid_owner(parts[1]) or not JOB_ID.fullmatch(parts[2]):
            return None  # a temporary file (".name.partial") or something foreign
        return QueueEntry(name, int(parts[0]), parts[1], parts[2])


class SharedQueue:
    """The queue index under `<root>/queue` and the claim files in job folders (see the module docstring)."""

    def __init__(self, root: Path, jobs_dir: Path, owner: str):
        self.dir, self.jobs_dir, self.owner = root / "queue", jobs_dir, owner
        self.dir.mkdir(exist_ok=True)

    def put(self, job_id: str, owner: str, request: ResolvedRequest | None = None) -> None:
        """Index a queued job (after its record exists) with the value its request was resolved into (None: a job
        no other server may take)."""
        name = f"{time.time_ns():020d}.{owner}.{job_id}"
        write_atomic(self.dir / name, json.dumps(None if request is None else request.to_json()), parents=False)

    def entries(self) -> list[QueueEntry]:
        """Queued jobs, oldest first."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        return sorted((e for e in map(QueueEntry.parse, names) if e is not None), key=lambda e: e.created_ns)

    def request(self, entry: QueueEntry, family: BlendFamily) -> ResolvedRequest | None:
        """The resolved request `entry` holds, loaded for `family`; None if it is gone, holds none, or is not a
        value of that family (another pair's job, or an entry some other program wrote)."""
        try:
            data = json.loads((self.dir / entry.name).read_text())
            return None if data is None else ResolvedRequest.from_json(data, family)
        except (FileNotFoundError, ValueError, TypeError, KeyError, AttributeError, FlowblendError):
            return None

    def claim(self, job_id: str, entry: QueueEntry | None = None) -> bool:
        """Take `job_id` out of the queue for this process; False if another claim came first."""
        folder = self.jobs_dir / job_id
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".claim.", suffix=".partial")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.owner)
            try:
                os.link(tmp, folder / CLAIM)
                won = True
            except FileExistsError:
                won = False
        finally:
            os.unlink(tmp)
        self._remove_entry(job_id, entry)
        return won

    def claimed(self, job_id: str) -> bool:
        return (self.jobs_dir / job_id / CLAIM).exists()

    def claimant(self, job_id: str) -> str | None:
        """The owner id of the process that claimed `job_id`, or None if it is still queued."""
        try:
            return (self.jobs_dir / job_id / CLAIM).read_text()
        except FileNotFoundError:
            return None

    def _remove_entry(self, job_id: str, entry: QueueEntry | None) -> None:
        names = [entry.name] if entry is not None else [n for n in os.listdir(self.dir) if n.endswith(f".{job_id}")]
        for name in names:
            try:
                os.unlink(self.dir / name)
            except FileNotFoundError:
                pass
