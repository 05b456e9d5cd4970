"""One layer's windows merged at several resolutions as they stream in
(``Repository.layer_reports_at``, what the dashboard's Layer and Batch size pages read): the
very reports of merging every window of the range at once, without holding the range."""

from __future__ import annotations

import dataclasses
import math
import weakref
from collections.abc import Iterator, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import torch
from sqlalchemy.orm import Session
from torch import nn

import bnwatch
from bnwatch.schema import LayerReport, WindowRecord
from bnwatch.sink import MemorySink
from bnwatch.store import repository
from bnwatch.store.migrate import engine_for
from bnwatch.store.models import Layer, Window
from bnwatch.store.repository import Repository, StoredWindow, merge_groups
from bnwatch.store.rollup import compact
from tests.store.helpers import batches

T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)
WINDOWS = 8
Reports = list[tuple[StoredWindow, LayerReport]]


class NanChannel(nn.Module):
    """Channel 0 of the input made NaN while ``active``."""

    def __init__(self) -> None:
        super().__init__()
        self.active = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        x = x.clone()
        x[:, 0] = float("nan")
        return x


def recorded(source: str, seed: int, nan_windows: Sequence[int]) -> list[WindowRecord]:
    """``WINDOWS`` windows of three BatchNorm layers (the first a warm-up), channel 0 NaN in
    ``nan_windows`` (in the last layer, the 36 features it becomes)."""
    torch.manual_seed(seed)
    nan = NanChannel()
    net = nn.Sequential(
        nan, nn.BatchNorm2d(3), nn.ReLU(), nn.BatchNorm2d(3), nn.Flatten(), nn.BatchNorm1d(108)
    ).eval()
    sink = MemorySink()
    mon = bnwatch.watch(
        net,
        name="nan",
        version="1",
        store=sink,
        window_seconds=None,
        overhead_budget=None,
        source=source,
        config=bnwatch.DriftConfig(warmup_samples=16, min_samples=4),
    )
    data = batches(WINDOWS * 4, seed=seed, shift=0.3 * seed)
    with torch.inference_mode():
        for w in range(WINDOWS):
            nan.active = w in nan_windows
            for x in data[w * 4 : (w + 1) * 4]:
                net(x)
            mon.flush()
    mon.close()
    return sink.windows


def at(record: WindowRecord, start: datetime, minutes: float = 10) -> WindowRecord:
    return dataclasses.replace(record, start=start, end=start + timedelta(minutes=minutes))


@pytest.fixture
def repo(migrated_db_url: str) -> Iterator[Repository]:
    """nan@1: two monitors of three layers, each warming up first; their windows end at the
    same instants (ties broken by id), a third monitor's at odd ones; channel 0 NaN in some
    windows of one and in every window of another; the first hour compacted (its bucket of
    each monitor split into the warm-up window and the others)."""
    engine = engine_for(migrated_db_url)
    store = Repository(engine)
    sources = [
        (recorded("a:1", 0, nan_windows=(2, 3)), T0),
        (recorded("b:1", 1, nan_windows=range(WINDOWS)), T0),
        (recorded("c:1", 2, nan_windows=()), T0 + timedelta(minutes=3, microseconds=7)),
    ]
    for records, first in sources:
        store.write_windows(
            [at(r, first + timedelta(minutes=10 * i)) for i, r in enumerate(records)]
        )
    done = compact(
        engine,
        older_than=timedelta(minutes=30),
        resolution=timedelta(hours=1),
        now=T0 + timedelta(minutes=100),
    )
    assert done.windows_merged > 0
    yield store
    engine.dispose()


def reports_in_memory(
    repo: Repository,
    layer: str,
    resolutions: Sequence[float | None],
    start: datetime | None = None,
    end: datetime | None = None,
) -> list[Reports]:
    """``layer_reports_at`` as it was: every window of the range read, then merged at each
    resolution with :func:`merge_groups` (the reference the streamed merge must equal)."""
    with Session(repo.engine) as conn:
        m = repo._model_row(conn, "nan", "1")
        query = repo._range(sa.select(Window, Layer), m, layer=layer, start=start, end=end)
        rows = conn.execute(query.order_by(Window.end, Window.id)).all()
        refs = repo.refs_for(conn, [w for w, _ in rows])
        count = repo._layer_count(conn, m)
    items = [
        (repo.to_stored(m, lr, w, True), lr, w.running_ref_id, w.baseline_ref_id) for w, lr in rows
    ]
    judged = repo.judging("nan", "1")
    views = []
    for resolution in resolutions:
        seconds = resolution if resolution is not None else repository._WHOLE_RANGE
        merged = merge_groups(items, refs, seconds, judged, layer_count=count)
        out = [(g.window, g.report) for g in merged if g.report is not None]
        if resolution is None and out:
            first = min(w.start for w, *_ in items)
            last = max(w.end for w, *_ in items)
            out = [(dataclasses.replace(w, start=first, end=last), r) for w, r in out]
        views.append(out)
    return views


