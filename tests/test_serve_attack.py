"""The server under attack (issue 31, items 1-3 and 9-12): each hostile request is answered at once with the API's
one-line JSON error, costs no memory or time to speak of, and creates no job.

The server is the production uvicorn setup (serve/server.uvicorn_config: the header deadline) on a free loopback
port, with short timeouts so that the slow-client probes take a second or two.
"""
from __future__ import annotations

import json
import socket
import time
import tracemalloc

import httpx
import pytest
from serve_support import ThreadedServer, toy_config, wait_final

from flowblend.errors import FlowblendError
from flowblend.families import get_family
from flowblend.runtime.plan import BlendPlan

PROMPT = "a red circle moving left"
HEADER_TIMEOUT, BODY_TIMEOUT = 1.0, 1.5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = ThreadedServer(toy_config(tmp_path_factory.mktemp("attack"), header_timeout=HEADER_TIMEOUT,
                                  body_timeout=BODY_TIMEOUT))
    yield s
    s.stop()


def job_count(server) -> int:
    return len(server.service.store.list())


def one_line_error(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    message = r.json()["error"]["message"]
    assert "\n" not in message and message
    return message


def refused(server, status: int, **request) -> str:
    """POST /v1/videos as given: refused with `status` within seconds, no job made; the message."""
    before, start = job_count(server), time.monotonic()
    r = server.client.post("/v1/videos", **request)
    assert time.monotonic() - start < 10
    assert job_count(server) == before, "a refused request created a job"
    return one_line_error(r, status)


def test_a_billion_frames_is_refused_by_formula(server):
    message = refused(server, 400, json={"prompt": PROMPT, "frames": 1_000_000_000})
    assert "1025" in message
    family = get_family("toy")
    tracemalloc.start()
    for frames in (1_000_000_000, 10**18 + 1):  # the CLI's check: nearest counts by formula, not a list
        with pytest.raises(FlowblendError, match="try"):
            family.check_video_shape(frames, family.height, family.width)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_a_huge_plan_span_is_refused_before_it_is_expanded(server):
    message = refused(server, 400, json={"prompt": PROMPT, "plan": "L100000000/20"})
    assert "steps" in message
    tracemalloc.start()
    with pytest.raises(ValueError, match="at most"):
        BlendPlan.parse("L100000000/20", 20)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_a_negative_frame_count_is_a_400_not_a_hang(server):
    for frames in (-100, 0, -1):
        refused(server, 400, json={"prompt": PROMPT, "frames": frames})
    family = get_family("toy")
    with pytest.raises(FlowblendError, match="try"):
        family.check_video_shape(-100, family.height, family.width)


def test_cross_site_bodies_and_origins_are_refused(server):
    body = json.dumps({"prompt": PROMPT})
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": kind} if kind else {}
        assert "application/json" in refused(server, 415, content=body, headers=headers)
    for origin in ("http://evil.example", "null", f"http://127.0.0.1:{server.port + 1}"):
        assert "origin" in refused(server, 403, content=body, headers={"origin": origin,
                                                                      "content-type": "text/plain"})
        refused(server, 403, json={"prompt": PROMPT}, headers={"origin": origin})
    r = server.client.post("/v1/videos", json={"prompt": PROMPT}, headers={"origin": server.url})  # the page
    assert r.status_code == 202, r.text
    wait_final(server.client, r.json()["id"])


def test_deeply_nested_json_is_a_one_line_400(server):
    deep = "[" * 100_000 + "]" * 100_000
    assert "deep" in refused(server, 400, content=deep, headers={"content-type": "application/json"})
    text = json.dumps({"prompt": PROMPT + " [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["})  # brackets in a string
    r = server.client.post("/v1/videos", content=text, headers={"content-type": "application/json"})
    assert "nest" not in r.text  # judged on its words, not its brackets


def raw_exchange(port: int, chunks, pause: float, limit: float) -> tuple[bytes, float]:
    """Send `chunks` `pause` s apart on a fresh connection (stopping when the server closes it); what came back
    and after how many seconds the server closed the connection."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=limit)
    start, received = time.monotonic(), b""
    try:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break
            time.sleep(pause)
            if time.monotonic() - start > limit:
                break
        sock.settimeout(max(0.1, limit - (time.monotonic() - start)))
        while True:
            data = sock.recv(65536)
            if not data:
                break
            received += data
    except (socket.timeout, ConnectionResetError):
        pass
    finally:
        sock.close()
    return received, time.monotonic() - start


def test_slow_headers_and_bodies_are_cut_off_with_a_408(server):
    head = f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()
    trickle = [head[i:i + 10] for i in range(0, len(head), 10)] + [b"X-Slow: " + b"a" * 10] * 40
    received, took = raw_exchange(server.port, trickle, 0.1, 8.0)
    assert received.startswith(b"HTTP/1.1 408") and b'"error"' in received, received[:200]
    assert took < HEADER_TIMEOUT + 3
    body = json.dumps({"prompt": PROMPT}).encode()
    start = head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
    received, took = raw_exchange(server.port, [start] + [body[i:i + 2] for i in range(0, len(body), 2)], 0.1, 8.0)
    assert received.startswith(b"HTTP/1.1 408") and b"--body-timeout" in received, received[:300]
    assert took < BODY_TIMEOUT + 3


def test_remix_refuses_fields_it_would_ignore(server):
    r = server.client.post("/v1/videos", json={"prompt": PROMPT})
    assert r.status_code == 202, r.text
    job = wait_final(server.client, r.json()["id"])
    before = job_count(server)
    r = server.client.post(f"/v1/videos/{job['id']}/remix", json={"prompt": "a blue square moving right",
                                                                   "steps": 999})
    assert "steps" in one_line_error(r, 400) and job_count(server) == before


def test_a_host_header_names_one_host(server):
    for hosts in ([f"localhost:{server.port}, evil.example"], [f"localhost:{server.port}", "evil.example"],
                  ["evil.example", f"localhost:{server.port}"]):
        request = "GET /v1/videos HTTP/1.1\r\n" + "".join(f"Host: {h}\r\n" for h in hosts) + \
            "Connection: close\r\n\r\n"
        received, _ = raw_exchange(server.port, [request.encode()], 0.0, 8.0)
        status, _, rest = received.partition(b"\r\n")
        assert status.startswith(b"HTTP/1.1 400"), received[:300]
        assert json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]["message"]
