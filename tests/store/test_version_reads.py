"""Reads of every model version at once (``Repository.window_spans``, ``metric_maxima``): the
Overview lists hundreds of versions, and asking about each cost a few queries apiece."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.service.helpers import T0, Monitor
from tests.store.helpers import record_windows

VERSIONS = [("cnn", "1"), ("cnn", "2"), ("resnet", "1"), ("idle", "1")]


@pytest.fixture
def repo(migrated_db_url: str) -> Iterator[Repository]:
    """cnn@1: two monitors of one-minute windows, one drifting; cnn@2: windows whose drift is
    undefined at first (warming up), two minutes long, ending an hour later; resnet@1: the
    same windows as cnn@1's first monitor plus, ending with its last, a longer one (a
    compacted window beside a raw one); idle@1: a profile, no window."""
    engine = engine_for(migrated_db_url)
    store = Repository(engine)
    store.write_windows(Monitor(source="r1").records(6))
    store.write_windows(Monitor(source="r2", seed=1).records(6, shift=1.0))
    later = T0 + timedelta(hours=1)
    store.write_windows(
        [
            dataclasses.replace(
                r,
                version="2",
                start=later + timedelta(minutes=2 * i),
                end=later + timedelta(minutes=2 * i + 2),
            )
            for i, r in enumerate(record_windows(4))
        ]
    )
    resnet = Monitor(model="resnet", source="r1", seed=2).records(6)
    last = resnet[-1]
    store.write_windows([*resnet, dataclasses.replace(last, uid="0" * 32, start=T0)])
    store.write_windows(Monitor(model="idle").records(1))
    with engine.begin() as conn:  # a version whose windows are gone (retention)
        conn.execute(
            sa.text(
                "DELETE FROM windows WHERE model_id = (SELECT id FROM models WHERE name = 'idle')"
            )
        )
    yield store
    engine.dispose()


RANGES: list[tuple[datetime | None, datetime | None]] = [
    (None, None),
    (T0 + timedelta(minutes=2), None),
    (None, T0 + timedelta(minutes=4)),
    (T0 + timedelta(minutes=2), T0 + timedelta(minutes=65)),
    (T0 + timedelta(days=1), None),
]


@pytest.mark.parametrize(("start", "end"), RANGES)
def test_spans_of_every_version_are_each_versions_span(
    repo: Repository, start: datetime | None, end: datetime | None
) -> None:
    spans = repo.window_spans(start=start, end=end)
    want = {}
    for name, version in VERSIONS:
        one = repo.window_span(name, version, start=start, end=end)
        if one is not None:
            want[(name, version)] = one
    assert spans == want
    if start is None and end is None:
        assert set(spans) == set(VERSIONS) - {("idle", "1")}
        # of the windows ending last, the shortest: the raw one beside the long one
        assert spans[("resnet", "1")][3] == 60.0 and spans[("cnn", "2")][3] == 120.0


def buckets_maxima(
    repo: Repository,
    name: str,
    version: str,
    column: str,
    seconds: float,
    start: datetime | None,
    end: datetime | None,
) -> list[tuple[datetime, float | None]]:
    """The largest ``column`` per bucket over every layer, from :meth:`metric_buckets`."""
    names, rows = repo.metric_buckets(
        name, version, seconds=seconds, columns=(column,), start=start, end=end
    )
    at_start, at_max = names.index("bucket_start"), names.index(f"max_{column}")
    values: dict[datetime, list[float]] = {}
    for row in rows:
        values.setdefault(row[at_start], [])
        if row[at_max] is not None:
            values[row[at_start]].append(row[at_max])
    return [(begins, max(v) if v else None) for begins, v in sorted(values.items())]


@pytest.mark.parametrize("column", ["drift_d_rms", "drifted", "frac_gap"])
@pytest.mark.parametrize(("start", "end"), RANGES)
def test_maxima_of_every_version_are_each_versions_buckets(
    repo: Repository, column: str, start: datetime | None, end: datetime | None
) -> None:
    # each version at its own bucket length (as its span chooses); a version not asked for
    # is left out, one without windows gets none
    seconds = {("cnn", "1"): 120.0, ("cnn", "2"): 0.5, ("resnet", "1"): 3600.0, ("idle", "1"): 60.0}
    maxima = repo.metric_maxima(column, seconds, start=start, end=end)
    assert set(maxima) == set(seconds)
    for (name, version), width in seconds.items():
        want = buckets_maxima(repo, name, version, column, width, start, end)
        assert maxima[(name, version)] == want
    if start is None and end is None and column == "drift_d_rms":
        assert len(maxima[("cnn", "1")]) == 3 and maxima[("idle", "1")] == []
        warming = [v for _, v in maxima[("cnn", "2")]]
        assert warming[0] is None and all(v is not None and not math.isnan(v) for v in warming[1:])
    only = repo.metric_maxima(column, {("cnn", "1"): 60.0}, start=start, end=end)
    assert set(only) == {("cnn", "1")}


def test_maxima_need_a_known_column_and_a_positive_length(repo: Repository) -> None:
    with pytest.raises(ValueError, match="unknown metric columns"):
        repo.metric_maxima("moments", {("cnn", "1"): 60.0})
    with pytest.raises(ValueError, match="resolution must be > 0"):
        repo.metric_maxima("drift_d_rms", {("cnn", "1"): 0.0})
    assert repo.metric_maxima("drift_d_rms", {}) == {}
    assert repo.metric_maxima("drift_d_rms", {("nope", "1"): 60.0}) == {("nope", "1"): []}
