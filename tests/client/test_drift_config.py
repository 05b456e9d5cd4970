"""A remote monitor's thresholds reach the store through a real ``bnwatch serve``: kept as
sent, or -- when the service recomputes every window (``BNWATCH_RECOMPUTE=1``) -- replaced
by the service's, which decided the stored flags.  On SQLite and PostgreSQL."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import bnwatch
from bnwatch.client import HttpSink
from bnwatch.drift import DriftConfig
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.client.conftest import ServerProcess, free_port
from tests.store.helpers import batches, small_cnn

TOKEN = "drift-config-token-0123"
MONITOR = DriftConfig(alpha=1e-4, min_shift=5.0, warmup_samples=16, min_samples=4)


@pytest.mark.parametrize("recompute", [False, True], ids=["as-sent", "recomputed"])
def test_the_store_names_the_thresholds_that_decided_the_flags(
    db_url: str, tmp_path: Path, recompute: bool
) -> None:
    engine = engine_for(db_url)  # the schema, as `bnwatch db upgrade` makes it
    port = free_port()
    argv = [sys.executable, "-m", "bnwatch", "serve", "--db", db_url]
    process = ServerProcess(
        [*argv, "--host", "127.0.0.1", "--port", str(port)],
        port,
        tmp_path / "server.log",
        env={"BNWATCH_API_TOKEN": TOKEN, "BNWATCH_RECOMPUTE": "1" if recompute else "0"},
    )
    process.start()
    try:
        net = small_cnn()
        sink = HttpSink(process.url, token=TOKEN, spool_dir=tmp_path / "spool", timeout=10.0)
        mon = bnwatch.watch(
            net,
            name="cnn",
            version="1",
            store=sink,
            window_seconds=None,
            overhead_budget=None,
            config=MONITOR,
        )
        with torch.inference_mode():
            for i, x in enumerate(batches(6)):
                net(x)
                if i % 3 == 2:
                    mon.flush()
        mon.close(timeout=60)
        assert sink.stats().written == 2
        repo = Repository(engine)
        # the service judges at its default thresholds when it recomputes
        expected = DriftConfig() if recompute else MONITOR
        assert repo.drift_config("cnn", "1") == expected
        (source,) = repo.sources("cnn", "1")
        assert source.drift_config == expected and source.windows == 2
    finally:
        process.stop()
        engine.dispose()
