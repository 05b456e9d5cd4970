"""Service-side recalibration triggers: an alert opened by ingest POSTs one signed webhook from
a background worker; ingest never waits for it; failures, a full queue and shutdown are
recorded."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from bnwatch.alerts import AlertChange, AlertConfig, AlertEngine
from bnwatch.export import names
from bnwatch.schema import utcnow
from bnwatch.service import Settings, create_app
from bnwatch.service.triggers import DEFAULT_QUEUE_SIZE, TriggerRunner
from bnwatch.store.repository import RecalibrationInfo, Repository
from bnwatch.triggers import Trigger, TriggerPolicy, WebhookAction, verify_signature
from tests.export.helpers import check_exposition
from tests.service.helpers import AUTH, ENDPOINT, TOKEN, Monitor
from tests.service.webhook import Receiver, start_server, stop_server, wait_for
from tests.store.rows import add_alerts

SECRET = "webhook-s3cret-for-tests"


@pytest.fixture
def gate() -> threading.Event:
    return threading.Event()


@pytest.fixture
def held(gate: threading.Event) -> Iterator[Receiver]:
    """A receiver that holds every request unanswered until the test sets ``gate``."""
    receiver = Receiver(gate=gate)
    yield receiver
    receiver.close()


def recalibrations(engine: Engine) -> list[RecalibrationInfo]:
    return Repository(engine).recalibrations()


def drift_app(make_app: Callable[..., FastAPI], url: str, **policy: float) -> FastAPI:
    return make_app(
        on_stored=AlertEngine(AlertConfig()).on_stored,
        webhook_url=url,
        webhook_secret=SECRET,
        triggers=TriggerPolicy(**policy),  # type: ignore[arg-type]
    )


def periodic_app(engine: Engine, url: str, **policy: float) -> FastAPI:
    """The service with webhook triggers to ``url`` and its periodic job every 50 ms."""
    settings = Settings(
        database_url=str(engine.url),
        api_token=TOKEN,
        webhook_url=url,
        webhook_secret=SECRET,
        triggers=TriggerPolicy(**policy),  # type: ignore[arg-type]
    )
    return create_app(settings, engine=engine, period_seconds=0.05)


def test_a_drift_alert_posts_one_signed_webhook_and_ingest_does_not_wait(
    make_app: Callable[..., FastAPI],
    engine: Engine,
    held: Receiver,
    gate: threading.Event,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mon = Monitor()
    app = drift_app(make_app, held.url, cooldown_seconds=3600)
    with caplog.at_level(logging.INFO, logger="bnwatch"), TestClient(app) as client:
        assert client.post(ENDPOINT, json=mon.body(6), headers=AUTH).status_code == 200
        answer = client.post(ENDPOINT, json=mon.body(6, shift=3.0), headers=AUTH)
        # the ingest has answered, and the receiver has not: it answers only once the gate
        # is set, so the request cannot have waited for the webhook
        assert answer.status_code == 200, answer.text
        assert answer.json()["stored"] == 6
        assert not gate.is_set() and held.answered == 0
        wait_for(lambda: held.received, "the webhook to arrive")
        (rec,) = recalibrations(engine)
        assert (rec.status, rec.method) == ("pending", "WebhookAction")
        assert rec.outcome is not None and rec.outcome["claimed_by"] == "trigger"
        gate.set()
        wait_for(lambda: "webhook" in (recalibrations(engine)[0].outcome or {}), "the outcome")
    drifts = [a for a in Repository(engine).alerts() if a.kind == "drift"]
    assert len(drifts) >= 1  # one per drifted layer: the cooldown lets the first one trigger
    ((body, header),) = held.received
    assert verify_signature(body, header, SECRET)
    event = json.loads(body)
    (rec,) = recalibrations(engine)
    assert event["recalibration_id"] == rec.id
    assert (event["model"], event["version"], event["alert"]["kind"]) == ("cnn", "1", "drift")
    assert event["alert"]["id"] == rec.alert_id in {a.id for a in drifts}
    assert rec.status == "pending"  # delivered: the receiver recalibrates and reports back
    assert rec.outcome is not None
    assert (rec.outcome["webhook"], rec.outcome["http_status"]) == (held.url, 200)
    port = held.url.split(":")[2].split("/")[0]
    assert f"recalibration triggers ON: webhook to 127.0.0.1:{port}" in caplog.text
    assert SECRET not in caplog.text


def test_a_failing_webhook_marks_the_recalibration_failed(
    make_app: Callable[..., FastAPI], engine: Engine
) -> None:
    receiver = Receiver([500, 502, 503])
    try:
        mon = Monitor()
        with TestClient(drift_app(make_app, receiver.url)) as client:
            assert client.post(ENDPOINT, json=mon.body(6), headers=AUTH).status_code == 200
            answer = client.post(ENDPOINT, json=mon.body(6, shift=3.0), headers=AUTH)
            assert answer.status_code == 200
            wait_for(lambda: recalibrations(engine)[0].status == "failed", "the failure")
        (rec,) = recalibrations(engine)
        assert rec.outcome is not None and rec.outcome["error"] == "HTTP 503"
        assert len(receiver.received) == 3  # every attempt made, none more
    finally:
        receiver.close()


def test_a_receiver_that_reported_then_answered_5xx_is_not_an_error(
    make_app: Callable[..., FastAPI], engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The receiver reports its outcome, then answers the webhook 502: the worker sent the
    event twice more and logged "recording the outcome of recalibration N failed" at ERROR
    with a traceback, although the stored status was the receiver's.  Now: sent once, the
    report stands, one INFO line."""
    received: list[int] = []

    class Reporting(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(event["recalibration_id"])
            Repository(engine).finish_recalibration(
                event["recalibration_id"], status="rejected", outcome={"why": "no better"}
            )
            self.send_response(502)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server, url = start_server(Reporting)
    try:
        mon = Monitor()
        with caplog.at_level(logging.INFO), TestClient(drift_app(make_app, url)) as client:
            assert client.post(ENDPOINT, json=mon.body(6), headers=AUTH).status_code == 200
            answer = client.post(ENDPOINT, json=mon.body(6, shift=3.0), headers=AUTH)
            assert answer.status_code == 200
            wait_for(lambda: "decided elsewhere" in caplog.text, "the worker's INFO line")
            time.sleep(2.0)  # the retries' backoff (0.5 s, 1 s): none is sent
        (rec,) = recalibrations(engine)
    finally:
        stop_server(server)
    assert received == [rec.id]
    assert rec.status == "rejected" and rec.outcome is not None
    assert rec.outcome["why"] == "no better"
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_without_a_webhook_there_are_no_triggers(
    make_app: Callable[..., FastAPI], engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    mon = Monitor()
    app = make_app(on_stored=AlertEngine(AlertConfig()).on_stored)
    assert app.state.bnwatch.triggers is None
    with caplog.at_level(logging.INFO, logger="bnwatch"), TestClient(app) as client:
        assert client.post(ENDPOINT, json=mon.body(6), headers=AUTH).status_code == 200
        assert client.post(ENDPOINT, json=mon.body(6, shift=3.0), headers=AUTH).status_code == 200
    assert [a for a in Repository(engine).alerts() if a.kind == "drift"]
    assert recalibrations(engine) == []
    assert "recalibration triggers off (set BNWATCH_WEBHOOK_URL" in caplog.text


# -- the runner: queue, shutdown, open alerts ----------------------------------------------------
@pytest.fixture
def repo(engine: Engine) -> Repository:
    """cnn@1 with drift alerts 1-4, open for two minutes."""
    repository = Repository(engine)
    repository.write_windows(Monitor().records(1))
    opened = utcnow() - timedelta(minutes=2)
    add_alerts(engine, (1, 2, 3, 4), opened_at=opened, values={"d_rms": 1.5})
    return repository


def opened(alert_id: int) -> AlertChange:
    return AlertChange("opened", alert_id, "drift", "cnn", "1", "bn1", {"d_rms": 1.5})


def test_a_full_queue_and_shutdown_record_failures_without_blocking(
    repo: Repository, held: Receiver, gate: threading.Event
) -> None:
    policy = TriggerPolicy(cooldown_seconds=0, daily_cap=10)
    runner = TriggerRunner(Trigger(WebhookAction(held.url, SECRET), policy), queue_size=1)
    runner.start()
    assert runner.on_alerts(repo, [opened(1)]) == 1
    wait_for(lambda: held.received, "the worker to take the first event")  # the queue is empty
    assert runner.on_alerts(repo, [opened(2)]) == 1  # waits in the queue
    assert runner.on_alerts(repo, [opened(3)]) == 0  # the queue is full: not queued, not blocked
    assert runner.dropped == 1
    status = {r.alert_id: r for r in repo.recalibrations()}
    assert status[3].status == "failed"
    assert "queue was full" in status[3].outcome["error"]  # type: ignore[index]

    stopper = threading.Thread(target=runner.stop)
    stopper.start()
    wait_for(lambda: runner.stopping, "the runner to stop taking events")
    gate.set()  # the action in flight finishes; the queued one is not started
    stopper.join()
    assert not runner.running
    assert runner.on_alerts(repo, [opened(4)]) == 0  # after shutdown: recorded, not sent
    status = {r.alert_id: r for r in repo.recalibrations()}
    assert status[1].status == "pending"
    assert status[1].outcome is not None and status[1].outcome["http_status"] == 200
    for alert_id, reason in ((2, "stopped before delivering"), (4, "is stopping")):
        assert status[alert_id].status == "failed"
        assert reason in status[alert_id].outcome["error"]  # type: ignore[index]
    assert len(held.received) == 1


def trigger_queue(client: TestClient) -> dict[str, float]:
    """The trigger queue's samples in the service's ``GET /metrics`` (promtool-clean)."""
    answer = client.get("/metrics")
    assert answer.status_code == 200
    check_exposition(answer.text)
    return {
        s.name: s.value
        for f in text_string_to_metric_families(answer.text)
        for s in f.samples
        if s.name.startswith("bnwatch_trigger_queue_")
    }


def test_metrics_export_the_trigger_queue_depth_and_drops(
    engine: Engine,
    repo: Repository,
    held: Receiver,
    gate: threading.Event,
    make_app: Callable[..., FastAPI],
) -> None:
    """``GET /metrics`` says how many claimed events wait for the webhook worker and how many
    a full queue dropped, as they change; a service without triggers exports neither."""
    policy = TriggerPolicy(cooldown_seconds=0, daily_cap=10)
    runner = TriggerRunner(Trigger(WebhookAction(held.url, SECRET), policy), queue_size=1)
    settings = Settings(database_url=str(engine.url), api_token=TOKEN)
    depth, dropped = "bnwatch_trigger_queue_depth", "bnwatch_trigger_queue_dropped_total"
    # no periodic job during the test: it would claim the open alerts
    app = create_app(settings, engine=engine, triggers=runner, period_seconds=3600)
    with TestClient(app) as client:
        assert trigger_queue(client) == {depth: 0, dropped: 0}
        assert runner.on_alerts(repo, [opened(1)]) == 1
        wait_for(lambda: held.received, "the worker to take the first event")  # held there
        assert trigger_queue(client) == {depth: 0, dropped: 0}  # in flight is not waiting
        assert runner.on_alerts(repo, [opened(2)]) == 1
        assert trigger_queue(client) == {depth: 1, dropped: 0}
        assert runner.on_alerts(repo, [opened(3)]) == 0  # the queue is full
        assert trigger_queue(client) == {depth: 1, dropped: 1}
        gate.set()
        wait_for(lambda: len(held.received) == 2, "the worker to send the queued event")
        assert trigger_queue(client) == {depth: 0, dropped: 1}
    assert DEFAULT_QUEUE_SIZE == 256 and "256" in names.TRIGGER_QUEUE_DEPTH.help
    with TestClient(make_app()) as client:  # no webhook: no triggers, no queue
        assert trigger_queue(client) == {}


def test_an_event_submitted_while_the_runner_stops_is_sent_or_failed(
    repo: Repository, held: Receiver, gate: threading.Event
) -> None:
    # submit() checked "not stopping", then stop() drained the (empty) queue and ended the
    # worker, then submit() queued the event behind nobody: pending for good, never sent.
    # Here the event's put waits for stop() to finish, or at most 0.5 s (with the fix, stop()
    # waits for the put, and the worker then takes the event).
    runner = TriggerRunner(
        Trigger(WebhookAction(held.url, SECRET), TriggerPolicy()), stop_timeout=1.0
    )
    runner.start()
    putting, go = threading.Event(), threading.Event()
    put = runner._queue.put_nowait

    def slow_put(item: object) -> None:
        if item is not None:  # the event, not stop()'s wake-up
            putting.set()
            go.wait(timeout=10)
        put(item)  # type: ignore[arg-type]

    runner._queue.put_nowait = slow_put  # type: ignore[method-assign]
    (event,) = runner.trigger.claim_opened(repo, [opened(1)])
    submitter = threading.Thread(target=runner.submit, args=(repo, event))
    submitter.start()
    wait_for(putting.is_set, "submit() to reach the queue")
    stopper = threading.Thread(target=runner.stop)
    stopper.start()
    stopper.join(timeout=0.5)
    go.set()
    submitter.join()
    stopper.join()
    gate.set()  # let a delivery in flight finish
    (rec,) = repo.recalibrations()
    if rec.status == "pending":  # taken by the worker before it stopped: it was sent
        wait_for(lambda: held.received, "the webhook")
    else:
        assert rec.status == "failed"
        assert "stop" in rec.outcome["error"]  # type: ignore[index]


def test_the_periodic_job_triggers_alerts_open_long_enough(
    engine: Engine, repo: Repository
) -> None:
    """``persist_seconds`` > 0: the alert is taken by the periodic job, not at opening."""
    receiver = Receiver()
    try:
        app = periodic_app(engine, receiver.url, persist_seconds=60, cooldown_seconds=3600)
        with TestClient(app):
            wait_for(lambda: receiver.received, "the periodic job's webhook")
            wait_for(lambda: "webhook" in (recalibrations(engine)[0].outcome or {}), "its outcome")
        (rec,) = recalibrations(engine)  # four open alerts, one cooldown: one trigger
        assert rec.status == "pending" and rec.alert_id in {1, 2, 3, 4}
        assert len(receiver.received) == 1
    finally:
        receiver.close()


def test_the_periodic_job_fails_claims_their_killed_process_abandoned(
    engine: Engine, repo: Repository
) -> None:
    """A worker killed while its webhook was in flight (``docker compose stop`` past the grace
    period) left its claim pending, holding the alert for good.  The periodic job of a running
    service records it failed once it is 30 minutes old, so that the alert is retried."""
    abandoned = repo.claim_recalibration(
        "cnn",
        "1",
        method="WebhookAction",
        alert_id=1,
        cooldown_seconds=0,
        daily_cap=10,
        now=utcnow() - timedelta(minutes=40),
    ).recalibration_id
    recent = repo.claim_recalibration(
        "cnn", "1", method="WebhookAction", alert_id=2, cooldown_seconds=0, daily_cap=10
    ).recalibration_id  # claimed just now: its process may still be at work
    assert abandoned is not None and recent is not None
    receiver = Receiver()
    try:
        app = periodic_app(engine, receiver.url, cooldown_seconds=3600)  # nothing else claimed
        with TestClient(app):
            wait_for(lambda: repo.recalibration(abandoned).status != "pending", "the job")
    finally:
        receiver.close()
    rec = repo.recalibration(abandoned)
    assert rec.status == "failed" and "abandoned" in rec.outcome["error"]  # type: ignore[index]
    assert repo.recalibration(recent).status == "pending"
    assert receiver.received == []  # the cooldown holds the alert until its retry


def test_the_periodic_job_sends_recalibrations_requested_by_hand(
    engine: Engine, repo: Repository
) -> None:
    """The dashboard's "Request a recalibration" reaches the webhook as a ``requested`` event
    with the method asked for -- outside the policy: the daily cap is reached already."""
    first = repo.claim_recalibration(
        "cnn", "1", method="WebhookAction", alert_id=1, cooldown_seconds=3600, daily_cap=1
    ).recalibration_id
    requested = repo.start_recalibration("cnn", "1", method="mix", alert_id=2)
    bare = repo.start_recalibration("cnn", "1", method="precise")
    receiver = Receiver()
    try:
        app = periodic_app(engine, receiver.url, cooldown_seconds=3600, daily_cap=1)
        with TestClient(app):
            wait_for(lambda: len(receiver.received) >= 2, "the requests' webhooks")
            wait_for(
                lambda: all(
                    "webhook" in (repo.recalibration(i).outcome or {}) for i in (requested, bare)
                ),
                "their outcomes",
            )
        bodies = {}
        for body, header in receiver.received:
            assert verify_signature(body, header, SECRET)
            event = json.loads(body)
            bodies[event["recalibration_id"]] = event
        assert sorted(bodies) == [requested, bare]  # each once; the claimed one never
        assert bodies[requested]["requested"] is True and bodies[requested]["method"] == "mix"
        assert (bodies[requested]["alert"]["id"], bodies[requested]["alert"]["kind"]) == (
            2,
            "drift",
        )
        assert bodies[bare]["alert"] is None and bodies[bare]["method"] == "precise"
        assert repo.recalibration(requested).status == "pending"  # the receiver reports back
        assert first is not None and "webhook" not in (repo.recalibration(first).outcome or {})
    finally:
        receiver.close()


def test_the_runner_claims_only_alerts_open_for_persist_seconds(
    repo: Repository, engine: Engine
) -> None:
    receiver = Receiver()
    try:
        policy = TriggerPolicy(persist_seconds=600)  # the alerts are two minutes old
        runner = TriggerRunner(Trigger(WebhookAction(receiver.url, SECRET), policy))
        runner.start()
        assert runner.on_alerts(repo, [opened(1)]) == 0  # just opened: too early
        assert runner.check_open(repo) == 0
        runner.stop()
        assert recalibrations(engine) == [] and receiver.received == []
    finally:
        receiver.close()


def capped(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    """The messages of refusals by the daily cap logged at ``level`` or above."""
    return [
        r.getMessage()
        for r in caplog.records
        if "daily cap" in r.getMessage() and r.levelno >= level
    ]


def test_the_periodic_job_says_a_reached_daily_cap_once_per_alert_and_takes_no_lock(
    repo: Repository, engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    """The periodic job claims every open alert again every minute.  With the daily cap
    reached, each check logged the refusal at INFO for every open alert without a
    recalibration, and took the write lock (SQLite: ``BEGIN IMMEDIATE``; PostgreSQL: the model
    row ``FOR NO KEY UPDATE``) for every open alert only to be refused.  Now the refusal is said
    at INFO once per alert and at DEBUG after, refusals are read without a lock, and nothing
    else is claimed."""
    claimed = repo.claim_recalibration(
        "cnn", "1", method="WebhookAction", alert_id=1, cooldown_seconds=0, daily_cap=1
    ).recalibration_id
    locks: list[str] = []

    def locking(conn: object, cursor: object, statement: str, *args: object) -> None:
        if statement.lstrip().startswith("BEGIN IMMEDIATE") or "FOR NO KEY UPDATE" in statement:
            locks.append(statement)

    receiver = Receiver()
    policy = TriggerPolicy(cooldown_seconds=0, daily_cap=1)
    runner = TriggerRunner(Trigger(WebhookAction(receiver.url, SECRET), policy))
    runner.start()
    sa.event.listen(engine, "before_cursor_execute", locking)
    try:
        with caplog.at_level(logging.DEBUG, logger="bnwatch"):
            for _ in range(5):  # five minutes of the periodic job
                assert runner.check_open(repo) == 0
    finally:
        sa.event.remove(engine, "before_cursor_execute", locking)
        runner.stop()
        receiver.close()
    said = sorted(capped(caplog, logging.INFO))
    assert len(said) == 3, said  # alerts 2, 3 and 4; alert 1 has its recalibration
    assert all(f"alert {a} " in m for a, m in zip((2, 3, 4), said, strict=True)), said
    assert len(capped(caplog)) == 3 * 5  # each refusal is still logged, at DEBUG
    assert locks == []
    assert [r.id for r in repo.recalibrations()] == [claimed]
    assert receiver.received == []


def test_a_reached_daily_cap_is_said_again_once_it_was_lifted(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    """Once per alert and *cap period*: after the 24 hours pass and a claim goes through, the
    alerts the cap refuses again are said again; the claims are those the policy allows."""
    trigger = Trigger(WebhookAction("http://127.0.0.1:1/hook", SECRET), TriggerPolicy(daily_cap=1))
    t0 = utcnow()
    with caplog.at_level(logging.INFO, logger="bnwatch"):
        first = trigger.claim_open(repo, now=t0)
        assert len(first) == 1 and len(capped(caplog)) == 3  # the other three alerts
        # delivered (a claim left without it for 30 minutes would be taken as abandoned)
        handed_off = {"webhook": "http://127.0.0.1:1/hook", "http_status": 202}
        repo.finish_recalibration(first[0].recalibration_id, status="pending", outcome=handed_off)
        caplog.clear()
        assert trigger.claim_open(repo, now=t0 + timedelta(minutes=1)) == []
        assert capped(caplog) == []  # said already
        second = trigger.claim_open(repo, now=t0 + timedelta(days=1, hours=1))
        assert len(second) == 1 and second[0].alert_id != first[0].alert_id
        assert len(capped(caplog)) == 2  # a new period: the two still unclaimed, again
    assert len(repo.recalibrations()) == 2
