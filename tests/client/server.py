"""A stand-in for the bnwatch ingest service: ``POST /api/v1/windows`` and ``GET /healthz``.

It validates bodies with the real :class:`bnwatch.wire.WindowBatch` (422 with pydantic's
errors), checks the bearer token (401), answers 413 above ``max_bytes``, stores each window
uid once and answers an :class:`bnwatch.wire.IngestResult`.  ``plan`` scripts answers
(e.g. three 503s, a 503 with its own body, or :data:`TRICKLE`) given before the normal
handling.  With ``state`` every stored uid is appended to a file before the answer, so a
killed and restarted server still stores each window once -- as the real service does with
its database.

In a thread: ``FakeService(...).start()``.  As a process (so a test can SIGKILL it):
``python -m tests.client.server --port N --state FILE [--token T]``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bnwatch.wire import WindowBatch

ENDPOINT = "/api/v1/windows"


@dataclass(frozen=True)
class Seen:
    """One request the service received."""

    at: float  # time.monotonic()
    status: int
    size: int
    uids: tuple[str, ...]
    authorization: str | None
    content_encoding: str | None


Planned = int | tuple[int, dict[str, str]] | tuple[int, dict[str, str], dict[str, Any]]
"""A status; or a status and headers; or a status, headers and the JSON answer."""
LOSE_ANSWER = 0
"""Planned "status": store the batch, then close the connection without answering."""
TRICKLE = -1
"""Planned "status": answer 200 with a Content-Length, then trickle the body one byte every
0.1 s (for 100 s at most): each read is quick, the answer never ends in time."""


class FakeService:
    def __init__(
        self,
        *,
        token: str | None = None,
        state: Path | None = None,
        max_bytes: int | None = None,
        port: int = 0,
    ) -> None:
        self.token = token
        self.max_bytes = max_bytes
        self.plan: deque[Planned] = deque()
        self.requests: list[Seen] = []
        self.stored: list[str] = []  # uids in the order they were stored
        self._uids: set[str] = set()
        self._lock = threading.Lock()
        self._state = state
        self._state_fd: int | None = None
        self.stopped = False
        if state is not None:
            if state.exists():
                for line in state.read_text().splitlines():
                    if line.strip():
                        self._uids.add(line.strip())
                        self.stored.append(line.strip())
            self._state_fd = os.open(state, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self._server = ThreadingHTTPServer(("127.0.0.1", port), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeService:
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopped = True  # down: no answer on a connection kept alive either
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._state_fd is not None:
            os.close(self._state_fd)
            self._state_fd = None

    def __enter__(self) -> FakeService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def posts(self) -> list[Seen]:
        with self._lock:
            return [r for r in self.requests if r.size >= 0]

    # -- the ingest logic ----------------------------------------------------------------
    def ingest(
        self, body: bytes, authorization: str | None, encoding: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        uids: tuple[str, ...] = ()
        try:
            windows = json.loads(body).get("windows", [])
            uids = tuple(str(w.get("uid")) for w in windows)
        except Exception:
            pass
        status, answer, headers = self._answer(body, authorization)
        with self._lock:
            self.requests.append(
                Seen(time.monotonic(), status, len(body), uids, authorization, encoding)
            )
        return status, answer, headers

    def _answer(
        self, body: bytes, authorization: str | None
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        with self._lock:
            planned = self.plan.popleft() if self.plan else None
        lose = planned == LOSE_ANSWER
        if planned is not None and not lose:
            if not isinstance(planned, tuple):
                return planned, {"detail": "planned"}, {}
            answer: dict[str, Any] = planned[2] if len(planned) == 3 else {"detail": "planned"}
            return planned[0], answer, planned[1]
        if self.token is not None and authorization != f"Bearer {self.token}":
            return 401, {"detail": "invalid or missing token"}, {"WWW-Authenticate": "Bearer"}
        if self.max_bytes is not None and len(body) > self.max_bytes:
            return 413, {"detail": f"body larger than {self.max_bytes} bytes"}, {}
        try:
            batch = WindowBatch.model_validate_json(body)
        except ValidationError as err:
            errors = json.loads(err.json(include_url=False, include_input=False))
            return 422, {"detail": errors}, {}
        stored = 0
        with self._lock:
            for window in batch.windows:
                if window.uid in self._uids:
                    continue
                if self._state_fd is not None:  # durable before we answer
                    os.write(self._state_fd, f"{window.uid}\n".encode())
                self._uids.add(window.uid)
                self.stored.append(window.uid)
                stored += 1
        received = len(batch.windows)
        if lose:
            return LOSE_ANSWER, {}, {}
        return 200, {"received": received, "stored": stored, "duplicates": received - stored}, {}


def _handler(service: FakeService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _send(self, status: int, answer: dict[str, Any], headers: dict[str, str]) -> None:
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, {"status": "ok"}, {})
            else:
                self._send(404, {"detail": "not found"}, {})

        def do_POST(self) -> None:
            if service.stopped:
                self.close_connection = True
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            if self.path != ENDPOINT:
                self._send(404, {"detail": "not found"}, {})
                return
            status, answer, headers = service.ingest(
                body, self.headers.get("Authorization"), self.headers.get("Content-Encoding")
            )
            if status == LOSE_ANSWER:
                self.close_connection = True  # stored, but the answer never arrives
                return
            if status == TRICKLE:
                self._trickle()
                return
            self._send(status, answer, headers)

        def _trickle(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.close_connection = True
            for _ in range(1000):
                try:
                    self.wfile.write(b" ")
                    self.wfile.flush()
                except OSError:  # the client gave up
                    return
                time.sleep(0.1)

    return Handler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--token", default=None)
    args = parser.parse_args(argv)
    service = FakeService(token=args.token, state=args.state, port=args.port)
    service._server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
