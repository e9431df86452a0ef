"""Servers sharing one results directory share one queue (serve/shared_queue.py): an idle server runs the jobs
waiting at a busy one, every job runs exactly once, cancels respect claims, long polls follow a job to the
server that took it, and a dead server's queued jobs are reported failed, never run.

Two servers in this process (uvicorn on free loopback ports, each its own warm toy pipeline) stand for two
Ray Serve replicas; the contract is the module docstrings' of serve/shared_queue.py and serve/service.py.
References: the set of job ids created, step counts read back from both servers' /metrics, record owners.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from serve_support import (
    LONG,
    QUIET_ENV,
    SHORT,
    ThreadedServer,
    toy_config,
    wait_final,
    wait_running,
    warm_toy_pipeline,
)

from flowblend.serve.jobs import QUEUED, JobRecord, JobStore, new_job_id

PROMPT = "a green triangle moving up"


@pytest.fixture
def pair(tmp_path):
    """Two servers on one results directory, as two replicas are."""
    results = tmp_path / "results"
    a = ThreadedServer(toy_config(results, queue_size=16), pipeline=warm_toy_pipeline(0))
    b = ThreadedServer(toy_config(results, queue_size=16), pipeline=warm_toy_pipeline(1))
    yield a, b
    for s in (a, b):
        for job in s.service.store.list():
            if job.status in ("queued", "in_progress"):
                s.client.post(f"/v1/videos/{job.id}/cancel")
    b.stop()
    a.stop()


def owner(server) -> str:
    return server.service.store.owner


def busy_and_idle(a, b, steps: int = LONG):
    """Make one server busy with a long job; returns (busy, idle, the long job's id)."""
    job = a.client.post("/v1/videos", json={"prompt": PROMPT, "steps": steps}).json()
    running = wait_running(a.client, job["id"])
    assert running["status"] == "in_progress", running
    return (a, b, job["id"]) if running["owner"] == owner(a) else (b, a, job["id"])


def steps_run(server) -> float:
    return sum(s.value for fam in text_string_to_metric_families(server.client.get("/metrics").text)
               for s in fam.samples if s.name == "flowblend_step_seconds_count")


def finished(server, state: str) -> float:
    return sum(s.value for fam in text_string_to_metric_families(server.client.get("/metrics").text)
               for s in fam.samples if s.name == "flowblend_jobs_finished_total" and s.labels.get("state") == state)


def test_jobs_queued_at_a_busy_server_run_on_the_idle_one(pair):
    busy, idle, long_id = busy_and_idle(*pair)
    shorts = [busy.client.post("/v1/videos", json={"prompt": PROMPT, "seed": i}).json() for i in range(3)]
    assert all(j["owner"] == owner(busy) and j["status"] == "queued" for j in shorts)  # accepted by the busy one
    wait = 60
    for job in shorts:
        # a long poll on the server that accepted the job follows it to the server that took it
        record = busy.client.get(f"/v1/videos/{job['id']}", params={"wait": wait}).json()
        answered = time.time()
        assert record["status"] == "completed", record
        assert record["owner"] == owner(idle), "the idle server should have run the job queued at the busy one"
        # a poll that slept past the job's end answers at the end of its wait; one that followed it, within
        # SHARED_POLL_SECONDS plus the load of the machine: a third of the wait tells the two apart
        assert answered - record["finished_at"] < wait / 3, "the long poll slept past the job's end"
        assert busy.client.get(f"/v1/videos/{job['id']}/content").status_code == 200
    assert busy.client.get(f"/v1/videos/{long_id}").json()["status"] == "in_progress"  # nobody waited for it
    assert steps_run(idle) == 3 * SHORT
    metrics = {s.name: s.value for fam in text_string_to_metric_families(busy.client.get("/metrics").text)
               for s in fam.samples}
    assert metrics["flowblend_queue_depth"] == 0  # what was queued here and taken elsewhere is not counted here


def test_every_job_runs_exactly_once_on_two_servers(pair):
    import concurrent.futures as cf

    a, b = pair
    with cf.ThreadPoolExecutor(6) as pool:
        posted = list(pool.map(lambda i: (a, b)[i % 2].client.post("/v1/videos", json={"prompt": PROMPT, "seed": i}),
                               range(16)))
    assert [r.status_code for r in posted] == [202] * 16
    ids = [r.json()["id"] for r in posted]
    records = [wait_final(a.client, job_id) for job_id in ids]
    assert [r["status"] for r in records] == ["completed"] * 16, records
    assert [r["request"]["seed"] for r in records] == list(range(16))
    assert steps_run(a) + steps_run(b) == 16 * SHORT, "a job ran twice (or not at all)"
    assert {r["owner"] for r in records} <= {owner(a), owner(b)}
    assert not list((a.service.store.root / "queue").iterdir()), "queue index entries left behind"


RACER = """
import json, sys
from flowblend.serve.jobs import JobStore
store = JobStore(sys.argv[1])
by_name = sys.argv[2] == "entry"
sys.stdin.readline()  # all racers start together
mine = []
while entries := store.queue.entries():  # every racer walks the same list in the same order: head-on collisions
    for e in entries:
        if store.queue.claim(e.job_id, e if by_name else None):
            mine.append(e.job_id)
print(json.dumps(mine), flush=True)
"""


def test_claims_racing_in_several_processes_take_each_job_exactly_once(tmp_path):
    store = JobStore(tmp_path)
    ids = []
    for i in range(300):
        record = JobRecord(new_job_id(), {"seed": i}, store.owner)
        store.create(record)  # no resolved value: nobody runs these, the racers only claim them
        ids.append(record.id)
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path), ("entry", "id")[k % 2]],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={**os.environ, **QUIET_ENV})
              for k in range(6)]
    time.sleep(1.5)  # imports
    for r in racers:
        r.stdin.write("go\n")
        r.stdin.flush()
    claimed = [json.loads(r.communicate(timeout=60)[0]) for r in racers]
    flat = [job_id for mine in claimed for job_id in mine]
    assert sorted(flat) == sorted(ids), "each job must be claimed exactly once"
    assert store.queue.entries() == []
    winners = {job_id: store.queue.claimant(job_id) for job_id in ids}
    assert len(set(winners.values())) >= 1 and None not in winners.values()


