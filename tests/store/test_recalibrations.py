"""Finishing a recalibration: safe for remote callers -- unknown ids, second reports and buffers
that do not fit the stored layers are refused with nothing written; a report stores the new
statistics as ``recalibrated`` references with their lineage, once, even under a race."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from bnwatch.codec import decode_arrays
from bnwatch.errors import (
    BnwatchError,
    ConfigError,
    RecalibrationBuffersError,
    RecalibrationNotFoundError,
    RecalibrationStateError,
)
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.store.helpers import record_windows
from tests.store.rows import add_alerts, random_buffers

CHANNELS = {"1": 6, "4": 4, "7": 5}  # the stored layers of tests.store.helpers.small_cnn
ALERT_ID = 7


@pytest.fixture
def repo(migrated_db_url: str) -> Iterator[Repository]:
    """A store with the windows of one model version (three layers) and a drift alert."""
    engine = engine_for(migrated_db_url)
    repository = Repository(engine)
    repository.write_windows(record_windows(1))
    add_alerts(engine, [ALERT_ID])
    yield repository
    engine.dispose()


def buffers(
    channels: dict[str, int] = CHANNELS, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    return random_buffers(channels, seed)


def recalibrated_refs(repo: Repository) -> list[dict[str, Any]]:
    with repo.engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT refs.id, layers.name, refs.eps, refs.mean_var, refs.lineage, refs.version "
                "FROM refs JOIN layers ON layers.id = refs.layer_id "
                "WHERE refs.kind = 'recalibrated' ORDER BY refs.id"
            )
        ).all()
    return [dict(r._mapping) for r in rows]


def lineage_of(row: dict[str, Any]) -> dict[str, Any]:
    import json

    value = row["lineage"]
    return json.loads(value) if isinstance(value, str) else dict(value)


def only(repo: Repository, rid: int) -> Any:
    (rec,) = [r for r in repo.recalibrations() if r.id == rid]
    return rec


def test_a_report_stores_recalibrated_references_with_their_lineage(repo: Repository) -> None:
    rid = repo.start_recalibration("cnn", "1", method="WebhookAction", alert_id=ALERT_ID)
    new = buffers()
    info = repo.finish_recalibration(
        rid,
        status="applied",
        outcome={
            "samples": 512,
            "kl_before": 0.4,
            "kl_after": float("nan"),
            "data": {"source": "recent traffic", "first_at": "2026-06-01T00:00:00+00:00"},
        },
        buffers=new,
        unknown_layers="error",
    )
    assert (info.id, info.model, info.version, info.status) == (rid, "cnn", "1", "applied")
    assert info.alert_id == ALERT_ID and info.finished_at is not None
    assert info == only(repo, rid)  # what it returns is what is stored
    assert info.outcome is not None
    assert info.outcome["samples"] == 512 and info.outcome["kl_after"] is None  # NaN: null
    refs = recalibrated_refs(repo)
    assert info.outcome["references"] == {row["name"]: row["id"] for row in refs}
    assert sorted(row["name"] for row in refs) == sorted(CHANNELS)
    for row in refs:
        mean, var, eps = new[row["name"]]
        stored = decode_arrays(row["mean_var"])
        assert np.array_equal(stored[0], mean) and np.array_equal(stored[1], var)  # bit for bit
        assert row["eps"] == eps and row["version"] == 1
        assert lineage_of(row) == {
            "recalibration_id": rid,
            "alert_id": ALERT_ID,
            "method": "WebhookAction",
            "requested": "WebhookAction",
            "samples": 512,
            "data": {"source": "recent traffic", "first_at": "2026-06-01T00:00:00+00:00"},
        }


def test_the_lineage_names_the_method_that_ran_and_how_it_was_requested(repo: Repository) -> None:
    """A request for ``precise`` answered with ``bnwatch recalibrate --method mix``: the
    lineage says ``mix`` and its prior strength, and that ``precise`` was requested."""
    rid = repo.start_recalibration("cnn", "1", method="precise", alert_id=ALERT_ID)
    outcome = {"method": "mix", "prior_strength": 16.0, "samples": 64}
    repo.finish_recalibration(rid, status="applied", outcome=outcome, buffers=buffers())
    for row in recalibrated_refs(repo):
        assert lineage_of(row) == {
            "recalibration_id": rid,
            "alert_id": ALERT_ID,
            "method": "mix",
            "requested": "precise",
            "prior_strength": 16.0,
            "samples": 64,
        }


def test_statistics_applied_again_are_the_newest_with_their_own_lineage(
    repo: Repository,
) -> None:
    """A, then B, then A again: A is the newest ``recalibrated`` version of every layer, and
    its lineage names the third recalibration (deduplicated by digest, A keeps its row)."""
    a, b = buffers(seed=1), buffers(seed=2)
    rids = []
    for stats in (a, b, a):
        rid = repo.start_recalibration("cnn", "1", method="precise")
        repo.finish_recalibration(rid, status="applied", outcome={"samples": 64}, buffers=stats)
        rids.append(rid)
    rows = recalibrated_refs(repo)
    assert len(rows) == 2 * len(CHANNELS)  # A and B, once each
    for name in CHANNELS:
        newest = max((r for r in rows if r["name"] == name), key=lambda r: r["version"])
        assert np.array_equal(decode_arrays(newest["mean_var"])[0], a[name][0])
        assert lineage_of(newest)["recalibration_id"] == rids[2]
        assert newest["version"] == 3
    assert repo.recalibration(rids[2]).outcome["references"] == {  # type: ignore[index]
        r["name"]: r["id"] for r in rows if lineage_of(r)["recalibration_id"] == rids[2]
    }


def test_an_unknown_recalibration_is_a_lookup_error(repo: Repository) -> None:
    with pytest.raises(RecalibrationNotFoundError, match="no recalibration 4242") as caught:
        repo.finish_recalibration(4242, status="failed", outcome={"error": "x"})
    assert isinstance(caught.value, LookupError) and isinstance(caught.value, BnwatchError)
    assert caught.value.recalibration_id == 4242
    assert repo.recalibrations() == []
    with pytest.raises(RecalibrationNotFoundError, match="no recalibration 4242"):
        repo.recalibration(4242)


def test_one_recalibration_is_read_as_the_list_shows_it(repo: Repository) -> None:
    first = repo.start_recalibration("cnn", "1", method="precise", alert_id=ALERT_ID)
    second = repo.start_recalibration("cnn", "1", method="mix")
    repo.finish_recalibration(second, status="failed", outcome={"error": "no data"})
    listed = {r.id: r for r in repo.recalibrations()}
    assert repo.recalibration(first) == listed[first]
    assert (listed[first].status, listed[first].alert_id, listed[first].outcome) == (
        "pending",
        ALERT_ID,
        None,
    )
    assert repo.recalibration(second) == listed[second]
    assert repo.recalibration(second).outcome == {"error": "no data", "references": {}}


@pytest.mark.parametrize("first", ["applied", "rejected", "failed"])
def test_a_finished_recalibration_cannot_be_finished_again(repo: Repository, first: str) -> None:
    rid = repo.start_recalibration("cnn", "1", method="precise")
    repo.finish_recalibration(
        rid,
        status=first,
        outcome={"first": True},
        buffers=buffers() if first == "applied" else None,
    )
    before = only(repo, rid)
    refs = recalibrated_refs(repo)
    with pytest.raises(RecalibrationStateError, match=f"already {first}") as caught:
        repo.finish_recalibration(
            rid, status="applied", outcome={"second": True}, buffers=buffers(seed=1)
        )
    assert caught.value.status == first and caught.value.recalibration_id == rid
    assert only(repo, rid) == before  # nothing changed
    assert recalibrated_refs(repo) == refs


def test_a_layer_the_model_does_not_have_is_refused_and_nothing_is_stored(
    repo: Repository,
) -> None:
    rid = repo.start_recalibration("cnn", "1", method="precise")
    reported = {**buffers(), "layer9.bn": (np.zeros(3), np.ones(3), 1e-5)}
    with pytest.raises(RecalibrationBuffersError) as caught:
        repo.finish_recalibration(
            rid, status="applied", outcome={}, buffers=reported, unknown_layers="error"
        )
    message = str(caught.value)
    assert "'layer9.bn'" in message and "cnn@1" in message and "3 stored layer(s)" in message
    assert caught.value.layer == "layer9.bn"
    assert only(repo, rid).status == "pending" and only(repo, rid).finished_at is None
    assert recalibrated_refs(repo) == []


def test_in_process_callers_skip_unknown_layers_and_the_outcome_says_so(
    repo: Repository,
) -> None:
    """A model watched with include/exclude is recalibrated whole by an in-process trigger."""
    rid = repo.start_recalibration("cnn", "1", method="precise")
    reported = {**buffers(), "layer9.bn": (np.zeros(3), np.ones(3), 1e-5)}
    info = repo.finish_recalibration(rid, status="applied", outcome={}, buffers=reported)
    assert info.status == "applied" and info.outcome is not None
    assert info.outcome["skipped_layers"] == ["layer9.bn"]
    assert sorted(info.outcome["references"]) == sorted(CHANNELS)


def test_a_channel_count_mismatch_is_refused_naming_layer_and_counts(repo: Repository) -> None:
    rid = repo.start_recalibration("cnn", "1", method="precise")
    reported = buffers({"1": 6, "4": 3, "7": 5})
    for policy in ("error", "skip"):  # never skipped: the architecture changed
        with pytest.raises(RecalibrationBuffersError) as caught:
            repo.finish_recalibration(
                rid,
                status="applied",
                outcome={},
                buffers=reported,
                unknown_layers=policy,  # type: ignore[arg-type]
            )
        assert "layer '4' has 4 channels in the store but its buffers have 3" in str(caught.value)
        assert (caught.value.layer, caught.value.expected, caught.value.found) == ("4", 4, 3)
    assert only(repo, rid).status == "pending"
    assert recalibrated_refs(repo) == []


@pytest.mark.parametrize(
    ("mean", "var", "eps", "field", "message"),
    [
        (np.array([0.0, np.nan, 0, 0]), np.ones(4), 1e-5, "running_mean", "NaN or infinite"),
        (np.zeros(4), np.array([1.0, np.inf, 1, 1]), 1e-5, "running_var", "NaN or infinite"),
        (np.zeros(4), np.array([1.0, -0.5, 1, 1]), 1e-5, "running_var", "must not be negative"),
        (np.zeros(4), np.ones(3), 1e-5, "running_var", "3 channels but running_mean has 4"),
        (np.zeros((2, 2)), np.ones(4), 1e-5, "running_mean", "one value per channel"),
        (np.zeros(4), np.ones(4), 0.0, "eps", "finite number > 0"),
        (np.zeros(4), np.ones(4), float("nan"), "eps", "finite number > 0"),
    ],
)
def test_invalid_statistics_are_refused(
    repo: Repository, mean: Any, var: Any, eps: float, field: str, message: str
) -> None:
    rid = repo.start_recalibration("cnn", "1", method="precise")
    reported = {**buffers(), "4": (mean, var, eps)}
    with pytest.raises(RecalibrationBuffersError, match=message) as caught:
        repo.finish_recalibration(rid, status="applied", outcome={}, buffers=reported)
    assert (caught.value.layer, caught.value.field) == ("4", field)
    assert "layer '4'" in str(caught.value)
    assert only(repo, rid).status == "pending"
    assert recalibrated_refs(repo) == []


def test_statuses_and_buffers_are_checked(repo: Repository) -> None:
    rid = repo.start_recalibration("cnn", "1", method="precise")
    with pytest.raises(ConfigError, match="status='done'"):
        repo.finish_recalibration(rid, status="done", outcome={})
    with pytest.raises(ConfigError, match="unless status is 'applied'"):
        repo.finish_recalibration(rid, status="rejected", outcome={}, buffers=buffers())
    assert only(repo, rid).status == "pending"


def test_a_hand_off_stays_pending_and_never_overrides_a_decision(repo: Repository) -> None:
    """A delivered webhook records its delivery (pending); a receiver that reported before the
    webhook's request returned keeps its decision."""
    rid = repo.start_recalibration("cnn", "1", method="WebhookAction")
    info = repo.finish_recalibration(rid, status="pending", outcome={"http_status": 202})
    assert info.status == "pending" and info.finished_at is None
    assert info.outcome is not None and info.outcome["http_status"] == 202

    other = repo.start_recalibration("cnn", "1", method="WebhookAction")
    decided = repo.finish_recalibration(
        other, status="applied", outcome={"samples": 64}, buffers=buffers()
    )
    late = repo.finish_recalibration(other, status="pending", outcome={"http_status": 200})
    assert late == decided == only(repo, other)
    with pytest.raises(RecalibrationNotFoundError):
        repo.finish_recalibration(999, status="pending", outcome={})


