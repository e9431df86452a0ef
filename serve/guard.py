"""What every request passes before a route sees it: the Host allow-list, the Origin and body type rules, the API
key, the body cap and the body read deadline.

An ASGI middleware, so a refused request costs no route and no parsing, and a body is never read
past the cap: a declared Content-Length above it is a 413 before one byte is read, and a chunked
body is counted as it arrives and refused at the cap (without this, a 50 MB body was read whole
before its 400). The Host check stops DNS rebinding (a web page whose name resolves to 127.0.0.1
driving a loopback server from a browser); the key is OpenAI's `Authorization: Bearer <key>`.
Cross-site requests: a browser may POST a "simple" body (text/plain, a form) to any origin without
asking, so a request that changes state is refused (403) when it carries an Origin other than the
server's own, and a body must be JSON or multipart/form-data (415). A body must arrive within
`body_timeout` seconds in all (408); headers have their own deadline (serve/deadline.py).
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import re

from starlette.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               403: "permission_error", 405: "invalid_request_error", 408: "invalid_request_error", 409: "conflict_error", 413: "invalid_request_error",
               415: "invalid_request_error", 429: "rate_limit_error", 503: "server_unavailable_error"}
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
BODY_TYPES = ("application/json", "multipart/form-data")  # what a request body may be (the SDK sends multipart)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")  # methods that change nothing: no Origin rule
HOST_HEADER = re.compile(r"(\[[0-9a-f:.]{2,45}\]|[a-z0-9._-]{1,253})(:[0-9]{1,5})?")
OPEN_PATHS = ("/health", "/")  # probes carry no key; the page is static (its API calls send the key typed in it)


def error_response(status: int, message: str, retry_after: int | None = None, headers: dict | None = None,
                   code: str | None = None) -> JSONResponse:
    """OpenAI's error shape: {"error": {"message", "type", "code"}}."""
    headers = {**(headers or {}), **({"Retry-After": str(retry_after)} if retry_after is not None else {})}
    return JSONResponse({"error": {"message": message, "type": ERROR_TYPES.get(status, "server_error"),
                                   "code": code}}, status_code=status, headers=headers or None)


def is_loopback(host: str) -> bool:
    """Whether `host` (an address or name the server binds) is reachable only from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


HOST_NAME = re.compile(r"\*|[A-Za-z0-9._-]{1,253}|\[?[0-9A-Fa-f:.]{2,45}\]?")


def check_access(host: str, api_key: str | None, extra_hosts: tuple[str, ...] = ()) -> None:
    """Refuse to serve beyond this machine without a key, and Host names that are not names: one line naming the
    fix, before anything loads."""
    from flowblend.errors import FlowblendError

    for name in extra_hosts:
        if not HOST_NAME.fullmatch(name):
            raise FlowblendError(f"--allowed-host {name!r} is not a host name (e.g. videos.example.com, 10.0.0.5, "
                                 "or * for any); give the name without scheme, port or path")

    if not is_loopback(host) and not api_key:
        raise FlowblendError(f"--host {host} serves other machines: set an API key (--api-key KEY or the "
                             "FLOWBLEND_API_KEY environment variable), or serve on 127.0.0.1")
    if api_key is not None and (len(api_key) < 8 or not api_key.isprintable() or " " in api_key):
        raise FlowblendError("the API key must be at least 8 printable characters without spaces")


def allowed_hosts(bind_host: str, extra: tuple[str, ...]) -> frozenset[str] | None:
    """The Host header names a request may carry (None: any, from "*"): loopback names, the bound address
    unless it is a wildcard, and `extra` (--allowed-host)."""
    if "*" in extra:
        return None
    names = set(LOOPBACK_NAMES) | {h.lower() for h in extra}
    if bind_host not in ("0.0.0.0", "::", ""):
        names.add(bind_host.strip("[]").lower())
    return frozenset(names)


def host_name(header: str) -> str:
    """The name in a Host header without its port ("[::1]:8000" -> "::1")."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class RequestGuard:
    """ASGI middleware: Host (400), Origin (403), body type (415), API key (401), body cap (413) and read deadline
    (408), in that order."""

    def __init__(self, app, api_key: str | None, hosts: frozenset[str] | None, max_body_bytes: int,
                 body_timeout: float = 30.0):
        self.app, self.api_key, self.hosts, self.max_body_bytes = app, api_key, hosts, max_body_bytes
        self.body_timeout = body_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(scope, headers)
        if refusal is None and scope["method"] in ("POST", "PUT", "PATCH"):
            refusal, receive = await self._capped(headers, receive)
        if refusal is not None:
            return await refusal(scope, receive, send)
        await self.app(scope, receive, send)

    def _refusal(self, scope, headers: dict) -> JSONResponse | None:
        host = headers.get("host", "")
        if sum(k.lower() == b"host" for k, _ in scope["headers"]) > 1:
            return error_response(400, "the request has more than one Host header: send exactly one")
        if (host or self.hosts is not None) and not HOST_HEADER.fullmatch(host.strip().lower()):
            return error_response(400, f"host {host!r} is not one host name with an optional port (e.g. "
                                       "localhost:8000): send exactly one name")
        if self.hosts is not None and host_name(host) not in self.hosts:
            return error_response(400, f"host {host!r} is not one this server answers to: start it "
                                       "with --allowed-host NAME for each name clients use (DNS rebinding guard)")
        origin = headers.get("origin")
        if origin is not None and scope["method"] not in SAFE_METHODS and \
                origin.strip().lower() not in (f"http://{host.strip().lower()}", f"https://{host.strip().lower()}"):
            return error_response(403, f"origin {origin!r} is not this server's own ({host}): a web page of another "
                                       "site may not change jobs here; call the API from the server's page, or from "
                                       "a client that sends no Origin")
        if scope["method"] in ("POST", "PUT", "PATCH") and self._has_body(headers):
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind not in BODY_TYPES:
                return error_response(415, f"content type {kind or 'none'!r}: send the body as application/json "
                                           "or multipart/form-data")
        if self.api_key is not None and scope["path"] not in OPEN_PATHS:
            sent = headers.get("authorization", "")
            token = sent[7:].strip() if sent[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                why = "a wrong API key" if token else "no API key"
                return error_response(401, f"{why}: send the server's key as 'Authorization: Bearer KEY' (the OpenAI "
                                           "SDK: api_key=KEY)", headers={"WWW-Authenticate": "Bearer"},
                                      code="invalid_api_key")
        return None

    @staticmethod
    def _has_body(headers: dict) -> bool:
        return headers.get("content-length", "0").strip() not in ("0", "") or "transfer-encoding" in headers

    async def _capped(self, headers: dict, receive):
        """The body read up to the cap and handed on whole, or a 413 as soon as it is known to be larger."""
        limit = self.max_body_bytes
        too_big = error_response(413, f"the body is larger than this server's limit of {limit} bytes (a request is "
                                      "a prompt and a few values)")
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return too_big, receive
        chunks, size, more = [], 0, True
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - asyncio.get_running_loop().time()))
            except asyncio.TimeoutError:
                return error_response(408, f"the body did not arrive within {self.body_timeout:g} s (this server's "
                                           "--body-timeout): send it at once", headers={"Connection": "close"}), receive
            if message["type"] != "http.request":
                break  # the client went away
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return too_big, receive
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if sent:
                return await receive()  # after the body: the disconnect, as the server reports it
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        return None, replay
