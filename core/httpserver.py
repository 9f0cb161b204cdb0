"""The limits a public HTTP endpoint needs and uvicorn's HTTP/1.1 protocol (httptools) does not enforce.

uvicorn buffers a request head of any size and waits for it forever: h11 has `h11_max_incomplete_event_size`,
httptools (the faster parser `serve` uses) has neither a size cap nor a deadline. `LimitedHttpToolsProtocol` adds
both: a head larger than `MAX_HEADER_BYTES` is answered 431 and the connection closed, one not complete within
`HEADER_TIMEOUT_SECONDS` of its first byte (or of the connection opening) is answered 408 and closed (slow-loris).
A body that stalls is the ASGI layer's to time out (core.webhook, `BODY_TIMEOUT_SECONDS`): there the app can
answer and make sure nothing of it is stored.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEADER_BYTES = 64 * 1024  # request line and headers together
HEADER_TIMEOUT_SECONDS = 10.0
BODY_TIMEOUT_SECONDS = 10.0  # without a single byte of the body arriving
NOSNIFF = (b"x-content-type-options", b"nosniff")

_REASONS = {408: "Request Timeout", 431: "Request Header Fields Too Large"}


def plain_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 answer that closes the connection, for rejections before any app sees the request."""
    body = message.encode()
    return (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\ncontent-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n{NOSNIFF[0].decode()}: {NOSNIFF[1].decode()}\r\nconnection: close\r\n\r\n"
    ).encode() + body


class LimitedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a size cap and a deadline on each request head."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_pending = True  # a request head has begun (or may begin) and is not complete yet
        self._head_bytes = 0
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        # Counted after parsing, so a chunk that completed the head (and carries body bytes) is not counted. A
        # chunk ending one pipelined request and starting the next is counted whole: at most one read too much.
        if self._head_pending and not self.transport.is_closing():
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEADER_BYTES:
                self._reject(431, f"request headers larger than {MAX_HEADER_BYTES // 1024} KB")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_pending = True
        self._head_bytes = 0
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._head_pending = False
        self._head_bytes = 0
        self._disarm_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(HEADER_TIMEOUT_SECONDS, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._head_pending or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self._arm_head_timer()  # a pipelined head waits while we answer the request before it
            return
        if self._head_bytes == 0:
            self.transport.close()  # a connection that never sent a byte gets no answer, as with nginx
            return
        self._reject(408, f"request headers not received within {HEADER_TIMEOUT_SECONDS:g} s")

    def _reject(self, status: int, message: str) -> None:
        self.logger.warning("HTTP %d: %s", status, message)
        # An answer still being written for an earlier pipelined request must not be interleaved with this one.
        if self.cycle is None or self.cycle.response_complete:
            self.transport.write(plain_response(status, message))
        self.transport.close()
