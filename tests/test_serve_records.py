"""The server under attack through its results directory (issue 31): records with wrong field types or odd owners are
skipped with one log line (never a 500 of GET or of the listing, never a failed start), no file outside a job's
own result is served (symbolic links, a record's own path), the listing and GET agree after a disk fault (whose
error code says what happened), and /health probes an idle results directory that has turned read-only.

Servers listen on loopback only (tests/serve_support.py). The disk fault is injected by replacing the store's
save and the probe (deterministic, no root needed); the read-only case remounts a small tmpfs (root on Linux, as
CI runs; skipped elsewhere with that reason).
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import time

import httpx
import pytest
from serve_support import LONG, ThreadedServer, toy_config, wait_final, wait_running

PROMPT = "a yellow circle moving down"
DEAD_OWNER = "1-deadbeef"


def finished_job(server: ThreadedServer) -> dict:
    done = wait_final(server.client, server.client.post("/v1/videos", json={"prompt": PROMPT}).json()["id"])
    assert done["status"] == "completed", done
    return done


def plant(jobs, job_id: str, record: dict, **changes) -> None:
    (jobs / job_id).mkdir()
    (jobs / job_id / "job.json").write_text(json.dumps({**record, "id": job_id, **changes}))


def every_page(client: httpx.Client) -> list[str]:
    """The ids of the whole listing, one record a page (as the SDK's auto-pagination walks it)."""
    ids, after = [], None
    for _ in range(50):
        r = client.get("/v1/videos", params={"limit": 1, **({"after": after} if after else {})})
        assert r.status_code == 200, r.text
        page = r.json()
        ids += [v["id"] for v in page["data"]]
        if not page["has_more"]:
            return ids
        after = page["last_id"]
    raise AssertionError("the listing does not end")


def skip_lines(caplog, job_id: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if job_id in r.getMessage() and "not a job record" in r.getMessage()]


def test_records_with_wrong_field_types_are_skipped_with_one_log_line(tmp_path, caplog):
    results = tmp_path / "results"
    jobs = results / "jobs"
    server = ThreadedServer(toy_config(results))
    try:
        done = finished_job(server)
        record = json.loads((jobs / done["id"] / "job.json").read_text())
        bad = {"video_" + "a" * 32: {"steps": "x"}, "video_" + "b" * 32: {"request": []},
               "video_" + "c" * 32: {"created_at": "abc"}, "video_" + "e" * 32: {"status": "weird"},
               "video_" + "f" * 32: {"models": [1]}, "video_" + "0" * 32: {"retryable": "yes"}}
        for job_id, changes in bad.items():
            plant(jobs, job_id, record, **changes)
        with caplog.at_level(logging.WARNING, logger="flowblend.serve"):
            for job_id in bad:
                assert server.client.get(f"/v1/videos/{job_id}").status_code == 404
                assert server.client.get(f"/v1/videos/{job_id}/content").status_code == 404
            assert every_page(server.client) == [done["id"]]
            listed = server.client.get("/v1/videos")
            assert listed.status_code == 200 and [v["id"] for v in listed.json()["data"]] == [done["id"]]
        for job_id in bad:
            assert len(skip_lines(caplog, job_id)) == 1, skip_lines(caplog, job_id)
    finally:
        server.stop()
    restarted = ThreadedServer(toy_config(results))  # the start reads them too
    try:
        assert every_page(restarted.client) == [done["id"]]
    finally:
        restarted.stop()


def test_odd_owners_are_skipped_and_the_server_starts(tmp_path, caplog):
    results = tmp_path / "results"
    jobs = results / "jobs"
    first = ThreadedServer(toy_config(results))
    try:
        done = finished_job(first)
    finally:
        first.stop()
    record = json.loads((jobs / done["id"] / "job.json").read_text())
    odd = {"video_" + "a" * 32: "a\u0000b", "video_" + "b" * 32: "o" * 300, "video_" + "c" * 32: "../x",
           "video_" + "d" * 32: 7}
    for job_id, owner in odd.items():
        plant(jobs, job_id, record, status="queued", owner=owner, video=None)
    foreign = results / "queue" / f"{time.time_ns():020d}.{'q' * 150}.video_{'1' * 32}"
    foreign.write_text("null")  # a queue entry of no owner id: never adopted, never a crash
    with caplog.at_level(logging.WARNING, logger="flowblend.serve"):
        restarted = ThreadedServer(toy_config(results))  # today: "embedded null byte" / errno 36, no server
    try:
        assert every_page(restarted.client) == [done["id"]]
        for job_id in odd:
            assert restarted.client.get(f"/v1/videos/{job_id}").status_code == 404
            assert len(skip_lines(caplog, job_id)) == 1, skip_lines(caplog, job_id)
        again = restarted.client.post("/v1/videos", json={"prompt": PROMPT}).json()
        assert wait_final(restarted.client, again["id"])["status"] == "completed"
    finally:
        restarted.stop()


def test_no_file_outside_a_jobs_own_result_is_served(tmp_path):
    results = tmp_path / "results"
    jobs = results / "jobs"
    secret = tmp_path / "secret.txt"
    secret.write_bytes(b"the server must never send this")
    server = ThreadedServer(toy_config(results))
    client = server.client
    try:
        done, other = finished_job(server), finished_job(server)
        record = json.loads((jobs / done["id"] / "job.json").read_text())
        served = client.get(f"/v1/videos/{done['id']}/content")
        assert served.status_code == 200 and len(served.content) > 64
        video = record["video"]
        linked = jobs / other["id"] / video  # the video is a symbolic link out of the results dir
        linked.unlink()
        linked.symlink_to(secret)
        (jobs / other["id"] / "thumbnail.png").unlink()
        (jobs / other["id"] / "thumbnail.png").symlink_to(secret)
        outside = tmp_path / "outside"  # a job folder that is a symbolic link to a folder elsewhere
        shutil.copytree(jobs / done["id"], outside)
        (outside / video).unlink()
        (outside / video).symlink_to(secret)
        folder_id = "video_" + "a" * 32
        (outside / "job.json").write_text(json.dumps({**record, "id": folder_id}))
        (jobs / folder_id).symlink_to(outside, target_is_directory=True)
        dotted_id = "video_" + "b" * 32  # a record naming a path of its own
        plant(jobs, dotted_id, record, video=os.path.relpath(secret, jobs / dotted_id))
        for job_id in (other["id"], folder_id, dotted_id):
            for variant in ("video", "thumbnail"):
                r = client.get(f"/v1/videos/{job_id}/content", params={"variant": variant})
                assert secret.read_bytes() not in r.content and r.status_code in (404, 409), (job_id, variant, r)
        fifo = jobs / done["id"] / "thumbnail.png"  # not a regular file: refused, not waited on
        fifo.unlink()
        os.mkfifo(fifo)
        assert client.get(f"/v1/videos/{done['id']}/content", params={"variant": "thumbnail"},
                          timeout=10).status_code == 404
        assert client.get(f"/v1/videos/{done['id']}/content").content == served.content  # the real one still is
    finally:
        server.stop()


class FullDisk:
    """A results dir that cannot be written while `full`: the store's saves and the worker's probe fail ENOSPC."""

    def __init__(self, monkeypatch, server: ThreadedServer):
        import flowblend.serve.worker as worker_module

        self.full = False
        store, save, probe = server.service.store, server.service.store.save, worker_module.writable_error

        def failing_save(record):
            if self.full:
                raise OSError(errno.ENOSPC, "No space left on device")
            save(record)

        monkeypatch.setattr(store, "save", failing_save)
        monkeypatch.setattr(worker_module, "writable_error",
                            lambda root: OSError(errno.ENOSPC, "No space left on device") if self.full else probe(root))


def test_the_listing_and_get_agree_after_a_disk_fault(tmp_path, monkeypatch):
    results = tmp_path / "results"
    server = ThreadedServer(toy_config(results))
    client = server.client
    try:
        disk = FullDisk(monkeypatch, server)
        job = client.post("/v1/videos", json={"prompt": PROMPT, "steps": LONG}).json()
        assert wait_running(client, job["id"])["step"] >= 1
        disk.full = True
        got = wait_final(client, job["id"], timeout=60)
        assert got["status"] == "failed" and "could not be saved" in got["error"]["message"], got
        assert got["error"]["code"] == "results_write_failed", got["error"]  # today: server_stopped
        listed = {v["id"]: v for v in client.get("/v1/videos").json()["data"]}
        assert listed[job["id"]]["status"] == "failed" and listed[job["id"]]["error"] == got["error"], listed
        disk.full = False  # freed: the record that could not be saved is saved now
        deadline = time.monotonic() + 20
        while json.loads((results / "jobs" / job["id"] / "job.json").read_text())["status"] != "failed":
            assert time.monotonic() < deadline, "the failed record was never saved"
            time.sleep(0.05)
        listed = {v["id"]: v for v in client.get("/v1/videos").json()["data"]}
        assert listed[job["id"]]["status"] == "failed" and client.get("/health").status_code == 200
    finally:
        server.stop()


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "small-disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root on Linux): {done.stderr.strip()}")
    yield mount
    subprocess.run(["mount", "-o", "remount,rw", str(mount)], capture_output=True)
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_health_probes_an_idle_results_dir_that_turned_read_only(small_disk):
    server = ThreadedServer(toy_config(small_disk / "results"))
    client = server.client
    try:
        assert client.get("/health").status_code == 200
        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        deadline = time.monotonic() + 15  # no POST: health alone must find out
        while (r := client.get("/health")).status_code != 503:
            assert time.monotonic() < deadline, f"health still says {r.json()} on a read-only results dir"
            time.sleep(0.1)
        assert "Read-only file system" in r.json()["error"], r.json()
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        deadline = time.monotonic() + 15
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline, "health never came back"
            time.sleep(0.1)
    finally:
        subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], capture_output=True)
        server.stop()
