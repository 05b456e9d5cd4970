"""How much memory and time do the dashboard's two heaviest reads take?

Run ``python benchmarks/dashboard_reads.py``; ``--smoke`` runs in seconds (few windows, few
versions), ``--parts layer`` or ``--parts overview`` runs one half, ``--json PATH`` keeps every
number, ``--help`` lists the knobs.  PostgreSQL comes from ``--postgres-url`` (as in
``benchmarks/store.py``): that server gets a fresh database, dropped at the end.

What is measured
    ``layer`` -- the read behind the Layer and Batch size pages (``data.channel_view``): one
    layer's windows of the range merged exactly, per time bucket of the page's resolution and
    over the whole range (:meth:`Repository.layer_reports_at`).  The store (SQLite) holds
    ``--windows`` one-minute windows (default 20,000: two weeks) of a model with a layer of
    ``--channels`` channels (default 256) and a narrow one.  Two paths make the same merged
    windows bit for bit (the run stops otherwise):

    * ``in memory`` -- every window of the range read and decoded first, then merged with
      :func:`~bnwatch.store.repository.merge_groups` at each resolution (what
      ``layer_reports_at`` did up to this benchmark);
    * ``streamed`` -- :meth:`Repository.layer_reports_at` as it is.

    Each path runs in a fresh child process, ``--repeats`` times: wall time (median), the
    child's peak resident memory (``VmHWM``) above what it held before the read, and in
    one more run the peak of Python's allocations during the read (``tracemalloc``, numpy's
    arrays included).

    ``overview`` -- the reads of the Overview page for ``--versions`` model versions
    (default 300) on PostgreSQL, each with a few layers and a day of windows: the drift
    sparkline of every version over the last 24 hours and its count of drifted layers.
    ``per version`` calls ``data.span``, ``data.buckets`` and ``data.latest`` for each version
    (what the page did); ``grouped`` is ``data.overview`` (a fixed number of queries for all
    versions).  Both give the same table (the run stops otherwise).  Then the whole page under
    Streamlit's ``AppTest``, as ``benchmarks/dashboard.py`` times it.  Every timing is cold:
    the dashboard's cache is cleared first.

Methodology
    No torch: windows are built as in ``benchmarks/store.py`` (random per-sample moments,
    assessed against running and warm-up references), cycling through a few report sets,
    each window with its own uid and time.  A machine that may be shared: read ratios, not
    absolute times.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.orm import Session

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
)
from bnwatch.schema import LayerReport, WindowRecord  # noqa: E402
from bnwatch.store import repository  # noqa: E402
from bnwatch.store.migrate import engine_for  # noqa: E402
from bnwatch.store.models import Layer, Window  # noqa: E402
from bnwatch.store.repository import (  # noqa: E402
    Repository,
    StoredWindow,
    merge_groups,
    moments_equal,
)

MODEL = "bench"
VERSION = "1"
WIDE = "wide.bn"
WINDOWS = 20_000
CHANNELS = 256
VERSIONS = 300
OVERVIEW_LAYERS = 4
OVERVIEW_WINDOWS = 24
WRITE_BATCH = 500
PATHS = ("in memory", "streamed")

Reports = list[tuple[StoredWindow, LayerReport]]


# -- the stores ---------------------------------------------------------------------------------
def write(
    repo: Repository,
    reports: Sequence[dict[str, LayerReport]],
    spans: Sequence[tuple[datetime, datetime]],
    *,
    model: str = MODEL,
    version: str = VERSION,
) -> None:
    """One window per span, cycling through ``reports``, ``WRITE_BATCH`` per transaction."""
    for i in range(0, len(spans), WRITE_BATCH):
        repo.write_windows(
            [
                WindowRecord(
                    model=model,
                    version=version,
                    source="bench:1",
                    start=start,
                    end=end,
                    reports=reports[(i + j) % len(reports)],
                    uid=uuid.uuid4().hex,
                )
                for j, (start, end) in enumerate(spans[i : i + WRITE_BATCH])
            ]
        )


def minutes(count: int, end: datetime) -> list[tuple[datetime, datetime]]:
    """``count`` consecutive one-minute windows, the last ending at ``end``."""
    end = end.replace(second=0, microsecond=0)
    first = end - timedelta(minutes=count)
    return [(first + timedelta(minutes=i), first + timedelta(minutes=i + 1)) for i in range(count)]


def fill_layer(url: str, windows: int, channels: int, progress: Callable[[str], None]) -> float:
    """The Layer page's store: ``windows`` windows of a wide and a narrow layer; seconds taken."""
    layers = [BnLayer("stem.bn", 8, 8), BnLayer(WIDE, channels, 8)]
    reports = build_reports(layers, variants=4, seed=0, reservoir=0)
    repo = Repository(engine_for(url))
    started = time.perf_counter()
    spans = minutes(windows, datetime.now(timezone.utc))
    for i in range(0, windows, WRITE_BATCH * 8):
        write(repo, reports, spans[i : i + WRITE_BATCH * 8])
        progress(f"  {min(i + WRITE_BATCH * 8, windows)}/{windows} windows written")
    repo.engine.dispose()
    return time.perf_counter() - started


