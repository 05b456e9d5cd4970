"""The dashboard benchmark runs end to end on SQLite and PostgreSQL and every page renders on
its month of windows.  Timings are never asserted (shared machines are noisy): the smoke run
checks the store it built (hourly windows before the last day, minutes after, every layer of
every window) and that every page produced a time."""

from __future__ import annotations

import itertools
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``benchmarks`` is not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import dashboard  # noqa: E402
from tests.conftest import postgres_admin_url  # noqa: E402


def test_timeline_is_hourly_then_minutes() -> None:
    now = datetime(2026, 1, 31, 12, 30, 15, tzinfo=timezone.utc)
    spans = dashboard.timeline(30, now)
    hourly = [s for s in spans if s[2]]
    minutes = [s for s in spans if not s[2]]
    assert all(end - start == timedelta(hours=1) for start, end, _ in hourly)
    assert all(end - start == timedelta(minutes=1) for start, end, _ in minutes)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # contiguous
    assert minutes[-1][1] == now.replace(second=0)
    assert minutes[0][0] <= now - timedelta(days=1) < minutes[0][1] + timedelta(hours=1)
    assert len(hourly) == 29 * 24  # from the hour before the cut, 29 days back
    assert len(dashboard.scaled_layers(8, None)) == 53


def test_smoke_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "dash.json"
    results = dashboard.main(
        [
            "--smoke",
            "--backends",
            "sqlite,postgresql",
            "--postgres-url",
            postgres_admin_url(),
            "--json",
            str(out),
        ]
    )
    assert json.loads(out.read_text())["repeats"] == 1
    for backend in ("sqlite", "postgresql"):
        store = results["results"][backend]["store"]
        assert store["rows"] == store["windows"] * store["layers"] == store["windows"] * 6
        assert 0 < store["hourly"] < store["windows"]
        pages = results["results"][backend]["pages"]
        assert set(pages) == set(dashboard.PAGES)
        assert all(t["cold_s"] > 0 and t["warm_s"] > 0 for t in pages.values())
    table = capsys.readouterr().out
    assert all(page in table for page in dashboard.PAGES)
