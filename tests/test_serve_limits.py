"""Limits and access, fed the inputs an attacker or a careless client sends: a 50 MB body, no or a wrong key, a
foreign Host header, /docs, guidance 1e308, a video that is not finite, 20,000 records, HEAD, `steps: true`,
"ünïcödé", size 99999x99999; plus the files a job leaves (modes, owner locks).
"""
from __future__ import annotations

import os
import socket
import threading
import time

import httpx
import pytest
import torch
from serve_support import LONG, ThreadedServer, toy_config, wait_final, wait_running

from flowblend.cli.main import main as cli_main
from flowblend.errors import FlowblendError
from flowblend.families import get_family
from flowblend.serve.jobs import FILE_MODE, STALE_LOCK_SECONDS, JobRecord
from flowblend.serve.video_request import VideoRequest, resolve

PROMPT = "a red square moving right"
KEY = "limits-key-5678"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ThreadedServer(toy_config(tmp_path_factory.mktemp("limits"), queue_size=4, max_body_bytes=64 * 1024))
    yield s
    s.stop()


@pytest.fixture
def client(server):
    return server.client


def one_line_400(r: httpx.Response, *words: str) -> str:
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def test_a_declared_big_body_gets_413_before_it_is_sent(server):
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {50 * 2**20}\r\n\r\n{{\"prompt\": ".encode())
        reply = sock.recv(4096)  # answered although 50 MB were announced and a few bytes sent: nothing was read
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
    assert b"limit of 65536 bytes" in reply


def test_a_chunked_big_body_is_cut_off_at_the_cap(client):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"x" * 1024  # no Content-Length: counted as it arrives
    r = client.post("/v1/videos", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of 65536 bytes" in r.json()["error"]["message"], r.text


def test_the_api_key_when_set(tmp_path):
    keyed = ThreadedServer(toy_config(tmp_path, api_key=KEY))
    try:
        assert keyed.client.post("/v1/videos", json={"prompt": PROMPT}).status_code == 401
        wrong = keyed.client.get("/v1/videos", headers={"Authorization": "Bearer not-the-key"})
        assert wrong.status_code == 401 and "wrong API key" in wrong.json()["error"]["message"]
        assert wrong.headers["www-authenticate"] == "Bearer"
        ok = keyed.client.post("/v1/videos", json={"prompt": PROMPT}, headers={"Authorization": f"Bearer {KEY}"})
        assert ok.status_code == 202, ok.text
        assert keyed.client.get("/health").status_code == 200  # probes carry no key
        wait_final(httpx.Client(base_url=keyed.url, headers={"Authorization": f"Bearer {KEY}"}), ok.json()["id"])
    finally:
        keyed.stop()


@pytest.mark.parametrize("args, words", [
    (["--host", "0.0.0.0"], ["serves other machines", "--api-key", "FLOWBLEND_API_KEY"]),
    (["--host", "127.0.0.1", "--api-key", "short"], ["at least 8 printable characters"]),
    (["--max-body-bytes", "10"], ["--max-body-bytes"]),
    (["--allowed-host", "https://videos.example.com:443/"], ["is not a host name", "without scheme, port or path"]),
])
def test_serve_refuses_unsafe_access_settings_in_one_line(tmp_path, capsys, monkeypatch, args, words):
    from flowblend.serve.warm import WarmPipeline

    monkeypatch.delenv("FLOWBLEND_API_KEY", raising=False)
    loads = []
    monkeypatch.setattr(WarmPipeline, "load", lambda self, *a, **k: loads.append(a))  # no time bound: a record
    code = cli_main(["serve", "--results-dir", str(tmp_path / "r"), "--port", "1", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err, err
    assert loads == [], "refused only after the pair loaded"


def test_the_key_may_come_from_the_environment(monkeypatch):
    from flowblend.cli.main import build_parser
    from flowblend.cli.serve_cmd import config_from_args

    monkeypatch.setenv("FLOWBLEND_API_KEY", KEY)
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0"])
    config = config_from_args(args)
    assert config.api_key == KEY and KEY not in repr(config) and config.host == "0.0.0.0"
    args = build_parser().parse_args(["serve", "--api-key", "flag-key-0000", "--allowed-host", "a.internal",
                                      "--allowed-host", "10.0.0.5", "--api-docs", "--max-body-bytes", "2048"])
    config = config_from_args(args)
    assert (config.api_key, config.allowed_hosts, config.api_docs, config.max_body_bytes) == \
        ("flag-key-0000", ("a.internal", "10.0.0.5"), True, 2048)


def test_host_allow_list_against_dns_rebinding(server, tmp_path):
    port = server.url.rsplit(":", 1)[1]
    for host in ("127.0.0.1", f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"):
        assert httpx.get(f"{server.url}/health", headers={"Host": host}).status_code == 200, host
    refused = httpx.get(f"{server.url}/v1/videos", headers={"Host": f"attacker.example:{port}"})
    one_line_400(refused, "'attacker.example:", "--allowed-host")
    named = ThreadedServer(toy_config(tmp_path, allowed_hosts=("videos.internal",)))
    try:
        assert httpx.get(f"{named.url}/health", headers={"Host": "videos.internal:80"}).status_code == 200
        assert httpx.get(f"{named.url}/health", headers={"Host": "other.internal"}).status_code == 400
    finally:
        named.stop()


def test_docs_are_off_unless_asked_for(client, tmp_path):
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert client.get(path).status_code == 404, path
    documented = ThreadedServer(toy_config(tmp_path, api_docs=True))
    try:
        assert documented.client.get("/openapi.json").status_code == 200
        assert documented.client.get("/docs").status_code == 200
    finally:
        documented.stop()


def test_guidance_is_bounded_and_a_non_finite_video_fails_its_job(client, server, monkeypatch):
    one_line_400(client.post("/v1/videos", json={"prompt": PROMPT, "guidance": 1e308}), "guidance must be at most")
    pipeline = server.service.pipeline
    real = pipeline.generate

    def overflowing(spec, on_step=None):
        video = real(spec, on_step)
        return torch.full_like(video, float("inf"))  # what a CFG update that overflowed gives

    monkeypatch.setattr(pipeline, "generate", overflowing)
    job = client.post("/v1/videos", json={"prompt": PROMPT}).json()
    done = wait_final(client, job["id"])
    assert done["status"] == "failed" and "non-finite" in done["error"]["message"], done
    assert not (server.service.store.folder(job["id"]) / "video.mp4").exists()
    monkeypatch.setattr(pipeline, "generate", real)
    assert wait_final(client, client.post("/v1/videos", json={"prompt": PROMPT}).json()["id"])["status"] == \
        "completed"


def test_listing_reads_only_the_page_and_never_blocks_the_event_loop(tmp_path, monkeypatch):
    results = tmp_path / "results"
    text = JobRecord("", {"prompt": PROMPT}, "1-0badf00d", status="completed").to_json()
    for i in range(20_000):  # finished records of earlier runs (older ids than any of this run)
        folder = results / "jobs" / f"video_{i:032x}"
        folder.mkdir(parents=True)
        (folder / "job.json").write_text(text.replace('"id": ""', f'"id": "{folder.name}"'))
    server = ThreadedServer(toy_config(results))
    store = server.service.store
    try:
        reads = []
        real_read = store._read
        monkeypatch.setattr(store, "_read", lambda job_id: reads.append(job_id) or real_read(job_id))
        r = server.client.get("/v1/videos", params={"limit": 20})
        assert r.status_code == 200 and len(r.json()["data"]) == 20 and r.json()["has_more"]
        assert len(reads) == 20, len(reads)  # the page's records, not 20,000
        release, entered = threading.Event(), threading.Event()
        real_page = store.page

        def slow_page(*args):
            entered.set()
            release.wait(10)
            return real_page(*args)

        monkeypatch.setattr(store, "page", slow_page)
        listing = threading.Thread(target=lambda: httpx.get(f"{server.url}/v1/videos", timeout=30))
        listing.start()
        assert entered.wait(10)
        assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200  # answered while the list reads
        release.set()
        listing.join(30)
    finally:
        server.stop()


def test_head_is_answered_on_every_get_route(client):
    job = client.post("/v1/videos", json={"prompt": PROMPT}).json()
    wait_final(client, job["id"])
    for path in ("/", "/health", "/metrics", "/v1/videos", f"/v1/videos/{job['id']}", f"/v1/videos/{job['id']}/content"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b"", (path, r.status_code)


@pytest.mark.parametrize("body, words", [
    ({"steps": True}, ["steps", "valid integer"]),
    ({"steps": "20"}, ["steps", "valid integer"]),
    ({"seed": 1.5}, ["seed"]),
    ({"guidance": "5"}, ["guidance", "valid number"]),
    ({"seconds": 1}, ["seconds", "valid string"]),
])
def test_json_types_are_strict(client, body, words):
    one_line_400(client.post("/v1/videos", json={"prompt": PROMPT, **body}), *words)


def _multipart(fields: dict) -> dict:
    """Form fields sent as multipart/form-data (the only form encoding the server takes: issue 31 item 9)."""
    return {k: (None, v) for k, v in fields.items()}


def test_form_fields_are_parsed_into_their_types(client):
    r = client.post("/v1/videos", files=_multipart({"prompt": PROMPT, "steps": "3", "seed": "7", "seconds": "1"}))
    assert r.status_code == 202, r.text
    assert (r.json()["steps"], r.json()["request"]["seed"], r.json()["seconds"]) == (3, 7, "1")
    one_line_400(client.post("/v1/videos", files=_multipart({"prompt": PROMPT, "steps": "twenty"})), "steps must be a whole number")
    one_line_400(client.post("/v1/videos", files=_multipart({"prompt": PROMPT, "colour": "red"})), "unknown field 'colour'")
    wait_final(client, r.json()["id"])


def test_unicode_words_are_named_as_typed(client):
    one_line_400(client.post("/v1/videos", json={"prompt": "a red circle moving ünïcödé"}), "unknown word(s) ünïcödé;")


@pytest.fixture(scope="module")
def dynamic_server(tmp_path_factory):
    s = ThreadedServer(toy_config(tmp_path_factory.mktemp("limits-dynamic"), dynamic_shapes=True))
    yield s
    s.stop()


def _suggested_size_is_accepted(client, size):
    message = one_line_400(client.post("/v1/videos", json={"prompt": PROMPT, "size": size}), "size")
    suggested = message.rsplit('"', 2)[-2]
    width, height = map(int, suggested.split("x"))
    assert width <= 4096 and height <= 4096
    # posted back to the server that suggested it (its own resolver and shapes): accepted. The worker is held by
    # an open-ended job first, so the accepted job stays queued and is dropped unrun (a 4096x4096 step is minutes)
    busy = client.post("/v1/videos", json={"prompt": PROMPT, "steps": LONG}).json()["id"]
    wait_running(client, busy)
    try:
        r = client.post("/v1/videos", json={"prompt": PROMPT, "size": suggested, "steps": 1})
        assert r.status_code == 202, f"{size} -> suggested {suggested}: {r.text}"
        dropped = client.post(f"/v1/videos/{r.json()['id']}/cancel")
        assert dropped.status_code == 200 and dropped.json()["job_status"] == "cancelled", dropped.text
    finally:
        client.post(f"/v1/videos/{busy}/cancel")
        wait_final(client, busy)


SIZES = ["99999x99999", "30x64", "4097x8", "100000x100000"]


@pytest.mark.parametrize("size", SIZES)
def test_every_size_a_refusal_suggests_is_accepted(dynamic_server, size):
    _suggested_size_is_accepted(dynamic_server.client, size)


@pytest.mark.parametrize("size", SIZES)
def test_a_fixed_shape_servers_suggested_size_is_accepted(client, size):
    _suggested_size_is_accepted(client, size)


@pytest.mark.parametrize("seconds", ["0.3", "2.2", "0.1"])
def test_every_duration_a_refusal_suggests_is_accepted(client, seconds):
    message = one_line_400(client.post("/v1/videos", json={"prompt": PROMPT, "seconds": seconds}), "seconds")
    suggestions = [part.strip(" '") for part in message.rsplit("try ", 1)[1].split(" or ")]
    for suggested in suggestions:
        resolve(VideoRequest(prompt=PROMPT, seconds=suggested), toy_config("unused"), get_family("toy"))
    with pytest.raises(FlowblendError, match="seconds or frames"):
        resolve(VideoRequest(prompt=PROMPT, seconds="1", frames=9), toy_config("unused"), get_family("toy"))


def test_a_jobs_files_share_one_mode_and_owner_locks_are_removed(tmp_path):
    results = tmp_path / "results"
    (results / "owners").mkdir(parents=True)
    stale = results / "owners" / "1-0badf00d.lock"  # a SIGKILLed server's, long ago
    stale.touch()
    os.utime(stale, (time.time() - 2 * STALE_LOCK_SECONDS,) * 2)
    young = results / "owners" / "2-0badf00d.lock"  # maybe a server starting right now: left alone
    young.touch()
    s = ThreadedServer(toy_config(results))
    try:
        assert not stale.exists() and young.exists()
        job = wait_final(s.client, s.client.post("/v1/videos", json={"prompt": PROMPT}).json()["id"])
        folder = s.service.store.folder(job["id"])
        modes = {name: (folder / name).stat().st_mode & 0o777 for name in ("job.json", "video.mp4", "thumbnail.png")}
        assert set(modes.values()) == {FILE_MODE}, modes
        own_lock = results / "owners" / f"{s.service.store.owner}.lock"
        assert own_lock.exists()
    finally:
        s.stop()
    assert not own_lock.exists()
