"""Windows, bodies, row counts and a real ``bnwatch serve`` for the service tests.

Records are built without torch (random per-sample statistics summarized exactly, assessed
against a running reference and a warm-up baseline that every window of a monitor shares,
as a monitor's windows do); ``tests.store.helpers.record_windows`` gives torch-made ones.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from bnwatch.codec import encode_arrays
from bnwatch.drift import DriftConfig, Reference, assess_layer, decide
from bnwatch.schema import LayerReport, WindowRecord
from bnwatch.stats import ChannelMoments, LayerStats
from bnwatch.store.models import Base
from bnwatch.wire import batch_of

TOKEN = "test-token_0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ENDPOINT = "/api/v1/windows"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
LAYERS: tuple[tuple[str, int], ...] = (("bn1", 4), ("layer1.bn2", 3), ("head.bn", 5))
ROOT = Path(__file__).resolve().parents[2]


class Monitor:
    """Windows of one monitor: fixed references, fresh statistics and uid per window."""

    def __init__(
        self,
        *,
        model: str = "cnn",
        version: str = "1",
        source: str = "replica-1",
        layers: Sequence[tuple[str, int]] = LAYERS,
        seed: int = 0,
        start: datetime = T0,
    ) -> None:
        self.model, self.version, self.source = model, version, source
        self.layers = list(layers)
        self.rng = np.random.default_rng(seed)
        self.config = DriftConfig(min_samples=4, warmup_samples=16)
        self.start = start
        self.made = 0
        self.refs: list[tuple[Reference, Reference]] = []
        for _, channels in self.layers:
            running = Reference.running(
                self.rng.normal(0, 0.1, channels), self.rng.uniform(0.8, 1.2, channels)
            )
            baseline = Reference.from_moments(self._moments(channels, 0.0))
            self.refs.append((running, baseline))

    def _moments(self, channels: int, shift: float) -> ChannelMoments:
        m = self.rng.normal(shift, 0.3, (16, channels))
        v = self.rng.gamma(8.0, 1 / 8, (16, channels))
        return ChannelMoments.from_rows(m, v, 36.0)

    def records(self, n: int, *, shift: float = 0.0) -> list[WindowRecord]:
        """``n`` consecutive one-minute windows (``shift`` moves every channel's mean)."""
        out = []
        for _ in range(n):
            reports: dict[str, LayerReport] = {}
            for depth, ((name, channels), (running, baseline)) in enumerate(
                zip(self.layers, self.refs, strict=True)
            ):
                stats = LayerStats(
                    moments=self._moments(channels, shift),
                    batch_sizes={4: 4},
                    n_batches=4,
                    batches_seen=4,
                    samples_seen=16,
                )
                reports[name] = assess_layer(
                    name,
                    "BatchNorm2d",
                    stats,
                    eps=1e-5,
                    running=running,
                    baseline=baseline,
                    baseline_kind="warmup",
                    depth=depth,
                    running_stats_mutated=False,
                    config=self.config,
                )
            begin = self.start + timedelta(minutes=self.made)
            out.append(
                WindowRecord(
                    model=self.model,
                    version=self.version,
                    source=self.source,
                    start=begin,
                    end=begin + timedelta(minutes=1),
                    reports=decide(reports, self.config),
                    uid=uuid.uuid4().hex,
                    monitor={"overhead_ratio": 0.01, "windows_dropped": 0.0, "hook_errors": 0.0},
                )
            )
            self.made += 1
        return out

    def body(self, n: int = 1, **kwargs: Any) -> dict[str, Any]:
        return batch_of(self.records(n, **kwargs))


def b64(arrays: Any) -> str:
    return base64.b64encode(encode_arrays(np.asarray(arrays, dtype=np.float64))).decode()


def edited(body: Mapping[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``body`` with the value at ``path`` ("windows.0.layers.1.eps") set."""
    out = copy.deepcopy(dict(body))
    *parents, last = path.split(".")
    node: Any = out
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value
    return out


def row_counts(engine: Engine) -> dict[str, int]:
    """Rows of every bnwatch table."""
    with engine.connect() as conn:
        return {
            table.name: int(
                conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()
            )
            for table in Base.metadata.sorted_tables
        }


def stored_windows(engine: Engine) -> int:
    """Distinct windows stored (a window is one row per layer)."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT count(DISTINCT uid) FROM windows")).scalar_one())


# -- a real ``bnwatch serve`` ------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll ``/healthz`` until it answers 200 (never a fixed sleep); fail if the server exits."""
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        if process.poll() is not None:
            output = log.read_text(errors="replace")
            raise RuntimeError(f"bnwatch serve exited with {process.returncode}:\n{output}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"bnwatch serve did not become healthy:\n{log.read_text()}")
        time.sleep(delay)  # a poll interval, not a wait for readiness
        delay = min(delay * 1.5, 0.5)


@contextlib.contextmanager
def serve(
    db_url: str,
    log: Path,
    *,
    token: str | None = TOKEN,
    workers: int = 1,
    extra_env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Iterator[Server]:
    """A ``bnwatch serve`` subprocess on a free port of 127.0.0.1, stopped (SIGTERM, then
    SIGKILL) on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNWATCH_")}
    env.update(extra_env or {})
    if token is not None:
        env["BNWATCH_API_TOKEN"] = token
    env["PYTHONPATH"] = str(ROOT)
    for attempt in range(3):  # another process may take the free port before the server does
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "bnwatch", "serve", "--db", db_url, "--port", str(port)]
        command += ["--workers", str(workers), "--log-level", "warning"]
        with log.open("ab") as out:
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, process, log, timeout)
        except RuntimeError:
            if attempt == 2 or "address already in use" not in log.read_text().lower():
                raise
            continue
        except BaseException:
            process.kill()
            process.wait(10)
            raise
        break
    try:
        yield Server(url, process, log)
    finally:
        process.terminate()
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def json_bytes(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body).encode()