def test_cancelling_a_job_another_server_took_stops_it_there(pair):
    busy, idle, long_id = busy_and_idle(*pair)
    taken = busy.client.post("/v1/videos", json={"prompt": PROMPT, "steps": LONG}).json()
    running = wait_running(busy.client, taken["id"])
    assert running["status"] == "in_progress" and running["owner"] == owner(idle), running
    r = busy.client.post(f"/v1/videos/{taken['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"] is True, r.text  # not dropped: it runs elsewhere
    assert busy.client.post(f"/v1/videos/{taken['id']}/cancel").status_code == 409
    done = wait_final(busy.client, taken["id"])
    assert done["job_status"] == "cancelled" and done["owner"] == owner(idle) and 1 <= done["step"] < LONG, done


def test_cancelling_a_queued_job_through_the_other_server_drops_it(pair):
    busy, other, first = busy_and_idle(*pair)
    second = other.client.post("/v1/videos", json={"prompt": PROMPT, "steps": LONG}).json()["id"]
    assert wait_running(other.client, second)["owner"] == owner(other)  # both busy now
    queued = busy.client.post("/v1/videos", json={"prompt": PROMPT, "seed": 9}).json()
    time.sleep(0.3)  # idle polls would have taken it by now
    assert busy.client.get(f"/v1/videos/{queued['id']}").json()["status"] == "queued"
    dropped = other.client.post(f"/v1/videos/{queued['id']}/cancel")
    assert dropped.status_code == 200 and dropped.json()["job_status"] == "cancelled", dropped.text
    index = [e.job_id for e in busy.service.store.queue.entries()]
    assert queued["id"] not in index, "a dropped job must leave the shared queue at once (nobody may claim it)"
    for job_id in (first, second):
        assert other.client.post(f"/v1/videos/{job_id}/cancel").status_code == 202
    for s in (busy, other):
        record = s.client.get(f"/v1/videos/{queued['id']}", params={"wait": 5}).json()
        assert record["job_status"] == "cancelled" and record["step"] == 0 and record["video"] is None, record
    for job_id in (first, second):
        assert wait_final(busy.client, job_id)["job_status"] == "cancelled"
    cancelled = busy.client.get(f"/v1/videos/{queued['id']}").json()
    time.sleep(0.5)  # both idle: nothing must pick the dropped job up (not even to cancel it again)
    assert busy.client.get(f"/v1/videos/{queued['id']}").json() == cancelled
    assert other.client.get(f"/v1/videos/{queued['id']}").json() == cancelled
    assert not (busy.service.store.folder(queued["id"]) / "video.mp4").exists()