def fill_overview(url: str, versions: int) -> float:
    """The Overview's store: ``versions`` versions of a small model with a day of windows."""
    layers = [BnLayer(f"bn{i}", 16, 8) for i in range(OVERVIEW_LAYERS)]
    reports = build_reports(layers, variants=4, seed=0, reservoir=0)
    repo = Repository(engine_for(url))
    started = time.perf_counter()
    now = datetime.now(timezone.utc)
    for v in range(versions):
        # each version's windows an hour apart, the newest some minutes ago
        end = now - timedelta(minutes=v % 50)
        spans = [(end - timedelta(hours=k + 1), end - timedelta(hours=k)) for k in range(24)]
        write(repo, reports, spans[::-1][:OVERVIEW_WINDOWS], model=f"m{v:03d}", version="1")
    repo.engine.dispose()
    return time.perf_counter() - started


# -- the Layer page's read ----------------------------------------------------------------------
def in_memory(repo: Repository, resolutions: Sequence[float | None]) -> list[Reports]:
    """``layer_reports_at`` as it was: every window of the range read, then merged."""
    with Session(repo.engine) as conn:
        m = repo._model_row(conn, MODEL, VERSION)
        query = repo._range(sa.select(Window, Layer), m, layer=WIDE)
        rows = conn.execute(query.order_by(Window.end, Window.id)).all()
        refs = repo.refs_for(conn, [w for w, _ in rows])
        count = repo._layer_count(conn, m)
    items = [
        (repo.to_stored(m, lr, w, True), lr, w.running_ref_id, w.baseline_ref_id) for w, lr in rows
    ]
    judged = repo.judging(MODEL, VERSION)
    views = []
    for resolution in resolutions:
        seconds = resolution if resolution is not None else repository._WHOLE_RANGE
        merged = merge_groups(items, refs, seconds, judged, layer_count=count)
        out = [(g.window, g.report) for g in merged if g.report is not None]
        if resolution is None and out:
            first = min(w.start for w, *_ in items)
            last = max(w.end for w, *_ in items)
            out = [(replace(w, start=first, end=last), r) for w, r in out]
        views.append(out)
    return views


def streamed(repo: Repository, resolutions: Sequence[float | None]) -> list[Reports]:
    return repo.layer_reports_at(MODEL, VERSION, WIDE, resolutions=resolutions)


def page_resolutions(repo: Repository) -> list[float | None]:
    """What ``data.channel_view`` asks for: the page's buckets, then the whole range."""
    import data

    found = repo.window_span(MODEL, VERSION)
    assert found is not None
    return [data.Span(*found).resolution, None]


