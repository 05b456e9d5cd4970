"""Repository.claim_recalibration: the trigger limits checked and recorded atomically."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import timedelta

import pytest
import sqlalchemy as sa

from bnwatch.alerts import AlertChange
from bnwatch.schema import utcnow
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import RecalibrationClaim, RecalibrationRequest, Repository
from bnwatch.triggers import CallbackAction, Outcome, Trigger, TriggerEvent, TriggerPolicy
from tests.service.helpers import Monitor
from tests.store.rows import add_alerts

ALERTS = (1, 2, 3, 4, 5)


@pytest.fixture
def db_url(migrated_db_url: str) -> str:
    """Each kind of database at the current schema (every test here opens it migrated)."""
    return migrated_db_url


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    """A store with model version cnn@1 and open drift alerts ``ALERTS``."""
    engine = engine_for(db_url)
    repository = Repository(engine)
    repository.write_windows(Monitor().records(1))
    add_alerts(engine, ALERTS)
    yield repository
    engine.dispose()


def claim(repo: Repository, alert_id: int, **kwargs: object) -> RecalibrationClaim:
    limits: dict[str, object] = {"cooldown_seconds": 600.0, "daily_cap": 2, **kwargs}
    return repo.claim_recalibration(
        "cnn",
        "1",
        method="WebhookAction",
        alert_id=alert_id,
        **limits,  # type: ignore[arg-type]
    )


def test_cooldown_and_daily_cap(repo: Repository) -> None:
    t0 = utcnow()
    first = claim(repo, 1, now=t0)
    assert first.recalibration_id is not None and first.refused is None
    assert (first.recent, first.last_started) == (0, None)
    assert claim(repo, 2, now=t0 + timedelta(minutes=9)).refused == "cooldown"
    second = claim(repo, 2, now=t0 + timedelta(minutes=11))
    assert second.recalibration_id is not None
    assert second.last_started == t0
    capped = claim(repo, 3, now=t0 + timedelta(hours=2))
    assert (capped.refused, capped.recent) == ("daily_cap", 2)
    assert claim(repo, 3, now=t0 + timedelta(days=1, minutes=12)).recalibration_id is not None
    recs = {r.id: r for r in repo.recalibrations()}
    assert set(recs) == {first.recalibration_id, second.recalibration_id, 3}
    assert all(r.status == "pending" and r.method == "WebhookAction" for r in recs.values())
    assert recs[first.recalibration_id].created_at == t0  # recorded at the claim's `now`


def test_one_claim_per_alert_unless_it_failed(repo: Repository) -> None:
    t0 = utcnow()
    first = claim(repo, 1, cooldown_seconds=0, now=t0)
    assert first.recalibration_id is not None
    assert claim(repo, 1, cooldown_seconds=0, now=t0 + timedelta(minutes=1)).refused == "alert"
    repo.finish_recalibration(first.recalibration_id, status="failed", outcome={"error": "x"})
    retry = claim(repo, 1, cooldown_seconds=0, now=t0 + timedelta(minutes=2))
    assert retry.recalibration_id is not None  # a failed trigger may be retried


def test_an_unknown_model_version_is_created_and_claimed(repo: Repository) -> None:
    made = repo.claim_recalibration(
        "other", "7", method="CallbackAction", cooldown_seconds=60, daily_cap=1
    )
    assert made.recalibration_id is not None
    (rec,) = repo.recalibrations(model="other")
    assert (rec.version, rec.alert_id, rec.status) == ("7", None, "pending")


def race(db_url: str, racers: int, attempt: Callable[[Repository, int], object]) -> list[object]:
    """Run ``attempt(repository, i)`` in ``racers`` threads at once, each with an engine (and so
    connections) of its own, as separate processes would; returns their results."""
    engines = [engine_for(db_url) for _ in range(racers)]
    barrier = threading.Barrier(racers)
    results: list[object] = [None] * racers
    errors: list[BaseException] = []

    def run(i: int) -> None:
        repository = Repository(engines[i])
        # connect, and know the model version's id, before the start line: each claim is then
        # only the checks and the insert (no first write that would serialize them anyway)
        repository.write_windows(Monitor().records(1))
        barrier.wait()
        try:
            results[i] = attempt(repository, i)
        except BaseException as err:  # reported below, with the racer's traceback
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for engine in engines:
        engine.dispose()
    if errors:
        raise errors[0]
    return results


def test_racing_claims_for_one_alert_record_one_recalibration(
    repo: Repository, db_url: str
) -> None:
    """Eight connections claim for the same alert at once (a service's workers seeing it open):
    exactly one wins, inside the cooldown or not."""
    now = utcnow()
    for cooldown in (3600.0, 0.0):
        alert_id = 1 if cooldown else 2
        results = race(
            db_url,
            8,
            lambda r, _, a=alert_id, c=cooldown: claim(  # type: ignore[misc]
                r, a, cooldown_seconds=c, daily_cap=100, now=now
            ),
        )
        claims = [c for c in results if isinstance(c, RecalibrationClaim)]
        won = [c for c in claims if c.recalibration_id is not None]
        assert len(claims) == 8 and len(won) == 1, claims
        assert [r.alert_id for r in repo.recalibrations()].count(alert_id) == 1


def test_racing_triggers_of_one_model_version_act_once(repo: Repository, db_url: str) -> None:
    """Six triggers, each seeing another drift alert of one model version open at once, within
    the cooldown: one action runs, one recalibration is recorded."""
    calls: list[TriggerEvent] = []
    lock = threading.Lock()

    def act(event: TriggerEvent) -> Outcome:
        with lock:
            calls.append(event)
        return Outcome("applied")

    trigger = Trigger(CallbackAction(act), TriggerPolicy(cooldown_seconds=3600))

    def attempt(repository: Repository, i: int) -> object:
        alert_id = [1, 2, 3, 4, 5, 1][i]
        change = AlertChange("opened", alert_id, "drift", "cnn", "1", "bn1", {})
        return trigger.on_alerts(repository, [change])

    results = race(db_url, 6, attempt)
    assert sum(len(r) for r in results if isinstance(r, list)) == 1
    assert len(calls) == 1
    (rec,) = repo.recalibrations()
    assert (rec.status, rec.alert_id) == ("applied", calls[0].alert_id)


# -- recalibrations requested by hand (the dashboard) --------------------------------------------
def test_requested_recalibrations_are_taken_once_and_claims_never(repo: Repository) -> None:
    claimed = claim(repo, ALERTS[1]).recalibration_id
    requested = repo.start_recalibration("cnn", "1", method="mix", alert_id=ALERTS[0])
    finished = repo.start_recalibration("cnn", "1", method="precise")
    repo.finish_recalibration(finished, status="failed", outcome={"error": "x"})
    assert claimed is not None

    assert repo.take_requested(model="other") == []
    ((info, alert),) = repo.take_requested(model="cnn", version="1")
    assert (info.id, info.method, info.status, info.alert_id) == (requested, "mix", "pending", 1)
    assert alert is not None and (alert.id, alert.kind) == (ALERTS[0], "drift")
    assert info.outcome is not None and set(info.outcome) == {"taken_at"}
    assert repo.recalibration(requested).outcome == info.outcome  # marked in the store
    assert repo.take_requested() == []  # taken: nobody gets it again
    # a request without an alert
    bare = repo.start_recalibration("cnn", "1", method="precise")
    ((info, alert),) = repo.take_requested()
    assert (info.id, info.alert_id, alert) == (bare, None, None)


def test_racing_takers_take_each_request_exactly_once(repo: Repository) -> None:
    ids = {repo.start_recalibration("cnn", "1", method="precise") for _ in range(6)}
    barrier = threading.Barrier(4)
    taken: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        barrier.wait()
        mine = [info.id for info, _ in repo.take_requested()]
        with lock:
            taken.extend(mine)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(ids)  # every request once, none twice


def test_a_request_while_another_waits_records_nothing_and_names_the_waiting_one(
    repo: Repository,
) -> None:
    """A second request for a model version with one waiting (pending, not taken) is not
    queued: it returns the waiting one.  Taken or finished, a request no longer holds back the
    next; trigger claims and other model versions never do."""
    claim(repo, ALERTS[0])  # a trigger's pending recalibration is not a waiting request
    assert repo.waiting_request("cnn", "1") is None
    first = repo.request_recalibration("cnn", "1", method="mix", alert_id=ALERTS[1])
    assert first.queued
    info = first.recalibration
    assert (info.status, info.method, info.alert_id, info.outcome) == ("pending", "mix", 2, None)
    assert repo.waiting_request("cnn", "1") == info

    again = repo.request_recalibration("cnn", "1", method="precise")  # a second click
    assert again == RecalibrationRequest(info, queued=False)
    assert [r.id for r in repo.recalibrations() if r.outcome is None] == [info.id]
    other = repo.request_recalibration("cnn", "2", method="precise")  # another version
    assert other.queued and other.recalibration.version == "2"

    ((taken, _),) = repo.take_requested(model="cnn", version="1")  # the service takes it
    assert taken.id == info.id and repo.waiting_request("cnn", "1") is None
    after_taken = repo.request_recalibration("cnn", "1", method="precise")
    assert after_taken.queued and after_taken.recalibration.id != info.id
    # carried out by hand (bnwatch recalibrate --recalibration ID) without being taken
    repo.finish_recalibration(after_taken.recalibration.id, status="failed", outcome={"e": 1})
    assert repo.request_recalibration("cnn", "1", method="precise").queued
    assert repo.waiting_request("nobody", "0") is None


def test_racing_requests_record_one(repo: Repository, db_url: str) -> None:
    """Eight operators request a recalibration of one model version at once (two dashboards,
    double clicks): exactly one request is recorded, and every one of them is told its id."""
    results = race(db_url, 8, lambda r, i: r.request_recalibration("cnn", "1", method="precise"))
    requests = [r for r in results if isinstance(r, RecalibrationRequest)]
    assert len(requests) == 8
    assert sum(r.queued for r in requests) == 1, requests
    assert len({r.recalibration.id for r in requests}) == 1
    assert len(repo.recalibrations(model="cnn", version="1")) == 1


def test_a_request_checks_and_records_under_the_claims_lock(repo: Repository) -> None:
    """The check and the insert hold the lock trigger claims take (SQLite: ``BEGIN
    IMMEDIATE`` before the check is read; PostgreSQL: the model row ``FOR NO KEY UPDATE``)."""
    statements: list[str] = []

    def record(conn: object, cursor: object, statement: str, *args: object) -> None:
        statements.append(" ".join(statement.split()))

    sa.event.listen(repo.engine, "before_cursor_execute", record)
    try:
        assert repo.request_recalibration("cnn", "1", method="precise").queued
    finally:
        sa.event.remove(repo.engine, "before_cursor_execute", record)

    def first(found: Callable[[str], bool]) -> int:
        return next(i for i, s in enumerate(statements) if found(s))

    lock = first(lambda s: s.startswith("BEGIN IMMEDIATE") or "FOR NO KEY UPDATE" in s)
    check = first(lambda s: s.startswith("SELECT recalibrations.id"))
    insert = first(lambda s: s.startswith("INSERT INTO recalibrations"))
    assert lock < check < insert, statements
