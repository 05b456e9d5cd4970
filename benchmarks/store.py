"""How fast does the store take windows?  Insert throughput of ResNet-50-sized windows.

Run ``python benchmarks/store.py``; ``--smoke`` runs in seconds (two windows per path, one
round), ``--backends sqlite`` skips PostgreSQL, ``--json PATH`` keeps every number, ``--help``
lists the knobs.  PostgreSQL comes from ``--postgres-url`` (default ``$BNWATCH_BENCH_POSTGRES_URL``,
``$BNWATCH_TEST_POSTGRES_URL`` or ``postgresql://postgres@127.0.0.1:5432/postgres``): that
server gets a fresh database ``bnwatch_bench_<random>``, dropped at the end.

What is measured
    A *window* is one closed :class:`~bnwatch.schema.WindowRecord` of a ResNet-50: 53
    :class:`~bnwatch.schema.LayerReport` s with 26,560 channels in all, i.e. 53 rows of the
    ``windows`` table carrying 13 × 8 × 26,560 = 2,762,240 bytes of float64 sufficient
    statistics (:func:`bnwatch.codec.raw_moment_bytes`, the yardstick of the bytes
    columns).  Windows go into SQLite (a file in a temporary directory) and PostgreSQL (a
    database created for the run) through the two write paths bnwatch has:

    * ``repository`` -- :meth:`Repository.write_windows` called directly, ``B`` windows per
      call (one transaction per call; default ``B`` = 1 and 8); the time is the sum of the
      calls.
    * ``pglz`` (PostgreSQL only; ``--no-compare-storage`` skips it) -- the repository path
      at the largest batch size with the array columns set back to TOAST's default ``STORAGE
      EXTENDED`` for its timed writes (what migration 0006 changed; the rest of the schema
      stays at head) and to ``EXTERNAL`` after: the store's storage as it was before 0006, in
      the same rounds as the rest, so the ratio of the two rows is the effect of not
      compressing incompressible float blobs.
    * ``driver`` -- the ceiling: the very bytes bnwatch stores for each window (53 rows of
      encoded moments and reservoir blobs, encoded before the timing) inserted by the database
      driver alone into a bare table (id, uid, layer, the two blobs; on PostgreSQL at
      ``STORAGE EXTERNAL`` as migration 0006 sets) at the largest batch size, one transaction
      per batch: on PostgreSQL by binary ``COPY`` (psycopg's ``copy.write_row``, as bnwatch
      stores all rows of a window but its first, though without bnwatch's row-by-row
      ``WHERE``: with no client work to overlap, the driver times the same with it or
      without), on SQLite by DB-API ``executemany``.  No
      bnwatch code runs in its timing, so it is what the server and its disk take for these
      bytes; every other row is also given as a share of it (``÷driver``), which separates
      "bnwatch is slow" from "this disk is slow".
      ``--no-driver`` skips it.
    * ``writer`` -- the real background writer :class:`~bnwatch.store.writer.StoreSink`
      (default batch size): ``write()`` every window, then ``flush()``; the time runs from
      the first ``write()`` to ``flush()`` returning, i.e. until everything is stored.
    * ``replicas`` (PostgreSQL only, shown as ``P replicas``; ``--replicas 0`` skips it) --
      what the database takes from a deployment: ``P`` processes (default 4, forked; each a
      replica with its own ``StoreSink`` and connection) store the round's windows between
      them, ``records / P`` each, at once.  Every process first stores an untimed window of
      its own and waits; the time runs from the common start to the last process's
      ``flush()`` returning (one monotonic clock).  A single model's monitor sends a window
      a minute, so 50 windows/s into one database is many replicas' traffic; the ``writer``
      row is one process alone.

    Reported per backend and path: windows/s (median over rounds, with min and max), the
    same as MB/s of raw float64 statistics, and stored bytes per window against the raw
    bytes.  Stored bytes are the growth of ``pg_total_relation_size('windows')`` (heap,
    TOAST and every index) on PostgreSQL, and of the database file after ``PRAGMA
    wal_checkpoint(TRUNCATE)`` on SQLite, divided by the windows added.  Targets beside the
    results: at least 50 windows/s into PostgreSQL, at most 1.2× raw bytes stored for the
    statistics.

    Reservoirs are reported apart, not hidden.  Every window also carries what
    ``bnwatch.watch`` keeps by default: per layer a reservoir of ``--reservoir`` (default 8)
    per-sample channel means, float32 -- for ResNet-50 2 rows (``default_reservoir_rows``:
    at most 256 KiB of reservoirs per window), 2 × 4 = 8 bytes per channel against the
    statistics' 13 × 8 = 104.  The table splits the stored bytes per window: ``reservoir``
    is the exact
    size of the reservoir blobs written (codec, float32), ``stats`` is everything else that
    was stored (statistics, metrics, row and index overhead -- including any overhead the
    reservoir blobs cause, so the split never flatters the statistics); the 1.2× target
    applies to ``stats``.  ``--reservoir 0`` measures windows without reservoirs.

Methodology
    * No torch, no model: per layer, per-sample channel means and variances are drawn at
      random (a ``[64, C]`` block: 8 batches of 8 samples; element counts from the layer's
      feature-map size) and summarized with :meth:`ChannelMoments.from_rows`; the report is
      :func:`bnwatch.drift.assess_layer` against a running reference (random means and
      variances near the data) and a warm-up baseline (another random block), then
      :func:`~bnwatch.drift.decide` over the 53 layers -- what a monitor sends after its
      warm-up.  Two such sets of reports are built; every window reuses one of them under a
      fresh ``uid`` (the store deduplicates by uid) and its own start and end.  Everything is
      built before any timing, the windows of every round included.
    * Steady state.  Before timing, one untimed window per backend creates the model, its
      layers and their references (stored once, then found by digest), and every writer
      stores one untimed window first (engine, connection, schema check).  The timed windows
      then pay what a long-running monitor pays per window.
    * Round-robin rounds.  Each round runs every path once with ``--records`` new windows
      (default 96: the writer's row spans three of its batches, the driver's and the
      repository's 12 transactions at batch 8); the order rotates every round, so a
      disturbance of the shared machine (or a PostgreSQL checkpoint) does not always hit the
      same path.  Throughput is the median over rounds; stored bytes are summed over
      rounds.  Size and row counts are read between paths, outside the timed region, and the
      rows stored are checked against windows × layers.
    * Server settings are left as found (printed, e.g. ``synchronous_commit``, ``fsync``): the
      benchmark measures the store as deployed, not a tuned one.  SQLite runs as bnwatch
      configures it (WAL, ``synchronous=NORMAL``).
    * Client CPU.  The notes give, untimed, what ``write_windows`` computes per window
      besides SQL: the 53 rows (moments encoded by the codec; made one at a time while the
      ``COPY`` sends them) and the digests of the references.

Tried and not kept (PostgreSQL, this file's functions in ad-hoc scripts, 96-128 windows per
path and round, 6-8 rounds round-robin; the shared VM's disk moved the driver between 38 and
99 windows/s over one evening, so only same-run ratios count)
    * Encoding the next batch on a helper thread while the server stores this one: 1.02x,
      1.07x and 1.10x the writer's windows/s with ``COPY``, 0.98x and 1.04x with ``INSERT``,
      0.82-0.91x on SQLite -- not worth a second thread in the writer.
    * Writing from 2 or 3 connections at once (by ``INSERT``): 1.02x and 1.05x (the
      repository; the per-layer totals are upserted by every transaction), 1.00x and 0.90x
      (the driver): the disk, not one connection, is the limit.
    * Dropping the ``windows`` foreign keys but the layer's (model, both references): 1.12x,
      for references that could then be deleted under their windows.
    * Byte-shuffling the float64 blobs and deflating them (zlib level 1): 0.673x raw bytes
      against the codec's 0.770x, for 34 ms of client CPU per window -- more than the
      insert itself.  Byte-shuffling and zstd (level 1) instead: 0.853x the codec's moment
      bytes for 3.6 ms per window (lz4: 0.892x for 1.7 ms) -- at most 1.15x were the disk
      alone to set the pace, less the client CPU paid in series; not pursued.
    * Two threads of one writer, each with its own connection, storing alternate batches of
      16 by ``COPY``: 0.86-0.94x one thread over 4 rounds (disk-bound rounds and fast ones
      alike), as the 2 and 3 connections above.
    * Without the disk (``windows`` and the driver's table ``UNLOGGED``, in a scratch database):
      ``write_windows`` at batch 8 took 10.0 ms per window against the driver's 4.3 ms, with
      5.5 ms of client CPU (encoding 2.0 ms, the rest formatting 35 columns per row for
      ``COPY`` and the statements around it); the three foreign keys but the layer's cost
      another 1.1 ms.  With the disk (repository, batch 8, 71 windows/s): 11.7 of a window's
      14.0 ms are the ``COPY``, during which the client spends 5.4 ms of CPU and the server's
      backend 7.5 ms (the driver's: 1.1 and 6.0) -- the two barely overlap: 5 ms of busy
      client CPU per window added to the driver's loop cut it to 0.41-0.78x.  Yet making them
      overlap did not pay: psycopg's ``QueuedLibpqWriter`` (a thread sends while the writer
      encodes) gave 0.61-1.18x over 5 rounds, nor did the helper thread or the two writer
      threads above.  Why, and what was kept, follows.

Why the client and the server took turns, and what was kept
    A binary ``COPY`` into a table without ``BEFORE`` triggers makes PostgreSQL buffer up to
    1,000 rows before inserting any: its other flush threshold, 64 kB, counts the bytes of text
    lines (``line_buf``), which a binary ``COPY`` has none of.  A batch of 8 ResNet-50 windows
    is 416 rows, so the server inserted nothing until the client had sent the last row, then
    everything while the client waited.  Seen from ``/proc`` (the driver's loop, 8-window
    batches): with the client's sending done in 1-2 ms per window, the backend then spent 8 ms
    per window of CPU; with 200 ms of sleep inserted after the last row it spent none of it in
    the sleep, and both sockets' queues were empty -- the rows waited in the backend's memory.
    Every attempt above to overlap the client with the server could only fail.  A volatile
    ``WHERE`` (``bnwatch.store.repository.COPY_ROW_BY_ROW``, ``WHERE pg_catalog.random() >= 0``:
    it keeps every row) makes PostgreSQL insert each row as it arrives.  5.3 ms of busy client
    CPU per window added to the driver's loop then cost -2.5 to +4.0 ms per window over three
    paired rounds (+0.2 on average) instead of +5.0 to +7.2 ms, and the driver alone took the
    same time with the ``WHERE`` as without, within noise.  Back-to-back runs of this file
    (without, with, with, without; 5 rounds each, ``--replicas 0``): the writer reached 0.71x
    and 0.57x the driver without it, 0.80x and 0.86x with it (47.9 and 53.9 against 69.4 and
    75.4 windows/s; the driver 67-95), the repository at batch 8 0.59x and 0.52x against 0.64x
    and 0.66x.  ``tests/store/test_repository.py`` checks that the table grows while a
    ``COPY`` is still being sent.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

import bnwatch
from bnwatch.codec import encode_arrays, encode_moments, raw_moment_bytes
from bnwatch.drift import DriftConfig, Reference, assess_layer, decide
from bnwatch.schema import LayerReport, WindowRecord
from bnwatch.sink import QUEUE_BYTES
from bnwatch.stats import (
    DEFAULT_RESERVOIR,
    ChannelMoments,
    LayerStats,
    Reservoir,
    default_reservoir_rows,
)
from bnwatch.store.engine import create_engine
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository, window_row
from bnwatch.store.writer import StoreSink

RESNET50_STAGES: tuple[tuple[int, int], ...] = ((64, 3), (128, 4), (256, 6), (512, 3))
"""(planes, bottlenecks) of ResNet-50's four stages."""
RESNET50_BN_LAYERS = 53
RESNET50_BN_CHANNELS = 26_560
RESNET50_STEM_SIDE = 112
"""Side of the stem's feature map for a 224 x 224 input; each later stage halves it (after 56)."""

