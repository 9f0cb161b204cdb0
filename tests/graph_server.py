"""A real local HTTP server that answers like the WhatsApp Cloud API's POST /{phone_number_id}/messages.

Runs a ThreadingHTTPServer on 127.0.0.1 (random port) in a thread. Each test scripts the answers:
`server.script(ok(), error(131000), http(429), slow(2.0), ...)` queues answers consumed in order; once the
queue is empty `default` answers (success). `server.rule(fn)` answers by request instead (e.g. per user).
Every request is recorded: path, headers, JSON body, and the wamid returned.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ERROR_TITLES = {
    131000: "Something went wrong",
    131026: "Message undeliverable",
    131031: "Business Account locked",
    131047: "Re-engagement message",
    131049: "This message was not delivered to maintain healthy ecosystem engagement.",
    131056: "(Business Account, Consumer Account) pair rate limit hit",
    130429: "Rate limit hit",
    190: "Access token has expired",
    132001: "Template name does not exist in the translation",
}


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: dict[str, Any] | None = None  # None + status 200: a success with a fresh wamid
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def ok() -> Answer:
    return Answer()


def error(code: int, *, status: int = 400, subcode: int | None = None, details: str | None = None) -> Answer:
    """Meta's error JSON shape."""
    title = ERROR_TITLES.get(code, "Error")
    body = {
        "error": {
            "message": f"(#{code}) {title}",
            "type": "OAuthException",
            "code": code,
            "error_subcode": subcode or 2494010,
            "fbtrace_id": "Az8or2yhqkZfEZ-_4Qn_Bam",
            "error_data": {"messaging_product": "whatsapp", "details": details or title},
        }
    }
    return Answer(status=status, body=body)


def http(status: int, *, retry_after: float | None = None, text: str | None = None) -> Answer:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else {}
    return Answer(status=status, body={"raw": text or f"HTTP {status}"}, headers=headers)


def slow(seconds: float, then: Answer | None = None) -> Answer:
    base = then or ok()
    return Answer(status=base.status, body=base.body, delay=seconds, headers=base.headers)


@dataclass
class Request:
    path: str
    phone_number_id: str
    headers: dict[str, str]
    json: dict[str, Any]
    wamid: str | None = None
    at: float = 0.0


class GraphServer:
    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._answers: list[Answer] = []
        self._rule: Callable[[Request], Answer | None] | None = None
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self.default = ok()
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="graph-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host!s}:{port}/v23.0"

    def script(self, *answers: Answer) -> None:
        with self._lock:
            self._answers.extend(answers)

    def rule(self, fn: Callable[[Request], Answer | None]) -> None:
        self._rule = fn

    def sent_to(self, user: str) -> list[Request]:
        return [r for r in self.requests if r.json.get("to") == user and r.wamid]

    def _next_answer(self, request: Request) -> Answer:
        with self._lock:
            self.requests.append(request)
            if self._rule is not None:
                answer = self._rule(request)
                if answer is not None:
                    return answer
            return self._answers.pop(0) if self._answers else self.default

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                parts = self.path.strip("/").split("/")
                request = Request(
                    path=self.path, phone_number_id=parts[-2] if len(parts) >= 2 else "",
                    headers={k: v for k, v in self.headers.items()}, json=json.loads(raw or b"{}"), at=time.time(),
                )
                answer = server._next_answer(request)
                if answer.delay:
                    time.sleep(answer.delay)
                body = answer.body
                if answer.status == 200 and body is None:
                    request.wamid = f"wamid.GRAPH{next(server._ids):06d}"
                    body = {
                        "messaging_product": "whatsapp",
                        "contacts": [{"input": request.json.get("to"), "wa_id": request.json.get("to")}],
                        "messages": [{"id": request.wamid}],
                    }
                payload = json.dumps(body).encode()
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (read timeout): exactly the case under test

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - signature from the base class
                pass

        return Handler

    def start(self) -> GraphServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextmanager
def running() -> Iterator[GraphServer]:
    server = GraphServer().start()
    try:
        yield server
    finally:
        server.stop()
