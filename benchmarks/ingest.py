"""How fast does ``bnwatch serve`` take windows?  Ingest throughput and latency over HTTP.

Run ``python benchmarks/ingest.py``; ``--smoke`` runs in seconds (two clients, two windows
each, one round, one worker), ``--json PATH`` keeps every number, ``--help`` lists the knobs.
PostgreSQL comes from ``--postgres-url`` (default ``$BNWATCH_BENCH_POSTGRES_URL``,
``$BNWATCH_TEST_POSTGRES_URL`` or ``postgresql://postgres@127.0.0.1:5432/postgres``): that
server gets a fresh database ``bnwatch_bench_<random>``, dropped at the end.

What is measured
    Windows of a ResNet-50 -- 53 BatchNorm layers, 26,560 channels, built without torch as in
    ``benchmarks/store.py`` (random per-sample statistics summarized exactly, assessed against
    a running reference and a warm-up baseline) -- sent as the HTTP sink sends them: one
    :class:`~bnwatch.wire.WindowBatch` JSON body per window (13 moment arrays, the running
    statistics and the 13 baseline arrays of every layer, base64 of codec blobs: about
    6.3 MB), ``POST /api/v1/windows`` with the bearer token, to a real ``bnwatch serve``
    subprocess (uvicorn, ``--workers W``, default 2 = the cores of the reference machine)
    whose store is PostgreSQL.  The service parses and validates the body, recomputes every
    metric of the 53 layers (:func:`bnwatch.wire.to_record`), writes the window in one
    transaction and evaluates the alert rules, as ``bnwatch serve`` does in production.

    For each number of concurrent clients ``C`` (default 1 to 4): windows/s (median over
    rounds, with min and max) and the request latency (client-side, from sending the
    request to reading the answer) at p50 and p99 over every timed request.  Targets beside
    the results: at least 20 windows/s with p99 at most 250 ms.

Methodology
    * Clients are threads of this process, each with its own keep-alive ``httpx.Client``,
      sending its windows one request after the other.  Every body is serialized before any
      timing, so the clients' CPU is what sending 6 MB over loopback costs.  They share the
      machine with the server -- as the benchmark's 2 cores are shared with PostgreSQL too.
    * Steady state.  The server is started once and polled until ``/healthz`` answers; every
      client then sends one untimed window (model, layers and references are created then,
      and every worker and connection is warm), so the timed windows pay what a long-running
      service pays per window.
    * Rounds.  Each round runs every client count in turn, order rotating each round; a
      round of ``C`` clients releases them together (a barrier) and its time runs until the
      last answer.  Throughput is the median over rounds; latency percentiles pool all timed
      requests of that client count.
    * Checks, outside the timed region: every answer is 200 with ``stored`` 1, and the store
      holds exactly windows × 53 layer rows at the end.
    * Server CPU.  The CPU seconds of the server process and its workers (``/proc``) over
      the timed rounds, per window: with throughput it shows whether the server was
      CPU-bound.  The notes break one window's server work down, measured in this process
      (median of 5, untimed): parse and validate, ``to_record``, ``write_windows``.
    * Server settings are left as found: the benchmark measures the service as deployed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # ``python benchmarks/ingest.py``: benchmarks is not installed
    sys.path.insert(0, str(ROOT))

import bnwatch  # noqa: E402
from benchmarks.store import (  # noqa: E402
    RecordFactory,
    build_reports,
    default_postgres_url,
    postgres_database,
    resnet50_bn_layers,
)
from bnwatch.drift import DriftConfig  # noqa: E402
from bnwatch.schema import WindowRecord  # noqa: E402
from bnwatch.store.engine import create_engine  # noqa: E402
from bnwatch.store.migrate import engine_for  # noqa: E402
from bnwatch.store.repository import Repository  # noqa: E402
from bnwatch.wire import WindowBatch, batch_of, to_record  # noqa: E402

ENDPOINT = "/api/v1/windows"
TOKEN = "bench-token"
DEFAULT_CLIENTS = (1, 2, 3, 4)
DEFAULT_WINDOWS = 16
"""Timed windows per client and round."""
DEFAULT_ROUNDS = 3
DEFAULT_WORKERS = 2
TARGET_WINDOWS_PER_S = 20.0
TARGET_P99_MS = 250.0
STARTUP_TIMEOUT = 120.0
REQUEST_TIMEOUT = 300.0


# -- the server ----------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the server and its worker processes (Linux)."""
        try:
            tick = os.sysconf("SC_CLK_TCK")
            pids = {self.process.pid}
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    with contextlib.suppress(OSError):
                        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                        if int(fields[1]) == self.process.pid:  # ppid
                            pids.add(int(entry.name))
            total = 0
            for pid in pids:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime, stime
            return total / tick
        except (OSError, ValueError, IndexError):
            return None