BACKENDS: tuple[str, ...] = ("sqlite", "postgresql")
REPOSITORY = "repository"
WRITER = "writer"
REPLICAS = "replicas"
"""Several writer processes at once (PostgreSQL): a deployment's replicas."""
DEFAULT_REPLICAS = 4
PGLZ = "pglz"
DRIVER = "driver"
"""The ceiling: the same encoded bytes inserted by the DB-API driver alone into a bare table."""
DRIVER_TABLE = "bench_driver"
"""PostgreSQL only: the repository path with the array columns at TOAST's default ``STORAGE
EXTENDED`` for its timed writes (pglz tries every value) -- the storage migration 0006 changed,
measured in the same rounds as the rest.  Only the storage is set back, not the schema: a
repository writes the head schema's columns."""
EXTERNAL_STORAGE_MIGRATION = (
    Path(__file__).resolve().parent.parent
    / "migrations"
    / "versions"
    / "0006_uncompressed_array_storage.py"
)

DEFAULT_RECORDS = 96
"""Timed windows per path and round: three of the writer's batches of 32, so that its row is
sustained throughput, not about one transaction (the default was 32 before)."""
DEFAULT_ROUNDS = 5
DEFAULT_BATCH_SIZES = (1, 8)
DEFAULT_SINK_BATCH = 32
"""StoreSink's own default batch size."""
SAMPLES_PER_WINDOW = 64
BATCH = 8
VARIANTS = 2
"""Distinct sets of reports the windows cycle through."""
TARGET_PG_WINDOWS_PER_S = 50.0
TARGET_BYTES_RATIO = 1.2
PG_ENVS = ("BNWATCH_BENCH_POSTGRES_URL", "BNWATCH_TEST_POSTGRES_URL")
PG_FALLBACK_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
FLUSH_TIMEOUT = 600.0


