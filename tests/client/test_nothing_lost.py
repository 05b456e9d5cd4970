"""Nothing lost: a monitor streams to a service that is SIGKILLed and restarted mid-stream;
every window is stored exactly once.

Runs against the stand-in service (``tests/client/server.py``) in a child process, and
against the real ``bnwatch serve`` (SQLite, with ``BNWATCH_API_TOKEN``) once
``bnwatch.service`` exists -- skipped with the reason until then.
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import sqlalchemy as sa
import torch

import bnwatch
from bnwatch.client import HttpSink
from bnwatch.schema import WindowRecord
from bnwatch.store.migrate import engine_for
from tests.client.conftest import ServerProcess, free_port, python_module, wait_for
from tests.store.helpers import batches, renamed, small_cnn

TOKEN = "e2e-token-0123456789"
LAYERS = 3  # small_cnn's BatchNorm layers


class RecordingSink(HttpSink):
    """Remembers the uid of every window handed to it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.uids: list[str] = []

    def write(self, window: WindowRecord) -> None:
        self.uids.append(window.uid)
        super().write(window)


@dataclass
class Service:
    """A service process and how to read what it stored: uid -> times stored."""

    process: ServerProcess
    stored: Callable[[], Counter[str]]
    token: str | None
    per_window: int  # stored rows per window


def serve_argv(db: str, port: int) -> list[str]:
    """The real service on 127.0.0.1:port, storing in ``db``."""
    where = ["--host", "127.0.0.1", "--port", str(port)]
    return [sys.executable, "-m", "bnwatch", "serve", "--db", db, *where]


def real_service_available() -> bool:
    return importlib.util.find_spec("bnwatch.service") is not None


@pytest.fixture(params=["stand-in", "bnwatch serve"])
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    port = free_port()
    log = tmp_path / "server.log"
    if request.param == "stand-in":
        state = tmp_path / "stored-uids.txt"
        process = ServerProcess(
            python_module("tests.client.server", "--port", str(port), "--state", str(state)),
            port,
            log,
        )

        def stored_fake() -> Counter[str]:
            lines = state.read_text().split() if state.exists() else []
            return Counter(lines)

        result = Service(process, stored_fake, None, 1)
    else:
        if not real_service_available():
            pytest.skip(
                "bnwatch.service does not exist yet: `bnwatch serve` is being built; "
                "this end-to-end test runs once it is"
            )
        db = f"sqlite:///{tmp_path / 'service.db'}"
        engine_for(db).dispose()  # the schema, in case serve expects `bnwatch db upgrade`
        process = ServerProcess(
            serve_argv(db, port),
            port,
            log,
            env={"BNWATCH_API_TOKEN": TOKEN},
        )

        def stored_real() -> Counter[str]:
            engine = sa.create_engine(db)
            try:
                with engine.connect() as conn:
                    raw = "SELECT uid FROM windows WHERE resolution_seconds = 0"
                    rows = conn.execute(sa.text(raw)).scalars().all()
            finally:
                engine.dispose()
            return Counter(rows)

        result = Service(process, stored_real, TOKEN, LAYERS)
    process.start()
    try:
        yield result
    finally:
        process.stop()


def test_nothing_lost_when_the_service_is_killed_and_restarted(
    service: Service, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = small_cnn()
    sink = RecordingSink(
        service.process.url,
        token=service.token,
        spool_dir=tmp_path / "spool",
        batch_size=4,
        timeout=5.0,
        retry_initial=0.05,
        retry_max=0.5,
    )
    mon = bnwatch.watch(
        net,
        name="cnn",
        version="1",
        store=sink,
        window_seconds=None,
        overhead_budget=None,
        config=bnwatch.DriftConfig(warmup_samples=16, min_samples=4),
    )
    n_windows = 80
    data = batches(n_windows * 2)
    with caplog.at_level(logging.WARNING, logger="bnwatch"), torch.inference_mode():
        for w in range(n_windows):
            for x in data[2 * w : 2 * w + 2]:
                net(x)
            mon.flush()
            if w in (15, 50):  # down while windows stream (and maybe a request is in flight)
                service.process.kill()
            elif w == 20:  # some windows spooled, then back
                assert wait_for(lambda: sink.stats().failures >= 1)
                service.process.start()
            elif w == 60:  # back without waiting for the client to notice the outage
                service.process.start()
        mon.close(timeout=120)
    stats = sink.stats()
    assert len(sink.uids) == n_windows == mon.stats().windows_closed
    assert (stats.dropped, stats.rejected, stats.spooled, stats.queued) == (0, 0, 0, 0)
    assert stats.written + stats.duplicates == n_windows  # duplicates: re-sent, stored once
    assert stats.failures >= 1
    stored = service.stored()
    assert set(stored) == set(sink.uids)  # every window ...
    assert set(stored.values()) == {service.per_window}  # ... exactly once
    assert mon.stats().windows_dropped == 0
    assert any("cannot send windows" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not real_service_available(), reason="bnwatch.service does not exist yet")
def test_the_real_service_speaks_the_protocol(tmp_path: Path) -> None:
    """The answers HttpSink relies on: 200 IngestResult, duplicates, 422, 401."""
    import httpx

    from bnwatch.wire import IngestResult, batch_of
    from tests.store.helpers import record_windows

    port = free_port()
    db = f"sqlite:///{tmp_path / 'service.db'}"
    engine_for(db).dispose()
    process = ServerProcess(
        serve_argv(db, port),
        port,
        tmp_path / "server.log",
        env={"BNWATCH_API_TOKEN": TOKEN},
    )
    process.start()
    try:
        records = record_windows(2)
        url = process.url + "/api/v1/windows"
        auth = {"Authorization": f"Bearer {TOKEN}"}
        first = httpx.post(url, json=batch_of(records), headers=auth, timeout=30)
        assert first.status_code == 200, first.text
        assert IngestResult.model_validate_json(first.content).stored == 2
        again = httpx.post(url, json=batch_of(records), headers=auth, timeout=30)
        assert IngestResult.model_validate_json(again.content).duplicates == 2
        bad = httpx.post(
            url, json=batch_of([renamed(records[0], uid="no good!")]), headers=auth, timeout=30
        )
        assert bad.status_code == 422
        refused = httpx.post(
            url, json=batch_of(records), headers={"Authorization": "Bearer nope"}, timeout=30
        )
        assert refused.status_code == 401
    finally:
        process.stop()