@contextlib.contextmanager
def served(db_url: str, workers: int, log: Path) -> Iterator[Server]:
    """A ``bnwatch serve`` subprocess on a free port, healthy on entry, stopped on exit."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BNWATCH_")}
    env.update(BNWATCH_API_TOKEN=TOKEN, PYTHONPATH=str(ROOT))
    port = _free_port()
    command = [sys.executable, "-m", "bnwatch", "serve", "--db", db_url, "--port", str(port)]
    command += ["--workers", str(workers), "--log-level", "warning"]
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:  # poll /healthz: never a fixed sleep
            if process.poll() is not None:
                raise RuntimeError(f"bnwatch serve exited:\n{log.read_text(errors='replace')}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/healthz", timeout=5.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"bnwatch serve is not healthy:\n{log.read_text()}")
            time.sleep(0.1)
        yield Server(url, process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


# -- the clients ---------------------------------------------------------------------------------
@dataclass
class Round:
    clients: int
    windows: int
    seconds: float
    latencies: list[float]
    failures: list[str]


def run_round(url: str, bodies: Sequence[Sequence[bytes]]) -> Round:
    """Every client sends its bodies one request after the other; all start together."""
    clients = len(bodies)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    failures: list[str] = []
    barrier = threading.Barrier(clients + 1)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}

    def client(i: int, http: httpx.Client) -> None:
        barrier.wait()
        for body in bodies[i]:
            start = time.perf_counter()
            try:
                answer = http.post(ENDPOINT, content=body)
            except httpx.HTTPError as err:
                failures.append(f"client {i}: {err!r}")
                return
            latencies[i].append(time.perf_counter() - start)
            if answer.status_code != 200 or answer.json().get("stored") != 1:
                failures.append(f"client {i}: {answer.status_code} {answer.text[:300]}")
                return

    sessions = [
        httpx.Client(base_url=url, headers=headers, timeout=REQUEST_TIMEOUT) for _ in range(clients)
    ]
    try:
        for http in sessions:  # open the keep-alive connections outside the timed region
            http.get("/healthz")
        threads = [
            threading.Thread(target=client, args=(i, http)) for i, http in enumerate(sessions)
        ]
        for t in threads:
            t.start()
        barrier.wait()
        start = time.perf_counter()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        for http in sessions:
            http.close()
    return Round(
        clients=clients,
        windows=sum(len(b) for b in bodies),
        seconds=seconds,
        latencies=[x for per in latencies for x in per],
        failures=failures,
    )


def bodies_of(records: Sequence[WindowRecord]) -> list[bytes]:
    """One ``WindowBatch`` JSON body per window, as the HTTP sink sends them."""
    return [json.dumps(batch_of([r])).encode() for r in records]


# -- server work, in process ---------------------------------------------------------------------
def stage_ms(
    body: bytes, factory: RecordFactory, db_url: str, repeats: int = 5
) -> dict[str, float]:
    """Median ms of one window's server work: parse and validate, to_record, write_windows."""
    config = DriftConfig()
    parse: list[float] = []
    assess: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        batch = WindowBatch.model_validate_json(body)
        parse.append(time.perf_counter() - start)
        start = time.perf_counter()
        to_record(batch.windows[0], config)
        assess.append(time.perf_counter() - start)
    engine = engine_for(db_url)
    write: list[float] = []
    try:
        repository = Repository(engine)
        records = [
            to_record(WindowBatch.model_validate_json(b).windows[0], config)
            for b in bodies_of(factory.make(repeats + 1))
        ]
        # another model name: the timed rows of the benchmark's model stay countable
        records = [dataclasses.replace(r, model="resnet50-stages") for r in records]
        repository.write_windows(records[:1])  # creates the model, layers and references
        for record in records[1:]:
            start = time.perf_counter()
            repository.write_windows([record])
            write.append(time.perf_counter() - start)
    finally:
        engine.dispose()
    return {
        "parse_validate_ms": 1e3 * statistics.median(parse),
        "to_record_ms": 1e3 * statistics.median(assess),
        "write_windows_ms": 1e3 * statistics.median(write),
    }


# -- results -------------------------------------------------------------------------------------
@dataclass
class Series:
    clients: int
    rounds: list[Round] = field(default_factory=list)


