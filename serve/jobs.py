"""Jobs on disk: one folder per job under the results directory, each record written atomically.

The results directory is the single source of truth for a job's state, so that (a) a restarted
server still lists and serves finished jobs, and (b) with several replicas (Ray Serve) any replica
answers for any job id: no routing by id is needed, only shared storage.

    <results>/jobs/<id>/job.json     the record (status, request, progress, timings, error)
    <results>/jobs/<id>/video.mp4    the result (.gif where ffmpeg is absent), renamed into place
    <results>/jobs/<id>/cancel       a cancel request, seen by whichever replica runs the job
    <results>/jobs/<id>/claim        who took the queued job out of the shared queue (serve/shared_queue.py)
    <results>/queue/...              the shared queue's index: one entry per queued job
    <results>/owners/<owner>.lock    held (flock) by a live server process for as long as it runs

A record's `owner` is the process that accepted the job, and from its claim on the process that runs
it. A queued or running job whose owner's lock is free belongs to a process that died: it is reported
failed (retryable) with that reason by the first reader, never left "running" forever (a queued one
only if that reader wins its claim, so a job another live server has just taken is left to it).
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from flowblend.errors import FlowblendError

from .shared_queue import SharedQueue

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
FINAL = (COMPLETED, FAILED, CANCELLED)
JOB_ID = re.compile(r"video_[0-9a-f]{32}")
WARMUP_PREFIX = "warmup-"  # + owner: a server's warm-up job folder (never listed; removed after the warm-up)


@dataclass
class JobRecord:
    """What `GET /v1/videos/{id}` returns (OpenAI-style video object, plus flowblend's progress and timings)."""

    id: str
    request: dict
    owner: str
    status: str = QUEUED
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    step: int = 0  # steps finished
    steps: int = 0
    models: list[str] = field(default_factory=list)  # the plan: which model runs each step
    model: str | None = None  # the model of the step that ran last
    timings: dict = field(default_factory=dict)
    error: str | None = None
    retryable: bool = False
    video: str | None = None  # file name inside the job folder once completed

    def public(self) -> dict:
        out = asdict(self)
        out["object"] = "video"
        out["progress"] = round(100.0 * self.step / self.steps, 1) if self.steps else 0.0
        return out


def new_job_id() -> str:
    return f"video_{uuid.uuid4().hex}"


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class OwnerLock:
    """A lock file held for the life of this process: its being free means the owner is gone (POSIX flock)."""

    def __init__(self, directory: Path, owner: str):
        self.path = directory / f"{owner}.lock"
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def alive(directory: Path, owner: str) -> bool:
        path = directory / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True  # someone (maybe this process, through its own descriptor) holds it
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return False
        finally:
            os.close(fd)


class JobStore:
    """Job records and results under one results directory, safe for several processes sharing it."""

    def __init__(self, root: str | os.PathLike, owner: str | None = None):
        self.root = Path(root)
        self.owner = owner or f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        if "." in self.owner:
            raise ValueError(f"owner {self.owner!r}: no dots (queue entries are <created>.<owner>.<job id>)")
        self.jobs_dir, self.owners_dir = self.root / "jobs", self.root / "owners"
        check_writable(self.root)
        self.jobs_dir.mkdir(exist_ok=True)
        self.owners_dir.mkdir(exist_ok=True)
        self.queue = SharedQueue(self.root, self.jobs_dir, self.owner)
        self._lock = threading.Lock()  # one writer per record within this process
        self._owner_lock = OwnerLock(self.owners_dir, self.owner)

    def close(self) -> None:
        self._owner_lock.release()

    # -- records ------------------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def create(self, record: JobRecord, body: dict | None = None) -> None:
        """A new job's folder and record; a queued one also enters the shared queue (with `body`, the request as
        submitted, which another server resolves by its own rules before it takes the job)."""
        self.folder(record.id).mkdir()
        self.save(record)
        if record.status == QUEUED:
            self.queue.put(record.id, record.owner, body)

    def save(self, record: JobRecord) -> None:
        with self._lock:
            _write_atomic(self.folder(record.id) / "job.json", json.dumps(asdict(record)))

    def stamp(self, job_id: str) -> tuple[int, int] | None:
        """What changes whenever the record is saved (each save renames a new file into place): one stat."""
        try:
            st = os.stat(self.folder(job_id) / "job.json")
        except (FileNotFoundError, ValueError):
            return None
        return st.st_ino, st.st_mtime_ns

    def load(self, job_id: str) -> JobRecord | None:
        """The record of `job_id`, or None if there is no such job; orphans of dead owners come back failed."""
        record = self._read(job_id)
        return self._fail_orphan(record) if record is not None and self._orphaned(record) else record

    def _read(self, job_id: str) -> JobRecord | None:
        if not JOB_ID.fullmatch(job_id):
            return None
        try:
            return JobRecord(**json.loads((self.folder(job_id) / "job.json").read_text()))
        except FileNotFoundError:
            return None

    def _orphaned(self, record: JobRecord) -> bool:
        return record.status in ACTIVE and record.owner != self.owner and \
            not OwnerLock.alive(self.owners_dir, record.owner)

    def _fail_orphan(self, record: JobRecord) -> JobRecord:
        if record.status == QUEUED and not self.queue.claim(record.id):
            claimant = self.queue.claimant(record.id)
            if claimant and OwnerLock.alive(self.owners_dir, claimant):
                return self._read(record.id) or record  # a live server has just taken it: its record follows
        where = "before it started" if record.status == QUEUED else f"at step {record.step} of {record.steps}"
        record.status, record.retryable, record.finished_at = FAILED, True, time.time()
        record.error = f"the server process that held this job stopped {where}; submit the request again"
        self.save(record)
        return record

    def ids(self) -> list[str]:
        """Every job id, newest first."""
        def created(job_id: str) -> float:
            try:
                return (self.folder(job_id) / "job.json").stat().st_mtime
            except FileNotFoundError:
                return 0.0
        return sorted((p.name for p in self.jobs_dir.iterdir() if JOB_ID.fullmatch(p.name)), key=created, reverse=True)

    def list(self, limit: int = 100) -> list[JobRecord]:
        """Newest first (orphans of dead owners come back failed, as from `load`)."""
        records = [self.load(i) for i in self.ids()[:limit]]
        return [r for r in records if r is not None]

    def recover(self) -> list[str]:
        """At start: every queued/running job of a dead owner reported failed (a restart after a crash), and the
        warm-up folders of servers that died warming up removed."""
        for folder in self.jobs_dir.glob(f"{WARMUP_PREFIX}*"):
            if not OwnerLock.alive(self.owners_dir, folder.name.removeprefix(WARMUP_PREFIX)):
                shutil.rmtree(folder, ignore_errors=True)
        orphans = [r for r in map(self._read, self.ids()) if r is not None and self._orphaned(r)]
        return [self._fail_orphan(r).id for r in orphans]

    # -- cancel requests (any replica may receive the DELETE) -------------------------------------
    def request_cancel(self, job_id: str) -> None:
        (self.folder(job_id) / "cancel").touch()

    def cancel_requested(self, job_id: str) -> bool:
        return (self.folder(job_id) / "cancel").exists()

    def video_path(self, record: JobRecord) -> Path | None:
        if record.status != COMPLETED or not record.video:
            return None
        path = self.folder(record.id) / record.video
        return path if path.is_file() else None


def check_writable(root: Path) -> None:
    """Refuse a results directory this process cannot create files in (one line, naming the fix)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise FlowblendError(f"results directory {root} is not writable ({exc.strerror or exc}): pass --results-dir "
                             "with a folder this user can write") from None
