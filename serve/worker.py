"""The worker's side of a server: which job to run next (its own or another live server's), running it, finishing it.

One thread runs jobs one at a time (the pipeline's buffers serve one request at a time). Every job is
claimed from the shared queue (serve/shared_queue.py) before it runs, whether it was accepted here or at
another server on the same results directory: a worker with nothing of its own takes the oldest queued
job of another live server, so no worker idles while a job waits anywhere (Ray routes each POST to any
replica; the 202 returns at once, so where a job was accepted says nothing about who is free). A job
accepted here but taken by another server is forgotten here, and its long polls read the shared record.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import threading
import time
from collections import deque

from pydantic import ValidationError

from flowblend.errors import FlowblendError
from flowblend.families import PairFamily
from flowblend.runtime.video import save_video

from .config import ServeConfig
from .jobs import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, WARMUP_PREFIX, JobRecord, JobStore, OwnerLock
from .metrics import ServeMetrics
from .shared_queue import QueueEntry
from .video_request import JobSpec, VideoRequest, resolve
from .warm import WarmPipeline

PROGRESS_SAVE_SECONDS = 0.5  # how often a running job's progress reaches the results dir (other replicas)
IDLE_POLL_SECONDS = 0.05  # an idle worker lists the shared queue this often (a few names: microseconds)


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

    def __init__(self, config: ServeConfig, family: PairFamily, store: JobStore, pipeline: WarmPipeline | None):
        self.config, self.family, self.store, self.pipeline = config, family, store, pipeline
        self.metrics = ServeMetrics()
        self.default_spec: JobSpec  # the warm spec (the subclass sets it first)
        self._queue: deque[str] = deque()  # accepted here, not yet claimed, oldest first
        self._records: dict[str, JobRecord] = {}  # this process's queued and running jobs (fresh progress)
        self._specs: dict[str, JobSpec] = {}
        self._running: str | None = None
        self._stop_running: _Stop | None = None
        self._cond = threading.Condition()
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._closed = False
        self._unrunnable: set[str] = set()  # shared-queue entries this server cannot run (another pair, shape)

    def _warm_up(self) -> None:
        """One request of the default spec through the path every job takes (record saves, on_step, the video
        written into the results directory), as a job nobody can list, fetch or take; then its folder goes,
        and its metrics with it."""
        spec = self.default_spec
        record = JobRecord(f"{WARMUP_PREFIX}{self.store.owner}", spec.to_dict(), self.store.owner, steps=len(spec.plan),
                           models=list(spec.plan.models))
        folder = self.store.folder(record.id)
        try:
            folder.mkdir()
            self.store.save(record)
            self._records[record.id], self._specs[record.id] = record, spec
            self._running = record.id
            self._run(record.id)
        finally:
            self._running = None
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
                self._forget(entry.job_id)  # another server took it
            elif entry.name not in self._unrunnable:
                job_id = self._adopt(entry)
                if job_id is not None:
                    return job_id
        listed = {e.job_id for e in entries}
        self._unrunnable &= {e.name for e in entries}  # forget entries that left the queue
        with self._cond:  # queued here, gone from the index: claimed elsewhere (entries go after their claim)
            gone = [job_id for job_id in self._queue if job_id in known and job_id not in listed]
        for job_id in gone:
            self._forget(job_id)
        return None

    def _adopt(self, entry: QueueEntry) -> str | None:
        """Take another server's queued job if its owner lives and this server runs it exactly as it would."""
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
        """The job's request resolved by this server's rules, if that gives what its owner resolved (same pair,
        defaults, plans) and the shape is warm here; else None."""
        body, record = self.store.queue.body(entry), self.store.load(entry.job_id)
        if not body or record is None:
            return None
        try:
            spec = resolve(VideoRequest(**body), self.config, self.family)
        except (FlowblendError, ValidationError, TypeError):
            return None
        if json.loads(json.dumps(spec.to_dict())) != record.request:
            return None
        return spec if self.config.dynamic_shapes or spec.shape_key() in self.pipeline.warm_keys else None

    def _forget(self, job_id: str) -> None:
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
        record, spec = self._records[job_id], self._specs[job_id]
        if self.store.cancel_requested(job_id):
            self._finish(record, CANCELLED, "cancelled while queued")
            return
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
        try:
            video = self.pipeline.generate(spec, on_step)
            t1 = time.perf_counter()
            written = save_video(video, self.store.folder(job_id) / "video.mp4")
            t2 = time.perf_counter()
        except _Stop as stop:
            self._finish(record, stop.status, stop.reason, stop.retryable)
            return
        except Exception as exc:  # noqa: BLE001 - the job fails with the reason; the server goes on
            self._finish(record, FAILED, _one_line(exc))
            return
        record.video = written.name
        record.timings = {"generate_seconds": round(t1 - t0, 4), "encode_seconds": round(t2 - t1, 4),
                          "queue_seconds": round(record.started_at - record.created_at, 4),
                          "step_seconds_mean": {m: round(sum(v) / len(v), 5) for m, v in per_model.items() if v}}
        self.metrics.job_seconds.observe(t2 - t0)
        self._finish(record, COMPLETED)

    def _finish(self, record: JobRecord, status: str, error: str | None = None, retryable: bool = False) -> None:
        record.status, record.error, record.retryable, record.finished_at = status, error, retryable, time.time()
        self.store.save(record)
        self.metrics.finished.labels(status).inc()
        self._forget(record.id)  # final: long polls wake and read the saved record

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.active.labels(QUEUED).set(len(self._queue))
        self.metrics.active.labels(RUNNING).set(1 if self._running else 0)


def _wake(watchers: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]) -> None:
    for loop, fut in watchers:
        loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and not isinstance(exc, FlowblendError) else \
        (text[0] if text else type(exc).__name__)