def summarize(series: Series, cpu_seconds: float | None, windows_total: int) -> dict[str, Any]:
    rates = [r.windows / r.seconds for r in series.rounds if r.seconds > 0]
    latencies = np.array([x for r in series.rounds for x in r.latencies]) * 1e3
    rate = statistics.median(rates) if rates else float("nan")
    p50 = float(np.percentile(latencies, 50)) if latencies.size else float("nan")
    p99 = float(np.percentile(latencies, 99)) if latencies.size else float("nan")
    return {
        "clients": series.clients,
        "rounds": len(series.rounds),
        "windows": sum(r.windows for r in series.rounds),
        "requests": int(latencies.size),
        "round_seconds": [r.seconds for r in series.rounds],
        "windows_per_s": rate,
        "windows_per_s_min": min(rates) if rates else float("nan"),
        "windows_per_s_max": max(rates) if rates else float("nan"),
        "latency_ms_p50": p50,
        "latency_ms_p90": float(np.percentile(latencies, 90)) if latencies.size else None,
        "latency_ms_p99": p99,
        "latency_ms_max": float(latencies.max()) if latencies.size else None,
        "target_windows_per_s": TARGET_WINDOWS_PER_S,
        "throughput_ratio": rate / TARGET_WINDOWS_PER_S,
        "meets_throughput": bool(rate >= TARGET_WINDOWS_PER_S),
        "target_p99_ms": TARGET_P99_MS,
        "p99_ratio": p99 / TARGET_P99_MS,
        "meets_p99": bool(p99 <= TARGET_P99_MS),
        "server_cpu_ms_per_window": (
            None if cpu_seconds is None or not windows_total else 1e3 * cpu_seconds / windows_total
        ),
        "failures": [f for r in series.rounds for f in r.failures],
    }


