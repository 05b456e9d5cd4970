"""A webhook receiver on 127.0.0.1 for the trigger tests (free port; ``close()`` stops it)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Receiver:
    """Answers each POST with the next of ``statuses`` (then 200) and records its body and
    ``X-Bnwatch-Signature``.  With ``gate``, every request is recorded first and answered only
    once the gate is set (a receiver that is slow, for as long as the test wants) -- or after
    ``hold_timeout`` s, so that code which wrongly waits for the answer fails its assertions
    instead of hanging."""

    hold_timeout = 30.0

    def __init__(self, statuses: list[int] | None = None, *, gate: threading.Event | None = None):
        self.statuses = list(statuses or [])
        self.gate = gate
        self.received: list[tuple[bytes, str]] = []
        self.answered = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with owner._lock:
                    owner.received.append((body, self.headers["X-Bnwatch-Signature"]))
                    status = owner.statuses.pop(0) if owner.statuses else 200
                if owner.gate is not None:
                    owner.gate.wait(owner.hold_timeout)
                self.send_response(status)
                self.end_headers()
                with owner._lock:
                    owner.answered += 1

            def log_message(self, *args: Any) -> None:
                pass

        self.server, self.url = start_server(Handler)

    def close(self) -> None:
        if self.gate is not None:
            self.gate.set()  # never leave a handler (or a sender) hanging
        stop_server(self.server)


def start_server(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """Serve ``handler`` on 127.0.0.1 at a free port from a daemon thread; returns the server
    and its webhook URL (``.../hook``).  :func:`stop_server` stops it."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/hook"


def stop_server(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


def wait_for(condition: Callable[[], object], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it is true (never a fixed sleep); fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(delay)  # a poll interval, not a wait for the outcome
        delay = min(delay * 1.5, 0.2)
