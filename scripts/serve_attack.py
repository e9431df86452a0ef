"""Probe a flowblend server with the hostile requests of issue 31 (items 1-3 and 9-12); PASS/FAIL per probe.

    python scripts/serve_attack.py                       # starts `flowblend serve --pair toy` on a free loopback port
    python scripts/serve_attack.py --url http://127.0.0.1:8000

Each probe is one or two requests with a time bound; PASS means the server answered at once with a one-line
JSON error of the expected status (the slow-client probes: a 408 within the server's timeout) and made no job.
Only loopback addresses are probed. Exit status 0 if every probe passed.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlparse

import httpx

PROMPT = "a red circle moving left"


def error_of(r: httpx.Response, status: int) -> str | None:
    """None if `r` is the one-line JSON error with `status`, else what is wrong."""
    if r.status_code != status:
        return f"status {r.status_code}, expected {status}: {r.text[:120]!r}"
    try:
        message = r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return f"not the JSON error shape: {r.text[:120]!r}"
    return None if message and "\n" not in message else "the message is not one line"


def raw(host: str, port: int, chunks: list[bytes], pause: float, limit: float) -> bytes:
    """Send `chunks` `pause` s apart; what the server sent back before closing (or `limit` s)."""
    sock = socket.create_connection((host, port), timeout=limit)
    start, got = time.monotonic(), b""
    try:
        for chunk in chunks:
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server closed it: read what it said
            time.sleep(pause)
            if time.monotonic() - start > limit:
                break
        sock.settimeout(max(0.1, limit - (time.monotonic() - start)))
        while data := sock.recv(65536):
            got += data
    except OSError:
        pass
    finally:
        sock.close()
    return got


def probes(client: httpx.Client, host: str, port: int, slow_limit: float):
    def post(status, **kw):
        before = len(client.get("/v1/videos", params={"limit": 100}).json()["data"])
        start = time.monotonic()
        try:
            r = client.post("/v1/videos", **kw)
        except httpx.TimeoutException:
            return "no answer (timed out)"
        took = time.monotonic() - start
        wrong = error_of(r, status)
        after = len(client.get("/v1/videos", params={"limit": 100}).json()["data"])
        return wrong or (f"took {took:.1f} s" if took > 5 else None) or (None if after == before else "a job was made")

    body = json.dumps({"prompt": PROMPT})
    yield "1 frames=1e9", lambda: post(400, json={"prompt": PROMPT, "frames": 1_000_000_000})
    yield "2 plan L100000000/20", lambda: post(400, json={"prompt": PROMPT, "plan": "L100000000/20"})
    yield "3 frames=-100", lambda: post(400, json={"prompt": PROMPT, "frames": -100})
    yield "9 foreign Origin", lambda: post(403, content=body, headers={"origin": "http://evil.example",
                                                                       "content-type": "text/plain"})
    yield "9 text/plain body", lambda: post(415, content=body, headers={"content-type": "text/plain"})
    yield "9 url-encoded body", lambda: post(415, content=body,
                                              headers={"content-type": "application/x-www-form-urlencoded"})
    yield "10 deep JSON", lambda: post(400, content="[" * 100_000 + "]" * 100_000,
                                       headers={"content-type": "application/json"})
    head = f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode()

    def slow_headers():
        got = raw(host, port, [head[i:i + 10] for i in range(0, len(head), 10)] + [b"X-Slow: aaaaaaaaaa"] * 600,
                  1.0, slow_limit)
        return None if got.startswith(b"HTTP/1.1 408") else f"no 408 within {slow_limit:g} s: {got[:80]!r}"

    def slow_body():
        start = head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        got = raw(host, port, [start] + [body[i:i + 1].encode() for i in range(len(body))] * 20, 1.0, slow_limit)
        return None if got.startswith(b"HTTP/1.1 408") else f"no 408 within {slow_limit:g} s: {got[:80]!r}"

    yield "11 headers at 10 B/s", slow_headers
    yield "11 body at 1 B/s", slow_body

    def remix():
        r = client.post("/v1/videos/video_probe/remix", json={"prompt": PROMPT, "steps": 999})
        return error_of(r, 400) or (None if "steps" in r.text else "the message does not name steps")

    def hosts(lines):
        def probe():
            request = "GET /v1/videos HTTP/1.1\r\n" + "".join(f"Host: {h}\r\n" for h in lines) + "Connection: close\r\n\r\n"
            got = raw(host, port, [request.encode()], 0.0, 10.0)
            return None if got.startswith(b"HTTP/1.1 400") else f"answered {got[:40]!r}"
        return probe

    yield "12 remix steps=999", remix
    yield "12 Host with a list", hosts([f"localhost:{port}, evil.example"])
    yield "12 two Host headers", hosts([f"localhost:{port}", "evil.example"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="a running loopback server (default: start `flowblend serve --pair toy`)")
    p.add_argument("--api-key", help="the server's key, if it has one")
    p.add_argument("--slow-limit", type=float, default=45.0, help="seconds a slow-client probe waits for its 408")
    args = p.parse_args()
    proc = None
    if args.url is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        proc = subprocess.Popen([sys.executable, "-m", "flowblend.cli.main", "serve", "--pair", "toy", "--port",
                                 str(port), "--threads", "1", "--results-dir", f"/tmp/flowblend-attack-{port}"],
                                env={**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"})
        args.url = f"http://127.0.0.1:{port}"
    u = urlparse(args.url)
    if u.hostname not in ("127.0.0.1", "localhost", "::1"):
        p.error("--url must be a loopback address: this script only probes this machine's servers")
    headers = {"authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    failed = 0
    try:
        with httpx.Client(base_url=args.url, timeout=20, headers=headers) as client:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.5)
            else:
                print(f"FAIL: {args.url}/health not ready within 180 s")
                return 1
            for name, probe in probes(client, u.hostname, u.port or 80, args.slow_limit):
                wrong = probe()
                failed += wrong is not None
                print(f"{'PASS' if wrong is None else 'FAIL'}  {name}" + (f": {wrong}" if wrong else ""), flush=True)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
