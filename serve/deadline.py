"""A deadline on request headers: uvicorn has none (its keep-alive timeout only covers idle connections, and
any byte resets it), so headers sent at 10 bytes/s held a connection open indefinitely.

`deadline_protocol(seconds)` is uvicorn's HTTP protocol (`http=` of uvicorn.Config) with one timer per
request: armed when the connection opens and when a request begins after the previous one's response;
if the request's headers are not complete when it fires, the client gets a 408 (the API's one-line JSON
error) and the connection is closed. Bodies have their own deadline (serve/guard.py, --body-timeout).
"""
from __future__ import annotations

import json

from uvicorn.protocols.http.auto import AutoHTTPProtocol


def _timeout_response(seconds: float) -> bytes:
    body = json.dumps({"error": {"message": f"the request headers did not arrive within {seconds:g} s (this "
                                            "server's --header-timeout): send them at once",
                                 "type": "invalid_request_error", "code": None}}).encode()
    return (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
            b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


def deadline_protocol(seconds: float) -> type:
    """uvicorn's HTTP protocol class with a `seconds` deadline on each request's headers."""

    class HeaderDeadlineProtocol(AutoHTTPProtocol):
        _header_timer = None
        _waiting_for = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # a new request on a kept-alive connection
            super().data_received(data)
            if self._header_timer is not None and self.cycle is not self._waiting_for:
                self._header_timer.cancel()  # its headers are complete
                self._header_timer = None

        def connection_lost(self, exc) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._waiting_for = self.cycle  # when the headers are complete, uvicorn starts a new cycle

            def expire() -> None:
                self._header_timer = None
                if self.cycle is self._waiting_for and not self.transport.is_closing():
                    self.transport.write(_timeout_response(seconds))
                    self.transport.close()

            self._header_timer = self.loop.call_later(seconds, expire)

    return HeaderDeadlineProtocol
