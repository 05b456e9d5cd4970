"""The thresholds a model version's windows were judged at: stored with each source's last
account of itself (``sources.drift_config``, migration 0008) and read back by
``Repository.drift_config``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bnwatch.drift import DriftConfig, config_account
from bnwatch.schema import WindowRecord
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.store.helpers import record_windows, renamed

RECORDED = DriftConfig(warmup_samples=16, min_samples=4)
"""The thresholds of :func:`tests.store.helpers.record_windows`'s monitor."""


@pytest.fixture
def repo(migrated_db_url: str) -> Iterator[Repository]:
    engine = engine_for(migrated_db_url)
    yield Repository(engine)
    engine.dispose()


def judged(
    record: WindowRecord, config: DriftConfig | None, *, later: float = 0.0, **changes: object
) -> WindowRecord:
    """``record`` as a monitor judging at ``config`` sent it (``None``: a monitor that reports
    no thresholds, as before they were stored), ``later`` seconds after it closed."""
    monitor = {k: v for k, v in record.monitor.items() if not k.startswith("drift_")}
    if config is not None:
        monitor.update(config_account(config))
    shift = timedelta(seconds=later)
    return renamed(
        record, monitor=monitor, start=record.start + shift, end=record.end + shift, **changes
    )


def test_a_monitors_thresholds_are_stored_with_its_source(repo: Repository) -> None:
    records = record_windows(2)
    assert repo.drift_config("cnn", "1") is None  # not stored yet
    repo.write_windows(records)
    assert repo.drift_config("cnn", "1") == RECORDED
    (source,) = repo.sources("cnn", "1")
    assert source.drift_config == RECORDED
    assert repo.drift_config("cnn", "2") is None and repo.sources("cnn", "2") == []


def test_without_reported_thresholds_there_is_none(repo: Repository) -> None:
    (record,) = record_windows(1)
    repo.write_windows([judged(record, None)])
    assert repo.drift_config("cnn", "1") is None
    (source,) = repo.sources()
    assert source.drift_config is None and source.windows == 1
    # a partial or invalid account is no account: never defaults for the missing fields
    partial = {k: v for k, v in config_account(RECORDED).items() if k != "drift_min_shift"}
    invalid = {**config_account(RECORDED), "drift_alpha": 3.0}
    for i, account in enumerate((partial, invalid), start=1):
        sent = judged(record, None, later=i)
        repo.write_windows([renamed(sent, monitor={**sent.monitor, **account})])
        assert repo.drift_config("cnn", "1") is None


def test_the_newest_source_wins_when_sources_disagree(repo: Repository) -> None:
    (record,) = record_windows(1)
    strict = DriftConfig(min_shift=5.0, alpha=1e-4)
    repo.write_windows([judged(record, RECORDED, source="replica-a")])
    repo.write_windows([judged(record, strict, later=60, source="replica-b")])
    assert repo.drift_config("cnn", "1") == strict
    configs = {s.source: s.drift_config for s in repo.sources("cnn", "1")}
    assert configs == {"replica-a": RECORDED, "replica-b": strict}  # the caller can tell
    # replica-a reports again, later: its thresholds are the newest now
    repo.write_windows([judged(record, RECORDED, later=120, source="replica-a")])
    assert repo.drift_config("cnn", "1") == RECORDED
    # a source that stops reporting thresholds (an older bnwatch) does not hide the others'
    repo.write_windows([judged(record, None, later=180, source="replica-b")])
    assert repo.drift_config("cnn", "1") == RECORDED
    assert {s.source: s.drift_config for s in repo.sources()}["replica-b"] is None


def test_a_source_keeps_the_thresholds_of_its_last_window(repo: Repository) -> None:
    (record,) = record_windows(1)
    first, second = DriftConfig(min_shift=0.5), DriftConfig(min_shift=1.5)
    repo.write_windows([judged(record, second, later=60), judged(record, first)])  # one batch
    assert repo.drift_config("cnn", "1") == second
    repo.write_windows([judged(record, first, later=30)])  # late delivery of an older window
    assert repo.drift_config("cnn", "1") == second
    repo.write_windows([judged(record, first, later=90)])
    assert repo.drift_config("cnn", "1") == first


def test_the_column_holds_the_account_as_sent(repo: Repository) -> None:
    (record,) = record_windows(1)
    repo.write_windows([record])
    with repo.engine.connect() as conn:
        stored = conn.execute(sa.text("SELECT drift_config FROM sources")).scalar_one()
    # one JSON value, readable in SQL: drift_<field> -> threshold
    assert (stored if isinstance(stored, dict) else json.loads(stored)) == config_account(RECORDED)


def test_merged_windows_are_judged_at_the_stored_thresholds_by_default(repo: Repository) -> None:
    """``windows(resolution=)`` and ``layer_reports`` re-judge merged windows: without a
    ``config``, at the thresholds that decided the stored flags (they used the default, which
    flags this untrained CNN's gap)."""
    loose = DriftConfig(min_shift=50.0, min_log_ratio=50.0, min_samples=4)
    records = record_windows(3, config=loose)
    repo.write_windows(records)
    assert not any(r.gap for rec in records for r in rec.reports.values())
    layer = next(iter(records[0].reports))
    at_default = DriftConfig()
    assert any(w.gap for w in repo.windows("cnn", "1", resolution=3600.0, config=at_default))
    assert repo.judging("cnn", "1") == loose
    assert not any(w.gap for w in repo.windows("cnn", "1", resolution=3600.0))
    assert not any(r.gap for _, r in repo.layer_reports("cnn", "1", layer, resolution=None))
    # an explicit config still wins; without stored thresholds the default judges
    assert any(
        r.gap for _, r in repo.layer_reports("cnn", "1", layer, resolution=None, config=at_default)
    )
    assert repo.judging("cnn", "2") == at_default
