"""The server's core, HTTP-free: a bounded queue, one worker thread over the warm pipeline, job state.

One thread runs jobs one at a time (the pipeline's buffers serve one request at a time; a second
model copy would double memory for no gain on one device). The HTTP side only validates, enqueues
and reads records. Cancellation is checked at step boundaries through the sampler's `on_step`
hook; SIGTERM drains (`drain`): no new jobs, the running one may finish within `drain_seconds`,
queued ones are persisted as failed-retryable.
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from pathlib import Path

from flowblend.errors import FlowblendError
from flowblend.export.pairs import get_family
from flowblend.runtime.video import save_video

from .config import ServeConfig
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
from .video_request import JobSpec, VideoRequest, resolve
from .warm import WARMUP_PROMPT, WarmPipeline

PROGRESS_SAVE_SECONDS = 0.5  # how often a running job's progress reaches the results dir (other replicas)


class ServiceError(FlowblendError):
    """A refusal with its HTTP status (400 bad input, 404, 409, 429 queue full, 503 not ready / draining)."""

    def __init__(self, status: int, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.status, self.retry_after = status, retry_after


class _Stop(Exception):
    """Raised from `on_step` to end a running job at a step boundary."""

    def __init__(self, status: str, reason: str, retryable: bool):
        super().__init__(reason)
        self.status, self.reason, self.retryable = status, reason, retryable


class VideoService:
    """`VideoService(config).start()`, then `submit / get / cancel / wait` from any thread or event loop."""

    def __init__(self, config: ServeConfig, pipeline: WarmPipeline | None = None):
        self.config = config
        self.family = get_family(config.pair)
        self.default_spec = self.check_config(config)
        self.store = JobStore(config.results_dir)
        self.recovered = self.store.recover()
        self.metrics = ServeMetrics()
        self.pipeline = pipeline
        self.state, self.stage, self.error = "loading", "starting", None
        self._queue: deque[str] = deque()
        self._records: dict[str, JobRecord] = {}  # this process's queued and running jobs (fresh progress)
        self._specs: dict[str, JobSpec] = {}
        self._running: str | None = None
        self._stop_running: _Stop | None = None
        self._cond = threading.Condition()
        self._watchers: dict[str, list[tuple[asyncio.AbstractEventLoop, asyncio.Future]]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

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
            self.pipeline.load(self.default_spec, stage)
        else:
            self.pipeline.warm_keys.add(self.default_spec.shape_key())

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
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if self._closed and not self._queue:
                    return
                job_id = self._queue.popleft()
                self._running = job_id
                self._update_gauges()
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
            self._finish(self._records[job_id], FAILED, f"{reason} before the job started; submit it again",
                         retryable=True)

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
            d = self.default_spec
            raise ServiceError(400, f"{spec.width}x{spec.height}, {spec.frames} frames, guidance {spec.guidance:g} is "
                                    f"not a warm shape of this server (warm: {d.width}x{d.height}, {d.frames} frames, "
                                    f"CFG {'on' if d.cfg else 'off'}); restart it with that size or with "
                                    "--dynamic-shapes")
        record = JobRecord(new_job_id(), spec.to_dict(), self.store.owner, steps=len(spec.plan),
                           models=list(spec.plan.models))
        with self._cond:
            if len(self._queue) >= self.config.queue_size:
                self.metrics.rejected.labels("queue_full").inc()
                raise ServiceError(429, f"the queue is full ({self.config.queue_size} jobs waiting); retry later",
                                   self.config.retry_after_seconds)
            self.store.create(record)
            self._records[record.id], self._specs[record.id] = record, spec
            self._queue.append(record.id)
            self._update_gauges()
            self._cond.notify_all()
        return record

    def get(self, job_id: str) -> JobRecord:
        record = self._records.get(job_id) or self.store.load(job_id)
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
        with self._cond:
            queued_here = job_id in self._queue
            if queued_here:
                self._queue.remove(job_id)
                self._update_gauges()
        if queued_here:
            self._finish(record, CANCELLED, "cancelled while queued")
        return self.get(job_id), queued_here

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
        while record.status in ACTIVE and time.monotonic() < deadline:
            if job_id in self._records:  # ours: woken by the worker
                loop, fut = asyncio.get_running_loop(), asyncio.get_running_loop().create_future()
                with self._cond:
                    self._watchers.setdefault(job_id, []).append((loop, fut))
                    final = self._records.get(job_id) is None
                if not final:
                    try:
                        await asyncio.wait_for(fut, max(0.0, deadline - time.monotonic()))
                    except asyncio.TimeoutError:
                        pass
            else:  # another replica's: its record on the shared results dir
                await asyncio.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
            record = self.get(job_id)
        return record

    # -- the worker ---------------------------------------------------------------------------
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
        with self._cond:
            self._records.pop(record.id, None)
            self._specs.pop(record.id, None)
            watchers = self._watchers.pop(record.id, [])
            self._update_gauges()
        for loop, fut in watchers:
            loop.call_soon_threadsafe(lambda f=fut: f.done() or f.set_result(None))

    def _update_gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._queue))
        self.metrics.active.labels(QUEUED).set(len(self._queue))
        self.metrics.active.labels(RUNNING).set(1 if self._running else 0)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text and not isinstance(exc, FlowblendError) else \
        (text[0] if text else type(exc).__name__)

