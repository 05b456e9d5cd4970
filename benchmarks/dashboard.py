"""How fast are the dashboard's pages on a month of data?  Each page's AppTest run time.

Run ``python benchmarks/dashboard.py``; ``--smoke`` runs in seconds (two days, few layers),
``--backends sqlite`` skips PostgreSQL, ``--json PATH`` keeps every number, ``--help`` lists
the knobs.  PostgreSQL comes from ``--postgres-url`` (as in ``benchmarks/store.py``): that
server gets a fresh database, dropped at the end.

What is measured
    The store holds 30 days of one-minute windows of a 53-layer model (ResNet-50's BatchNorm
    layers, channels divided by ``--channel-divisor``, default 8: 3,320 channels) *after*
    ``bnwatch db compact --older-than 1d --resolution 1h``: 29 days of hourly windows and the
    last day of one-minute windows: about 2,140 windows and 113,000 rows.  (The hourly windows are
    written as such and marked with ``resolution_seconds = 3600``, which is what compaction
    leaves; writing 41,760 minute windows to compact them would only slow the benchmark.)
    The alert engine has run over them; two recalibrations are recorded.

    Each page runs under Streamlit's ``AppTest`` (the real script: the entry script's
    sidebar, then the page) with the time range set to "last 30 days", the worst case.  The
    time is one ``AppTest.run()`` of the page.  *Cold*: every cache cleared first (the first
    visit, or the first after the 30 s TTL); *warm*: the same page again (a rerun within the
    TTL, e.g. after moving a widget elsewhere).  The Layer page shows the widest layer
    (2,048 / divisor channels).  Median over ``--repeats`` runs; target 2 s per page, cold.

Methodology
    No torch: windows are built as in ``benchmarks/store.py`` (random per-sample moments,
    assessed against running and warm-up references), cycling through a few report sets,
    each window with its own uid and time.  Pages run in this process, one after another,
    on a machine that may be shared: read ratios, not absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "dashboard"
for path in (ROOT, DASHBOARD):  # benchmarks/ and the dashboard's modules are not installed
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from benchmarks.store import (  # noqa: E402
    BnLayer,
    build_reports,
    default_postgres_url,
    postgres_database,
    resnet50_bn_layers,
)
from bnwatch.alerts import AlertEngine  # noqa: E402
from bnwatch.schema import WindowRecord  # noqa: E402
from bnwatch.store.migrate import engine_for  # noqa: E402
from bnwatch.store.models import Window  # noqa: E402
from bnwatch.store.repository import Repository  # noqa: E402

MODEL = "resnet50"
VERSION = "bench"
PAGES = ("overview", "model", "layer", "batch_size", "alerts", "reports")
TARGET_SECONDS = 2.0
DAYS = 30
WRITE_BATCH = 64


@dataclass(frozen=True)
class Plan:
    days: int
    divisor: int
    layers: int | None  # None: all 53


def scaled_layers(divisor: int, limit: int | None) -> list[BnLayer]:
    layers = [
        replace(layer, channels=max(4, layer.channels // divisor)) for layer in resnet50_bn_layers()
    ]
    return layers[:limit] if limit else layers


def timeline(days: int, now: datetime) -> list[tuple[datetime, datetime, bool]]:
    """(start, end, compacted) of every window: hourly before the last day, then minutes."""
    now = now.replace(second=0, microsecond=0)
    cut = now - timedelta(days=1)
    first = cut - timedelta(days=days - 1)
    first = first.replace(minute=0)
    out = []
    t = first
    while t + timedelta(hours=1) <= cut:
        out.append((t, t + timedelta(hours=1), True))
        t += timedelta(hours=1)
    while t + timedelta(minutes=1) <= now:
        out.append((t, t + timedelta(minutes=1), False))
        t += timedelta(minutes=1)
    return out


def fill(url: str, plan: Plan, progress: Callable[[str], None]) -> dict[str, Any]:
    """Write the month of windows, mark the compacted ones, run the alert engine."""
    layers = scaled_layers(plan.divisor, plan.layers)
    reports = build_reports(layers, variants=4, seed=0)
    spans = timeline(plan.days, datetime.now(timezone.utc))
    repo = Repository(engine_for(url))
    started = time.perf_counter()
    for i in range(0, len(spans), WRITE_BATCH):
        records = [
            WindowRecord(
                model=MODEL,
                version=VERSION,
                source="bench:1",
                start=start,
                end=end,
                reports=reports[(i + j) % len(reports)],
                uid=uuid.uuid4().hex,
            )
            for j, (start, end, _) in enumerate(spans[i : i + WRITE_BATCH])
        ]
        repo.write_windows(records)
        if i and i % (WRITE_BATCH * 8) == 0:
            progress(f"  {i}/{len(spans)} windows written")
    compacted_until = max((end for _, end, c in spans if c), default=None)
    if compacted_until is not None:
        with repo.engine.begin() as conn:
            conn.execute(
                sa.update(Window)
                .where(Window.end <= compacted_until)
                .values(resolution_seconds=3600.0)
            )
    write_seconds = time.perf_counter() - started
    AlertEngine().evaluate(repo, MODEL, VERSION)
    for status in ("applied", "rejected"):
        rid = repo.start_recalibration(MODEL, VERSION, method="precise")
        repo.finish_recalibration(rid, status=status, outcome={"samples": 512})
    rows = repo.window_count()
    repo.engine.dispose()
    return {
        "windows": len(spans),
        "hourly": sum(c for _, _, c in spans),
        "layers": len(layers),
        "channels": sum(layer.channels for layer in layers),
        "widest_layer": max(layers, key=lambda layer: layer.channels).name,
        "rows": rows,
        "write_seconds": write_seconds,
    }


def time_pages(url: str, widest: str, repeats: int) -> dict[str, dict[str, float]]:
    """Median cold and warm ``AppTest.run()`` seconds of each page."""
    from streamlit.testing.v1 import AppTest

    import data

    os.environ[data.DATABASE_ENV] = url
    cold: dict[str, list[float]] = {p: [] for p in PAGES}
    warm: dict[str, list[float]] = {p: [] for p in PAGES}
    for _ in range(repeats):
        for page in PAGES:
            at = AppTest.from_file(str(DASHBOARD / "app.py"), default_timeout=300)
            at.session_state["bnwatch_layer"] = widest
            at.run()
            at.sidebar.selectbox(key="time_range").set_value("last 30 days").run()
            at.switch_page(f"views/{page}.py")
            data.clear()
            for bucket in (cold, warm):
                started = time.perf_counter()
                at.run()
                bucket[page].append(time.perf_counter() - started)
                if at.exception:
                    raise RuntimeError(f"page {page}: {at.exception[0].value}")
    return {
        p: {"cold_s": statistics.median(cold[p]), "warm_s": statistics.median(warm[p])}
        for p in PAGES
    }


@contextmanager
def database(backend: str, postgres_url: str) -> Iterator[str]:
    if backend == "sqlite":
        with tempfile.TemporaryDirectory(prefix="bnwatch-dash-") as tmp:
            yield f"sqlite:///{Path(tmp) / 'bnwatch.db'}"
    else:
        with postgres_database(postgres_url) as url:
            yield url


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """One row per page: cold and warm seconds per backend, and cold against the target."""
    head = f"{'page':<12}" + "".join(
        f" | {b:<10} {'cold s':>7} {'warm s':>7} {'cold/2s':>8}" for b in results
    )
    lines = [head, "-" * len(head)]
    for page in PAGES:
        line = f"{page:<12}"
        for b in results:
            t = results[b]["pages"][page]
            ok = "ok" if t["cold_s"] <= TARGET_SECONDS else "MISS"
            line += (
                f" | {'':<10} {t['cold_s']:>7.2f} {t['warm_s']:>7.2f} "
                f"{t['cold_s'] / TARGET_SECONDS:>5.2f} {ok:<2}"
            )
        lines.append(line)
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Time every dashboard page on 30 days of a 53-layer model's windows "
        "(after compaction), under Streamlit's AppTest.",
    )
    p.add_argument("--smoke", action="store_true", help="2 days, 6 layers, 1 repeat")
    p.add_argument("--days", type=int, default=DAYS, help=f"days of windows (default {DAYS})")
    p.add_argument(
        "--channel-divisor",
        type=int,
        default=8,
        help="divide ResNet-50's channel counts by this (default 8)",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs per page (default 3)")
    p.add_argument(
        "--backends",
        default="sqlite,postgresql",
        help="comma-separated: sqlite, postgresql (default both)",
    )
    p.add_argument("--postgres-url", default=default_postgres_url(), help="PostgreSQL server")
    p.add_argument("--json", type=Path, help="write every number to this file")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    plan = (
        Plan(days=2, divisor=32, layers=6)
        if args.smoke
        else Plan(args.days, args.channel_divisor, None)
    )
    repeats = 1 if args.smoke else args.repeats

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    results: dict[str, dict[str, Any]] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        if backend not in ("sqlite", "postgresql"):
            raise SystemExit(f"unknown backend {backend!r}: use sqlite, postgresql")
        with database(backend, args.postgres_url) as url:
            progress(f"{backend}: writing {plan.days} days of windows")
            store = fill(url, plan, progress)
            progress(
                f"{backend}: {store['windows']} windows ({store['rows']} rows) in "
                f"{store['write_seconds']:.1f} s; timing pages"
            )
            results[backend] = {
                "store": store,
                "pages": time_pages(url, store["widest_layer"], repeats),
            }
    first = next(iter(results.values()))["store"]
    print(
        f"dashboard pages on {first['windows']} windows ({first['hourly']} hourly + "
        f"{first['windows'] - first['hourly']} one-minute) of {first['layers']} layers, "
        f"{first['channels']} channels; range 'last 30 days'; median of {repeats}"
    )
    print(format_table(results))
    out = {"plan": vars(plan), "repeats": repeats, "results": results}
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
