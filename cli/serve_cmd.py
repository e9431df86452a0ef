"""`flowblend serve`: the HTTP video API over a warm pipeline, on this machine or as a Ray Serve deployment."""
from __future__ import annotations

import os

from flowblend.errors import FlowblendError

from ..runtime.graph_modes import check_graph_flag
from .common import choices_of, subscribe

API_KEY_ENV = "FLOWBLEND_API_KEY"
INSTALL_HINT = "install the extra: pip install 'flowblend[serve]'"


def register(p) -> None:
    p.description = ("Loads the pair and engines once, warms up, then serves POST /v1/videos, "
                     "GET /v1/videos/{id}[/content], DELETE /v1/videos/{id}, /health and /metrics. The shared flags "
                     "set the warm configuration and the defaults of requests that leave a value out.")
    subscribe(p, "pair", "plan", "video", "guidance", "experts", "solver", "engine", "graph", "threads")
    r = p.add_argument_group("backend")
    r.add_argument("--build-engines", action="store_true",
                   help="build missing onnxruntime/tensorrt engines at start into --artifacts (on shared storage, "
                        "replicas build each once)")
    s = p.add_argument_group("serving")
    s.add_argument("--dynamic-shapes", action="store_true",
                   help="accept sizes other than the warm one (their buffers are built on first use)")
    s.add_argument("--plans-dir", help="folder of calibrated plans (NAME.json): requests may name them")
    s.add_argument("--results-dir", default="results", help="where job records and videos are written")
    s.add_argument("--queue-size", type=int, default=8, help="jobs that may wait; more get 429")
    s.add_argument("--max-steps", type=int, default=200, help="largest step count a request may ask for")
    s.add_argument("--drain-seconds", type=float, default=60.0,
                   help="on SIGTERM, how long the running job may take to finish")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on")
    s.add_argument("--port", type=int, default=8000, help="port to listen on")
    s.add_argument("--log-level", default="warning", help="uvicorn's log level")
    a = p.add_argument_group("access")
    a.add_argument("--api-key", default=os.environ.get(API_KEY_ENV),
                   help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}; required off loopback)")
    a.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                   help="a Host name clients use beyond loopback and --host (repeat; '*' allows any)")
    a.add_argument("--api-docs", action="store_true", help="serve /docs and /openapi.json")
    a.add_argument("--max-body-bytes", type=int, default=1 << 20, help="larger request bodies get 413 unread")
    a.add_argument("--header-timeout", type=float, default=10.0, metavar="S",
                   help="seconds a client may take to send a request's headers (then 408 and closed)")
    a.add_argument("--body-timeout", type=float, default=30.0, metavar="S",
                   help="seconds a request's body may take to arrive in all (then 408 and closed)")
    ray = p.add_argument_group("Ray Serve (pip install 'flowblend[ray]')")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (one replica per GPU)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (a fixed count; or --min/--max-replicas)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling lower bound (default 1 when autoscaling)")
    ray.add_argument("--max-replicas", type=int, help="autoscaling upper bound (default: --replicas)")
    ray.add_argument("--target-ongoing-requests", type=float, default=2.0, help="autoscaling target per replica")
    ray.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    ray.add_argument("--num-gpus", type=float, help="GPUs per replica (default: 1 with --device cuda, else 0)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs Ray reserves per replica")
    p.set_defaults(func=run)


def config_from_args(args):
    from ..serve.config import ServeConfig

    if args.queue_size < 1 or args.max_steps < 1 or args.drain_seconds < 0 or args.max_body_bytes < 1024:
        raise FlowblendError("--queue-size and --max-steps must be >= 1, --drain-seconds >= 0 and --max-body-bytes "
                             ">= 1024")
    if not (args.header_timeout > 0 and args.body_timeout > 0):
        raise FlowblendError("--header-timeout and --body-timeout must be > 0 seconds (the defaults: 10 and 30)")
    from ..assembly import EngineChoice

    return ServeConfig(pair=args.pair, large=args.large, small=args.small, allow_download=args.allow_download,
                       engine=EngineChoice.of(args), blend=choices_of(args),  # every declared setting, as parsed
                       build_engines=args.build_engines, graph=args.graph,
                       dynamic_shapes=args.dynamic_shapes, plans_dir=args.plans_dir, results_dir=args.results_dir,
                       queue_size=args.queue_size, max_steps=args.max_steps, drain_seconds=args.drain_seconds,
                       threads=args.threads, host=args.host, api_key=args.api_key or None,
                       allowed_hosts=tuple(args.allowed_host), api_docs=args.api_docs,
                       max_body_bytes=args.max_body_bytes, header_timeout=args.header_timeout,
                       body_timeout=args.body_timeout)

def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise FlowblendError(f"flowblend serve needs {exc.name}: {INSTALL_HINT}") from None
    check_graph_flag(args.graph, args.device)
    config = config_from_args(args)
    if args.ray:
        from ..serve.ray_app import RayOptions, run_ray

        return run_ray(config, RayOptions(replicas=args.replicas, min_replicas=args.min_replicas,
                                          max_replicas=args.max_replicas,
                                          target_ongoing_requests=args.target_ongoing_requests,
                                          address=args.ray_address, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                                          host=args.host, port=args.port))
    from ..serve.server import run_server

    return run_server(config, args.host, args.port, args.log_level)
