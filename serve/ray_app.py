"""The same app as a Ray Serve deployment: one replica per GPU, Ray's routing and autoscaling.

Each replica is a whole `flowblend serve` (warm pipeline, worker, queue) behind `@serve.ingress`;
Ray's proxy spreads requests over replicas. Job state lives on the shared results directory
(serve/jobs.py), so any replica answers `GET/DELETE /v1/videos/{id}` for a job another replica
runs: nothing has to route an id to its replica, and a replica that dies leaves records that the
next reader reports failed (retryable). The replicas also share one queue there (serve/shared_queue.py):
a POST returns 202 at once, so Ray's routing cannot see which replica is free; an idle replica takes
the oldest job queued at a busy one instead. Engines come from the engine store under `artifacts`
(on shared storage with `--build-engines`: built once per GPU type under the store's lock, then
loaded by every replica of that type).

    flowblend serve --ray --replicas 2 --results-dir /shared/results
    serve run docs/serve-ray.yaml            # the same, from a Ray Serve config file
"""
from __future__ import annotations

import json
import signal
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from ray import serve

from flowblend.errors import FlowblendError

from .app import create_app
from .config import ServeConfig
from .service import VideoService

REPLICA_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}  # replicas share cores: no busy-waiting


@dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: Ray Serve autoscaling instead of a fixed count
    max_replicas: int | None = None
    target_ongoing_requests: float = 2.0
    address: str | None = None  # an existing cluster; None starts a local one
    num_gpus: float | None = None  # per replica; None: 1 on CUDA, 0 on CPU
    num_cpus: float = 1.0
    host: str = "127.0.0.1"
    port: int = 8000
    object_store_mb: int = 200  # a local cluster's object store: videos never pass through it


@serve.deployment(name="flowblend")
@serve.ingress()
class FlowblendReplica:
    """One replica: loads and warms up in its constructor, so Ray routes to it only once it is ready."""

    def __init__(self, config: dict):
        self.service = VideoService(ServeConfig.from_settings(config)).start(wait=True)

    def __serve_build_asgi_app__(self):
        return create_app(self.service)

    def check_health(self) -> None:
        """Ray's health probe: a replica whose worker failed is replaced."""
        if self.service.state not in ("ready", "draining"):
            raise RuntimeError(f"flowblend replica is {self.service.state}: {self.service.reason or self.service.stage}")

    def __del__(self):
        """Ray's graceful shutdown: drain (queued jobs persisted as failed-retryable)."""
        self.service.drain()


def absolute_paths(config: ServeConfig) -> ServeConfig:
    """Replicas may start in another working directory: pin every path."""
    plan = config.blend.plan_file
    return replace(config, results_dir=str(Path(config.results_dir).resolve()),
                   engine=replace(config.engine, artifacts=str(Path(config.engine.artifacts).resolve())),
                   plans_dir=str(Path(config.plans_dir).resolve()) if config.plans_dir else None,
                   blend=replace(config.blend, plan_file=str(Path(plan).resolve()) if plan else None))


def deployment_options(config: ServeConfig, opts: RayOptions) -> dict:
    """Ray Serve deployment options: resources per replica, replica count or autoscaling, drain time."""
    gpus = opts.num_gpus if opts.num_gpus is not None else (1 if config.engine.device.startswith("cuda") else 0)
    env = dict(REPLICA_ENV)
    if config.threads:
        env["OMP_NUM_THREADS"] = str(config.threads)
    out = {"ray_actor_options": {"num_cpus": opts.num_cpus, "num_gpus": gpus, "runtime_env": {"env_vars": env}},
           # long polls (GET ?wait=) hold a slot each; the server's own queue bounds the work
           "max_ongoing_requests": 64 + config.queue_size,
           "graceful_shutdown_timeout_s": config.drain_seconds + 5.0,
           "health_check_period_s": 2.0}
    if opts.min_replicas is not None or opts.max_replicas is not None:
        low = opts.min_replicas if opts.min_replicas is not None else 1
        high = opts.max_replicas if opts.max_replicas is not None else max(low, opts.replicas)
        if not 0 <= low <= high:
            raise FlowblendError(f"--min-replicas {low} must be <= --max-replicas {high}")
        out["autoscaling_config"] = {"min_replicas": low, "max_replicas": high,
                                     "target_ongoing_requests": opts.target_ongoing_requests}
    else:
        if opts.replicas < 1:
            raise FlowblendError(f"--replicas must be >= 1, got {opts.replicas}")
        out["num_replicas"] = opts.replicas
    return out


def build_app(config: ServeConfig, opts: RayOptions = RayOptions()):
    """The Ray Serve application (pass it to `serve.run`)."""
    config = absolute_paths(config)
    VideoService.check_config(config)  # one line for a bad setting here, not a failed replica later
    return FlowblendReplica.options(**deployment_options(config, opts)).bind(config.to_dict())


def build(args: dict):
    """Application builder for `serve run flowblend.serve.ray_app:build key=value ...` or a config file's
    `import_path`: ServeConfig fields plus RayOptions' replicas / min_replicas / max_replicas / num_gpus."""
    ray_fields = {"replicas", "min_replicas", "max_replicas", "target_ongoing_requests", "num_gpus", "num_cpus"}
    values = {k: _typed(v) for k, v in args.items()}
    # ServeConfig's own keys and every EngineChoice / BlendChoices setting, flat or nested; others refused there
    config = ServeConfig.from_settings({k: v for k, v in values.items() if k not in ray_fields})
    opts = RayOptions(**{k: v for k, v in values.items() if k in ray_fields})
    return build_app(config, opts)


def _typed(value):
    """`serve run ... steps=4` passes strings; a config file passes YAML's types. JSON reads the former."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def start_ray(opts: RayOptions) -> None:
    """Connect to `opts.address`, or start a small local cluster (no dashboard, a small object store)."""
    import ray

    if ray.is_initialized():
        return
    if opts.address:
        ray.init(address=opts.address)
    else:
        ray.init(object_store_memory=opts.object_store_mb * 2**20, include_dashboard=False,
                 _node_ip_address="127.0.0.1")  # a local cluster talks over loopback only


def run_ray(config: ServeConfig, opts: RayOptions) -> int:
    """`flowblend serve --ray`: deploy, print where, serve until SIGTERM/SIGINT, then shut the deployment down."""
    app = build_app(config, opts)
    start_ray(opts)
    serve.start(http_options={"host": opts.host, "port": opts.port})
    serve.run(app, name="flowblend", route_prefix="/")
    print(f"flowblend serve: ready on http://{opts.host}:{opts.port} (Ray Serve, "
          f"{opts.replicas if opts.max_replicas is None else f'{opts.min_replicas}-{opts.max_replicas}'} replica(s)); "
          f"results in {absolute_paths(config).results_dir}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    serve.shutdown()  # replicas drain (FlowblendReplica.__del__) within graceful_shutdown_timeout_s
    if not opts.address:
        import ray

        ray.shutdown()
    return 0

