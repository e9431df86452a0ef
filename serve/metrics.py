"""Prometheus metrics of one server (or one Ray replica): queue depth, jobs by state, per-model step latency.

Each server has its own registry (not the process-global one), so two servers in one process (tests)
never share counters; `GET /metrics` renders it in the Prometheus text format.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
JOB_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 900.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The counters a worker updates; names follow Prometheus conventions (base units, _total)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ready = Gauge("flowblend_ready", "1 once the warm pipeline has served its warm-up request", registry=r)
        self.queue_depth = Gauge("flowblend_queue_depth", "jobs waiting for the worker", registry=r)
        self.active = Gauge("flowblend_jobs_active", "jobs queued or running, by state", ["state"], registry=r)
        self.finished = Counter("flowblend_jobs_finished_total", "jobs that reached a final state, by state",
                                ["state"], registry=r)
        self.rejected = Counter("flowblend_requests_rejected_total", "requests refused, by reason", ["reason"],
                                registry=r)
        self.step_seconds = Histogram("flowblend_step_seconds", "one denoising step (engine, CFG, solver), by model",
                                      ["model"], buckets=STEP_BUCKETS, registry=r)
        self.job_seconds = Histogram("flowblend_job_seconds", "a job from start to written video",
                                     buckets=JOB_BUCKETS, registry=r)
        self.queue_seconds = Histogram("flowblend_queue_wait_seconds", "a job's wait in the queue",
                                       buckets=JOB_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
