"""What the server adds to a request, measured side by side with the pipeline called in-process (toy pair).

    python scripts/serve_latency.py [--requests 10] [--steps 20] [--out docs/serve-cpu]

Starts `flowblend serve` as a child process on a free loopback port, then alternates, request by
request, a call of the same warm pipeline in this process (generate + write the video, what the
server's worker does) and the same request through the server (POST /v1/videos, long-poll
GET /v1/videos/{id}?wait= until completed), one torch thread on both sides. Targets (issue 17):
  - added time per request: median(server) / median(in-process) - 1 <= 5%;
  - the first request after the server reports ready within 10% of the tenth (nothing lazy).
Writes <out>.json and <out>.md; prints the summary.
"""
from __future__ import annotations

import argparse
import json
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

from flowblend.export.pairs import get_family
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


def wait_ready(client: httpx.Client, proc: subprocess.Popen) -> float:
    start = time.perf_counter()
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=10, help="requests each way (>= 10 for the first/tenth figure)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", default="docs/serve-cpu", help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    port_sock = bind_socket("127.0.0.1", 0)
    port = port_sock.getsockname()[1]
    port_sock.close()
    with tempfile.TemporaryDirectory() as tmp:
        proc = start_server(Path(tmp) / "results", args.steps, port)
        try:
            client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120)
            config = ServeConfig(steps=args.steps, threads=1, results_dir=str(Path(tmp) / "unused"))
            family = get_family(config.pair)
            spec = resolve(VideoRequest(prompt=PROMPT), config, family)
            pipeline = WarmPipeline(config, family)
            pipeline.load(spec)  # while the server loads too: both warm before the first timed request
            ready_after = wait_ready(client, proc)
            server, inproc, records = [], [], []
            for i in range(args.requests):
                seconds, record = through_server(client, seed=i)  # the server's first request comes first
                server.append(seconds)
                records.append(record)
                start = time.perf_counter()
                video = pipeline.generate(resolve(VideoRequest(prompt=PROMPT, seed=i), config, family))
                save_video(video, Path(tmp) / f"inproc-{i}.mp4")
                inproc.append(time.perf_counter() - start)
        finally:
            proc.terminate()
            proc.wait(60)
    med_server, med_inproc = statistics.median(server), statistics.median(inproc)
    worker = [r["timings"]["generate_seconds"] + r["timings"]["encode_seconds"] for r in records]
    report = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": 1, "load_average_end": os.getloadavg()},
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "steps": args.steps, "requests": args.requests, "server_ready_seconds": round(ready_after, 2),
        "server_seconds": [round(s, 4) for s in server], "inprocess_seconds": [round(s, 4) for s in inproc],
        "server_worker_seconds": [round(s, 4) for s in worker],
        "median_server": round(med_server, 4), "median_inprocess": round(med_inproc, 4),
        "added_fraction": round(med_server / med_inproc - 1, 4),
        "added_ms_median": round(1000 * statistics.median(s - w for s, w in zip(server, worker)), 2),
        "first_over_tenth": round(server[0] / server[9], 4) if len(server) >= 10 else None,
    }
    report["targets"] = {"added <= 5%": report["added_fraction"] <= 0.05,
                         "first within 10% of tenth": report["first_over_tenth"] is not None
                         and abs(report["first_over_tenth"] - 1) <= 0.10}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(render(report))
    print(render(report))
    return 0


def render(r: dict) -> str:
    first = f"{r['first_over_tenth']:.3f}" if r["first_over_tenth"] is not None else "n/a (fewer than 10 requests)"
    return "\n".join([
        "# flowblend serve: added latency (toy pair, CPU)", "",
        f"Command: `python {r['command']}`; {r['requests']} requests each way, {r['steps']} steps, one torch thread, "
        f"{r['machine']['cores']} cores, load average at the end {r['machine']['load_average_end'][0]:.2f}.", "",
        "| measure | value | target |", "|---|---|---|",
        f"| median in-process (pipeline + video write) | {r['median_inprocess']:.4f} s | |",
        f"| median through the server (POST to completed) | {r['median_server']:.4f} s | |",
        f"| added time per request | {100 * r['added_fraction']:+.2f}% ({r['added_ms_median']:.1f} ms over the "
        f"worker's own time) | <= 5% ({'met' if r['targets']['added <= 5%'] else 'not met'}) |",
        f"| first request after ready / tenth | {first} | within 10% "
        f"({'met' if r['targets']['first within 10% of tenth'] else 'not met'}) |",
        f"| server start to ready (load + warm-up) | {r['server_ready_seconds']:.1f} s | |", ""])


if __name__ == "__main__":
    sys.exit(main())