OWNER = """
import sys, time
from flowblend.serve.config import ServeConfig
from flowblend.families import get_family
from flowblend.serve.jobs import JobRecord, JobStore, new_job_id
from flowblend.serve.video_request import VideoRequest, resolve
store = JobStore(sys.argv[1])
body = {"prompt": "a green triangle moving up", "seed": 7}
spec = resolve(VideoRequest(**body), ServeConfig.from_settings(__import__("json").loads(sys.argv[2])), get_family("toy"))
record = JobRecord(new_job_id(), spec.to_dict(), store.owner, steps=len(spec.plan), models=list(spec.plan.models))
store.create(record, spec)
print(record.id, flush=True)
time.sleep(600)
"""


def _queued_by_another_process(server, **settings) -> tuple[subprocess.Popen, str]:
    """A server process (as far as the results dir can tell, with `settings` changed in its config) that accepted
    one job and never runs it."""
    config = json.dumps({**server.service.config.to_dict(), **settings})
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(server.service.store.root), config],
                            stdout=subprocess.PIPE, text=True, env={**os.environ, **QUIET_ENV})
    return proc, proc.stdout.readline().strip()


def test_a_live_servers_queued_job_is_taken_but_a_dead_ones_is_failed(tmp_path):
    server = ThreadedServer(toy_config(tmp_path / "results"), pipeline=warm_toy_pipeline(0))
    live = dead = None
    try:
        live, live_job = _queued_by_another_process(server)
        done = wait_final(server.client, live_job)
        assert done["status"] == "completed" and done["owner"] == owner(server), done  # its owner lives: taken
        long = server.client.post("/v1/videos", json={"prompt": PROMPT, "steps": LONG}).json()
        wait_running(server.client, long["id"])  # busy: it cannot take the next one before its owner dies
        dead, dead_job = _queued_by_another_process(server)
        dead.send_signal(signal.SIGKILL)
        dead.wait()
        completed_before = finished(server, "completed")
        assert server.client.post(f"/v1/videos/{long['id']}/cancel").status_code == 202
        assert wait_final(server.client, long["id"])["job_status"] == "cancelled"
        time.sleep(0.5)  # idle: it looks at the shared queue several times
        record = server.client.get(f"/v1/videos/{dead_job}").json()
        assert record["status"] == "failed" and record["retryable"] and "before it started" in record["error"]["message"], record
        assert record["owner"] != owner(server) and record["step"] == 0
        assert finished(server, "completed") == completed_before and not (
            server.service.store.folder(dead_job) / "video.mp4").exists()
        assert not list((tmp_path / "results" / "queue").iterdir())
    finally:
        for proc in (live, dead):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        server.stop()