# -- the windows ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BnLayer:
    """One BatchNorm layer of the architecture: torchvision-style name, channels, map side."""

    name: str
    channels: int
    side: int


def resnet50_bn_layers() -> list[BnLayer]:
    """ResNet-50's BatchNorm layers in module order (v1.5: the 3×3 conv carries the stride).

    Stem 64; per bottleneck ``planes, planes, 4·planes``, plus the downsample BN (``4·planes``)
    in the first block of each stage.
    """
    layers = [BnLayer("bn1", 64, RESNET50_STEM_SIDE)]
    side = RESNET50_STEM_SIDE // 2  # after the max-pool
    for s, (planes, blocks) in enumerate(RESNET50_STAGES):
        for b in range(blocks):
            stride = 2 if s > 0 and b == 0 else 1
            out_side = side // stride
            prefix = f"layer{s + 1}.{b}"
            layers.append(BnLayer(f"{prefix}.bn1", planes, side))
            layers.append(BnLayer(f"{prefix}.bn2", planes, out_side))
            layers.append(BnLayer(f"{prefix}.bn3", 4 * planes, out_side))
            if b == 0:
                layers.append(BnLayer(f"{prefix}.downsample.1", 4 * planes, out_side))
            side = out_side
    assert len(layers) == RESNET50_BN_LAYERS, len(layers)
    assert sum(layer.channels for layer in layers) == RESNET50_BN_CHANNELS
    return layers


