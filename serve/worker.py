"""The worker's side of a server: which job to run next (its own or another live server's), running it, finishing it.

One thread runs jobs one at a time (the pipeline's buffers serve one request at a time). Every job is
claimed from the shared queue (serve/shared_queue.py) before it runs, whether it was accepted here or at
another server on the same results directory: a worker with nothing of its own takes the oldest queued
job of another live server, so no worker idles while a job waits anywhere (Ray routes each POST to any
replica; the 202 returns at once, so where a job was accepted says nothing about who is free). A job
accepted here but taken by another server is forgotten here, and its long polls read the shared record.

Faults never stall the queue: whatever fails while a job runs or finishes (the pipeline, the video
encoder, saving its record into a full or deleted folder) fails that job with the reason, and the worker
goes on. A record that cannot be saved is kept in memory and answered from there. After a failure the
results directory is probed; while it cannot be written, `fault` says why (health answers 503 with it,
new jobs are refused, the queued ones fail with it) and the probe is repeated until it can be again.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

from flowblend.errors import FlowblendError

from ..families import PairFamily
from .config import ServeConfig
from .jobs import (
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    WARMUP_PREFIX,
    JobRecord,
    JobStore,
    OwnerLock,
    writable_error,
)
from .metrics import ServeMetrics
from .results import NonFiniteVideo, write_results
from .shared_queue import QueueEntry
from .video_request import JobSpec
from .warm import WarmPipeline

PROGRESS_SAVE_SECONDS = 0.5  # how often a running job's progress reaches the results dir (other replicas)
IDLE_POLL_SECONDS = 0.05  # an idle worker lists the shared queue this often (a few names: microseconds)
FAULT_PROBE_SECONDS = 1.0  # while the results dir cannot be written, it is probed again this often
IDLE_PROBE_SECONDS = 1.0  # an idle worker probes the results dir this often (health reports what it probed)
WRITE_FAILED = "results_write_failed"  # the error code of a job failed by a results dir that cannot be written
UNSAVED_KEPT = 1000  # final records that could not be saved, answered from memory (newest kept)
log = logging.getLogger("flowblend.serve")


class _Stop(Exception):
    """Raised from `on_step` to end a running job at a step boundary."""

    def __init__(self, status: str, reason: str, retryable: bool):
        super().__init__(reason)
        self.status, self.reason, self.retryable = status, reason, retryable


class JobWorker:
    """The job state a server's worker thread and its request handlers share, and what the worker does with it.

    `_queue` holds the jobs accepted here and not yet claimed (oldest first), `_records`/`_specs` the jobs
    queued or running here (fresh progress), `_running` the one the worker runs; all under `_cond`.
    """

    def __init__(self, config: ServeConfig, family: PairFamily, store: JobStore, pipeline: WarmPipeline | None,
                 default_spec: JobSpec):
        self.config, self.family, self.store, self.pipeline = config, family, store, pipeline
        self.default_spec = default_spec  # the warm spec
        self.metrics = ServeMetrics()
        self.fault: str | None = None  # why no job can run now (the results dir cannot be written); None: fine
        self._queue: deque[str] = deque()  # accepted here, not yet claimed, oldest first
        self._records: dict[str, JobRecord] = {}  # this process's queued and running jobs (fresh progress)
        self._specs: dict[str, JobSpec] = {}
        self._unsaved: OrderedDict[str, JobRecord] = OrderedDict()  # final, but their record could not be saved
        self._running: str | None = None
        self._stop_running: _Stop | None = None
        self._cond = threading.Condition()
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._closed = False
        self._unrunnable: set[str] = set()  # shared-queue entries this server cannot run (another pair, shape)
        store.fresh = self.local  # the listing answers what GET answers: fresh progress, unsaved final records

    # -- what request handlers ask ------------------------------------------------------------
    def enqueue(self, record: JobRecord, spec: JobSpec) -> bool:
        """Create the job and queue it here; False (nothing created) if the queue is full."""
        with self._cond:
            if len(self._queue) >= self.config.queue_size:
                for job_id in [j for j in self._queue if self.store.queue.claimed(j)]:
                    self.forget(job_id)  # taken by other servers since
            if len(self._queue) >= self.config.queue_size:
                return False
            self.store.create(record, spec)
            self._records[record.id], self._specs[record.id] = record, spec
            self._queue.append(record.id)
            self._update_gauges()
            self._cond.notify_all()
        return True

    def local(self, job_id: str) -> JobRecord | None:
        """The fresh record of a job queued or running here (or final but unsaved), else None (read the store)."""
        with self._cond:
            if job_id in self._queue and self.store.queue.claimed(job_id):
                self.forget(job_id)  # another server took it (this worker claims and dequeues in one step)
            return self._records.get(job_id) or self._unsaved.get(job_id)

    def dequeue(self, job_id: str) -> None:
        """A job claimed by a cancel or a delete: out of this server's queue."""
        with self._cond:
            if job_id in self._queue:
                self._queue.remove(job_id)
                self._update_gauges()

    def watch(self, job_id: str, loop: asyncio.AbstractEventLoop, fut: asyncio.Future) -> bool:
        """Wake `fut` when the job leaves this process (final, or taken elsewhere); False if it is not here."""
        with self._cond:
            if job_id not in self._records:
                return False
            self._watchers.setdefault(job_id, []).append((loop, fut))
            return True

    def unwatch(self, job_id: str, fut: asyncio.Future) -> None:
        with self._cond:
            if job_id in self._watchers:
                self._watchers[job_id] = [w for w in self._watchers[job_id] if w[1] is not fut]

    def take_queued(self) -> list[str]:
        """Every job queued here, out of the queue (a drain fails them)."""
        with self._cond:
            dropped = list(self._queue)
            self._queue.clear()
            self._update_gauges()
        return dropped

    def stop(self, stop: _Stop, timeout: float) -> bool:
        """Wait up to `timeout` for the running job; then stop it with `stop` at its next step. Closes the loop."""
        with self._cond:
            finished = self._cond.wait_for(lambda: self._running is None, timeout)
            if not finished:
                self._stop_running = stop
            self._closed = True
            self._cond.notify_all()
        return finished

    # -- the worker thread --------------------------------------------------------------------
    def run_loop(self, may_take: Callable[[], bool]) -> None:
        """Run queued jobs until closed; `may_take()` says whether the server takes jobs now (ready)."""
        probed = 0.0
        while True:
            with self._cond:  # woken at once by a job submitted here; otherwise looks at the shared queue
                self._cond.wait_for(lambda: self._queue or self._closed, IDLE_POLL_SECONDS)
                if self._closed:
                    return
            try:
                if self.fault is not None:
                    if time.monotonic() - probed >= FAULT_PROBE_SECONDS:
                        probed = time.monotonic()
                        self.check_results_dir()
                    continue
                job_id = self._take_next() if may_take() else None
                if job_id is not None:
                    self._run(job_id)
                elif time.monotonic() - probed >= IDLE_PROBE_SECONDS:  # idle: is the results dir still writable?
                    probed = time.monotonic()
                    self.check_results_dir()
            except Exception as exc:  # noqa: BLE001 - outside any job (listing the queue...): health says why
                log.warning("flowblend serve: the worker could not take a job: %s", _one_line(exc))
                self.fault = f"the worker cannot take jobs: {_one_line(exc)}"
                probed = time.monotonic()
            finally:
                with self._cond:
                    self._running = None
                    self._update_gauges()
                    self._cond.notify_all()

    def check_results_dir(self) -> None:
        """Probe the results dir: clear `fault` if it can be written, else set it and fail the jobs queued here."""
        exc = writable_error(self.store.jobs_dir)
        if exc is not None:
            if self.fault is None:
                log.warning("flowblend serve: results directory %s cannot be written: %s", self.store.root, exc)
            self.fault = f"the results directory cannot be written ({exc.strerror or exc}): free space on its disk " \
                         "or make it writable (the server's log names it)"
            for job_id in self.take_queued():
                if self._claim_quietly(job_id):
                    self.finish(self._records[job_id], FAILED, f"not run: {self.fault}", retryable=True,
                                code=WRITE_FAILED)
            return
        if self.fault is not None:
            self._save_unsaved()
        self.fault = None

    def _save_unsaved(self) -> None:
        """The final records that could not be saved, written now that the results dir can be (a restart then
        reads what GET answered, not a stale "in_progress")."""
        with self._cond:
            pending = list(self._unsaved.values())
        for record in pending:
            try:
                if self.store.folder(record.id).is_dir() and not self.store.deleted(record.id):
                    self.store.save(record)
            except OSError:
                return
            with self._cond:
                self._unsaved.pop(record.id, None)

    def _claim_quietly(self, job_id: str) -> bool:
        try:
            return self.store.queue.claim(job_id)
        except OSError:
            return job_id in self._records  # its folder is gone or cannot be written: nobody else can claim it

    def warm_up(self) -> None:
        """One request of the default spec through the path every job takes (record saves, on_step, the video
        written into the results directory), as a job nobody can list, fetch or take; then its folder goes,
        and its metrics with it."""
        spec = self.default_spec
        record = JobRecord(f"{WARMUP_PREFIX}{self.store.owner}", spec.to_dict(), self.store.owner,
                           pair=self.family.name, steps=len(spec.plan), models=list(spec.plan.models))
        folder = self.store.folder(record.id)
        try:
            folder.mkdir()
            self.store.save(record)
            self._records[record.id], self._specs[record.id] = record, spec
            self._running = record.id
            self._run(record.id)
        finally:
            self._running = None
            self._unsaved.pop(record.id, None)
            shutil.rmtree(folder, ignore_errors=True)
        if record.status != COMPLETED:
            raise FlowblendError(f"the warm-up request failed: {record.error}")
        self.metrics = ServeMetrics()

    def _take_next(self) -> str | None:
        """Claim the oldest queued job this server can run: its own, or a live server's (then adopted here)."""
        with self._cond:
            known = set(self._queue)  # before listing: each of these has its index entry already
        entries = self.store.queue.entries()
        for entry in entries:
            if entry.owner == self.store.owner:
                with self._cond:
                    if entry.job_id not in self._queue:
                        continue  # being cancelled or drained here: that path claims it
                    if self.store.queue.claim(entry.job_id, entry):
                        self._queue.remove(entry.job_id)
                        self._running = entry.job_id
                        self._update_gauges()
                        return entry.job_id
                self.forget(entry.job_id)  # another server took it
            elif entry.name not in self._unrunnable:
                job_id = self._adopt(entry)
                if job_id is not None:
                    return job_id
        listed = {e.job_id for e in entries}
        self._unrunnable &= {e.name for e in entries}  # forget entries that left the queue
        with self._cond:  # queued here, gone from the index: claimed elsewhere (entries go after their claim)
            gone = [job_id for job_id in self._queue if job_id in known and job_id not in listed]
        for job_id in gone:
            self.forget(job_id)
        return None

    def _adopt(self, entry: QueueEntry) -> str | None:
        """Take another server's queued job if its owner lives and this server can run the value its owner resolved."""
        if not OwnerLock.alive(self.store.owners_dir, entry.owner):
            self.store.load(entry.job_id)  # a dead owner's job is reported failed (retryable), never run
            return None
        spec = self._same_spec(entry)
        if spec is None:
            self._unrunnable.add(entry.name)
            return None
        if not self.store.queue.claim(entry.job_id, entry):
            return None
        record = self.store.load(entry.job_id)
        if record is None or record.status != QUEUED:
            return None
        record.owner = self.store.owner  # saved with the status "in_progress": nobody reads it running elsewhere
        with self._cond:
            self._records[record.id], self._specs[record.id] = record, spec
            self._running = record.id
            self._update_gauges()
        return record.id

    def _same_spec(self, entry: QueueEntry) -> JobSpec | None:
        """The value its owner resolved the job's request into (stored in the queue entry, loaded, not resolved
        again), if it is of this server's pair and its shape is warm here; else None."""
        resolved = self.store.queue.request(entry, self.family)
        if resolved is None:
            return None
        spec = JobSpec(resolved.request, resolved.options, resolved.experts)
        return spec if self.config.dynamic_shapes or spec.shape_key() in self.pipeline.warm_keys else None

    def forget(self, job_id: str) -> None:
        """Drop a job from this process's state and wake its long polls, which read the shared record from now on:
        a job that finished, or one queued here that another server took."""
        with self._cond:
            if job_id in self._queue:
                self._queue.remove(job_id)
            self._records.pop(job_id, None)
            self._specs.pop(job_id, None)
            watchers = self._watchers.pop(job_id, [])
            self._update_gauges()
        _wake(watchers)

    def _run(self, job_id: str) -> None:
        """Run one claimed job to its end; whatever fails fails this job (with the reason), never the worker."""
        record, spec = self._records[job_id], self._specs[job_id]
        try:
            self._generate(record, spec)
        except _Stop as stop:
            self.finish(record, stop.status, stop.reason, stop.retryable)
        except NonFiniteVideo as exc:
            self.finish(record, FAILED, str(exc))
        except OSError as exc:  # a file of the job could not be written (full or read-only disk, folder gone)
            self.finish(record, FAILED, _one_line(exc), retryable=True, code=WRITE_FAILED)
            self.check_results_dir()
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the server goes on
            self.finish(record, FAILED, _one_line(exc))
            self.check_results_dir()  # a full or read-only disk: health says so, queued jobs fail with it
        else:
            self.finish(record, COMPLETED)

    def _generate(self, record: JobRecord, spec: JobSpec) -> None:
        job_id = record.id
        if self.store.cancel_requested(job_id):
            raise _Stop(CANCELLED, "cancelled while queued", retryable=False)
        record.status, record.started_at = RUNNING, time.time()
        self.metrics.queue_seconds.observe(record.started_at - record.created_at)
        self.store.save(record)
        self._update_gauges()
        per_model: dict[str, list[float]] = {m: [] for m in set(spec.plan.models)}
        last = [time.perf_counter(), time.perf_counter()]  # previous step end, last progress save

        def on_step(i: int) -> None:
            if self.pipeline.syncs_per_step:
                import torch

                torch.cuda.synchronize()
            now = time.perf_counter()
            model = spec.plan.models[i]
            if self.pipeline.steps_report:
                per_model[model].append(now - last[0])
                self.metrics.step_seconds.labels(model).observe(now - last[0])
            last[0] = now
            record.step, record.model = i + 1, model
            if self._stop_running is not None:
                raise self._stop_running
            if self.store.cancel_requested(job_id):
                raise _Stop(CANCELLED, f"cancelled at step {i + 1} of {record.steps}", retryable=False)
            if now - last[1] > PROGRESS_SAVE_SECONDS:
                last[1] = now
                self.store.save(record)

        t0 = time.perf_counter()
        video = self.pipeline.generate(spec, on_step)
        t1 = time.perf_counter()
        record.video, record.thumbnail = write_results(video, self.store.folder(job_id))
        t2 = time.perf_counter()
        record.timings = {"generate_seconds": round(t1 - t0, 4), "encode_seconds": round(t2 - t1, 4),
                          "queue_seconds": round(record.started_at - record.created_at, 4),
                          "step_seconds_mean": {m: round(sum(v) / len(v), 5) for m, v in per_model.items() if v}}
        self.metrics.job_seconds.observe(t2 - t0)

    def finish(self, record: JobRecord, status: str, error: str | None = None, retryable: bool = False,
               code: str | None = None) -> None:
        """Final state, saved; a record that cannot be saved is kept in memory with why (GET and the listing answer
        from there, and it is saved once the results dir can be written again). A job deleted while it ran is
        removed now. `code`: the error code when it is not the default (serve/video_object.py)."""
        record.status, record.error, record.retryable, record.finished_at = status, error, retryable, time.time()
        record.error_code = code
        if status != COMPLETED:
            record.video = record.thumbnail = None
        try:
            if self.store.deleted(record.id):
                self.forget(record.id)  # first: once the folder (and its `deleted` mark) is gone, memory must not answer
                self.store.remove(record.id)
            else:
                self.store.save(record)
        except OSError as exc:
            if status == COMPLETED:  # a video without its record is not a result
                record.status, record.video, record.thumbnail = FAILED, None, None
            record.error = f"{record.error + '; ' if record.error else ''}its record could not be saved " \
                           f"({exc.strerror or exc}): free space in the results directory and submit it again"
            record.retryable, record.error_code = True, WRITE_FAILED
            log.warning("flowblend serve: job %s: %s", record.id, record.error)
            with self._cond:
                self._unsaved[record.id] = record
                while len(self._unsaved) > UNSAVED_KEPT:
                    self._unsaved.popitem(last=False)
        self.metrics.finished.labels(record.status).inc()
        self.forget(record.id)  # final: long polls wake and read the saved record

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.active.labels(QUEUED).set(len(self._queue))
        self.metrics.active.labels(RUNNING).set(1 if self._running else 0)


def _wake(watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]) -> None:
    for loop, fut in watchers:
        loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))


def _one_line(exc: BaseException) -> str:
    """The first line of an error, with its type unless it is flowblend's own; an OSError without its path."""
    text = [exc.strerror] if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and not isinstance(exc, FlowblendError) else \
        (text[0] if text else type(exc).__name__)