def same(a: Any, b: Any) -> bool:
    """Bit-for-bit equality of two results, NaN equal to NaN: arrays by value and dtype,
    dataclasses field by field, containers item by item."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (
            isinstance(a, np.ndarray)
            and isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.tobytes() == b.tobytes()
        )
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        return type(a) is type(b) and all(
            same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a)
        )
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return (
            type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))  # type: ignore[arg-type]
        )
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a):
        return math.isnan(b)
    return bool(type(a) is type(b) and a == b)


@pytest.mark.parametrize(
    ("start", "end"),
    [(None, None), (T0 + timedelta(minutes=25), T0 + timedelta(minutes=75))],
)
def test_the_streamed_merge_is_the_merge_of_every_window_at_once(
    repo: Repository, start: datetime | None, end: datetime | None
) -> None:
    resolutions = [120.0, 600.0, 3600.0, None]
    layers = [layer.name for layer in repo.layers("nan", "1")]
    assert layers == ["1", "3", "5"]
    # the store holds what makes a merge differ when done otherwise
    stored = repo.windows("nan", "1", with_stats=True)
    assert {w.source for w in stored} == {"a:1", "b:1", "c:1"}
    assert {w.baseline for w in stored} == {"warming_up", "warmup"}
    assert {w.resolution_seconds for w in stored} == {0.0, 3600.0}
    assert all(w.stats is not None for w in stored)
    # windows whose channel 0 was NaN throughout: no finite value of it (count 0)
    assert any(
        w.nonfinite > 0 and (w.stats.moments.as_arrays()[0] == 0).any()
        for w in stored
        if w.stats is not None
    )
    for layer in layers:
        want = reports_in_memory(repo, layer, resolutions, start, end)
        got = repo.layer_reports_at(
            "nan", "1", layer, resolutions=resolutions, start=start, end=end
        )
        assert [len(v) for v in got] == [len(v) for v in want]
        assert len(want[-1]) == 1 and len(want[0]) > len(want[2]) > 1
        assert same(got, want)
    # channel 0 is undefined where every window of the range had it NaN, defined elsewhere
    (((_, whole),),) = repo.layer_reports_at("nan", "1", "1", resolutions=[None])
    assert not np.isnan(whole.mean).any() and whole.nonfinite > 0


def test_a_long_range_is_merged_holding_a_few_windows_at_a_time(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Layer page read every window of its range, decoded, before merging: 1.3 GB for
    20,000 windows of 256 channels.  The windows are merged into their buckets as they come
    and dropped: a few are held at any time, however many the range has."""
    decoded = repo.to_stored
    alive: set[int] = set()
    most = 0

    def counted(*args: Any, **kwargs: Any) -> StoredWindow:
        nonlocal most
        window = decoded(*args, **kwargs)
        alive.add(id(window))
        weakref.finalize(window, alive.discard, id(window))
        most = max(most, len(alive))
        return window

    monkeypatch.setattr(repo, "to_stored", counted)
    views = repo.layer_reports_at("nan", "1", "5", resolutions=[120.0, None])
    held = most
    merged = views[-1][0][0].merged_from
    assert merged == len(repo.windows("nan", "1", layer="5")) > 12
    # the whole range's first window, the first and the last of the bucket being merged
    assert held <= 4, f"{held} of {merged} windows held at once"


@pytest.mark.parametrize(
    ("start", "end"),
    [(None, None), (T0 + timedelta(minutes=25), T0 + timedelta(minutes=75)), (T0, T0)],
)
def test_batch_sizes_are_summed_over_the_range_as_it_streams(
    repo: Repository, start: datetime | None, end: datetime | None
) -> None:
    """The Batch size page's histogram: the batches of every window of one layer in the range
    (compacted ones merged theirs), as :meth:`Repository.metric_rows` lists them."""
    for layer in ("1", "5"):
        names, rows = repo.metric_rows("nan", "1", layer=layer, start=start, end=end, columns=())
        want: dict[int, int] = {}
        for row in rows:
            for size, n in row[names.index("batch_sizes")].items():
                want[int(size)] = want.get(int(size), 0) + n
        got = repo.batch_size_counts("nan", "1", layer=layer, start=start, end=end)
        assert got == want
        assert (got == {}) == (start == end is not None)
    with pytest.raises(KeyError, match="no model"):
        repo.batch_size_counts("nope", "1", layer="1")