def _random_rows(
    rng: np.random.Generator, mu: np.ndarray, sd: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample means and variances of ``SAMPLES_PER_WINDOW`` random samples."""
    shape = (SAMPLES_PER_WINDOW, mu.shape[0])
    m = mu + 0.5 * sd * rng.standard_normal(shape)
    v = 0.75 * sd**2 * rng.gamma(20.0, 1.0 / 20.0, shape)
    return m, v


def _random_moments(
    rng: np.random.Generator, mu: np.ndarray, sd: np.ndarray, side: int
) -> ChannelMoments:
    """Moments of ``SAMPLES_PER_WINDOW`` samples with random per-sample means and variances."""
    m, v = _random_rows(rng, mu, sd)
    return ChannelMoments.from_rows(m, v, float(side * side))


def reservoir_bytes(reports: dict[str, LayerReport]) -> int:
    """Bytes of the reservoir blobs one window's reports store (0 without reservoirs)."""
    return sum(
        len(encode_arrays(r.stats.reservoir.rows, dtype="<f4"))
        for r in reports.values()
        if r.stats.reservoir is not None
    )


def build_reports(
    layers: Sequence[BnLayer],
    variants: int = VARIANTS,
    seed: int = 0,
    reservoir: int = DEFAULT_RESERVOIR,
) -> list[dict[str, LayerReport]]:
    """``variants`` decided report sets of one model (shared running and baseline references),
    each layer's window keeping a reservoir of ``reservoir`` per-sample means (0: none)."""
    rng = np.random.default_rng(seed)
    config = DriftConfig()
    refs: list[tuple[Reference, Reference, np.ndarray, np.ndarray]] = []
    for layer in layers:
        mu = rng.normal(0.0, 1.0, layer.channels)
        sd = rng.uniform(0.5, 2.0, layer.channels)
        running = Reference.running(
            mu + rng.normal(0.0, 0.05, layer.channels),
            sd**2 * rng.uniform(0.9, 1.1, layer.channels),
        )
        baseline = Reference.from_moments(_random_moments(rng, mu, sd, layer.side))
        refs.append((running, baseline, mu, sd))
    out: list[dict[str, LayerReport]] = []
    for _ in range(variants):
        assessed: dict[str, LayerReport] = {}
        for depth, (layer, (running, baseline, mu, sd)) in enumerate(
            zip(layers, refs, strict=True)
        ):
            m, v = _random_rows(rng, mu, sd)
            kept = None
            if reservoir:
                kept = Reservoir(reservoir, layer.channels, seed=int(rng.integers(2**62)))
                kept.add(m)
            stats = LayerStats(
                moments=ChannelMoments.from_rows(m, v, float(layer.side * layer.side)),
                batch_sizes={BATCH: SAMPLES_PER_WINDOW // BATCH},
                n_batches=SAMPLES_PER_WINDOW // BATCH,
                batches_seen=SAMPLES_PER_WINDOW // BATCH,
                samples_seen=SAMPLES_PER_WINDOW,
                reservoir=kept,
            )
            assessed[layer.name] = assess_layer(
                layer.name,
                "BatchNorm2d",
                stats,
                eps=1e-5,
                running=running,
                baseline=baseline,
                baseline_kind="warmup",
                depth=depth,
                running_stats_mutated=False,
                config=config,
            )
        out.append(decide(assessed, config))
    return out


class RecordFactory:
    """Fresh windows (new uid, consecutive minutes) cycling through prebuilt report sets."""

    def __init__(self, reports: Sequence[dict[str, LayerReport]]) -> None:
        self.reports = list(reports)
        self.start = datetime(2024, 1, 1, tzinfo=timezone.utc)
        self.made = 0

    def make(self, n: int) -> list[WindowRecord]:
        out = []
        for _ in range(n):
            start = self.start + timedelta(minutes=self.made)
            out.append(
                WindowRecord(
                    model="resnet50",
                    version="bench",
                    source="bench:1",
                    start=start,
                    end=start + timedelta(minutes=1),
                    reports=self.reports[self.made % len(self.reports)],
                    uid=uuid.uuid4().hex,
                )
            )
            self.made += 1
        return out


def client_cpu_ms(record: WindowRecord, repeats: int = 5) -> dict[str, float]:
    """Median ms per window of the work ``write_windows`` does besides SQL."""
    rows: list[float] = []
    digests: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        for report in record.reports.values():
            window_row(record, report, 1, 1, 1, 1)
        rows.append(time.perf_counter() - start)
        start = time.perf_counter()
        for report in record.reports.values():  # what Repository._running_ref/_baseline_ref do
            hashlib.sha256(encode_arrays(np.stack([report.ref_mean, report.ref_var]))).digest()
            base = report.baseline_moments
            if base is not None:
                blob = encode_arrays(np.stack([base.mean, base.var]))
                hashlib.sha256(blob + encode_moments(base)).digest()
        digests.append(time.perf_counter() - start)
    return {
        "rows_ms": 1e3 * statistics.median(rows),
        "ref_digests_ms": 1e3 * statistics.median(digests),
    }


# -- databases -----------------------------------------------------------------------------------
def default_postgres_url() -> str:
    for name in PG_ENVS:
        value = os.environ.get(name)
        if value:
            return value
    return PG_FALLBACK_URL


@contextlib.contextmanager
def postgres_database(admin_url: str) -> Iterator[str]:
    """A fresh database ``bnwatch_bench_<random>`` on the server of ``admin_url``, dropped after."""
    admin = sa.make_url(admin_url).set(drivername="postgresql+psycopg")
    name = f"bnwatch_bench_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        try:
            yield admin.set(database=name).render_as_string(hide_password=False)
        finally:
            with engine.connect() as conn:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()


@dataclass(frozen=True)
class Size:
    """Stored bytes of the ``windows`` table (PostgreSQL) or the whole file (SQLite), rows."""

    bytes: int
    rows: int


@functools.cache
def _external_storage_migration() -> Any:
    """Migration 0006's module, loaded once (its column lists are what the ``pglz`` row sets
    back; a migration file is not an importable module name)."""
    spec = importlib.util.spec_from_file_location("migration_0006", EXTERNAL_STORAGE_MIGRATION)
    assert spec is not None and spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    return migration


class Meter:
    """Reads stored bytes and rows between timed sections (its own engine)."""

    def __init__(self, backend: str, url: str, sqlite_path: Path | None) -> None:
        self.backend = backend
        self.sqlite_path = sqlite_path
        self.engine: Engine = create_engine(url)

    def read(self, table: str = "windows") -> Size:
        with self.engine.connect() as conn:
            rows = int(conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar_one())
            if self.backend == "postgresql":
                size = conn.execute(sa.text(f"SELECT pg_total_relation_size('{table}')"))
                return Size(int(size.scalar_one()), rows)
            conn.rollback()
            for _ in range(100):  # a reader still inside a transaction makes it busy
                busy = conn.execute(sa.text("PRAGMA wal_checkpoint(TRUNCATE)")).one()[0]
                if not busy:
                    break
                time.sleep(0.05)
        assert self.sqlite_path is not None
        wal = Path(f"{self.sqlite_path}-wal")
        extra = wal.stat().st_size if wal.exists() else 0
        return Size(self.sqlite_path.stat().st_size + extra, rows)

    @contextlib.contextmanager
    def pglz_storage(self) -> Iterator[None]:
        """PostgreSQL: the array columns migration 0006 made ``STORAGE EXTERNAL`` at TOAST's
        default ``EXTENDED`` inside, ``EXTERNAL`` again after (outside any timing: the setting
        applies to values written while it holds).  The columns are 0006's own lists."""
        migration = _external_storage_migration()

        def set_storage(storage: str, skip: frozenset[tuple[str, str]]) -> None:
            with self.engine.begin() as conn:
                for table, columns in migration.ARRAY_COLUMNS.items():
                    alters = ", ".join(
                        f"ALTER COLUMN {c} SET STORAGE {storage}"
                        for c in columns
                        if (table, c) not in skip
                    )
                    conn.execute(sa.text(f"ALTER TABLE {table} {alters}"))

        set_storage("EXTENDED", migration.ALREADY_EXTERNAL)
        try:
            yield
        finally:
            set_storage("EXTERNAL", frozenset())

    def create_driver_table(self) -> None:
        """The bare table of the ``driver`` row (blob columns stored as bnwatch stores them)."""
        with self.engine.begin() as conn:
            if self.backend == "postgresql":
                conn.execute(
                    sa.text(
                        f"CREATE TABLE {DRIVER_TABLE} (id bigserial PRIMARY KEY, uid text NOT NULL,"
                        " layer integer NOT NULL, moments bytea NOT NULL, reservoir bytea)"
                    )
                )
                conn.execute(
                    sa.text(
                        f"ALTER TABLE {DRIVER_TABLE} ALTER COLUMN moments SET STORAGE EXTERNAL,"
                        " ALTER COLUMN reservoir SET STORAGE EXTERNAL"
                    )
                )
            else:
                conn.execute(
                    sa.text(
                        f"CREATE TABLE {DRIVER_TABLE} (id INTEGER PRIMARY KEY, uid TEXT NOT NULL,"
                        " layer INTEGER NOT NULL, moments BLOB NOT NULL, reservoir BLOB)"
                    )
                )

    def server(self) -> dict[str, Any]:
        """Version and the settings that decide commit cost."""
        with self.engine.connect() as conn:
            if self.backend == "sqlite":
                return {
                    "version": conn.execute(sa.text("SELECT sqlite_version()")).scalar_one(),
                    "journal_mode": conn.execute(sa.text("PRAGMA journal_mode")).scalar_one(),
                    "synchronous": conn.execute(sa.text("PRAGMA synchronous")).scalar_one(),
                    "page_size": conn.execute(sa.text("PRAGMA page_size")).scalar_one(),
                }
            out: dict[str, Any] = {
                "version": conn.execute(sa.text("SHOW server_version")).scalar_one()
            }
            for name in ("synchronous_commit", "fsync", "wal_compression", "max_wal_size"):
                out[name] = conn.execute(sa.text(f"SHOW {name}")).scalar_one()
            return out

    def close(self) -> None:
        self.engine.dispose()


# -- measurement ---------------------------------------------------------------------------------
@dataclass
class PathResult:
    """Every timed round of one write path on one backend."""

    backend: str
    path: str
    batch: int
    processes: int = 1
    seconds: list[float] = field(default_factory=list)
    windows: list[int] = field(default_factory=list)
    transaction_seconds: list[float] = field(default_factory=list)
    stored_bytes: int = 0
    rows_stored: int = 0
    dropped: int = 0
    complete: bool = True


def time_repository(repo: Repository, records: Sequence[WindowRecord], batch: int) -> list[float]:
    """Seconds of each ``write_windows`` call over ``records``, ``batch`` per call."""
    out = []
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        start = time.perf_counter()
        repo.write_windows(chunk)
        out.append(time.perf_counter() - start)
    return out


DriverRow = tuple[str, int, bytes, bytes | None]


def driver_rows(records: Sequence[WindowRecord]) -> list[list[DriverRow]]:
    """Per window, the rows of the ``driver`` path: the blobs :func:`window_row` encodes."""
    blobs: dict[int, list[tuple[bytes, bytes | None]]] = {}
    out = []
    for record in records:
        key = id(record.reports)
        if key not in blobs:
            blobs[key] = []
            for report in record.reports.values():
                row = window_row(record, report, 0, 0, None, None)
                blobs[key].append((row["moments"], row["reservoir"]))
        out.append([(record.uid, i, m, r) for i, (m, r) in enumerate(blobs[key])])
    return out


def time_driver(engine: Engine, windows: Sequence[list[DriverRow]], batch: int) -> list[float]:
    """Seconds of each insert (binary COPY on PostgreSQL, ``executemany`` on SQLite) + commit
    of ``batch`` windows' rows."""
    columns = "uid, layer, moments, reservoir"
    marker = "?" if engine.dialect.paramstyle == "qmark" else "%s"
    sql = f"INSERT INTO {DRIVER_TABLE} ({columns}) VALUES ({', '.join([marker] * 4)})"
    copy_sql = f"COPY {DRIVER_TABLE} ({columns}) FROM STDIN (FORMAT BINARY)"
    dbapi: Any = engine.raw_connection()  # untimed: the connection exists before the first batch
    try:
        out = []
        for i in range(0, len(windows), batch):
            rows = [row for window in windows[i : i + batch] for row in window]
            start = time.perf_counter()
            cursor = dbapi.cursor()
            if engine.dialect.name == "postgresql":
                with cursor.copy(copy_sql) as copy:
                    copy.set_types(["text", "int4", "bytea", "bytea"])
                    for row in rows:
                        copy.write_row(row)
            else:
                cursor.executemany(sql, rows)
            cursor.close()
            dbapi.commit()
            out.append(time.perf_counter() - start)
        return out
    finally:
        dbapi.close()


def burst_bytes(records: Sequence[WindowRecord]) -> int:
    """A writer queue bound that holds ``records`` at once.  The benchmark writes a round in
    one burst (a monitor sends a window a minute), and the default bound, 256 MiB of windows
    (46 of ResNet-50), would drop part of it."""
    return max(QUEUE_BYTES, sum(r.nbytes for r in records))


def warmed_sink(
    url: str, warmup: WindowRecord, records: Sequence[WindowRecord], batch: int
) -> StoreSink:
    """A writer whose queue holds ``warmup`` and ``records`` at once (:func:`burst_bytes`) and
    that has stored ``warmup`` -- untimed: engine, connection, schema check, id cache."""
    sink = StoreSink(url, batch_size=batch, queue_bytes=burst_bytes([warmup, *records]))
    sink.write(warmup)
    if not sink.flush(FLUSH_TIMEOUT):
        sink.close()
        raise RuntimeError("the writer did not store its warm-up window")
    return sink


def store_all(sink: StoreSink, records: Sequence[WindowRecord]) -> bool:
    """``write()`` every record, then ``flush()``: whether everything was stored in time."""
    for record in records:
        sink.write(record)
    return sink.flush(FLUSH_TIMEOUT)


def _replica(
    url: str,
    inherited: Sequence[Engine],
    warmup: WindowRecord,
    records: Sequence[WindowRecord],
    batch: int,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    """One replica process: store a warm-up window, report ready, wait for the start, store
    ``records`` through a StoreSink and report (monotonic end, complete, dropped + rejected)."""
    for engine in inherited:  # the parent's pooled connections are not this process's
        engine.dispose(close=False)
    try:
        sink = warmed_sink(url, warmup, records, batch)
    except RuntimeError:
        ready.put(False)
        return
    try:
        ready.put(True)
        if not start.wait(FLUSH_TIMEOUT):
            return
        complete = store_all(sink, records)
        end = time.monotonic()
        stats = sink.stats()
        results.put((end, complete, stats.dropped + stats.rejected))
    finally:
        sink.close()


def time_replicas(
    url: str,
    meter: Meter,
    records: Sequence[WindowRecord],
    warmup: WindowRecord,
    batch: int,
    processes: int,
    inherited: Sequence[Engine],
) -> tuple[Size, float, int, bool]:
    """``records`` stored by ``processes`` forked writer processes at once: the size before
    (read once every process is ready), the seconds from the common start to the last
    ``flush()``, the windows dropped or rejected, and whether every process completed."""
    ctx = multiprocessing.get_context("fork")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    share = [records[i::processes] for i in range(processes)]
    workers = [
        ctx.Process(
            target=_replica,
            args=(
                url,
                [meter.engine, *inherited],
                dataclasses.replace(warmup, uid=uuid.uuid4().hex),
                share[i],
                batch,
                ready,
                start,
                results,
            ),
            daemon=True,
        )
        for i in range(processes)
    ]
    for worker in workers:
        worker.start()
    try:
        if not all(ready.get(timeout=FLUSH_TIMEOUT) for _ in workers):
            raise RuntimeError("a replica did not store its warm-up window")
        before = meter.read()
        began = time.monotonic()
        start.set()
        reports = [results.get(timeout=FLUSH_TIMEOUT) for _ in workers]
    finally:
        start.set()
        for worker in workers:
            worker.join(FLUSH_TIMEOUT)
            if worker.is_alive():  # pragma: no cover - a hung replica
                worker.kill()
    seconds = max(end for end, _, _ in reports) - began
    return before, seconds, sum(lost for _, _, lost in reports), all(ok for _, ok, _ in reports)


def run_path(
    result: PathResult,
    *,
    url: str,
    repo: Repository,
    meter: Meter,
    records: Sequence[WindowRecord],
    warmup: WindowRecord,
) -> None:
    """One timed round of one path; size and rows are read just outside the timed region."""
    if result.path == DRIVER:
        windows = driver_rows(records)
        before = meter.read(DRIVER_TABLE)
        calls = time_driver(meter.engine, windows, result.batch)
        after = meter.read(DRIVER_TABLE)
        result.seconds.append(sum(calls))
        result.transaction_seconds.extend(calls)
    elif result.path in (REPOSITORY, PGLZ):
        schema = meter.pglz_storage() if result.path == PGLZ else contextlib.nullcontext()
        with schema:
            before = meter.read()
            calls = time_repository(repo, records, result.batch)
            after = meter.read()
        result.seconds.append(sum(calls))
        result.transaction_seconds.extend(calls)
    elif result.path == REPLICAS:
        before, seconds, lost, complete = time_replicas(
            url, meter, records, warmup, result.batch, result.processes, [repo.engine]
        )
        after = meter.read()
        result.seconds.append(seconds)
        result.dropped += lost
        result.complete &= complete
    else:
        sink = warmed_sink(url, warmup, records, result.batch)
        try:
            before = meter.read()
            start = time.perf_counter()
            result.complete &= store_all(sink, records)
            result.seconds.append(time.perf_counter() - start)
            after = meter.read()
        finally:
            sink.close()
        stats = sink.stats()
        result.dropped += stats.dropped + stats.rejected
    result.windows.append(len(records))
    result.stored_bytes += after.bytes - before.bytes
    result.rows_stored += after.rows - before.rows


def run_backend(
    backend: str,
    url: str,
    *,
    sqlite_path: Path | None,
    factory: RecordFactory,
    paths: Sequence[tuple[str, int, int]],
    rounds: int,
    records: int,
    progress: Callable[[str], None],
) -> tuple[list[PathResult], dict[str, Any]]:
    """Every path on one (empty) database, ``rounds`` rounds round-robin."""
    engine = engine_for(url)  # creates the schema
    meter = Meter(backend, url, sqlite_path)
    try:
        repo = Repository(engine)
        repo.write_windows(factory.make(1))  # untimed: model, layers, references
        if any(path == DRIVER for path, _, _ in paths):
            meter.create_driver_table()
        results = [PathResult(backend, path, batch, n) for path, batch, n in paths]
        # every window of every round exists before the first timing
        planned = [
            [(factory.make(records), factory.make(1)[0]) for _ in results] for _ in range(rounds)
        ]
        for r in range(rounds):
            shift = r % len(results)
            order = list(range(len(results)))
            order = order[shift:] + order[:shift]
            for i in order:
                batch_records, warmup = planned[r][i]
                run_path(
                    results[i],
                    url=url,
                    repo=repo,
                    meter=meter,
                    records=batch_records,
                    warmup=warmup,
                )
            progress(f" {backend}: round {r + 1}/{rounds} done")
        server = meter.server()
        server["final"] = vars(meter.read())
        return results, server
    finally:
        meter.close()
        engine.dispose()


def summarize(
    result: PathResult, layers: int, raw_bytes: int, reservoir_bytes: int = 0
) -> dict[str, Any]:
    """One row of results (``reservoir_bytes``: the reservoir blobs of one window)."""
    rates = [w / s for w, s in zip(result.windows, result.seconds, strict=True) if s > 0]
    windows = sum(result.windows)
    rate = statistics.median(rates) if rates else float("nan")
    per_window = result.stored_bytes / windows if windows else float("nan")
    stats_per_window = per_window - reservoir_bytes
    goal = TARGET_PG_WINDOWS_PER_S if result.backend == "postgresql" else None
    bytes_ratio = stats_per_window / raw_bytes
    tx = result.transaction_seconds
    return {
        "backend": result.backend,
        "path": result.path,
        "batch": result.batch,
        "processes": result.processes,
        "rounds": len(result.windows),
        "windows": windows,
        "rows_expected": windows * layers,
        "rows_stored": result.rows_stored,
        "dropped_or_rejected": result.dropped,
        "complete": result.complete,
        "seconds": sum(result.seconds),
        "round_seconds": result.seconds,
        "windows_per_s": rate,
        "windows_per_s_min": min(rates) if rates else float("nan"),
        "windows_per_s_max": max(rates) if rates else float("nan"),
        "windows_per_s_overall": windows / sum(result.seconds) if sum(result.seconds) else None,
        "raw_mb_per_s": rate * raw_bytes / 1e6,
        "stored_mb_per_s": rate * per_window / 1e6,
        "target_windows_per_s": goal,
        "throughput_ratio": None if goal is None else rate / goal,
        "meets_throughput": None if goal is None else bool(rate >= goal),
        "ms_per_transaction_median": 1e3 * statistics.median(tx) if tx else None,
        "stored_bytes": result.stored_bytes,
        "stored_bytes_per_window": per_window,
        "statistics_bytes_per_window": stats_per_window,
        "reservoir_bytes_per_window": reservoir_bytes,
        "raw_bytes_per_window": raw_bytes,
        "bytes_ratio": bytes_ratio,
        "reservoir_ratio": reservoir_bytes / raw_bytes,
        "total_bytes_ratio": per_window / raw_bytes,
        "target_bytes_ratio": TARGET_BYTES_RATIO,
        "meets_bytes": bool(bytes_ratio <= TARGET_BYTES_RATIO),
    }


def with_driver_ratio(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row's windows/s as a share of the ``driver`` row's (one backend's rows; None
    without a driver row)."""
    ceiling = next((r["windows_per_s"] for r in rows if r["path"] == DRIVER), None)
    for row in rows:
        row["driver_ratio"] = None if not ceiling else row["windows_per_s"] / ceiling
    return rows


# -- output --------------------------------------------------------------------------------------
def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results table: throughput and its target ratio; stored bytes per window split into
    statistics (against the raw float64 statistics and the 1.2× target) and reservoirs."""
    header = (
        f"{'backend':<10} {'path':<10} {'batch':>5} {'windows':>7}  "
        f"{'windows/s median [min, max]':<26} {'÷target':>7}  {'target':<9} {'÷driver':>7}  "
        f"{'raw MB/s':>8}  "
        f"{'ms/txn':>6}  {'stats B/window':>14} {'÷raw':>6}  {'target':<9} "
        f"{'reservoir B/window':>18} {'÷raw':>6}  {'total ÷raw':>10}"
    )
    lines = [header, "-" * len(header)]
    for row in rows:
        goal = row["target_windows_per_s"]
        verdict = "-" if goal is None else f">={goal:.0f} {_ok(row['meets_throughput'])}"
        ratio = "-" if goal is None else f"{row['throughput_ratio']:.2f}x"
        rate = (
            f"{row['windows_per_s']:7.1f} [{row['windows_per_s_min']:.1f}, "
            f"{row['windows_per_s_max']:.1f}]"
        )
        bytes_verdict = f"<={row['target_bytes_ratio']:.1f} {_ok(row['meets_bytes'])}"
        tx = row["ms_per_transaction_median"]
        share = "-" if row.get("driver_ratio") is None else f"{row['driver_ratio']:.2f}x"
        path = row["path"] if row["processes"] == 1 else f"{row['processes']} {row['path']}"
        lines.append(
            f"{row['backend']:<10} {path:<10} {row['batch']:>5} {row['windows']:>7}  "
            f"{rate:<26} {ratio:>7}  {verdict:<9} {share:>7}  {row['raw_mb_per_s']:>8.1f}  "
            f"{'-' if tx is None else f'{tx:.1f}':>6}  "
            f"{row['statistics_bytes_per_window']:>14,.0f} {row['bytes_ratio']:>5.3f}x  "
            f"{bytes_verdict:<9} {row['reservoir_bytes_per_window']:>18,.0f} "
            f"{row['reservoir_ratio']:>5.3f}x  {row['total_bytes_ratio']:>9.3f}x"
        )
    return "\n".join(lines)


def _ok(met: bool) -> str:
    return "ok" if met else "MISS"


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Insert throughput of ResNet-50-sized windows into SQLite and PostgreSQL.",
        epilog="Methodology: see the module docstring of benchmarks/store.py.",
    )
    p.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=list(BACKENDS),
        help="databases to measure (default: both)",
    )
    p.add_argument(
        "--postgres-url",
        default=None,
        metavar="URL",
        help="PostgreSQL server to create the benchmark database on (default: "
        f"${PG_ENVS[0]}, ${PG_ENVS[1]} or {PG_FALLBACK_URL})",
    )
    p.add_argument(
        "--records",
        type=int,
        default=None,
        help=f"timed windows per path and round (default {DEFAULT_RECORDS})",
    )
    p.add_argument("--rounds", type=int, default=None, help=f"rounds (default {DEFAULT_ROUNDS})")
    p.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="windows per write_windows call, one repository path each (default "
        f"{' '.join(map(str, DEFAULT_BATCH_SIZES))})",
    )
    p.add_argument(
        "--sink-batch-size",
        type=int,
        default=None,
        help=f"StoreSink batch_size (default {DEFAULT_SINK_BATCH}, the writer's default)",
    )
    p.add_argument(
        "--replicas",
        type=int,
        default=DEFAULT_REPLICAS,
        metavar="P",
        help=f"writer processes of the PostgreSQL 'replicas' row (default {DEFAULT_REPLICAS}; "
        "0 skips it)",
    )
    p.add_argument(
        "--no-compare-storage",
        dest="compare_storage",
        action="store_false",
        help="skip the PostgreSQL 'pglz' row (the repository path at the largest batch size "
        "with the array columns at TOAST's compressing default, as before migration 0006)",
    )
    p.add_argument(
        "--no-driver",
        dest="driver",
        action="store_false",
        help="skip the 'driver' row (the same encoded bytes inserted by the DB-API driver alone "
        "into a bare table: the ceiling the server and disk allow)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="tiny run for tests: 2 windows, 1 round, batches 1 2, at most 2 replicas",
    )
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write results here")
    p.add_argument("--seed", type=int, default=0, help="seed of the random statistics")
    p.add_argument(
        "--reservoir",
        type=int,
        default=default_reservoir_rows(RESNET50_BN_CHANNELS),
        metavar="ROWS",
        help="per-sample mean rows each layer's window keeps, as bnwatch.watch(reservoir=) "
        f"(default {default_reservoir_rows(RESNET50_BN_CHANNELS)}: watch's default for "
        "ResNet-50; 0: none)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = p.parse_args(argv)
    if args.smoke:
        args.records = 2 if args.records is None else args.records
        args.rounds = 1 if args.rounds is None else args.rounds
        args.batch_sizes = args.batch_sizes or [1, 2]
        args.sink_batch_size = 2 if args.sink_batch_size is None else args.sink_batch_size
        args.replicas = min(args.replicas, 2)
    args.records = DEFAULT_RECORDS if args.records is None else args.records
    args.rounds = DEFAULT_ROUNDS if args.rounds is None else args.rounds
    args.batch_sizes = list(args.batch_sizes or DEFAULT_BATCH_SIZES)
    args.sink_batch_size = args.sink_batch_size or DEFAULT_SINK_BATCH
    args.backends = list(dict.fromkeys(args.backends))
    args.postgres_url = args.postgres_url or default_postgres_url()
    if args.reservoir < 0:
        p.error(f"--reservoir must be >= 0, got {args.reservoir}")
    if args.replicas < 0:
        p.error(f"--replicas must be >= 0, got {args.replicas}")
    for flag, value in (
        ("--records", args.records),
        ("--rounds", args.rounds),
        ("--sink-batch-size", args.sink_batch_size),
        *(("--batch-sizes", b) for b in args.batch_sizes),
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
            print(f"[{time.perf_counter() - started:6.1f}s]{message}", file=sys.stderr, flush=True)

    layers = resnet50_bn_layers()
    channels = sum(layer.channels for layer in layers)
    raw = raw_moment_bytes(channels)
    factory = RecordFactory(build_reports(layers, seed=args.seed, reservoir=args.reservoir))
    sample = factory.reports[0]
    encoded = sum(len(encode_moments(r.stats.moments)) for r in sample.values())
    kept = reservoir_bytes(sample)
    cpu = client_cpu_ms(factory.make(1)[0])
    progress(f" {VARIANTS} report sets of {len(layers)} layers built")
    paths = [(REPOSITORY, b, 1) for b in args.batch_sizes] + [(WRITER, args.sink_batch_size, 1)]
    if args.driver:
        paths.append((DRIVER, max(args.batch_sizes), 1))
    postgres_only = [(REPLICAS, args.sink_batch_size, args.replicas)] if args.replicas else []
    if args.compare_storage:
        postgres_only.append((PGLZ, max(args.batch_sizes), 1))

    rows: list[dict[str, Any]] = []
    servers: dict[str, dict[str, Any]] = {}
    databases: dict[str, str] = {}
    for backend in args.backends:
        with contextlib.ExitStack() as stack:
            if backend == "sqlite":
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bnwatch_")))
                sqlite_path: Path | None = tmp / "bench.db"
                url = f"sqlite:///{sqlite_path}"
            else:
                sqlite_path = None
                url = stack.enter_context(postgres_database(args.postgres_url))
            databases[backend] = sa.make_url(url).database or ""
            measured = paths + (postgres_only if backend == "postgresql" else [])
            progress(f" {backend}: {len(measured)} paths x {args.rounds} rounds x {args.records}")
            results, servers[backend] = run_backend(
                backend,
                url,
                sqlite_path=sqlite_path,
                factory=factory,
                paths=measured,
                rounds=args.rounds,
                records=args.records,
                progress=progress,
            )
        rows.extend(with_driver_ratio([summarize(r, len(layers), raw, kept) for r in results]))
    total = time.perf_counter() - started
    load_after = os.getloadavg()

    meta = {
        "model": "ResNet-50 BatchNorm layers (no torch: random statistics, decided reports)",
        "bn_layers": len(layers),
        "bn_channels": channels,
        "raw_bytes_per_window": raw,
        "encoded_bytes_per_window": encoded,
        "reservoir_rows": args.reservoir,
        "reservoir_bytes_per_window": kept,
        "client_cpu_ms_per_window": cpu,
        "samples_per_window": SAMPLES_PER_WINDOW,
        "records_per_round": args.records,
        "rounds": args.rounds,
        "batch_sizes": args.batch_sizes,
        "sink_batch_size": args.sink_batch_size,
        "replicas": args.replicas,
        "servers": servers,
        "databases": databases,
        "sqlalchemy": sa.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "bnwatch": bnwatch.__version__,
        "smoke": args.smoke,
        "total_seconds": total,
        "load_average_1m_before_after": [load_before[0], load_after[0]],
    }
    print(
        f"ResNet-50 windows: {len(layers)} layers, {channels:,} channels; raw float64 "
        f"statistics {raw:,} B/window, codec {encoded:,} B ({encoded / raw:.3f}x raw); "
        f"reservoirs of {args.reservoir} rows {kept:,} B/window ({kept / raw:.3f}x raw)"
    )
    for backend, server in servers.items():
        settings = ", ".join(f"{k}={v}" for k, v in server.items() if k != "final")
        print(f"{backend}: {settings}")
    print(
        f"{args.rounds} round(s) round-robin, {args.records} timed windows per path and round; "
        "windows/s = median over rounds; stored = growth per window"
    )
    print("  (PostgreSQL: pg_total_relation_size('windows'); SQLite: file after checkpoint)")
    print(
        "  stats = stored - reservoir blobs (so any overhead the blobs cause counts against "
        "the statistics); the 1.2x target is for stats"
    )
    print()
    print(format_table(rows))
    print()
    print(
        f"  client CPU per window besides SQL: rows (moments encoded) {cpu['rows_ms']:.1f} ms, "
        f"reference digests {cpu['ref_digests_ms']:.1f} ms (paid once per monitor: the "
        "repository remembers reference ids by identity)"
    )
    for row in rows:
        if row["rows_stored"] != row["rows_expected"] or row["dropped_or_rejected"]:
            print(
                f"  WARNING {row['backend']} {row['path']} {row['batch']}: {row['rows_stored']} "
                f"rows stored, {row['rows_expected']} expected, "
                f"{row['dropped_or_rejected']} dropped or rejected"
            )
    print(
        f"total runtime {total:.1f} s; 1-min load average {load_before[0]:.2f} before, "
        f"{load_after[0]:.2f} after, on {os.cpu_count()} CPUs"
    )

    out = {"meta": meta, "results": rows}
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"results written to {args.json}")
    return out


if __name__ == "__main__":
    main()