def _ok(met: bool) -> str:
    return "ok" if met else "MISS"


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    header = (
        f"{'clients':>7} {'windows':>7}  {'windows/s median [min, max]':<27} {'÷target':>7}  "
        f"{'target':<9} {'p50 ms':>7} {'p99 ms':>7} {'÷target':>7}  {'target':<10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        rate = (
            f"{row['windows_per_s']:7.1f} [{row['windows_per_s_min']:.1f}, "
            f"{row['windows_per_s_max']:.1f}]"
        )
        rate_goal = f">={row['target_windows_per_s']:.0f} {_ok(row['meets_throughput'])}"
        p99_goal = f"<={row['target_p99_ms']:.0f} {_ok(row['meets_p99'])}"
        lines.append(
            f"{row['clients']:>7} {row['windows']:>7}  {rate:<27} "
            f"{row['throughput_ratio']:>6.2f}x  {rate_goal:<9} "
            f"{row['latency_ms_p50']:>7.0f} {row['latency_ms_p99']:>7.0f} "
            f"{row['p99_ratio']:>6.2f}x  {p99_goal:<10}"
        )
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Ingest throughput and latency of ResNet-50 windows through bnwatch serve "
        "into PostgreSQL.",
        epilog="Methodology: see the module docstring of benchmarks/ingest.py.",
    )
    p.add_argument(
        "--postgres-url",
        default=None,
        metavar="URL",
        help="PostgreSQL server to create the benchmark database on (default: "
        "$BNWATCH_BENCH_POSTGRES_URL, $BNWATCH_TEST_POSTGRES_URL or the local server)",
    )
    p.add_argument(
        "--clients",
        type=int,
        nargs="+",
        default=None,
        help=f"concurrent clients, one row each (default {' '.join(map(str, DEFAULT_CLIENTS))})",
    )
    p.add_argument(
        "--windows",
        type=int,
        default=None,
        help=f"timed windows per client and round (default {DEFAULT_WINDOWS})",
    )
    p.add_argument("--rounds", type=int, default=None, help=f"rounds (default {DEFAULT_ROUNDS})")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help=f"bnwatch serve --workers (default {DEFAULT_WORKERS})",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for tests: 2 clients, 2 windows, 1 round, 1 worker",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    p.add_argument("--seed", type=int, default=0, help="seed of the random statistics")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.smoke:
        args.clients = args.clients or [2]
        args.windows = 2 if args.windows is None else args.windows
        args.rounds = 1 if args.rounds is None else args.rounds
        args.workers = 1 if args.workers is None else args.workers
    args.clients = list(dict.fromkeys(args.clients or DEFAULT_CLIENTS))
    args.windows = DEFAULT_WINDOWS if args.windows is None else args.windows
    args.rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    args.workers = DEFAULT_WORKERS if args.workers is None else args.workers
    args.postgres_url = args.postgres_url or default_postgres_url()
    for flag, value in (
        ("--windows", args.windows),
        ("--rounds", args.rounds),
        ("--workers", args.workers),
        *(("--clients", c) for c in args.clients),
    ):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the table, optionally write JSON; returns the results."""
    args = parse_args(argv)
    load_before = os.getloadavg()
    started = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[{time.perf_counter() - started:6.1f}s] {message}", file=sys.stderr, flush=True)

    layers = resnet50_bn_layers()
    channels = sum(layer.channels for layer in layers)
    factory = RecordFactory(build_reports(layers, seed=args.seed))
    # every body of every round, serialized before any timing
    warmup = {c: [bodies_of(factory.make(1)) for _ in range(c)] for c in args.clients}
    planned: dict[int, list[list[list[bytes]]]] = {
        c: [[bodies_of(factory.make(args.windows)) for _ in range(c)] for _ in range(args.rounds)]
        for c in args.clients
    }
    body_bytes = len(planned[args.clients[0]][0][0][0])
    progress(f"{sum(args.clients) * args.windows * args.rounds} timed bodies built")

    series = {c: Series(c) for c in args.clients}
    with contextlib.ExitStack() as stack:
        db_url = stack.enter_context(postgres_database(args.postgres_url))
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnwatch_ingest_")))
        server = stack.enter_context(served(db_url, args.workers, tmp / "serve.log"))
        progress(f"bnwatch serve --workers {args.workers} healthy at {server.url}")
        for c in args.clients:
            warm = run_round(server.url, warmup[c])
            if warm.failures:
                raise RuntimeError(f"warm-up failed: {warm.failures[:3]}\n{server.log.read_text()}")
        cpu_before = server.cpu_seconds()
        for r in range(args.rounds):
            order = args.clients[r % len(args.clients) :] + args.clients[: r % len(args.clients)]
            for c in order:
                result = run_round(server.url, planned[c][r])
                series[c].rounds.append(result)
                progress(
                    f"round {r + 1}/{args.rounds}, {c} client(s): "
                    f"{result.windows / result.seconds:.1f} windows/s"
                    + (f", FAILURES {result.failures[:2]}" if result.failures else "")
                )
        cpu_after = server.cpu_seconds()
        timed = sum(r.windows for s in series.values() for r in s.rounds)
        cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
        engine = create_engine(db_url)
        try:
            with engine.connect() as conn:
                rows_stored = int(
                    conn.execute(
                        sa.text(
                            "SELECT count(*) FROM windows w JOIN models m ON m.id = w.model_id "
                            "WHERE m.name = 'resnet50'"
                        )
                    ).scalar_one()
                )
        finally:
            engine.dispose()
        stages = stage_ms(planned[args.clients[0]][0][0][0], factory, db_url)
        database = sa.make_url(db_url).database or ""
    warmed = sum(args.clients)
    rows_expected = (timed + warmed) * len(layers)
    rows = [summarize(series[c], cpu, timed) for c in args.clients]
    total = time.perf_counter() - started
    load_after = os.getloadavg()

    meta = {
        "model": "ResNet-50 BatchNorm layers (no torch: random statistics, decided reports)",
        "bn_layers": len(layers),
        "bn_channels": channels,
        "body_bytes_per_window": body_bytes,
        "windows_per_request": 1,
        "workers": args.workers,
        "clients": args.clients,
        "windows_per_client_and_round": args.windows,
        "rounds": args.rounds,
        "rows_expected": rows_expected,
        "rows_stored": rows_stored,
        "complete": rows_stored == rows_expected,
        "server_cpu_seconds_timed": cpu,
        "stage_ms_in_process": stages,
        "database": database,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "bnwatch": bnwatch.__version__,
        "smoke": args.smoke,
        "total_seconds": total,
        "load_average_1m_before_after": [load_before[0], load_after[0]],
    }
    print(
        f"ResNet-50 windows: {len(layers)} layers, {channels:,} channels; one window per "
        f"request, {body_bytes / 1e6:.2f} MB of JSON each; bnwatch serve --workers "
        f"{args.workers} into PostgreSQL on {os.cpu_count()} CPUs"
    )
    print(
        f"{args.rounds} round(s), {args.windows} timed windows per client and round; windows/s = "
        "median over rounds; latency = client-side, all timed requests"
    )
    print()
    print(format_table(rows))
    print()
    per_window = rows[0]["server_cpu_ms_per_window"]
    print(
        "  server work per window, in process: parse+validate "
        f"{stages['parse_validate_ms']:.0f} ms, to_record {stages['to_record_ms']:.0f} ms, "
        f"write_windows {stages['write_windows_ms']:.0f} ms"
        + ("" if per_window is None else f"; server CPU over the rounds {per_window:.0f} ms/window")
    )
    failures = [f for row in rows for f in row["failures"]]
    if failures or rows_stored != rows_expected:
        print(
            f"  WARNING: {len(failures)} failed request(s) {failures[:2]}; {rows_stored} rows "
            f"stored, {rows_expected} expected"
        )
    print(
        f"total runtime {total:.1f} s; 1-min load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after"
    )
    out = {"meta": meta, "results": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"results written to {args.json}")
    return out


if __name__ == "__main__":
    main()
