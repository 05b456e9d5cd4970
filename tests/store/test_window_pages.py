"""Reading windows a page at a time, reading only the columns a read needs, and merging a
range to a resolution as it streams in (``Repository.window_page``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, undefer

from bnwatch.store.migrate import engine_for
from bnwatch.store.models import Layer, Window
from bnwatch.store.repository import (
    Repository,
    StoredWindow,
    WindowKey,
    WindowPage,
    merge_stored,
    merge_streamed,
    moments_equal,
)
from tests.service.helpers import T0, Monitor


@pytest.fixture
def repo(migrated_db_url: str) -> Iterator[Repository]:
    """cnn@1: three layers; two monitors closing windows at the same instants (ties in the
    order, broken by id), one of them drifting, and a third whose windows end at an odd
    microsecond, across several two-minute and hour buckets."""
    engine = engine_for(migrated_db_url)
    repository = Repository(engine)
    repository.write_windows(Monitor(source="r1").records(5))
    repository.write_windows(Monitor(source="r2", seed=1).records(5, shift=1.0))
    odd = T0 + timedelta(minutes=57, microseconds=1)
    repository.write_windows(Monitor(source="r3", seed=2, start=odd).records(4))
    yield repository
    engine.dispose()


def walk(read: Callable[[WindowKey | None], WindowPage], limit: int) -> list[StoredWindow]:
    """Every window of the pages ``read(after)`` gives, following ``next`` to the end."""
    out: list[StoredWindow] = []
    after = None
    for _ in range(1000):
        page = read(after)
        assert len(page.windows) <= limit
        out += page.windows
        if page.next is None:
            return out
        assert len(page.windows) == limit  # only a full page has a next one
        assert WindowKey.parse(page.next.token()) == page.next
        after = page.next
    raise AssertionError("the pages never ended")


@pytest.mark.parametrize("limit", [1, 5, 14, 42, 1000])
def test_pages_walk_every_window_in_order(repo: Repository, limit: int) -> None:
    everything = repo.windows("cnn", "1")
    assert len(everything) == 14 * 3
    walked = walk(lambda after: repo.window_page("cnn", "1", limit=limit, after=after), limit)
    assert [w.id for w in walked] == [w.id for w in everything]


def test_pages_keep_the_filters(repo: Repository) -> None:
    start, end = T0 + timedelta(minutes=2), T0 + timedelta(minutes=59)
    filters: dict[str, Any] = {"layer": "layer1.bn2", "start": start, "end": end}
    expected = repo.windows("cnn", "1", **filters)
    assert [w.source for w in expected] == ["r1", "r2"] * 4 + ["r3"]
    walked = walk(
        lambda after: repo.window_page("cnn", "1", limit=2, after=after, **filters), limit=2
    )
    assert [w.id for w in walked] == [w.id for w in expected]


def columns(repo: Repository, read: Callable[[], object]) -> set[str]:
    """The blob columns of ``windows`` (moments, reservoir) that ``read`` selected."""
    statements: list[str] = []

    def capture(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    sa.event.listen(repo.engine, "before_cursor_execute", capture)
    try:
        read()
    finally:
        sa.event.remove(repo.engine, "before_cursor_execute", capture)
    sql = "\n".join(statements)
    return {c for c in ("moments", "reservoir") if re.search(rf"\bwindows\.{c}\b", sql)}


def test_a_read_selects_only_the_blobs_it_needs(repo: Repository) -> None:
    """A plain list selected every window's statistics blob, and a merged read every
    reservoir, though neither answer holds them: 3.3 GB of server memory for a 15 MiB
    answer on 100 layers of 2,048 channels."""
    assert columns(repo, lambda: repo.windows("cnn", "1")) == set()
    assert columns(repo, lambda: repo.windows("cnn", "1", with_stats=True)) == {
        "moments",
        "reservoir",
    }
    lean = columns(repo, lambda: repo.windows("cnn", "1", with_stats=True, reservoirs=False))
    assert lean == {"moments"}
    # merging needs the statistics, never the reservoirs (no merged answer holds them)
    merged = columns(repo, lambda: repo.windows("cnn", "1", resolution=3600, with_stats=False))
    assert merged == {"moments"}
    # what the Python API gave before: merged windows with their statistics and reservoirs
    assert columns(repo, lambda: repo.windows("cnn", "1", resolution=60)) == {
        "moments",
        "reservoir",
    }
    assert all(w.stats is not None for w in repo.windows("cnn", "1", resolution=60))


def merged_at_once(repo: Repository, seconds: float, **filters: Any) -> list[StoredWindow]:
    """The merge of the whole range read at once, as ``Repository.windows`` did it before it
    streamed: the reference the streamed merge must match bit for bit."""
    layer = filters.get("layer")
    with Session(repo.engine) as conn:
        m = repo._model_row(conn, "cnn", "1")
        query = repo._range(sa.select(Window, Layer), m, **filters)
        rows = conn.execute(
            query.options(undefer(Window.reservoir)).order_by(
                Layer.depth, Layer.id, Window.end, Window.id
            )
        ).all()
        refs = repo.refs_for(conn, [w for w, _ in rows])
        count = repo._layer_count(conn, m) if layer is not None else None
        items = [
            (repo.to_stored(m, lr, w, True), lr, w.running_ref_id, w.baseline_ref_id)
            for w, lr in rows
        ]
    return merge_stored(items, refs, seconds, repo.judging("cnn", "1"), layer_count=count)


def same_metrics(a: StoredWindow, b: StoredWindow) -> bool:
    def nan_free(metrics: Any) -> dict[str, Any]:
        return {
            k: "nan" if isinstance(v, float) and math.isnan(v) else v for k, v in metrics.items()
        }

    return nan_free(a.metrics) == nan_free(b.metrics)


@pytest.mark.parametrize(
    ("seconds", "filters"),
    [(120.0, {}), (3600.0, {}), (120.0, {"layer": "head.bn"}), (60.0, {"source": "r3"})],
)
def test_merged_pages_are_the_merge_of_the_whole_range(
    repo: Repository, seconds: float, filters: dict[str, Any]
) -> None:
    expected = merged_at_once(repo, seconds, **filters)
    assert expected
    if not filters and seconds == 120.0:  # decisions made both ways
        assert {w.drifted for w in expected} == {True, False}
    for limit in (3, 1000):

        def read(after: WindowKey | None, limit: int = limit) -> WindowPage:
            return repo.window_page(
                "cnn", "1", resolution=seconds, limit=limit, after=after, **filters
            )

        walked = walk(read, limit)
        key = [(w.layer, w.start, w.end, w.source, w.merged_from) for w in walked]
        assert key == [(w.layer, w.start, w.end, w.source, w.merged_from) for w in expected]
        for got, want in zip(walked, expected, strict=True):
            assert same_metrics(got, want)
            assert got.stats is not None and want.stats is not None
            assert moments_equal(got.stats.moments, want.stats.moments)
            assert (got.n_samples, got.batch_sizes, got.baseline) == (
                want.n_samples,
                want.batch_sizes,
                want.baseline,
            )
    # without their statistics: the same windows, judged the same
    lean = repo.windows("cnn", "1", resolution=seconds, with_stats=False, **filters)
    assert all(w.stats is None for w in lean)
    assert all(same_metrics(a, b) for a, b in zip(lean, expected, strict=True))


def test_window_keys_read_back_or_are_refused() -> None:
    key = WindowKey(3, 17, T0 + timedelta(microseconds=7), 99)
    assert WindowKey.parse(key.token()) == key
    assert key.token() == "3.17.1772366400000007.99"
    for token in ["", "1.2.3", "a.b.c.d", "1.2.3.4.5", "1.2.99999999999999999999.4", "1.2. 3.4"]:
        with pytest.raises(ValueError, match="not a window key"):
            WindowKey.parse(token)
    with pytest.raises(ValueError, match="out of range"):
        WindowKey.parse("0.1.9223372036854775807.0")


def test_limit_must_be_positive(repo: Repository) -> None:
    with pytest.raises(ValueError, match="limit"):
        repo.window_page("cnn", "1", limit=0)
    assert np.isfinite(len(repo.window_page("cnn", "1", limit=1).windows))


def test_a_merge_streams_one_bucket_at_a_time(repo: Repository) -> None:
    """A merged read held every window of the range (and its reservoir) before merging:
    1.7 GB of server memory for a 0.1 MiB answer of 4,000 windows of 2,048 channels.  A
    bucket is merged and decided as soon as the next one begins."""
    with Session(repo.engine) as conn:
        m = repo._model_row(conn, "cnn", "1")
        rows = conn.execute(
            repo._range(sa.select(Window, Layer), m).order_by(
                Window.end, Layer.depth, Layer.id, Window.id
            )
        ).all()
        refs = repo.refs_for(conn, [w for w, _ in rows])
        items = [
            (repo.to_stored(m, lr, w, True), lr, w.running_ref_id, w.baseline_ref_id)
            for w, lr in rows
        ]
    consumed = 0

    def counted() -> Iterator[Any]:
        nonlocal consumed
        for item in items:
            consumed += 1
            yield item

    merged = merge_streamed(counted(), lambda ids: refs, 120.0, repo.judging("cnn", "1"))
    first = next(merged)
    # the first bucket, (12:00, 12:02], holds two windows of each of two monitors and layer
    assert first.window.merged_from == 4 and consumed == 4 * 3 + 1
    rest = list(merged)
    assert consumed == len(items)
    assert sorted(w.window.merged_from for w in [first, *rest]) == sorted(
        w.merged_from for w in merged_at_once(repo, 120.0)
    )
    with pytest.raises(ValueError, match="time order"):
        list(merge_streamed(reversed(items), lambda ids: refs, 120.0, repo.judging("cnn", "1")))
