"""The server's core, HTTP-free: the life cycle (load, ready, drain) and the requests (submit, get, cancel, delete).

One worker thread (serve/worker.py's JobWorker, which this service holds) runs jobs one at a time (the
pipeline's buffers serve one request at a time; a second model copy would double memory for no gain
on one device). The HTTP side only validates, enqueues and reads records. Cancellation is checked at
step boundaries through the sampler's `on_step` hook; SIGTERM drains (`drain`): no new jobs, the running
one may finish within `drain_seconds`, queued ones are persisted as failed-retryable. Servers on one
results directory (Ray Serve replicas) share their queues: what the worker runs, and from where, is the
worker's job.
"""
from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import time
from pathlib import Path

from pydantic import ValidationError

from flowblend.errors import FlowblendError

from ..families import get_family
from .config import ServeConfig
from .guard import check_access
from .jobs import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    FAILED,
    FINAL,
    QUEUED,
    RUNNING,
    JobRecord,
    JobStore,
    check_writable,
    new_job_id,
)
from .metrics import ServeMetrics
from .video_request import JobSpec, VideoRequest, error_line, resolve
from .warm import WARMUP_PROMPT, WarmPipeline
from .worker import JobWorker, _one_line, _Stop

CLAIM_CHECK_SECONDS = 0.1  # a long poll on a job queued here looks this often whether another server took it
SHARED_POLL_SECONDS = 0.05  # a long poll on another server's job: one stat of its record this often
ORPHAN_CHECK_SECONDS = 1.0  # ... and a full read (which notices a dead owner) at least this often
log = logging.getLogger("flowblend.serve")


