"""`flowblend serve`: the HTTP video API over a warm pipeline, on this machine or as a Ray Serve deployment."""
from __future__ import annotations

from flowblend.errors import FlowblendError
from flowblend.runtime.graph_modes import GRAPH_FLAGS

from .backends import BACKENDS
from .common import add_pair_args, add_plan_args, add_video_args

INSTALL_HINT = "install the extra: pip install 'flowblend[serve]'"


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve videos over HTTP from warm engines (OpenAI-style /v1/videos)",
                       description="Loads the pair and engines once, warms up, then serves POST /v1/videos, "
                                   "GET /v1/videos/{id}[/content], DELETE /v1/videos/{id}, /health and /metrics.")
    add_pair_args(p)
    add_plan_args(p)  # the default plan (warmed up at start) and steps of requests that name none
    add_video_args(p)  # the warm shape
    p.add_argument("--guidance", type=float, help="default CFG scale of requests (default: the family's)")
    p.add_argument("--backend", default="torch", choices=BACKENDS, help="engine backend (default torch)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16 (default fp32)")
    p.add_argument("--artifacts", default="artifacts",
                   help="engine store root; on shared storage, replicas build each engine once (default ./artifacts)")
    p.add_argument("--build-engines", action="store_true", help="build missing compiled engines at start")
    p.add_argument("--graph", default="none", choices=GRAPH_FLAGS,
                   help="CUDA graphs (--device cuda); with 'whole' a cancel takes effect when the loop ends")
    p.add_argument("--dynamic-shapes", action="store_true",
                   help="accept sizes other than the warm one (buffers are built on first use)")
    p.add_argument("--plans-dir", help="folder of calibrated plans (NAME.json): requests may name them")
    p.add_argument("--results-dir", default="results", help="where jobs and videos are written (default ./results)")
    p.add_argument("--queue-size", type=int, default=8, help="jobs that may wait; more get 429 (default 8)")
    p.add_argument("--max-steps", type=int, default=200, help="largest step count a request may ask (default 200)")
    p.add_argument("--drain-seconds", type=float, default=60.0,
                   help="on SIGTERM, how long the running job may take to finish (default 60)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default warning)")
    ray = p.add_argument_group("Ray Serve (pip install 'flowblend[ray]')")
    ray.add_argument("--ray", action="store_true", help="run as a Ray Serve deployment (one replica per GPU)")
    ray.add_argument("--replicas", type=int, default=1, help="replicas (fixed; see --min/--max-replicas)")
    ray.add_argument("--min-replicas", type=int, help="autoscaling lower bound (with --max-replicas)")
    ray.add_argument("--max-replicas", type=int, help="autoscaling upper bound")
    ray.add_argument("--target-ongoing-requests", type=float, default=2.0, help="autoscaling target per replica")
    ray.add_argument("--ray-address", help="an existing Ray cluster (default: start a local one)")
    ray.add_argument("--num-gpus", type=float, help="GPUs per replica (default 1 with --device cuda, else 0)")
    ray.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.set_defaults(func=run)


def config_from_args(args):
    from flowblend.serve.config import ServeConfig

    if args.queue_size < 1 or args.max_steps < 1 or args.drain_seconds < 0:
        raise FlowblendError("--queue-size and --max-steps must be >= 1 and --drain-seconds >= 0")
    return ServeConfig(pair=args.pair, large=args.large, small=args.small, allow_download=args.allow_download,
                       backend=args.backend, device=args.device, dtype=args.dtype, artifacts=args.artifacts,
                       build_engines=args.build_engines, graph=args.graph, plan=args.plan,
                       plan_file=args.plan_file, steps=args.steps,
                       frames=args.frames, height=args.height, width=args.width, guidance=args.guidance,
                       dynamic_shapes=args.dynamic_shapes, plans_dir=args.plans_dir, results_dir=args.results_dir,
                       queue_size=args.queue_size, max_steps=args.max_steps, drain_seconds=args.drain_seconds,
                       threads=args.threads)


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise FlowblendError(f"flowblend serve needs {exc.name}: {INSTALL_HINT}") from None
    if args.graph != "none" and not args.device.startswith("cuda"):
        raise FlowblendError(f"--graph {args.graph} captures CUDA graphs: pass --device cuda, or drop --graph")
    config = config_from_args(args)
    if args.ray:
        from flowblend.serve.ray_app import RayOptions, run_ray

        return run_ray(config, RayOptions(replicas=args.replicas, min_replicas=args.min_replicas,
                                          max_replicas=args.max_replicas,
                                          target_ongoing_requests=args.target_ongoing_requests,
                                          address=args.ray_address, num_gpus=args.num_gpus, num_cpus=args.num_cpus,
                                          host=args.host, port=args.port))
    from flowblend.serve.server import run_server

    return run_server(config, args.host, args.port, args.log_level)
