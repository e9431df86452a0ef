"""What the server adds to a request, measured side by side with the pipeline called in-process (toy pair).

    python scripts/serve_latency.py [--starts 3] [--requests 10] [--steps 20] [--out docs/serve-cpu]

Starts `flowblend serve` as a child process on a free loopback port `--starts` times (a fresh results
directory each time), and after each start alternates, request by request, the same request through
the server (POST /v1/videos, long-poll GET /v1/videos/{id}?wait= until completed) and a call of the
same warm pipeline in this process (generate + write the video, what the server's worker does), one
torch thread on both sides. Targets (issue 17):
  - added time per request: median(server) / median(in-process) - 1 <= 5% (all starts' requests);
  - the first request after the server reports ready within 10% of the tenth (nothing lazy): each start's
    first/tenth and their median (the target's figure: one request against one is noisy on a shared
    machine, so several starts), with each start's first / median of its others beside it.
Writes <out>.json and <out>.md; prints the summary.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from flowblend.bench.report import write_json_and_markdown
from flowblend.families import get_family
from flowblend.runtime.video import save_video
from flowblend.serve.config import ServeConfig
from flowblend.serve.server import bind_socket
from flowblend.serve.video_request import VideoRequest, resolve
from flowblend.serve.warm import WarmPipeline

PROMPT = "a red circle moving left"


def start_server(results: Path, steps: int, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "flowblend.cli.main", "serve", "--results-dir", str(results), "--port", str(port),
           "--host", "127.0.0.1", "--threads", "1", "--steps", str(steps)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_ready(client: httpx.Client, proc: subprocess.Popen, start: float) -> float:
    """Seconds from `start` (the server process's launch) until /health answers ready."""
    while True:
        if proc.poll() is not None:
            sys.exit(f"server exited: {proc.stderr.read()}")
        try:
            if client.get("/health").status_code == 200:
                return time.perf_counter() - start
        except httpx.TransportError:
            pass
        time.sleep(0.05)


def through_server(client: httpx.Client, seed: int) -> tuple[float, dict]:
    start = time.perf_counter()
    job = client.post("/v1/videos", json={"prompt": PROMPT, "seed": seed}).json()
    record = job
    while record["status"] not in ("completed", "failed", "cancelled"):
        record = client.get(f"/v1/videos/{job['id']}", params={"wait": 30}).json()
    seconds = time.perf_counter() - start
    if record["status"] != "completed":
        sys.exit(f"job failed: {record}")
    return seconds, record


def one_start(results: Path, port: int, args, pipeline: WarmPipeline | None, config, family, tmp: Path):
    """Start a server, time `args.requests` requests through it and in-process (alternating), stop it."""
    launched = time.perf_counter()
    proc = start_server(results, args.steps, port)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
        if pipeline is None:  # loads while the server loads: both warm before the first timed request
            pipeline = WarmPipeline(config, family)
            pipeline.load(resolve(VideoRequest(prompt=PROMPT), config, family))
        ready_after = wait_ready(client, proc, launched)
        server, inproc, records = [], [], []
        for i in range(args.requests):
            seconds, record = through_server(client, seed=i)  # the server's first request comes first
            server.append(seconds)
            records.append(record)
            start = time.perf_counter()
            video = pipeline.generate(resolve(VideoRequest(prompt=PROMPT, seed=i), config, family))
            save_video(video, tmp / f"inproc-{i}.mp4")
            inproc.append(time.perf_counter() - start)
        client.close()
    finally:
        proc.terminate()
        proc.wait(60)
    worker = [r["timings"]["generate_seconds"] + r["timings"]["encode_seconds"] for r in records]
    run = {"server_ready_seconds": round(ready_after, 2), "server_seconds": [round(x, 4) for x in server],
           "inprocess_seconds": [round(x, 4) for x in inproc], "server_worker_seconds": [round(x, 4) for x in worker],
           "first_over_tenth": round(server[0] / server[9], 4) if len(server) >= 10 else None,
           "first_over_median_of_others": round(server[0] / statistics.median(server[1:]), 4)
           if len(server) >= 2 else None}
    return run, pipeline


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--starts", type=int, default=3, help="server starts (each: its first request and the rest)")
    ap.add_argument("--requests", type=int, default=10, help="requests each way per start (>= 10 for first/tenth)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="docs/serve-cpu", help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    port_sock = bind_socket("127.0.0.1", 0)
    port = port_sock.getsockname()[1]
    port_sock.close()
    runs, pipeline = [], None
    with tempfile.TemporaryDirectory() as tmp:
        config = ServeConfig(steps=args.steps, threads=1, results_dir=str(Path(tmp) / "unused"))
        family = get_family(config.pair)
        for k in range(args.starts):
            run, pipeline = one_start(Path(tmp) / f"results-{k}", port, args, pipeline, config, family, Path(tmp))
            runs.append(run)
            print(f"start {k + 1}: first/tenth {run['first_over_tenth']}, first/median of others "
                  f"{run['first_over_median_of_others']}", flush=True)
    server = [x for r in runs for x in r["server_seconds"]]
    inproc = [x for r in runs for x in r["inprocess_seconds"]]
    worker = [x for r in runs for x in r["server_worker_seconds"]]
    med_server, med_inproc = statistics.median(server), statistics.median(inproc)
    ratios = [r["first_over_tenth"] for r in runs if r["first_over_tenth"] is not None]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": 1, "load_average_end": os.getloadavg()},
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "steps": args.steps, "requests": args.requests, "starts": args.starts, "runs": runs,
        "median_server": round(med_server, 4), "median_inprocess": round(med_inproc, 4),
        "added_fraction": round(med_server / med_inproc - 1, 4),
        "added_ms_median": round(1000 * statistics.median(s - w for s, w in zip(server, worker)), 2),
        "first_over_tenth": round(statistics.median(ratios), 4) if ratios else None,
        "first_over_median_of_others": round(statistics.median(r["first_over_median_of_others"] for r in runs), 4)
        if all(r["first_over_median_of_others"] is not None for r in runs) else None,
        "server_ready_seconds": round(statistics.median(r["server_ready_seconds"] for r in runs), 2),
    }
    report["targets"] = {"added <= 5%": report["added_fraction"] <= 0.05,
                         "first within 10% of tenth": report["first_over_tenth"] is not None
                         and abs(report["first_over_tenth"] - 1) <= 0.10}
    write_json_and_markdown(args.out, report, render(report))
    print(render(report))
    return 0


def render(r: dict) -> str:
    def ratio(x) -> str:
        return f"{x:.3f}" if x is not None else "n/a (fewer than 10 requests)"

    per_start = ", ".join(ratio(run["first_over_tenth"]) for run in r["runs"])
    others = ", ".join(ratio(run["first_over_median_of_others"]) for run in r["runs"])
    return "\n".join([
        "# flowblend serve: added latency (toy pair, CPU)", "",
        f"Command: `python {r['command']}`; {r['starts']} server start(s), {r['requests']} requests each way after "
        f"each, {r['steps']} steps, one torch thread, {r['machine']['cores']} cores, load average at the end "
        f"{r['machine']['load_average_end'][0]:.2f}.", "",
        "| measure | value | target |", "|---|---|---|",
        f"| median in-process (pipeline + video write) | {r['median_inprocess']:.4f} s | |",
        f"| median through the server (POST to completed) | {r['median_server']:.4f} s | |",
        f"| added time per request | {100 * r['added_fraction']:+.2f}% ({r['added_ms_median']:.1f} ms over the "
        f"worker's own time) | <= 5% ({'met' if r['targets']['added <= 5%'] else 'not met'}) |",
        f"| first request after ready / tenth, median of {r['starts']} start(s) | {ratio(r['first_over_tenth'])} "
        f"(each start: {per_start}) | within 10% "
        f"({'met' if r['targets']['first within 10% of tenth'] else 'not met'}) |",
        f"| first request / median of the others, each start | {others} | |",
        f"| server process launch to ready (imports, load, warm-up), median | {r['server_ready_seconds']:.1f} s | |", ""])


if __name__ == "__main__":
    sys.exit(main())
