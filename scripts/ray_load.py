"""Ray Serve scale-out on this machine: throughput of 2 replicas vs 1, latency, and a replica killed mid-load.

    python scripts/ray_load.py [--requests 40] [--concurrency 4] [--steps 20] [--out docs/serve-ray-cpu]

Starts a local Ray cluster (no dashboard, 200 MB object store), deploys the toy pair's server as a
Ray Serve app on a free loopback port with 1 replica, runs the bounded load (every request's
outcome accounted: completed, failed with a reason, refused, lost, duplicated), redeploys with 2
replicas and runs it again, then runs it once more killing one replica's process (SIGKILL) after
a quarter of the requests and times Ray's replacement. CPU replicas, one torch thread each. The replicas
share one queue on the results directory (serve/shared_queue.py): an idle one runs jobs another accepted.
Each run also reports, from the jobs' own records, the jobs each replica ran and the mean queue wait.
Target (issue 17): throughput(2) / throughput(1) >= 1.6 on the 2-core machine; lost = duplicated = 0.
Writes <out>.json and <out>.md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import ray
from loadgen import replica_pids, run_load  # scripts/loadgen.py, beside this script
from ray import serve

from flowblend.bench.report import write_json_and_markdown
from flowblend.serve.config import ServeConfig
from flowblend.serve.ray_app import RayOptions, build_app
from flowblend.serve.server import bind_socket

QUIET_ENV = {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def deploy(config: ServeConfig, replicas: int) -> float:
    start = time.perf_counter()
    serve.run(build_app(config, RayOptions(replicas=replicas)), name="flowblend", route_prefix="/")
    return time.perf_counter() - start


def running_replicas() -> int:
    return serve.status().applications["flowblend"].deployments["flowblend"].replica_states.get("RUNNING", 0)


def job_records(results: Path, load, replicas: int | None) -> dict:
    """From the jobs' own records: how many each replica ran, how long jobs waited and ran, and (for a fixed
    number of replicas) the replica time left idle while a job waited."""
    records = []
    for o in load.outcomes:
        path = results / "jobs" / str(o.job_id) / "job.json"
        if o.job_id and path.is_file():
            records.append(json.loads(path.read_text()))
    done = [r for r in records if r["status"] == "completed"]
    by_owner: dict[str, int] = {}
    for r in done:
        by_owner[r["owner"]] = by_owner.get(r["owner"], 0) + 1
    waits = sorted(r["timings"]["queue_seconds"] for r in done)
    work = [r["timings"]["generate_seconds"] + r["timings"]["encode_seconds"] for r in done]
    return {"jobs_per_replica": sorted(by_owner.values(), reverse=True),
            "queue_seconds_mean": round(sum(waits) / len(waits), 3) if waits else None,
            "worker_seconds_mean": round(sum(work) / len(work), 3) if work else None,
            "idle_while_waiting_seconds": idle_while_waiting(done, replicas) if replicas else None}


def idle_while_waiting(records: list[dict], replicas: int) -> float | None:
    """Replica-seconds in which a replica was idle while a job waited in a queue (0 for a work-conserving
    system; a random split of jobs over replicas with their own queues wastes a lot): the integral over time
    of min(jobs queued, replicas not running a job), from the jobs' created/started/finished times."""
    if not records:
        return None
    events = sorted({t for r in records for t in (r["created_at"], r["started_at"], r["finished_at"])})
    waste = 0.0
    for t0, t1 in zip(events, events[1:]):
        mid = (t0 + t1) / 2
        queued = sum(1 for r in records if r["created_at"] <= mid < r["started_at"])
        running = sum(1 for r in records if r["started_at"] <= mid < r["finished_at"])
        waste += min(queued, max(0, replicas - running)) * (t1 - t0)
    return round(waste, 3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--fault", action=argparse.BooleanOptionalAction, default=True,
                    help="the third run, with a replica killed mid-load (--no-fault: throughput runs only)")
    ap.add_argument("--out", default="docs/serve-ray-cpu", help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    body = {"prompt": "a red circle moving left"}
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    ray.init(num_cpus=max(4, os.cpu_count() or 1), object_store_memory=200 * 2**20, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": QUIET_ENV}, _node_ip_address="127.0.0.1")
    report = {"command": " ".join(["scripts/ray_load.py", *sys.argv[1:]]), "cores": os.cpu_count(),
              "requests": args.requests, "concurrency": args.concurrency, "steps": args.steps, "runs": {}}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        with tempfile.TemporaryDirectory() as tmp:
            config = ServeConfig(results_dir=str(Path(tmp) / "results"), steps=args.steps, threads=1,
                                 queue_size=args.requests)
            for replicas in (1, 2):
                deploy_seconds = deploy(config, replicas)
                load = run_load(url, args.requests, args.concurrency, body)
                report["runs"][f"{replicas}_replicas"] = {**load.summary(), "deploy_seconds": round(deploy_seconds, 2),
                                                          **job_records(Path(config.results_dir), load, replicas)}
                print(replicas, "replica(s):", report["runs"][f"{replicas}_replicas"], flush=True)
            if args.fault:
                before = replica_pids(url, 2)
                victim = sorted(before)[0]
                killed_at: list[float] = []

                def kill(progress) -> None:
                    if len(progress.outcomes) >= args.requests // 4 and not killed_at:
                        killed_at.append(time.monotonic())
                        os.kill(victim, signal.SIGKILL)

                replaced_at: list[float] = []

                def watch() -> None:
                    while not replaced_at:
                        pids = replica_pids(url, 2, attempts=20) if killed_at else set()
                        if killed_at and running_replicas() == 2 and len(pids) == 2 and victim not in pids:
                            replaced_at.append(time.monotonic())
                        time.sleep(0.5)

                watcher = threading.Thread(target=watch, daemon=True)
                watcher.start()
                fault = run_load(url, args.requests, args.concurrency, body, on_progress=kill)
                watcher.join(timeout=180)
                report["runs"]["fault_2_replicas"] = {
                    **fault.summary(), **job_records(Path(config.results_dir), fault, None),
                    "killed_pid": victim,
                    "replaced_after_seconds": round(replaced_at[0] - killed_at[0], 2) if replaced_at else None,
                    "not_completed": [{"index": o.index, "status": o.status, "detail": o.detail}
                                      for o in fault.outcomes if o.status != "completed"]}
                print("fault:", report["runs"]["fault_2_replicas"], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    return finish(report, args)


def finish(report: dict, args) -> int:
    one, two = report["runs"]["1_replicas"], report["runs"]["2_replicas"]
    report["throughput_ratio"] = round(two["throughput_per_s"] / one["throughput_per_s"], 3) \
        if one["throughput_per_s"] and two["throughput_per_s"] else None
    write_json_and_markdown(args.out, report, render(report))
    print(render(report))
    return 0


def render(r: dict) -> str:
    rows = ["| run | completed | failed | refused | lost | duplicated | throughput (jobs/s) | p50 (s) | p95 (s) | "
            "jobs per replica | mean queue wait (s) | mean worker time (s) | replica idle while a job waited (s) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, s in r["runs"].items():
        rows.append(f"| {name.replace('_', ' ')} | {s['completed']} | {s['failed']} | {s['refused']} | {s['lost']} | "
                    f"{s['duplicated']} | {s['throughput_per_s']} | {s['p50_seconds']} | {s['p95_seconds']} | "
                    f"{' / '.join(map(str, s.get('jobs_per_replica', [])))} | {s.get('queue_seconds_mean')} | "
                    f"{s.get('worker_seconds_mean')} | {s.get('idle_while_waiting_seconds')} |")
    fault = r["runs"].get("fault_2_replicas")
    ratio = r.get("throughput_ratio")
    return "\n".join([
        "# flowblend serve on Ray Serve (toy pair, CPU replicas)", "",
        f"Command: `python {r['command']}`; {r['requests']} requests from {r['concurrency']} concurrent clients, "
        f"{r['steps']} steps, one torch thread per replica, {r['cores']} cores, loopback only.", "", *rows, "",
        f"Throughput, 2 replicas / 1: {ratio} (target >= 1.6: {'met' if ratio and ratio >= 1.6 else 'not met'}).",
        f"Fault run: replica pid {fault['killed_pid']} killed after a quarter of the requests; Ray had 2 replicas "
        f"running again after {fault['replaced_after_seconds']} s." if fault else "No fault run (--no-fault).", ""])


if __name__ == "__main__":
    sys.exit(main())
