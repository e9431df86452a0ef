"""Helpers for the server tests: loopback servers started and stopped by the test, one shared warm toy pipeline.

Every server listens on 127.0.0.1 on a port the OS picked; nothing is sent anywhere else.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import uvicorn

from flowblend.families import get_family
from flowblend.serve.app import create_app
from flowblend.serve.config import ServeConfig
from flowblend.serve.server import bind_socket, uvicorn_config
from flowblend.serve.service import VideoService
from flowblend.serve.warm import WarmPipeline

ROOT = Path(__file__).resolve().parents[1]
QUIET_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
SHORT = 4  # steps of the quick test jobs
LONG = 150  # steps of an open-ended job: on the shared toy pipelines it never ends by itself (see open_ended)
HELD_STEP = 1  # the step boundary an open-ended job stays at (its record says step HELD_STEP + 1 meanwhile)


def toy_config(results_dir, **changes) -> ServeConfig:
    return ServeConfig.from_settings({"pair": "toy", "results_dir": str(results_dir), "steps": SHORT, "threads": 1,
                                      "queue_size": 2, "max_steps": 400, "drain_seconds": 30.0, **changes})


def open_ended(generate):
    """`WarmPipeline.generate` whose jobs of LONG steps never end by themselves: at step boundary HELD_STEP the
    worker's `on_step` runs again and again (it raises to end the job: a cancel, a drain's stop, a progress save
    that fails) until it raises. A test acting on a running job then races nothing on a loaded machine; before,
    150 real toy steps had to outlast whatever the test did."""
    def generate_open_ended(spec, on_step=None):
        if on_step is None or len(spec.plan) != LONG:
            return generate(spec, on_step)

        def held(i: int) -> None:
            on_step(i)
            while i == HELD_STEP:  # left only by on_step raising
                time.sleep(0.01)  # a poll interval, not a bound: nothing here ends by time
                on_step(i)
        return generate(spec, held)
    return generate_open_ended


@functools.lru_cache(maxsize=2)
def warm_toy_pipeline(copy: int = 0) -> WarmPipeline:
    """The toy pair loaded and warmed up once per test process (what `flowblend serve` does at start); `copy=1`
    is a second one, for a second server that works at the same time (a pipeline runs one request at a time).
    Its jobs of LONG steps are open-ended (open_ended): they end only when cancelled or stopped."""
    config = toy_config("unused")
    pipeline = WarmPipeline(config, get_family("toy"))
    pipeline.load(VideoService.check_config(toy_config(os.environ.get("TMPDIR", "/tmp"))))
    pipeline.generate = open_ended(pipeline.generate)
    return pipeline


class ThreadedServer:
    """A VideoService behind uvicorn on a free loopback port, in a thread; `stop()` shuts both down.

    `load=True`: the service loads and warms up its own pipeline from `config`, as `flowblend serve` does."""

    def __init__(self, config: ServeConfig, pipeline: WarmPipeline | None = None, load: bool = False):
        self.service = VideoService(config, None if load else pipeline or warm_toy_pipeline()).start(wait=True)
        sock = bind_socket("127.0.0.1", 0)
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn_config(create_app(self.service), config))  # what `flowblend serve` runs
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.server.started, "uvicorn did not start"
        self.client = httpx.Client(base_url=self.url, timeout=60)

    def stop(self) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(30)
        self.service.drain(timeout=0)
        assert not self.thread.is_alive()


def wait_final(client: httpx.Client, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/v1/videos/{job_id}", params={"wait": 10}).json()
        if record["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return record


def wait_running(client: httpx.Client, job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = client.get(f"/v1/videos/{job_id}").json()
        if record["status"] != "queued" and record["step"] >= 1 or time.monotonic() > deadline:
            return record
        time.sleep(0.02)


def serve_process(results_dir, port: int, *extra: str) -> subprocess.Popen:
    """`flowblend serve` as a child process on 127.0.0.1:port (stdout/stderr piped)."""
    cmd = [sys.executable, "-m", "flowblend.cli.main", "serve", "--results-dir", str(results_dir), "--host",
           "127.0.0.1", "--port", str(port), "--threads", "1", "--steps", str(SHORT), "--max-steps", "400", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **QUIET_ENV}, cwd=ROOT)


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}: {proc.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def free_port() -> int:
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    return port
