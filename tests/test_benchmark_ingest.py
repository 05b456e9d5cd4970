"""The ingest benchmark runs end to end against a real ``bnwatch serve`` and PostgreSQL.

Timings are never asserted: the smoke run checks that every window was stored (rows =
windows × 53 layers), that every request succeeded, and that the numbers are sensible.
PostgreSQL comes from ``BNWATCH_TEST_POSTGRES_URL`` (the benchmark creates and drops its own
database there); without it the test is skipped -- except in CI, where it fails.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import ingest  # noqa: E402

PG_ENV = "BNWATCH_TEST_POSTGRES_URL"


def _postgres_admin_url() -> str:
    url = os.environ.get(PG_ENV)
    if not url:
        message = f"{PG_ENV} is not set: cannot run the ingest benchmark"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(message + " (CI requires it)")
        pytest.skip(message)
    return url


def test_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin_url = _postgres_admin_url()
    out = tmp_path / "ingest.json"
    results = ingest.main(["--smoke", "--quiet", "--postgres-url", admin_url, "--json", str(out)])
    table = capsys.readouterr().out
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    meta = results["meta"]
    assert (meta["bn_layers"], meta["bn_channels"]) == (53, 26_560)
    assert meta["complete"] and meta["rows_stored"] == meta["rows_expected"]
    assert meta["rows_expected"] == (2 * 2 + 2) * 53  # timed + one warm-up window per client
    assert meta["body_bytes_per_window"] > 1_000_000
    assert set(meta["stage_ms_in_process"]) == {
        "parse_validate_ms",
        "to_record_ms",
        "write_windows_ms",
    }
    (row,) = results["results"]
    assert (row["clients"], row["windows"], row["requests"]) == (2, 4, 4)
    assert row["failures"] == []
    for key in ("windows_per_s", "latency_ms_p50", "latency_ms_p99"):
        assert math.isfinite(row[key]) and row[key] > 0
    assert row["latency_ms_p50"] <= row["latency_ms_p99"]
    assert "windows/s" in table and "p99 ms" in table

    engine = sa.create_engine(sa.make_url(admin_url).set(drivername="postgresql+psycopg"))
    try:
        with engine.connect() as conn:
            left = conn.execute(
                sa.text("SELECT count(*) FROM pg_database WHERE datname = :name"),
                {"name": meta["database"]},
            ).scalar_one()
    finally:
        engine.dispose()
    assert left == 0, f"the benchmark left its database {meta['database']} behind"


def test_arguments() -> None:
    args = ingest.parse_args(["--smoke"])
    assert (args.clients, args.windows, args.rounds, args.workers) == ([2], 2, 1, 1)
    args = ingest.parse_args([])
    assert args.clients == list(ingest.DEFAULT_CLIENTS)
    with pytest.raises(SystemExit):
        ingest.parse_args(["--clients", "0"])
