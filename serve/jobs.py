"""Jobs on disk: one folder per job under the results directory, each record written atomically (flowblend/atomic.py).

The results directory is the single source of truth for a job's state, so that (a) a restarted
server still lists and serves finished jobs, and (b) with several replicas (Ray Serve) any replica
answers for any job id: no routing by id is needed, only shared storage.

    <results>/jobs/<id>/job.json     the record (status, request, progress, timings, error)
    <results>/jobs/<id>/video.mp4    the result (.gif where ffmpeg is absent), renamed into place
    <results>/jobs/<id>/thumbnail.png  its first frame
    <results>/jobs/<id>/cancel       a cancel request, seen by whichever replica runs the job
    <results>/jobs/<id>/deleted      a DELETE of a running job: hidden at once, removed when it stops
    <results>/jobs/<id>/claim        who took the queued job out of the shared queue (serve/shared_queue.py)
    <results>/queue/...              the shared queue's index: one entry per queued job
    <results>/owners/<owner>.lock    held (flock) by a live server process for as long as it runs

A record's `owner` is the process that accepted the job, and from its claim on the process that runs
it. A queued or running job whose owner's lock is free belongs to a process that died: it is reported
failed (retryable) with that reason by the first reader, never left "running" forever (a queued one
only if that reader wins its claim, so a job another live server has just taken is left to it).

A record that cannot be read (not JSON, not a record, written by something else) is skipped with one log
line naming the file, never an error of the listing or of the start; keys a newer version wrote are kept.
Files are created with the umask's modes (0644 under the usual 022), records and videos alike.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

from flowblend.atomic import write_atomic
from flowblend.errors import FlowblendError

from ..resolve.resolved import ResolvedRequest
from .records import JOB_ID, check_record, open_result, valid_owner
from .shared_queue import SharedQueue

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "in_progress", "completed", "failed", "cancelled"
ACTIVE = (QUEUED, RUNNING)
FINAL = (COMPLETED, FAILED, CANCELLED)
WARMUP_PREFIX = "warmup-"  # + owner: a server's warm-up job folder (never listed; removed after the warm-up)
STALE_LOCK_SECONDS = 60.0  # a free owner lock older than this is a dead server's: removed at start
log = logging.getLogger("flowblend.serve")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()  # what open() would give: mkstemp's 0600 widened to the same as videos


@dataclass
class JobRecord:
    """What `GET /v1/videos/{id}` returns (OpenAI-style video object, plus flowblend's progress and timings)."""

    id: str
    request: dict
    owner: str
    pair: str | None = None  # the pair that makes it (the video object's `model`)
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
    error_code: str | None = None  # what failed, when not the sampler (serve/video_object.py's error codes)
    retryable: bool = False
    video: str | None = None  # file name inside the job folder once completed
    thumbnail: str | None = None  # the first frame's image, beside the video
    remixed_from: str | None = None  # the job whose request this one reused with a new prompt
    body: dict | None = None  # the request as submitted (what a remix reuses)
    newer_fields: dict = field(default_factory=dict)  # keys of a newer version's record: kept, written back

    def to_json(self) -> str:
        out = asdict(self)
        return json.dumps({**out.pop("newer_fields"), **out})

    @staticmethod
    def from_dict(data: dict, job_id: str | None = None) -> "JobRecord":
        """A record from its JSON object, checked field by field (serve/records.py); unknown keys are kept aside
        (TypeError/KeyError if it is not a record, or not the record of `job_id`)."""
        check_record(data, data.get("id") if job_id is None and isinstance(data, dict) else job_id)
        known = {f.name for f in fields(JobRecord)} - {"newer_fields"}
        return JobRecord(**{k: v for k, v in data.items() if k in known},
                         newer_fields={k: v for k, v in data.items() if k not in known})


def new_job_id() -> str:
    """video_<12 hex digits of the creation time in ms><20 random>: ids sort in creation order (as UUIDv7)."""
    return f"video_{time.time_ns() // 1_000_000:012x}{uuid.uuid4().hex[:20]}"


class OwnerLock:
    """A lock file held for the life of this process: its being free means the owner is gone (POSIX flock)."""

    def __init__(self, directory: Path, owner: str):
        self.path = directory / f"{owner}.lock"
        self._fd = os.open(self.path, os.O_CREAT | os.O_RDONLY, 0o644)  # flock needs no write access
        fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def release(self) -> None:
        """Remove the lock file (still held, so no reader sees it free and alive at once), then let it go."""
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def remove_stale(directory: Path) -> None:
        """Remove the lock files of dead servers (free and older than STALE_LOCK_SECONDS: a new server's file is
        young, so one being created and not yet locked is never taken for a dead one's)."""
        for path in directory.glob("*.lock"):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                if time.time() - os.fstat(fd).st_mtime < STALE_LOCK_SECONDS:
                    continue
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                path.unlink(missing_ok=True)  # held by us while it goes: nobody locks it in between
            except BlockingIOError:
                pass  # a live server's
            finally:
                os.close(fd)

    @staticmethod
    def alive(directory: Path, owner: str) -> bool:
        if not valid_owner(owner):
            return False  # not an owner id (a foreign queue entry or claim): no server holds such a lock
        path = directory / f"{owner}.lock"
        try:
            fd = os.open(path, os.O_RDONLY)
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
        if not valid_owner(self.owner):
            raise ValueError(f"owner {self.owner!r}: letters, digits, '-' and '_' only, at most 64 (queue entries are "
                             "<created>.<owner>.<job id>, lock files <owner>.lock)")
        self.jobs_dir, self.owners_dir = self.root / "jobs", self.root / "owners"
        check_writable(self.root)
        self.jobs_dir.mkdir(exist_ok=True)
        self.owners_dir.mkdir(exist_ok=True)
        self.queue = SharedQueue(self.root, self.jobs_dir, self.owner)
        self._lock = threading.Lock()  # one writer per record within this process
        self._unreadable: set[Path] = set()  # records already reported unreadable (one log line each)
        self._owner_lock = OwnerLock(self.owners_dir, self.owner)
        self.fresh: Callable[[str], JobRecord | None] | None = None  # this process's newer copy of a record (worker)

    def close(self) -> None:
        self._owner_lock.release()

    # -- records ------------------------------------------------------------------------------
    def folder(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def create(self, record: JobRecord, request: ResolvedRequest | None = None) -> None:
        """A new job's folder and record; a queued one also enters the shared queue with `request`, the value its
        request was resolved into, which another server loads and runs as it is (None: only this server runs it)."""
        self.folder(record.id).mkdir()
        self.save(record)
        if record.status == QUEUED:
            self.queue.put(record.id, record.owner, request)

    def save(self, record: JobRecord) -> None:
        with self._lock:
            write_atomic(self.folder(record.id) / "job.json", record.to_json(), mode=FILE_MODE,
                         parents=False)

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
        """The record, or None: no such job, a deleted one, or a file that is not a record (logged once)."""
        if not JOB_ID.fullmatch(job_id) or self.deleted(job_id):
            return None
        path = self.folder(job_id) / "job.json"
        try:
            return JobRecord.from_dict(json.loads(path.read_text()), job_id)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            if path not in self._unreadable:
                self._unreadable.add(path)
                log.warning("flowblend serve: skipping %s: not a job record (%s)", path, str(exc).splitlines()[0])
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

    def ids(self, newest_first: bool = True) -> list[str]:
        """Every job id in creation order (ids begin with their creation time: one directory listing, no stat)."""
        return sorted((n for n in os.listdir(self.jobs_dir) if JOB_ID.fullmatch(n)), reverse=newest_first)

    def list(self, limit: int = 100) -> list[JobRecord]:
        """The newest `limit` records."""
        return self.page(limit)[0]

    def page(self, limit: int = 100, after: str | None = None, newest_first: bool = True) -> tuple[list[JobRecord], bool]:
        """Up to `limit` records after the id `after` in that order, and whether more follow (orphans of dead
        owners come back failed, as from `load`; unreadable records are skipped)."""
        ids = self.ids(newest_first)
        if after is not None:
            ids = [i for i in ids if (i < after if newest_first else i > after)]
        records: list[JobRecord] = []
        for job_id in ids:
            if len(records) == limit:
                return records, True
            record = self.fresh(job_id) if self.fresh is not None else None  # what GET answers (service.get)
            record = self.load(job_id) if record is None else None if self.deleted(job_id) else record
            if record is not None:
                records.append(record)
        return records, False

    def recover(self) -> list[str]:
        """At start: every queued/running job of a dead owner reported failed (a restart after a crash), and the
        warm-up folders of servers that died warming up removed."""
        OwnerLock.remove_stale(self.owners_dir)
        for folder in self.jobs_dir.glob(f"{WARMUP_PREFIX}*"):
            if not OwnerLock.alive(self.owners_dir, folder.name.removeprefix(WARMUP_PREFIX)):
                shutil.rmtree(folder, ignore_errors=True)
        orphans = [r for r in map(self._read, self.ids()) if r is not None and self._orphaned(r)]
        return [self._fail_orphan(r).id for r in orphans]

    # -- cancel requests (any replica may receive the DELETE) -------------------------------------
    def request_cancel(self, job_id: str) -> None:
        (self.folder(job_id) / "cancel").touch()

    def mark_deleted(self, job_id: str) -> None:
        """Hide a running job at once (404 from now on); whoever runs it removes the folder when it stops."""
        (self.folder(job_id) / "deleted").touch()

    def deleted(self, job_id: str) -> bool:
        return (self.folder(job_id) / "deleted").exists()

    def remove(self, job_id: str) -> None:
        """A job's folder gone for good (DELETE of a stopped job): renamed aside first, so no reader sees half."""
        folder = self.folder(job_id)
        trash = self.jobs_dir / f".deleted-{job_id}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(folder, trash)
        except FileNotFoundError:
            return
        shutil.rmtree(trash, ignore_errors=True)

    def cancel_requested(self, job_id: str) -> bool:
        return (self.folder(job_id) / "cancel").exists()

    def open_result(self, record: JobRecord, name: str | None = None) -> int | None:
        """A descriptor of the completed job's file `name` (default: its video), if it is a regular file the server
        wrote at its own path in the job folder (no symbolic links followed: serve/records.py); the caller closes it."""
        name = name or record.video
        if record.status != COMPLETED or not name:
            return None
        return open_result(self.jobs_dir, record.id, name)


def writable_error(root: Path) -> OSError | None:
    """Why this process cannot create and write a file in `root` (None: it can). A full disk still creates empty
    files, so the probe writes a page."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=root, prefix=".write-probe.")
        try:
            os.write(fd, b"\0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        return exc
    return None


def check_writable(root: Path) -> None:
    """Refuse a results directory this process cannot create files in (one line, naming the fix)."""
    exc = writable_error(root)
    if exc is not None:
        raise FlowblendError(f"results directory {root} is not writable ({exc.strerror or exc}): pass --results-dir "
                             "with a folder this user can write")