def memory_status(field: str) -> int:
    """A field of ``/proc/self/status`` (Linux) in bytes: ``VmRSS`` (resident now) or
    ``VmHWM`` (the resident peak, which ``reset_peak`` brings down to now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == field:
            return int(value.split()[0]) * 1024
    raise KeyError(field)


def reset_peak() -> None:
    """Start ``VmHWM`` over from the resident memory now.  (Not ``ru_maxrss``: a child keeps
    the high-water mark of the process that started it, here one that held a merge.)"""
    Path("/proc/self/clear_refs").write_text("5")


def child(url: str, path: str, traced: bool) -> dict[str, float]:
    """One read in this (fresh) process: seconds, peak RSS growth, peak traced bytes."""
    repo = Repository(engine_for(url, create=False))
    resolutions = page_resolutions(repo)
    reset_peak()
    before = memory_status("VmRSS")
    if traced:
        tracemalloc.start()
    started = time.perf_counter()
    views = (in_memory if path == "in memory" else streamed)(repo, resolutions)
    seconds = time.perf_counter() - started
    peak_traced = tracemalloc.get_traced_memory()[1] if traced else 0
    tracemalloc.stop()
    after = memory_status("VmHWM")
    return {
        "seconds": seconds,
        "rss_bytes": max(after - before, 0),
        "traced_bytes": peak_traced,
        "buckets": len(views[0]),
    }


def run_child(url: str, path: str, traced: bool) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child", url, path, *(["--traced"] if traced else [])],
        check=True,
        capture_output=True,
        text=True,
    )
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def same_views(a: Sequence[Reports], b: Sequence[Reports]) -> bool:
    """Bit-for-bit the same merged windows and reports."""
    for one, other in zip(a, b, strict=True):
        if len(one) != len(other):
            return False
        for (wa, ra), (wb, rb) in zip(one, other, strict=True):
            if (wa.start, wa.end, wa.n_samples, wa.merged_from) != (
                wb.start,
                wb.end,
                wb.n_samples,
                wb.merged_from,
            ):
                return False
            assert wa.stats is not None and wb.stats is not None
            if not moments_equal(wa.stats.moments, wb.stats.moments):
                return False
            for name in ("d", "log_r", "drift_d", "drift_log_r", "drift_z", "z"):
                if not np.array_equal(getattr(ra, name), getattr(rb, name), equal_nan=True):
                    return False
    return True


def measure_layer(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bnwatch-reads-") as tmp:
        url = f"sqlite:///{Path(tmp) / 'bnwatch.db'}"
        progress(f"layer: writing {args.windows} windows of {args.channels} channels")
        write_seconds = fill_layer(url, args.windows, args.channels, progress)
        repo = Repository(engine_for(url, create=False))
        resolutions = page_resolutions(repo)
        if not same_views(in_memory(repo, resolutions), streamed(repo, resolutions)):
            raise SystemExit("the streamed merge differs from the merge in memory")
        repo.engine.dispose()
        paths: dict[str, dict[str, float]] = {}
        # each read in a fresh process (a peak of its own); --smoke reads in this one, a
        # check that the run works, in seconds
        read = child if args.smoke else run_child
        for path in PATHS:
            progress(f"layer: timing {path}")
            runs = [read(url, path, traced=False) for _ in range(args.repeats)]
            paths[path] = {
                "seconds": statistics.median(r["seconds"] for r in runs),
                "rss_bytes": max(r["rss_bytes"] for r in runs),
                "traced_bytes": read(url, path, traced=True)["traced_bytes"],
                "buckets": runs[0]["buckets"],
            }
    return {
        "windows": args.windows,
        "channels": args.channels,
        "write_seconds": write_seconds,
        "paths": paths,
    }


# -- the Overview's reads -----------------------------------------------------------------------
def per_version(url: str, start: datetime | None) -> pd.DataFrame:
    """The Overview's columns as the page read them: three reads per model version."""
    import data

    rows = []
    for row in data.models(url).itertuples():
        found = data.span(url, row.name, row.version, start, None)
        spark: list[float] = []
        if found is not None:
            frame = data.buckets(
                url, row.name, row.version, start, None, found.resolution, ("drift_d_rms",)
            )
            spark = data.sparkline(frame, "drift_d_rms")
        latest = data.latest(url, row.name, row.version)
        drifted = int(latest["drifted"].sum()) if len(latest) else 0
        rows.append((row.name, row.version, spark, drifted))
    return pd.DataFrame(rows, columns=["name", "version", "drift", "drifted_layers"])


def grouped(url: str, start: datetime | None) -> pd.DataFrame:
    import data

    models = data.models(url)
    view = data.overview(url, start, None)
    return pd.DataFrame(
        [
            (name, version, *view.loc[(name, version)])
            for name, version in zip(models["name"], models["version"], strict=True)
        ],
        columns=["name", "version", "drift", "drifted_layers"],
    )


