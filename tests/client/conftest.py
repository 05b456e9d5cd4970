"""Fixtures of the HTTP sink tests: windows, the stand-in service, server processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from bnwatch.schema import WindowRecord
from tests.client.server import FakeService
from tests.store.helpers import record_windows, renamed

ROOT = Path(__file__).resolve().parents[2]


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll ``condition`` until it holds (never a fixed sleep)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """A server in a child process on a fixed port: start, SIGKILL, restart, stop."""

    def __init__(
        self, argv: list[str], port: int, log: Path, env: dict[str, str] | None = None
    ) -> None:
        self.argv = argv
        self.port = port
        self.log = log
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, cwd=ROOT, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        end = time.monotonic() + timeout
        while time.monotonic() < end:  # ready: it answers HTTP (any status)
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.argv} exited with {self.proc.returncode}:\n{self.log.read_text()}"
                )
            try:
                httpx.get(self.url + "/healthz", timeout=1.0)
                return
            except httpx.TransportError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.argv} not ready after {timeout} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()


@pytest.fixture(scope="session")
def base_records() -> list[WindowRecord]:
    """Real windows of a small CNN (3 BatchNorm layers)."""
    return record_windows(3)


@pytest.fixture
def windows(base_records: list[WindowRecord]) -> Callable[[int], list[WindowRecord]]:
    """``windows(n)``: n real windows, each with a fresh uid."""

    def make(n: int) -> list[WindowRecord]:
        return [renamed(base_records[i % len(base_records)]) for i in range(n)]

    return make


@pytest.fixture
def service() -> Iterator[FakeService]:
    with FakeService() as fake:
        yield fake


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token from the developer's environment; default spools under tmp_path."""
    monkeypatch.delenv("BNWATCH_API_TOKEN", raising=False)
    monkeypatch.setenv("BNWATCH_SPOOL_DIR", str(tmp_path / "default-spools"))


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