def test_queued_jobs_created_without_the_index_are_still_failed_when_their_owner_died(tmp_path):
    """Records written before the shared queue existed (no index entry) are reported as they always were."""
    results = tmp_path / "results"
    dead = JobStore(results, owner="12345-deadbeef")
    record = JobRecord(new_job_id(), {"prompt": "p"}, dead.owner, status=QUEUED, steps=4)
    dead.folder(record.id).mkdir()
    dead.save(record)  # no index entry
    dead.close()
    reader = JobStore(results)
    failed = reader.load(record.id)
    assert failed.status == "failed" and failed.retryable and "before it started" in failed.error


def test_a_job_submitted_while_the_idle_worker_lists_the_queue_is_not_lost(tmp_path, monkeypatch):
    """The idle worker lists the shared queue outside its lock; a job accepted meanwhile is not in that list and
    must not be taken for one another server took (a stand-in listing that takes 40 ms widens that window)."""
    from flowblend.serve.shared_queue import SharedQueue

    listing = SharedQueue.entries

    def slow_entries(self):
        found = listing(self)
        time.sleep(0.04)
        return found

    monkeypatch.setattr(SharedQueue, "entries", slow_entries)
    server = ThreadedServer(toy_config(tmp_path / "results", queue_size=16), pipeline=warm_toy_pipeline(0))
    try:
        outcomes = []
        for i in range(12):  # one at a time, each landing at another point of the idle worker's ~90 ms cycle
            time.sleep(0.01 * ((7 * i) % 12))
            job = server.client.post("/v1/videos", json={"prompt": PROMPT, "seed": i, "steps": 1}).json()
            outcomes.append(wait_final(server.client, job["id"])["status"])
        assert outcomes == ["completed"] * 12
    finally:
        server.stop()


def test_an_adopted_job_runs_the_value_its_owner_resolved_not_this_servers_defaults(tmp_path):
    """The owner's server makes SHORT + 3 steps by default; the idle one, SHORT. The job it adopts runs the owner's
    resolved request (SHORT + 3 steps, as its record says), loaded from the queue entry, never resolved again here
    (which would give SHORT steps: the code before compared the two and left such a job queued for good)."""
    server = ThreadedServer(toy_config(tmp_path / "results"), pipeline=warm_toy_pipeline(0))
    proc = None
    try:
        proc, job_id = _queued_by_another_process(server, steps=SHORT + 3)
        done = wait_final(server.client, job_id)
        assert done["status"] == "completed" and done["owner"] == owner(server), done
        assert done["step"] == SHORT + 3 and len(done["request"]["plan"]["models"]) == SHORT + 3, done
        assert steps_run(server) == SHORT + 3
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()
        server.stop()


def test_a_queue_entry_holds_the_resolved_value_and_loads_only_for_its_pair(tmp_path):
    from flowblend.families import get_family
    from flowblend.serve.video_request import VideoRequest, resolve

    toy = get_family("toy")
    spec = resolve(VideoRequest(prompt=PROMPT, seed=3, steps=5, guidance=2.0), toy_config(tmp_path), toy)
    store = JobStore(tmp_path / "results")
    record = JobRecord(new_job_id(), spec.to_dict(), store.owner)
    store.create(record, spec)
    other = JobRecord(new_job_id(), {}, store.owner)
    store.create(other)  # queued without a value: only its owner runs it
    entries = {e.job_id: e for e in store.queue.entries()}
    loaded = store.queue.request(entries[record.id], toy)
    assert (loaded.request, loaded.options, loaded.experts) == (spec.request, spec.options, spec.experts)
    assert len(loaded.plan) == 5 and loaded.options.guidance_scale == 2.0
    assert json.loads((store.queue.dir / entries[record.id].name).read_text())["seed"] == 3
    assert store.queue.request(entries[record.id], get_family("wan")) is None  # another pair's job
    assert store.queue.request(entries[other.id], toy) is None
    (store.queue.dir / entries[record.id].name).write_text('{"prompt": "a request body, not a resolved value"}')
    assert store.queue.request(entries[record.id], toy) is None
    store.close()
