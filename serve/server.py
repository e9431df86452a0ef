"""`flowblend serve` on one machine: uvicorn over the app, with a drain on SIGTERM/SIGINT.

Start-up order, cheapest check first, so that a bad setting costs milliseconds and one line: the
request defaults (the CLI's rules), the results directory (writable?), the port (free? the socket
is bound here and handed to uvicorn, so nothing can take it in between), and only then the pair
and engines, loaded on the worker thread while `/health` answers 503 "loading".
"""
from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import time

import uvicorn

from flowblend.errors import FlowblendError

from .app import create_app
from .config import ServeConfig
from .deadline import deadline_protocol
from .service import VideoService


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or FlowblendError in one line (port in use, address not local)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as exc:
        sock.close()
        if exc.errno in (98, 48, 10048):  # EADDRINUSE on Linux, macOS, Windows
            raise FlowblendError(f"port {port} on {host} is in use: stop the other server or pass --port") from None
        raise FlowblendError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pass another --host/--port") \
            from None
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app, config: ServeConfig, log_level: str = "warning") -> uvicorn.Config:
    """uvicorn's settings for the app: a deadline on request headers (config.header_timeout, serve/deadline.py;
    bodies: serve/guard.py), idle kept-alive connections closed after uvicorn's 5 s, a 5 s graceful shutdown."""
    return uvicorn.Config(app, log_level=log_level, lifespan="off", timeout_graceful_shutdown=5,
                          timeout_keep_alive=5, http=deadline_protocol(config.header_timeout),
                          h11_max_incomplete_event_size=64 * 1024)


class DrainingServer(uvicorn.Server):
    """uvicorn, except that the first SIGTERM/SIGINT drains the service before the server stops.

    A second signal stops at once (uvicorn's force exit); the process then exits normally (status 0)
    instead of re-raising the signal, since the drain already did what the signal asked for.
    """

    def __init__(self, config: uvicorn.Config, service: VideoService):
        super().__init__(config)
        self.service = service
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        if self._draining:
            self.force_exit = self.should_exit = True
            return
        self._draining = True
        threading.Thread(target=self._drain_then_exit, name="flowblend-drain", daemon=True).start()

    def _drain_then_exit(self) -> None:
        """Drain, then stop uvicorn whatever the drain met (a full disk must not keep the process alive)."""
        try:
            finished = self.service.drain()
            print(f"flowblend serve: drained ({'the running job finished' if finished else 'running job stopped'}; "
                  "queued jobs persisted as failed, retryable)", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - one line, then exit as asked
            print(f"flowblend serve: drained with an error: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        finally:
            self.should_exit = True


def run_server(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit status (2 if the pipeline failed to load)."""
    config = dataclasses.replace(config, host=host)  # the Host allow-list and the key rule follow the address
    service = VideoService(config)  # checks the defaults, access and the results dir before anything loads
    try:
        sock = bind_socket(host, port)
    except FlowblendError:
        service.store.close()
        raise
    server = DrainingServer(uvicorn_config(create_app(service), config, log_level), service)
    if service.recovered:
        print(f"flowblend serve: {len(service.recovered)} job(s) of a previous run were queued or running when it "
              "stopped; reported failed (retryable)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    service.start()
    failure: list[str] = []

    def report_ready() -> None:
        try:
            service.wait_ready()
        except FlowblendError as exc:
            failure.append(str(exc))
            server.should_exit = True
            return
        if service.state == "ready":
            print(f"flowblend serve: ready on http://{host}:{sock.getsockname()[1]} ({config.pair} pair, "
                  f"{config.engine.backend} on {config.engine.device}, {time.perf_counter() - start:.1f} s to load and warm up); "
                  f"results in {service.store.root}", flush=True)

    threading.Thread(target=report_ready, name="flowblend-ready", daemon=True).start()
    server.run(sockets=[sock])
    if not server._draining:
        service.drain(timeout=0)
    if failure:
        raise FlowblendError(f"the pipeline failed to load: {failure[0]}")
    return 0
