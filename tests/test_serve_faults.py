"""`flowblend serve` as a real process: refusals at start (one line, exit 2, before loading), the SIGTERM
drain, and a crash (SIGKILL) whose queued and running jobs the next server reports failed, never lost.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_support import (
    LONG,
    QUIET_ENV,
    ThreadedServer,
    free_port,
    serve_process,
    toy_config,
    wait_final,
    wait_ready,
    wait_running,
    warm_toy_pipeline,
)

from flowblend.cli.main import main as cli_main
from flowblend.serve.server import bind_socket

PROMPT = "a green triangle moving up"


def _serve_cli(capsys, *args: str) -> tuple[int, str]:
    """`flowblend serve ...` through the CLI's entry point, in this process (the refusals come before any server)."""
    code = cli_main(["serve", "--host", "127.0.0.1", *args])
    return code, capsys.readouterr().err


def _one_line_refusal(done: tuple[int, str], *words: str) -> None:
    code, err = done
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flowblend serve: error:"), err
    for word in words:
        assert word in lines[0], lines[0]


def test_results_dir_that_cannot_be_written_refuses_to_start(tmp_path, capsys, monkeypatch):
    from flowblend.serve.warm import WarmPipeline

    loads = []
    monkeypatch.setattr(WarmPipeline, "load", lambda self, *a, **k: loads.append(a))  # no time bound: a record
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    done = _serve_cli(capsys, "--results-dir", str(blocker / "results"), "--port", str(free_port()))
    _one_line_refusal(done, "results directory", "not writable", "--results-dir")
    assert loads == [], "refused only after the pair loaded"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the file case above covers it")
def test_read_only_results_dir_refuses_to_start(tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    results.chmod(0o500)
    try:
        _one_line_refusal(_serve_cli(capsys, "--results-dir", str(results), "--port", str(free_port())), "not writable")
    finally:
        results.chmod(0o700)


def test_port_in_use_refuses_to_start(tmp_path, capsys):
    taken = bind_socket("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        done = _serve_cli(capsys, "--results-dir", str(tmp_path / "r"), "--port", str(port))
        _one_line_refusal(done, f"port {port}", "in use", "--port")
    finally:
        taken.close()


def test_bad_default_plan_refuses_to_start(tmp_path, capsys):
    done = _serve_cli(capsys, "--results-dir", str(tmp_path / "r"), "--port", str(free_port()), "--plan", "LQL")
    _one_line_refusal(done, "LQL")


def test_sigterm_drains_running_finishes_queued_persisted_failed(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = serve_process(tmp_path / "results", port, "--drain-seconds", "120")
    try:
        wait_ready(url, proc)
        client = httpx.Client(base_url=url, timeout=30)
        running = client.post("/v1/videos", json={"prompt": PROMPT, "steps": 80}).json()  # seconds of work
        queued = [client.post("/v1/videos", json={"prompt": PROMPT, "seed": i}).json() for i in range(2)]
        assert wait_running(client, running["id"])["status"] == "in_progress"
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30  # the drain starts on a thread of its own: no fixed sleep on a loaded CPU
        while client.get("/health").json()["status"] != "draining" and time.monotonic() < deadline:
            time.sleep(0.05)
        refused = client.post("/v1/videos", json={"prompt": PROMPT})
        assert refused.status_code == 503 and "shutting down" in refused.json()["error"]["message"]
        for job in queued:
            record = client.get(f"/v1/videos/{job['id']}", params={"wait": 10}).json()
            assert record["status"] == "failed" and record["retryable"] and "submit it again" in record["error"]["message"]
        proc.wait(timeout=120)
        assert proc.returncode == 0, proc.stderr.read()
        assert "drained" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # what the drain left on disk, read by the next server
    again = ThreadedServer(toy_config(tmp_path / "results"))
    try:
        assert wait_final(again.client, running["id"])["status"] == "completed"
        assert again.client.get(f"/v1/videos/{running['id']}/content").status_code == 200
        for job in queued:
            assert again.client.get(f"/v1/videos/{job['id']}").json()["status"] == "failed"
    finally:
        again.stop()


CRASHING_OWNER = """
import sys, time
from flowblend.serve.jobs import COMPLETED, QUEUED, RUNNING, JobRecord, JobStore, new_job_id
store = JobStore(sys.argv[1])
ids = []
for status, step in ((COMPLETED, 4), (RUNNING, 3), (QUEUED, 0)):
    record = JobRecord(new_job_id(), {"prompt": "p", "seed": len(ids)}, store.owner, status=status, step=step, steps=4)
    store.create(record)
    if status == COMPLETED:
        (store.folder(record.id) / "video.mp4").write_bytes(b"not really a video")
        record.video = "video.mp4"
        store.save(record)
    ids.append(record.id)
print(" ".join(ids), flush=True)
time.sleep(600)
"""


def test_a_crash_leaves_no_job_silently_lost(tmp_path):
    """A process holding jobs dies without a word (SIGKILL): the next server reports its queued and running
    jobs failed (retryable, with the reason) and still serves what it finished. The dying process writes
    its records with the same JobStore the server's worker uses, without loading a model (seconds, not a
    minute); the worker writing those records is covered by tests/test_serve_api.py."""
    results = tmp_path / "results"
    owner = subprocess.Popen([sys.executable, "-c", CRASHING_OWNER, str(results)], stdout=subprocess.PIPE, text=True,
                             env={**os.environ, **QUIET_ENV})
    try:
        finished, running, queued = owner.stdout.readline().split()
        live = ThreadedServer(toy_config(results))  # while the owner lives, its jobs are its own
        try:
            assert live.client.get(f"/v1/videos/{running}").json()["status"] == "in_progress"
            assert live.service.recovered == []
        finally:
            live.stop()
    finally:
        owner.kill()  # SIGKILL: no drain, no goodbye
        owner.wait()
    restarted = ThreadedServer(toy_config(results))
    try:
        assert sorted(restarted.service.recovered) == sorted([running, queued])
        r = restarted.client.get(f"/v1/videos/{running}").json()
        assert r["status"] == "failed" and r["retryable"] and "stopped at step 3 of 4" in r["error"]["message"], r
        q = restarted.client.get(f"/v1/videos/{queued}").json()
        assert q["status"] == "failed" and q["retryable"] and "before it started" in q["error"]["message"], q
        assert restarted.client.get(f"/v1/videos/{finished}").json()["status"] == "completed"
        assert restarted.client.get(f"/v1/videos/{finished}/content").content == b"not really a video"
        assert not list(results.rglob("*.partial*"))
    finally:
        restarted.stop()


def test_a_drain_stops_a_job_that_overruns_its_limit_at_a_step_boundary(tmp_path):
    from flowblend.serve.service import ServiceError, VideoService
    from flowblend.serve.video_request import VideoRequest

    service = VideoService(toy_config(tmp_path), warm_toy_pipeline()).start(wait=True)
    running = service.submit(VideoRequest(prompt=PROMPT, steps=LONG))
    queued = service.submit(VideoRequest(prompt=PROMPT))
    deadline = time.monotonic() + 60
    while service.get(running.id).step < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert service.drain(timeout=0.2) is False
    r = service.store.load(running.id)
    assert r.status == "failed" and r.retryable and "drain limit" in r.error and 1 <= r.step < LONG, r
    q = service.store.load(queued.id)
    assert q.status == "failed" and q.retryable and "before the job started" in q.error, q
    with pytest.raises(ServiceError) as refused:
        service.submit(VideoRequest(prompt=PROMPT))
    assert refused.value.status == 503 and "shutting down" in str(refused.value)
