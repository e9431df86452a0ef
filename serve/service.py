"""The server's core, HTTP-free: a bounded queue, one worker thread over the warm pipeline, job state.

One thread runs jobs one at a time (the pipeline's buffers serve one request at a time; a second
model copy would double memory for no gain on one device). The HTTP side only validates, enqueues
and reads records. Cancellation is checked at step boundaries through the sampler's `on_step`
hook; SIGTERM drains (`drain`): no new jobs, the running one may finish within `drain_seconds`,
queued ones are persisted as failed-retryable. Servers on one results directory (Ray Serve
replicas) share their queues: what the worker runs, and from where, is serve/worker.py's job.
"""
from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

from flowblend.errors import FlowblendError
from flowblend.families import get_family

from .config import ServeConfig
from .jobs import ACTIVE, CANCELLED, FAILED, FINAL, QUEUED, RUNNING, JobRecord, JobStore, check_writable, new_job_id
from .video_request import JobSpec, VideoRequest, resolve
from .warm import WARMUP_PROMPT, WarmPipeline
from .worker import IDLE_POLL_SECONDS, JobWorker, _one_line, _Stop

CLAIM_CHECK_SECONDS = 0.1  # a long poll on a job queued here looks this often whether another server took it
SHARED_POLL_SECONDS = 0.05  # a long poll on another server's job: one stat of its record this often
ORPHAN_CHECK_SECONDS = 1.0  # ... and a full read (which notices a dead owner) at least this often


