"""A bounded load test against a running server: N requests from C concurrent clients, every outcome accounted.

A client, not part of the server: used by scripts/ray_load.py and tests/test_serve_ray.py (which loads it from
scripts/). Each request carries its index as the seed, so a result that answers another request (a duplicate) is caught by reading the job's own record;
an accepted job that never reaches a final state is "lost". POSTs are never retried (a retry could
create a second job); status polls are (GET is idempotent, and may land on another replica).
"""
from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

import httpx

FINAL = ("completed", "failed", "cancelled")


@dataclass
class Outcome:
    index: int
    status: str  # completed | failed | cancelled | refused (HTTP error on POST) | lost
    job_id: str | None = None
    seconds: float = 0.0
    detail: str = ""


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    wall_seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def duplicated(self) -> int:
        ids = [o.job_id for o in self.outcomes if o.job_id]
        return len(ids) - len(set(ids)) + sum(1 for o in self.outcomes if o.detail.startswith("duplicate"))

    def latency(self, q: float) -> float | None:
        done = sorted(o.seconds for o in self.outcomes if o.status == "completed")
        if not done:
            return None
        return round(done[min(len(done) - 1, int(round(q * (len(done) - 1))))], 4)

    def summary(self) -> dict:
        done = [o.seconds for o in self.outcomes if o.status == "completed"]
        return {"requests": len(self.outcomes), "completed": self.count("completed"), "failed": self.count("failed"),
                "cancelled": self.count("cancelled"), "refused": self.count("refused"), "lost": self.count("lost"),
                "duplicated": self.duplicated, "wall_seconds": round(self.wall_seconds, 3),
                "throughput_per_s": round(len(done) / self.wall_seconds, 4) if self.wall_seconds else None,
                "p50_seconds": self.latency(0.5), "p95_seconds": self.latency(0.95),
                "mean_seconds": round(statistics.fmean(done), 4) if done else None}


def _poll(client: httpx.Client, job_id: str, deadline: float) -> dict | None:
    while time.monotonic() < deadline:
        try:
            r = client.get(f"/v1/videos/{job_id}", params={"wait": min(10.0, max(0.1, deadline - time.monotonic()))})
        except httpx.TransportError:
            time.sleep(0.2)
            continue
        if r.status_code == 200:
            record = r.json()
            if record["status"] in FINAL:
                return record
        elif r.status_code == 404:
            return None
        else:
            time.sleep(0.2)
    return None


def one_request(client: httpx.Client, index: int, body: dict, timeout: float) -> Outcome:
    start = time.monotonic()
    try:
        r = client.post("/v1/videos", json={**body, "seed": index})
    except httpx.TransportError as exc:
        return Outcome(index, "refused", detail=f"POST failed: {type(exc).__name__}")
    if r.status_code != 202:
        return Outcome(index, "refused", detail=f"POST {r.status_code}: {r.text[:200]}")
    job_id = r.json()["id"]
    record = _poll(client, job_id, start + timeout)
    seconds = time.monotonic() - start
    if record is None:
        return Outcome(index, "lost", job_id, seconds, "no final state before the deadline")
    if record["request"]["seed"] != index:
        return Outcome(index, record["status"], job_id, seconds, f"duplicate: the record answers seed "
                                                                  f"{record['request']['seed']}")
    detail = (record.get("error") or {}).get("message", "")
    if record["status"] == "completed":
        content = client.get(f"/v1/videos/{job_id}/content")
        if content.status_code != 200 or not content.content:
            return Outcome(index, "lost", job_id, seconds, f"completed but content {content.status_code}")
    return Outcome(index, record["status"], job_id, seconds, detail)


def run_load(url: str, requests: int, concurrency: int, body: dict, timeout: float = 300.0,
             on_progress=None) -> LoadReport:
    """`requests` jobs from `concurrency` client threads, each submitting and waiting for one job at a time."""
    report = LoadReport()
    lock = threading.Lock()
    next_index = iter(range(requests))

    def client_loop() -> None:
        with httpx.Client(base_url=url, timeout=60) as client:
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    return
                outcome = one_request(client, index, body, timeout)
                with lock:
                    report.outcomes.append(outcome)
                    if on_progress is not None:
                        on_progress(report)

    start = time.monotonic()
    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.wall_seconds = time.monotonic() - start
    report.outcomes.sort(key=lambda o: o.index)
    return report


def replica_pids(url: str, expect: int, attempts: int = 60) -> set[int]:
    """Process ids of the replicas behind `url`, as their /health reports them (Ray routes each probe to one)."""
    pids: set[int] = set()
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(attempts):
            try:
                r = client.get("/health")
            except httpx.TransportError:
                continue
            if r.status_code == 200:
                pids.add(r.json()["pid"])
            if len(pids) >= expect:
                break
    return pids
