"""Window reservoirs in the store: exact round trips, merges that keep them uniform and
bounded, pooled production and reference reads -- on SQLite and PostgreSQL."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import torch

import bnwatch
from bnwatch.schema import LayerReport, WindowRecord
from bnwatch.stats import DEFAULT_RESERVOIR as D
from bnwatch.stats import Reservoir
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import NoReservoirError, Repository
from bnwatch.store.rollup import compact
from tests.store.helpers import batches, record_windows, small_cnn

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = engine_for(db_url)
    yield Repository(engine)
    engine.dispose()


def at(record: WindowRecord, start: datetime, minutes: float = 10) -> WindowRecord:
    return dataclasses.replace(record, start=start, end=start + timedelta(minutes=minutes))


def reservoir(record: WindowRecord, layer: str) -> Reservoir:
    found = record.reports[layer].stats.reservoir
    assert found is not None
    return found


def watch_one_window(net: torch.nn.Module, db_url: str, **options: Any) -> dict[str, LayerReport]:
    """Watch ``net`` (model cnn@1, stored in ``db_url``) over 3 batches closed as one window."""
    with (
        bnwatch.watch(
            net,
            name="cnn",
            version="1",
            store=db_url,
            window_seconds=None,
            overhead_budget=None,
            **options,
        ) as mon,
        torch.inference_mode(),
    ):
        for x in batches(3):
            net(x)
        return mon.flush()


def row_set(rows: np.ndarray) -> set[bytes]:
    return {row.tobytes() for row in np.ascontiguousarray(rows, dtype=np.float32)}


def test_reservoirs_round_trip_bit_for_bit(repo: Repository) -> None:
    records = record_windows(3)
    repo.write_windows(records)
    stored = repo.windows("cnn", "1", with_stats=True)
    assert len(stored) == 9
    for w in stored:
        rec = next(r for r in records if abs((r.end - w.end).total_seconds()) < 1e-6)
        sent = reservoir(rec, w.layer)
        assert w.stats is not None and w.stats.reservoir is not None
        got = w.stats.reservoir
        np.testing.assert_array_equal(got.rows, sent.rows)
        assert (got.seen, got.capacity) == (sent.seen, sent.capacity) == (16, D)
    # metric reads do not load them; latest windows with statistics do
    assert all(w.stats is None for w in repo.windows("cnn", "1"))
    latest = repo.latest_windows("cnn", "1", with_stats=True)
    assert all(w.stats is not None and w.stats.reservoir is not None for w in latest)


def without_reservoirs(records: list[WindowRecord]) -> list[WindowRecord]:
    """The same windows as a monitor that keeps no reservoirs would send them."""
    return [
        dataclasses.replace(
            r,
            reports={
                n: dataclasses.replace(rep, stats=dataclasses.replace(rep.stats, reservoir=None))
                for n, rep in r.reports.items()
            },
        )
        for r in records
    ]


def test_windows_without_reservoirs_read_as_none(repo: Repository) -> None:
    bare = without_reservoirs(record_windows(2))
    repo.write_windows(bare)
    assert all(
        w.stats and w.stats.reservoir is None for w in repo.windows("cnn", "1", with_stats=True)
    )
    merged = repo.windows("cnn", "1", resolution=3600 * 24 * 365)
    assert all(w.stats and w.stats.reservoir is None for w in merged)
    with pytest.raises(NoReservoirError, match=r"reservoir=N"):
        repo.production_reservoir("cnn", "1", "1")


def test_no_production_reservoir_says_why(repo: Repository) -> None:
    # a range without windows, or only warm-up windows, were both told to watch with
    # reservoir=N -- which no reservoir setting fixes
    (warming,) = record_windows(1)  # judged against a baseline still warming up
    repo.write_windows([warming])
    with pytest.raises(NoReservoirError, match=r"every window of layer '1' .* is a warm-up"):
        repo.production_reservoir("cnn", "1", "1", after_warmup=True)
    later = warming.end + timedelta(days=1)
    with pytest.raises(NoReservoirError, match="there is no window of layer '1'"):
        repo.production_reservoir("cnn", "1", "1", start=later)
    assert repo.production_reservoir("cnn", "1", "1").windows == 1


def test_merged_reads_merge_reservoirs(repo: Repository) -> None:
    records = record_windows(4)
    repo.write_windows([at(r, NOW + timedelta(minutes=10 * i)) for i, r in enumerate(records)])
    merged = repo.windows("cnn", "1", resolution=3600)
    assert len(merged) == 3
    for w in merged:
        assert w.stats is not None and w.stats.reservoir is not None
        res = w.stats.reservoir
        union = set().union(*(row_set(reservoir(r, w.layer).rows) for r in records))
        assert res.seen == 64 and res.capacity == D
        assert res.rows.shape == (D, w.channels)
        assert row_set(res.rows) <= union


def test_compaction_merges_reservoirs(repo: Repository) -> None:
    records = record_windows(6, warmup_samples=10**6)
    hour = NOW - timedelta(days=2, hours=3)
    repo.write_windows([at(r, hour + timedelta(minutes=10 * i)) for i, r in enumerate(records)])
    result = compact(
        repo.engine, older_than=timedelta(days=1), resolution=timedelta(hours=1), now=NOW
    )
    assert (result.windows_merged, result.windows_created) == (18, 3)
    rolled = repo.windows("cnn", "1", with_stats=True)
    assert [w.resolution_seconds for w in rolled] == [3600.0] * 3
    for w in rolled:
        assert w.stats is not None and w.stats.reservoir is not None
        res = w.stats.reservoir
        assert (res.seen, res.capacity, res.rows.shape) == (96, D, (D, w.channels))
        union = set().union(*(row_set(reservoir(r, w.layer).rows) for r in records))
        assert row_set(res.rows) <= union


def test_production_reservoir_pools_the_range(repo: Repository) -> None:
    records = record_windows(5, warmup_samples=10**6)
    repo.write_windows([at(r, NOW + timedelta(minutes=10 * i)) for i, r in enumerate(records)])
    pooled = repo.production_reservoir("cnn", "1", "4")
    assert (pooled.kind, pooled.windows, pooled.reservoir.seen) == ("production", 5, 80)
    # windows of equal size: every row they kept, each once
    kept = [row_set(reservoir(r, "4").rows) for r in records]
    assert row_set(pooled.reservoir.rows) == set().union(*kept)
    assert pooled.reservoir.rows.shape == (5 * min(D, 16), 4)
    assert (pooled.start, pooled.end) == (NOW, NOW + timedelta(minutes=50))
    # [start, end) on the windows' ends: the 2nd and 3rd windows (ends at 20 and 30 minutes)
    part = repo.production_reservoir(
        "cnn", "1", "4", start=NOW + timedelta(minutes=20), end=NOW + timedelta(minutes=40)
    )
    assert part.windows == 2
    assert row_set(part.reservoir.rows) == kept[1] | kept[2]
    bounded = repo.production_reservoir("cnn", "1", "4", max_rows=10)
    assert bounded.reservoir.rows.shape == (10, 4) and bounded.reservoir.seen == 80
    again = repo.production_reservoir("cnn", "1", "4", max_rows=10)
    np.testing.assert_array_equal(bounded.reservoir.rows, again.reservoir.rows)  # seeded
    with pytest.raises(NoReservoirError, match=r"ending at or after 20.*: none was stored"):
        repo.production_reservoir("cnn", "1", "4", start=NOW + timedelta(days=1))
    with pytest.raises(NoReservoirError, match=r"ending before 20.*: none was stored"):
        repo.production_reservoir("cnn", "1", "4", end=NOW - timedelta(days=1))
    with pytest.raises(NoReservoirError, match=r"ending in \[20.*, 20.*\): none was stored"):
        repo.production_reservoir("cnn", "1", "4", start=NOW, end=NOW + timedelta(seconds=1))
    with pytest.raises(KeyError, match=r"no layer 'nope' in cnn@1; layers: 1, 4, 7"):
        repo.production_reservoir("cnn", "1", "nope")
    with pytest.raises(KeyError, match="no model"):
        repo.production_reservoir("cnn", "9", "4")


def test_reference_reservoir_is_the_profiles_else_the_warmup(repo: Repository) -> None:
    # warmup_samples=16: the first window (16 samples) forms the baseline
    records = record_windows(3, warmup_samples=16)
    assert [r.reports["1"].baseline for r in records] == ["warming_up", "warmup", "warmup"]
    repo.write_windows(records)
    ref = repo.reference_reservoir("cnn", "1", "1")
    assert (ref.kind, ref.windows, ref.reservoir.seen) == ("warmup", 1, 16)
    assert row_set(ref.reservoir.rows) == row_set(reservoir(records[0], "1").rows)
    after = repo.production_reservoir("cnn", "1", "1", after_warmup=True)
    assert after.windows == 2

    net = small_cnn()
    prof = bnwatch.profile(net, batches(10, seed=3), name="cnn", version="1", reservoir_size=24)
    repo.write_profile(prof)
    ref = repo.reference_reservoir("cnn", "1", "1")
    assert ref.kind == "profile"
    np.testing.assert_array_equal(ref.reservoir.rows, prof.layers["1"].reservoir.rows)
    assert ref.reservoir.seen == prof.layers["1"].reservoir.seen == 40


def test_windows_judged_against_a_stored_profile_point_at_it(db_url: str) -> None:
    # the windows carry the profile's moments, not its reservoir: they must reuse the stored
    # profile, not store it again reservoir-less as a newer one (which load_profile would return)
    net = small_cnn()
    prof = bnwatch.profile(
        net, batches(10, seed=3), name="cnn", version="1", store=db_url, reservoir_size=24
    )
    reports = watch_one_window(net, db_url, reference=prof)
    assert {r.baseline for r in reports.values()} == {"profile"}
    engine = engine_for(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text(
                    "SELECT l.name, r.id FROM refs r JOIN layers l ON l.id = r.layer_id "
                    "WHERE r.kind = 'profile'"
                )
            ).all()
            pointed: dict[str, int] = {
                name: ref_id
                for name, ref_id in conn.execute(
                    sa.text(
                        "SELECT DISTINCT l.name, w.baseline_ref_id FROM windows w "
                        "JOIN layers l ON l.id = w.layer_id"
                    )
                ).all()
            }
        # one profile reference per layer, and the windows point at it
        assert sorted(name for name, _ in rows) == sorted(prof.layers)
        assert pointed == {name: ref_id for name, ref_id in rows}
        back = Repository(engine).load_profile("cnn", "1")
        assert back is not None
        for name, lp in prof.layers.items():
            np.testing.assert_array_equal(back.layers[name].reservoir.rows, lp.reservoir.rows)
    finally:
        engine.dispose()


def test_no_reference_says_how_to_record_one(repo: Repository) -> None:
    bare = without_reservoirs(record_windows(2, warmup_samples=10**6))  # never leaves the warm-up
    repo.write_windows(bare)
    with pytest.raises(NoReservoirError, match=r"bnwatch\.profile\(model") as info:
        repo.reference_reservoir("cnn", "1", "4")
    assert (info.value.which, info.value.layer) == ("reference", "4")
    assert "reservoir=N" in str(info.value)


def test_a_monitor_stores_its_reservoirs(db_url: str) -> None:
    watch_one_window(small_cnn(), db_url, reservoir=5)
    engine = engine_for(db_url)
    try:
        stored = Repository(engine).windows("cnn", "1", with_stats=True)
    finally:
        engine.dispose()
    assert len(stored) == 3
    for w in stored:
        assert w.stats is not None and w.stats.reservoir is not None
        assert w.stats.reservoir.capacity == 5
        assert w.stats.reservoir.rows.shape[0] <= 5