def test_of_concurrent_reports_exactly_one_wins(repo: Repository) -> None:
    rid = repo.start_recalibration("cnn", "1", method="WebhookAction")
    reporters = 4
    start = threading.Barrier(reporters)
    won: list[int] = []
    refused: list[str] = []
    unexpected: list[BaseException] = []

    def report(seed: int) -> None:
        start.wait()
        try:
            repo.finish_recalibration(
                rid, status="applied", outcome={"reporter": seed}, buffers=buffers(seed=seed)
            )
            won.append(seed)
        except RecalibrationStateError as err:
            refused.append(err.status)
        except BaseException as err:  # surfaced below, with the thread's error
            unexpected.append(err)

    threads = [threading.Thread(target=report, args=(seed,)) for seed in range(reporters)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not unexpected, unexpected
    assert len(won) == 1 and refused == ["applied"] * (reporters - 1)
    rec = only(repo, rid)
    assert rec.outcome["reporter"] == won[0]
    refs = recalibrated_refs(repo)  # only the winner's statistics were stored
    assert sorted(rec.outcome["references"].values()) == sorted(row["id"] for row in refs)
    winner = buffers(seed=won[0])
    for row in refs:
        assert np.array_equal(decode_arrays(row["mean_var"])[0], winner[row["name"]][0])


def test_a_claim_abandoned_by_its_process_is_failed_and_its_alert_claimed_again(
    repo: Repository,
) -> None:
    """A process killed while its action ran left the claim pending: it held its alert for
    good.  30 minutes after the claim, without any outcome, it is recorded failed -- and the
    alert is claimed again (after the cooldown, as any failed trigger)."""
    t0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)

    def claim(minutes: float) -> Any:
        return repo.claim_recalibration(
            "cnn",
            "1",
            method="WebhookAction",
            alert_id=ALERT_ID,
            cooldown_seconds=600,
            daily_cap=10,
            now=t0 + timedelta(minutes=minutes),
        )

    first = claim(0).recalibration_id
    assert first is not None
    assert claim(20).refused == "alert"  # its process may still be running the action
    assert repo.fail_abandoned_claims(now=t0 + timedelta(minutes=29)) == []
    assert claim(29).refused == "alert"
    assert repo.fail_abandoned_claims(now=t0 + timedelta(minutes=31)) == [first]
    again = claim(31)
    assert again.refused is None and again.recalibration_id is not None
    abandoned = repo.recalibration(first)
    assert abandoned.status == "failed" and abandoned.outcome is not None
    assert abandoned.outcome["error"].startswith("abandoned: no outcome was recorded 30 minutes")
    assert abandoned.outcome["claimed_by"] == "trigger"  # the claim is kept
    # a hand-off that was recorded (a delivered webhook) waits for its receiver: never failed
    repo.finish_recalibration(again.recalibration_id, status="pending", outcome={"webhook": "x"})
    assert repo.fail_abandoned_claims(now=t0 + timedelta(days=2)) == []
    assert repo.recalibration(again.recalibration_id).status == "pending"


def test_claims_of_different_methods_keep_their_own_limits(repo: Repository) -> None:
    """A notification callback and an in-process recalibration on one model version: each
    acts on the alert, with its own cooldown and cap; neither uses up the other's."""

    def claim(method: str, alert_id: int | None = ALERT_ID) -> Any:
        return repo.claim_recalibration(
            "cnn", "1", method=method, alert_id=alert_id, cooldown_seconds=3600, daily_cap=1
        )

    assert claim("CallbackAction").refused is None
    assert claim("precise").refused is None  # the notification did not take its alert
    assert claim("CallbackAction").refused == "alert"
    assert claim("precise", alert_id=None).refused == "daily_cap"