class ServiceError(FlowblendError):
    """A refusal with its HTTP status (400 bad input, 404, 409, 429 queue full, 503 not ready / draining)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class VideoService:
    """`VideoService(config).start()`, then `submit / get / cancel / delete / wait` from any thread or event loop."""

    def __init__(self, config: ServeConfig, pipeline: WarmPipeline | None = None):
        self.config, self.family = config, get_family(config.pair)
        self.default_spec = self.check_config(config)
        self.store = JobStore(config.results_dir)
        self.worker = JobWorker(config, self.family, self.store, pipeline, self.default_spec)
        self.recovered = self.store.recover()
        self._state, self.stage, self.error = "loading", "starting", None
        self._state_changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @staticmethod
    def check_config(config: ServeConfig) -> JobSpec:
        """The request defaults by the CLI's rules and a writable results dir: one line, before anything loads."""
        spec = resolve(VideoRequest(prompt=WARMUP_PROMPT), config, get_family(config.pair))
        check_access(config.host, config.api_key, tuple(config.allowed_hosts))
        check_writable(Path(config.results_dir))
        return spec

    @property
    def pipeline(self) -> WarmPipeline | None:
        return self.worker.pipeline

    @property
    def metrics(self) -> ServeMetrics:
        return self.worker.metrics

    @property
    def state(self) -> str:
        """loading | ready | unavailable (the worker cannot take jobs: `error` says why) | failed | draining | stopped"""
        return "unavailable" if self._state == "ready" and self.worker.fault else self._state

    @property
    def reason(self) -> str | None:
        return self.worker.fault if self.state == "unavailable" else self.error

    # -- life cycle ---------------------------------------------------------------------------
    def start(self, wait: bool = False) -> "VideoService":
        """Load and warm up on the worker thread (or reuse a loaded pipeline), then serve the queue."""
        self._thread = threading.Thread(target=self._work, name="flowblend-worker", daemon=True)
        self._thread.start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        with self._state_changed:
            self._state_changed.wait_for(lambda: self._state != "loading", timeout)
        if self._state == "failed":
            raise FlowblendError(self.error)

    def _set_state(self, state: str, error: str | None = None, only_from: str | None = None) -> None:
        with self._state_changed:
            if only_from is None or self._state == only_from:
                self._state, self.error = state, error
            self._state_changed.notify_all()

    def _load(self) -> None:
        def stage(text: str) -> None:
            self.stage = text

        w = self.worker
        if w.pipeline is None:
            w.pipeline = WarmPipeline(self.config, self.family)
            w.pipeline.load(self.default_spec, stage, warm_up=False)
        else:
            w.pipeline.warm_keys.add(self.default_spec.shape_key())
        stage(w.pipeline.warm_up_stage)
        start = time.perf_counter()
        w.warm_up()
        w.pipeline.load_seconds["warmup"] = round(time.perf_counter() - start, 3)

    def _work(self) -> None:
        try:
            self._load()
        except Exception as exc:  # noqa: BLE001 - reported by /health and the CLI as one line
            self._set_state("failed", _one_line(exc))
            return
        self.stage = "ready"
        self._set_state("ready", only_from="loading")
        self.metrics.ready.set(1)
        self.worker.run_loop(lambda: self._state == "ready")

    def begin_drain(self, reason: str = "the server is shutting down") -> None:
        """Refuse new jobs; fail every queued job as retryable now (persisted), let the running one go on."""
        with self._state_changed:
            if self._state in ("draining", "stopped"):
                return
            self._state = "draining"
        for job_id in self.worker.take_queued():
            record = self.worker.local(job_id)
            try:
                claimed = self.store.queue.claim(job_id)
            except OSError:
                claimed = True  # its folder is gone or unwritable: nobody else can take it either
            if claimed and record is not None:
                self.worker.finish(record, FAILED, f"{reason} before the job started; submit it again",
                                    retryable=True)
            else:
                self.worker.forget(job_id)  # another server took it and runs it

    def drain(self, timeout: float | None = None) -> bool:
        """begin_drain, wait up to `timeout` (default drain_seconds) for the running job, then stop it.

        Returns True if the running job (if any) finished on its own. The worker thread ends.
        """
        self.begin_drain()
        timeout = self.config.drain_seconds if timeout is None else timeout
        finished = self.worker.stop(_Stop(FAILED, f"the server shut down while the job ran (drain limit {timeout:g} "
                                                  "s); submit it again", retryable=True), timeout)
        if self._thread is not None:
            self._thread.join(timeout + 5.0)  # a job stops at its next step; a load in progress is abandoned
        self._set_state("stopped", self.error)
        self.store.close()
        return finished

    # -- requests -----------------------------------------------------------------------------
    def submit(self, body: VideoRequest, remixed_from: str | None = None) -> JobRecord:
        """Check and enqueue; ServiceError(400/429/503) when refused."""
        if self.state != "ready":
            reason = "the server is shutting down" if self.state in ("draining", "stopped") else \
                f"the server cannot take jobs: {self.reason}" if self.state == "unavailable" else \
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
        record = JobRecord(new_job_id(), spec.to_dict(), self.store.owner, pair=self.family.name,
                           steps=len(spec.plan), models=list(spec.plan.models), remixed_from=remixed_from)
        record.body = body.model_dump(exclude_none=True)
        try:
            accepted = self.worker.enqueue(record, spec)
        except OSError as exc:  # a full or read-only results dir: nothing half-made is left, health says why
            shutil.rmtree(self.store.folder(record.id), ignore_errors=True)
            self.worker.check_results_dir()
            raise ServiceError(503, f"the job could not be saved ({exc.strerror or exc}); retry later",
                               self.config.retry_after_seconds) from None
        if not accepted:
            self.metrics.rejected.labels("queue_full").inc()
            raise ServiceError(429, f"the queue is full ({self.config.queue_size} jobs waiting); retry later",
                               self.config.retry_after_seconds)
        return record

    def remix(self, job_id: str, prompt: str) -> JobRecord:
        """A new job with `job_id`'s request and a new prompt (OpenAI's remix)."""
        source = self.get(job_id)
        body = source.body
        if body is None:
            raise ServiceError(409, f"job {job_id} was made by an older server that kept no request to remix")
        try:
            request = VideoRequest.model_validate({**body, "prompt": prompt})
        except ValidationError as exc:
            raise ServiceError(400, error_line(exc.errors())) from None
        return self.submit(request, remixed_from=job_id)

    def get(self, job_id: str) -> JobRecord:
        record = self.worker.local(job_id) or self.store.load(job_id)
        if record is None or self.store.deleted(job_id):
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
            self.worker.dequeue(job_id)
            record = self.worker.local(job_id) or self.store.load(job_id)
            self.worker.finish(record, CANCELLED, "cancelled while queued")
        return self.get(job_id), dropped

    def delete(self, job_id: str) -> None:
        """Delete (OpenAI's DELETE): gone at once for every reader; a running job stops at its next step and its
        folder goes then (whoever runs it removes it)."""
        record = self.get(job_id)
        if record.status in ACTIVE and not (record.status == QUEUED and self.store.queue.claim(job_id)):
            self.store.mark_deleted(job_id)  # running (or just claimed): hidden now, removed when it stops
            self.store.request_cancel(job_id)
            return
        if record.status == QUEUED:
            self.worker.dequeue(job_id)
        self.worker.forget(job_id)
        self.store.remove(job_id)

    def cancel_requested(self, job_id: str) -> bool:
        return self.store.cancel_requested(job_id)

    def open_file(self, job_id: str, name: str | None = None) -> tuple[int, str]:
        """(descriptor, file name) of the completed job's video (or its file `name`: the thumbnail): only a regular
        file the server wrote in the job folder, no symbolic link followed (serve/records.py); 409 before it is
        completed, 404 if it is not there or not such a file. The caller closes the descriptor."""
        record = self.get(job_id)
        if record.status != COMPLETED:
            extra = f": {record.error}" if record.error else ""
            raise ServiceError(409, f"job {job_id} is {record.status}{extra}; its files exist once it is completed")
        fd = self.store.open_result(record, name)
        if fd is None:
            log.warning("flowblend serve: job %s: its file %r is not a regular file in its folder: not served",
                        job_id, name or record.video)
            raise ServiceError(404, f"job {job_id} has no such file: its result is missing or is not a file the "
                                    "server wrote")
        return fd, name or record.video

    async def wait(self, job_id: str, timeout: float) -> JobRecord:
        """The record once final or after `timeout` seconds (long poll without a thread per waiter)."""
        record = await asyncio.to_thread(self.get, job_id)
        deadline = time.monotonic() + timeout
        seen, read_at = self.store.stamp(job_id), time.monotonic()
        while record.status in ACTIVE and (left := deadline - time.monotonic()) > 0:
            loop = asyncio.get_running_loop()
            fut = loop.create_future()
            if self.worker.watch(job_id, loop, fut):  # queued or running here: the worker wakes us
                try:  # a job queued here may be taken by another server meanwhile: look again now and then
                    await asyncio.wait_for(fut, left if record.status == RUNNING else min(left, CLAIM_CHECK_SECONDS))
                except asyncio.TimeoutError:
                    self.worker.unwatch(job_id, fut)
                record = self.get(job_id)
            else:  # another server's: its record on the shared results dir, read when it changed
                await asyncio.sleep(min(SHARED_POLL_SECONDS, left))
                stamp = self.store.stamp(job_id)
                if stamp != seen or time.monotonic() - read_at >= ORPHAN_CHECK_SECONDS:
                    seen, read_at = stamp, time.monotonic()
                    record = await asyncio.to_thread(self.get, job_id)
        return record