class ServiceError(FlowblendError):
    """A refusal with its HTTP status (400 bad input, 404, 409, 429 queue full, 503 not ready / draining)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class VideoService(JobWorker):
    """`VideoService(config).start()`, then `submit / get / cancel / wait` from any thread or event loop."""

    def __init__(self, config: ServeConfig, pipeline: WarmPipeline | None = None):
        self.default_spec = self.check_config(config)
        super().__init__(config, get_family(config.pair), JobStore(config.results_dir), pipeline)
        self.recovered = self.store.recover()
        self.state, self.stage, self.error = "loading", "starting", None
        self._thread: threading.Thread | None = None

    @staticmethod
    def check_config(config: ServeConfig) -> JobSpec:
        """The request defaults by the CLI's rules and a writable results dir: one line, before anything loads."""
        spec = resolve(VideoRequest(prompt=WARMUP_PROMPT), config, get_family(config.pair))
        check_writable(Path(config.results_dir))
        return spec

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, wait: bool = False) -> "VideoService":
        """Load and warm up on the worker thread (or reuse a loaded pipeline), then serve the queue."""
        self._thread = threading.Thread(target=self._work, name="flowblend-worker", daemon=True)
        self._thread.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        with self._cond:
            self._cond.wait_for(lambda: self.state != "loading", timeout)
        if self.state == "failed":
            raise FlowblendError(self.error)

    def _load(self) -> None:
        def stage(text: str) -> None:
            self.stage = text

        if self.pipeline is None:
            self.pipeline = WarmPipeline(self.config, self.family)
            self.pipeline.load(self.default_spec, stage, warm_up=False)
        else:
            self.pipeline.warm_keys.add(self.default_spec.shape_key())
        stage(self.pipeline.warm_up_stage)
        start = time.perf_counter()
        self._warm_up()
        self.pipeline.load_seconds["warmup"] = round(time.perf_counter() - start, 3)

    def _work(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - reported by /health and the CLI as one line
            with self._cond:
                self.state, self.error = "failed", _one_line(exc)
                self._cond.notify_all()
            return
        with self._cond:
            if self.state == "loading":
                self.state, self.stage = "ready", "ready"
            self._cond.notify_all()
        self.metrics.ready.set(1)
        while True:
            with self._cond:  # woken at once by a job submitted here; otherwise looks at the shared queue
                self._cond.wait_for(lambda: self._queue or self._closed, IDLE_POLL_SECONDS)
                if self._closed:
                    return
            job_id = self._take_next() if self.state == "ready" else None
            if job_id is None:
                continue
            try:
                self._run(job_id)
            finally:
                with self._cond:
                    self._running = None
                    self._update_gauges()
                    self._cond.notify_all()

    def begin_drain(self, reason: str = "the server is shutting down") -> None:
        """Refuse new jobs; fail every queued job as retryable now (persisted), let the running one go on."""
        with self._cond:
            if self.state in ("draining", "stopped"):
                return
            self.state = "draining"
            dropped = list(self._queue)
            self._queue.clear()
        for job_id in dropped:
            if self.store.queue.claim(job_id):
                self._finish(self._records[job_id], FAILED, f"{reason} before the job started; submit it again",
                             retryable=True)
            else:
                self._forget(job_id)  # another server took it and runs it

    def drain(self, timeout: float | None = None) -> bool:
        """begin_drain, wait up to `timeout` (default drain_seconds) for the running job, then stop it.

        Returns True if the running job (if any) finished on its own. The worker thread ends.
        """
        self.begin_drain()
        timeout = self.config.drain_seconds if timeout is None else timeout
        with self._cond:
            finished = self._cond.wait_for(lambda: self._running is None, timeout)
            if not finished:
                self._stop_running = _Stop(FAILED, f"the server shut down while the job ran (drain limit "
                                                   f"{timeout:g} s); submit it again", retryable=True)
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout + 5.0)  # a job stops at its next step; a load in progress is abandoned
        self.state = "stopped"
        self.store.close()
        return finished

    # -- requests -----------------------------------------------------------------------------
    def submit(self, body: VideoRequest) -> JobRecord:
        """Check and enqueue; ServiceError(400/429/503) when refused."""
        if self.state != "ready":
            reason = "the server is shutting down" if self.state in ("draining", "stopped") else \
                f"the server is not ready ({self.stage})"
            self.metrics.rejected.labels("not_ready").inc()
            raise ServiceError(503, f"{reason}; retry later", self.config.retry_after_seconds)
        try:
            spec = resolve(body, self.config, self.family)
        except FlowblendError as exc:
            self.metrics.rejected.labels("invalid").inc()
            raise ServiceError(400, str(exc)) from None
        if not self.config.dynamic_shapes and spec.shape_key() not in self.pipeline.warm_keys:
            self.metrics.rejected.labels("shape").inc()
            r, d = spec.request, self.default_spec.request
            raise ServiceError(400, f"{r.width}x{r.height}, {r.frames} frames, guidance {r.guidance:g} is not a warm "
                                    f"shape of this server (warm: {d.width}x{d.height}, {d.frames} frames, "
                                    f"CFG {'on' if self.default_spec.cfg else 'off'}); restart it with that size or with "
                                    "--dynamic-shapes")
        record = JobRecord(new_job_id(), spec.to_dict(), self.store.owner, steps=len(spec.plan),
                           models=list(spec.plan.models))
        with self._cond:
            if len(self._queue) >= self.config.queue_size:
                for job_id in [j for j in self._queue if self.store.queue.claimed(j)]:
                    self._forget(job_id)  # taken by other servers since
            if len(self._queue) >= self.config.queue_size:
                self.metrics.rejected.labels("queue_full").inc()
                raise ServiceError(429, f"the queue is full ({self.config.queue_size} jobs waiting); retry later",
                                   self.config.retry_after_seconds)
            self.store.create(record, body.model_dump())
            self._records[record.id], self._specs[record.id] = record, spec
            self._queue.append(record.id)
            self._update_gauges()
            self._cond.notify_all()
        return record

    def get(self, job_id: str) -> JobRecord:
        with self._cond:
            if job_id in self._queue and self.store.queue.claimed(job_id):
                self._forget(job_id)  # another server took it (this worker claims and dequeues in one step)
            record = self._records.get(job_id)
        record = record or self.store.load(job_id)
        if record is None:
            raise ServiceError(404, f"no job {job_id!r}: list jobs with GET /v1/videos")
        return record

    def cancel(self, job_id: str) -> tuple[JobRecord, bool]:
        """Cancel; returns (record, done_now): a queued job is dropped now, a running one at its next step."""
        record = self.get(job_id)
        if record.status in FINAL:
            raise ServiceError(409, f"job {job_id} is already {record.status}: nothing to cancel")
        if self.store.cancel_requested(job_id):
            raise ServiceError(409, f"job {job_id} is already being cancelled (it stops at its next step boundary)")
        self.store.request_cancel(job_id)
        # Still queued (here or at another server): take it out of the shared queue and drop it. If another
        # claim came first, the job is starting or running where it was claimed and stops at its next step.
        dropped = record.status == QUEUED and self.store.queue.claim(job_id)
        if dropped:
            with self._cond:
                if job_id in self._queue:
                    self._queue.remove(job_id)
                    self._update_gauges()
                record = self._records.get(job_id) or self.store.load(job_id)
            self._finish(record, CANCELLED, "cancelled while queued")
        return self.get(job_id), dropped

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.cancel_requested(job_id)

    def video_path(self, job_id: str) -> Path:
        record = self.get(job_id)
        path = self.store.video_path(record)
        if path is None:
            extra = f": {record.error}" if record.error else ""
            raise ServiceError(409, f"job {job_id} is {record.status}{extra}; the video exists once it is completed")
        return path

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """The record once final or after `timeout` seconds (long poll without a thread per waiter)."""
        record = self.get(job_id)
        deadline = time.monotonic() + timeout
        seen, read_at = self.store.stamp(job_id), time.monotonic()
        while record.status in ACTIVE and (left := deadline - time.monotonic()) > 0:
            loop, fut = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
            with self._cond:
                here = job_id in self._records  # queued or running here: the worker (or _forget) wakes us
                if here:
                    self._watchers.setdefault(job_id, []).append((loop, fut))
            if here:  # a job queued here may be taken by another server meanwhile: look again now and then
                try:
                    await asyncio.wait_for(fut, left if record.status == RUNNING else min(left, CLAIM_CHECK_SECONDS))
                except asyncio.TimeoutError:
                    with self._cond:
                        if fut in (f for _, f in self._watchers.get(job_id, [])):
                            self._watchers[job_id] = [w for w in self._watchers[job_id] if w[1] is not fut]
                record = self.get(job_id)
            else:  # another server's: its record on the shared results dir, read when it changed
                await asyncio.sleep(min(SHARED_POLL_SECONDS, left))
                stamp = self.store.stamp(job_id)
                if stamp != seen or time.monotonic() - read_at >= ORPHAN_CHECK_SECONDS:
                    seen, read_at = stamp, time.monotonic()
                    record = self.get(job_id)
        return record