def same_overview(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    if list(a["name"]) != list(b["name"]) or list(a["drifted_layers"]) != list(b["drifted_layers"]):
        return False
    return all(
        np.array_equal(np.array(x, dtype=float), np.array(y, dtype=float), equal_nan=True)
        for x, y in zip(a["drift"], b["drift"], strict=True)
    )


def time_page(url: str) -> float:
    """One cold ``AppTest.run()`` of the Overview page."""
    from streamlit.testing.v1 import AppTest

    import data

    os.environ[data.DATABASE_ENV] = url
    at = AppTest.from_file(str(DASHBOARD / "app.py"), default_timeout=600)
    at.run()
    data.clear()
    started = time.perf_counter()
    at.run()
    seconds = time.perf_counter() - started
    if at.exception:
        raise RuntimeError(f"overview: {at.exception[0].value}")
    return seconds


def measure_overview(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    import data

    with postgres_database(args.postgres_url) as url:
        progress(f"overview: writing {args.versions} versions")
        write_seconds = fill_overview(url, args.versions)
        start = data.since(timedelta(hours=24))
        reads: dict[str, Callable[[str, datetime | None], pd.DataFrame]] = {
            "per version": per_version,
            "grouped": grouped,
        }
        has_grouped = hasattr(data, "overview")
        if not has_grouped:
            del reads["grouped"]
        times: dict[str, list[float]] = {name: [] for name in reads}
        tables: dict[str, pd.DataFrame] = {}
        for _ in range(args.repeats):
            for name, read in reads.items():
                data.clear()
                started = time.perf_counter()
                tables[name] = read(url, start)
                times[name].append(time.perf_counter() - started)
        if has_grouped and not same_overview(tables["per version"], tables["grouped"]):
            raise SystemExit("the grouped overview differs from the per-version reads")
        progress("overview: timing the page")
        page = statistics.median(time_page(url) for _ in range(args.repeats))
        data.repository.clear()
    return {
        "versions": args.versions,
        "write_seconds": write_seconds,
        "reads_seconds": {name: statistics.median(t) for name, t in times.items()},
        "page_seconds": page,
    }


# -- the report ---------------------------------------------------------------------------------
def format_layer(result: dict[str, Any]) -> str:
    paths = result["paths"]
    base = paths["in memory"]
    head = f"{'path':<10} {'seconds':>8} {'peak RSS MB':>12} {'traced MB':>10} {'÷in memory':>24}"
    lines = [
        f"layer read: {result['windows']} windows x {result['channels']} channels (SQLite), "
        f"{paths['streamed']['buckets']} buckets + the whole range",
        head,
        "-" * len(head),
    ]
    for path, p in paths.items():
        ratio = (
            f"time {p['seconds'] / base['seconds']:.2f}, "
            f"mem {p['traced_bytes'] / max(base['traced_bytes'], 1):.3f}"
        )
        lines.append(
            f"{path:<10} {p['seconds']:>8.2f} {p['rss_bytes'] / 2**20:>12.1f} "
            f"{p['traced_bytes'] / 2**20:>10.1f} {ratio:>24}"
        )
    return "\n".join(lines)


def format_overview(result: dict[str, Any]) -> str:
    reads = result["reads_seconds"]
    lines = [f"overview: {result['versions']} model versions (PostgreSQL), cold"]
    for name, seconds in reads.items():
        ratio = seconds / reads["per version"]
        lines.append(f"  reads, {name:<12} {seconds:>7.2f} s  ({ratio:.3f} of per version)")
    lines.append(f"  page (AppTest)      {result['page_seconds']:>7.2f} s")
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Memory and time of the Layer page's merge and of the Overview's reads.",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="300 windows, 12 versions, 1 repeat, read in this process",
    )
    p.add_argument("--parts", default="layer,overview", help="comma-separated: layer, overview")
    p.add_argument("--windows", type=int, default=WINDOWS, help=f"default {WINDOWS}")
    p.add_argument("--channels", type=int, default=CHANNELS, help=f"default {CHANNELS}")
    p.add_argument("--versions", type=int, default=VERSIONS, help=f"default {VERSIONS}")
    p.add_argument("--repeats", type=int, default=3, help="runs per path (default 3)")
    p.add_argument("--postgres-url", default=default_postgres_url(), help="PostgreSQL server")
    p.add_argument("--json", type=Path, help="write every number to this file")
    p.add_argument("--child", nargs=2, metavar=("URL", "PATH"), help=argparse.SUPPRESS)
    p.add_argument("--traced", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.windows, args.versions, args.repeats = 300, 12, 1
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.child:
        url, path = args.child
        print(json.dumps(child(url, path, traced=args.traced)))
        return {}

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    out: dict[str, Any] = {"repeats": args.repeats}
    for part in parts:
        if part == "layer":
            out["layer"] = measure_layer(args, progress)
            print(format_layer(out["layer"]))
        elif part == "overview":
            out["overview"] = measure_overview(args, progress)
            print(format_overview(out["overview"]))
        else:
            raise SystemExit(f"unknown part {part!r}: use layer, overview")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
