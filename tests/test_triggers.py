"""Recalibration triggers: signed webhooks, callbacks, policy limits, in-process recalibration."""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler
from typing import Any

import pytest
import torch
from sqlalchemy import exc as sa_exc

import bnwatch
from bnwatch.alerts import AlertChange, AlertConfig, Rule
from bnwatch.errors import ConfigError, ShapeError
from bnwatch.schema import utcnow
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from bnwatch.store.writer import StoreSink
from bnwatch.triggers import (
    MIN_KEPT_INPUTS,
    CallbackAction,
    Outcome,
    RecalibrateAction,
    Trigger,
    TriggerEvent,
    TriggerPolicy,
    WebhookAction,
    hook_free_copy,
    sign,
    verify_signature,
)
from bnwatch.triggers import core as trigger_core
from tests.service.webhook import Receiver, start_server, stop_server, wait_for
from tests.store.helpers import batches, feed, record_windows, small_cnn
from tests.store.rows import add_alerts


def test_signatures_verify_and_reject_tampering_and_replays() -> None:
    body = b'{"a": 1}'
    header = sign(body, "s3cret", int(time.time()))
    assert verify_signature(body, header, "s3cret")
    assert not verify_signature(body + b" ", header, "s3cret")
    assert not verify_signature(body, header, "other")
    old = sign(body, "s3cret", int(time.time()) - 3600)
    assert not verify_signature(body, old, "s3cret")
    assert not verify_signature(body, "garbage", "s3cret")
    assert not verify_signature(body, None, "s3cret")  # headers.get() of a request without one
    assert not verify_signature(body, header.encode(), "s3cret")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "header",
    [
        "",
        "t=1",
        "sha256=00",
        "t=abc,sha256=00",
        "t={now}.0,sha256={sig}",
        "t={now},sha256=\u00e9",  # non-ASCII: hmac.compare_digest would raise
        "t=" + "9" * 400 + ",sha256={sig}",  # too large for a float: would overflow
        "t={now},sha256={sig},t={now}",  # a repeated field
        "t={now},sha256={sig},sha256=00",
    ],
)
def test_a_malformed_signature_header_is_false_not_an_error(header: str) -> None:
    body = b'{"a": 1}'
    now = int(time.time())
    sig = sign(body, "s3cret", now).split("sha256=")[1]
    assert verify_signature(body, header.format(now=now, sig=sig), "s3cret") is False
    assert verify_signature(body, f"t={now},sha256={sig}", "s3cret") is True


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([503, 200])
    yield r
    r.close()


@pytest.fixture
def repo(db_url: str) -> Iterator[Repository]:
    engine = engine_for(db_url)
    repository = Repository(engine)
    repository.write_windows(record_windows(1))
    add_alerts(engine, (1, 2, 3, 4, 9), state="resolved")  # alerts the triggers can refer to
    yield repository
    engine.dispose()


def drift_alert(alert_id: int = 1) -> AlertChange:
    return AlertChange("opened", alert_id, "drift", "cnn", "1", "4", {"p_value": 1e-9})


def test_webhook_is_signed_retried_and_recorded(repo: Repository, receiver: Receiver) -> None:
    trigger = Trigger(WebhookAction(receiver.url, "s3cret"), TriggerPolicy(cooldown_seconds=0))
    ((rid, outcome),) = trigger.on_alerts(repo, [drift_alert()])
    assert outcome.status == "pending"  # delivered: the receiver recalibrates
    assert len(receiver.received) == 2  # one 503, then success
    body, header = receiver.received[-1]
    assert verify_signature(body, header, "s3cret")
    event = json.loads(body)
    assert event["recalibration_id"] == rid
    assert event["alert"]["kind"] == "drift"
    (rec,) = repo.recalibrations()
    assert (rec.id, rec.status, rec.method) == (rid, "pending", "WebhookAction")
    assert rec.outcome is not None and rec.outcome["http_status"] == 200


def test_a_webhook_answered_too_late_is_sent_once_and_left_pending_for_its_receiver(
    repo: Repository,
) -> None:
    """The request went out and the answer did not come in time: the receiver may have the
    event, so it is not sent again, and its recalibration stays pending (with a note) for the
    receiver's report -- not failed (which refused that report and handed the alert out
    again)."""
    gate = threading.Event()
    slow = Receiver([], gate=gate)  # records each request, answers once the gate opens
    try:
        action = WebhookAction(slow.url, "s3cret", timeout=0.5, attempts=3)
        ((rid, outcome),) = Trigger(action, TriggerPolicy(cooldown_seconds=0)).on_alerts(
            repo, [drift_alert()]
        )
        assert len(slow.received) == 1  # sent once, not three times
    finally:
        slow.close()
    assert outcome.status == "pending"
    rec = repo.recalibration(rid)
    assert rec.status == "pending" and rec.outcome is not None
    assert "no answer within 0.5 s" in rec.outcome["note"]
    # the receiver carried it out and reports: accepted
    repo.finish_recalibration(rid, status="rejected", outcome={"by": "receiver"})
    assert repo.recalibration(rid).status == "rejected"


def test_a_receiver_that_reported_then_answered_5xx_gets_the_event_once(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiver reports how the recalibration ended, then its HTTP answer is a 5xx (a proxy
    timing out, a crash after the report).  The webhook was sent again twice -- the receiver
    got the event of a recalibration it had decided three times, its later reports refused --
    and :meth:`Trigger.run` raised ``RecalibrationStateError`` although the store was right.
    Now a retry first asks whether the recalibration is still pending: sent once, and the
    receiver's decision stands, said at INFO."""
    received: list[int] = []

    class Reporting(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            event = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append(event["recalibration_id"])
            repo.finish_recalibration(
                event["recalibration_id"], status="rejected", outcome={"by": "receiver"}
            )
            self.send_response(502)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server, url = start_server(Reporting)
    try:
        trigger = Trigger(
            WebhookAction(url, "s3cret", attempts=3), TriggerPolicy(cooldown_seconds=0)
        )
        with caplog.at_level(logging.DEBUG, logger="bnwatch"):
            ((rid, outcome),) = trigger.on_alerts(repo, [drift_alert()])
    finally:
        stop_server(server)
    assert received == [rid]  # once: not re-sent after the receiver's report
    assert (outcome.status, outcome.details["by"]) == ("rejected", "receiver")
    rec = repo.recalibration(rid)
    assert rec.status == "rejected" and rec.outcome is not None and rec.outcome["by"] == "receiver"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    (said,) = [r for r in caplog.records if "decided elsewhere" in r.getMessage()]
    assert said.levelno == logging.INFO and said.exc_info is None


def test_an_action_whose_recalibration_was_decided_meanwhile_keeps_that_decision(
    repo: Repository, caplog: pytest.LogCaptureFixture
) -> None:
    """In process too: a callback whose recalibration someone else finished while it ran
    (``bnwatch recalibrate --recalibration ID``) is not recorded, and nothing is raised."""

    def meanwhile(event: TriggerEvent) -> Outcome:
        assert event.still_pending is not None and event.still_pending()
        repo.finish_recalibration(event.recalibration_id, status="failed", outcome={"by": "hand"})
        assert not event.still_pending()
        return Outcome("applied", {"by": "callback"})

    trigger = Trigger(CallbackAction(meanwhile), TriggerPolicy(cooldown_seconds=0))
    with caplog.at_level(logging.INFO, logger="bnwatch"):
        ((rid, outcome),) = trigger.on_alerts(repo, [drift_alert()])
    assert outcome.status == "failed" and outcome.details["by"] == "hand"
    assert repo.recalibration(rid).status == "failed"
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
    assert "decided elsewhere meanwhile (failed" in caplog.text


def test_a_webhook_whose_receiver_cannot_be_reached_is_retried_and_failed() -> None:
    server, url = start_server(BaseHTTPRequestHandler)
    stop_server(server)  # nothing listens there now: connection refused
    outcome = WebhookAction(url, "s3cret", attempts=2)(
        TriggerEvent(1, "cnn", "1", 1, "drift", "4", {})
    )
    assert outcome.status == "failed" and "ConnectError" in outcome.details["error"]


def test_a_trickled_answer_is_cut_at_the_timeout_of_the_whole_request() -> None:
    """httpx's timeout is per read: a receiver answering one byte every 0.2 s held the
    trigger for 44 reads.  The whole request is limited to ``timeout``."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    done = threading.Event()

    def trickle() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            for byte in b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n":
                if done.wait(0.2):
                    return
                with contextlib.suppress(OSError):
                    conn.send(bytes([byte]))

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    started = time.monotonic()
    try:
        outcome = WebhookAction(url, "s3cret", timeout=1.0)(
            TriggerEvent(1, "cnn", "1", 1, "drift", "4", {})
        )
    finally:
        done.set()
        thread.join(5)
        listener.close()
    took = time.monotonic() - started
    assert took < 3.0, f"the webhook took {took:.1f} s with timeout=1"  # 8.8 s before
    assert outcome.status == "pending" and "no answer within 1 s" in outcome.details["note"]


def test_policy_cooldown_daily_cap_and_kinds(repo: Repository) -> None:
    calls: list[int] = []

    def record(event: Any) -> Outcome:
        calls.append(event.alert_id)
        return Outcome("applied")

    action = CallbackAction(record)
    trigger = Trigger(action, TriggerPolicy(cooldown_seconds=600, daily_cap=2))
    now = utcnow()
    assert trigger.on_alerts(repo, [drift_alert(1)], now=now)
    assert not trigger.on_alerts(repo, [drift_alert(2)], now=now + timedelta(minutes=5))  # cooldown
    assert trigger.on_alerts(repo, [drift_alert(3)], now=now + timedelta(minutes=11))
    assert not trigger.on_alerts(repo, [drift_alert(4)], now=now + timedelta(minutes=30))  # cap
    other = AlertChange("opened", 9, "no_data", "cnn", "1", None, {})
    assert not trigger.on_alerts(repo, [other], now=now + timedelta(days=2))  # not its kind
    assert calls == [1, 3]
    assert [r.status for r in repo.recalibrations()] == ["applied", "applied"]


def test_a_failing_action_is_recorded_as_failed(repo: Repository) -> None:
    def boom(event: Any) -> None:
        raise RuntimeError("no GPU today")

    ((_, outcome),) = Trigger(CallbackAction(boom)).on_alerts(repo, [drift_alert()])
    assert outcome.status == "failed"
    (rec,) = repo.recalibrations()
    assert rec.status == "failed"
    assert "no GPU today" in rec.outcome["error"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("returned", "error"),
    [
        (Outcome("success"), "status='success' is invalid"),
        (Outcome("applied", {"model": object()}), "not JSON serializable"),
        (Outcome("rejected", {"why": float("nan"), "ok": {1: (2, 3)}}), None),  # made JSON-ready
    ],
)
def test_an_outcome_the_store_refuses_is_recorded_failed_not_left_pending(
    repo: Repository, returned: Outcome, error: str | None
) -> None:
    # the action ran: its recalibration must not stay pending, and run() must not raise
    ((_, outcome),) = Trigger(CallbackAction(lambda event: returned)).on_alerts(
        repo, [drift_alert()]
    )
    (rec,) = repo.recalibrations()
    assert rec.outcome is not None
    if error is None:
        assert outcome is returned and rec.status == "rejected"
        assert rec.outcome["why"] is None and rec.outcome["ok"] == {"1": [2, 3]}
    else:
        assert outcome.status == rec.status == "failed"
        assert error in rec.outcome["error"]


def test_finishing_with_an_outcome_json_cannot_carry_writes_nothing(repo: Repository) -> None:
    claim = repo.claim_recalibration(
        "cnn", "1", method="manual", alert_id=1, cooldown_seconds=0, daily_cap=10
    )
    assert claim.recalibration_id is not None
    with pytest.raises(ConfigError, match=r"outcome.*not JSON serializable"):
        repo.finish_recalibration(
            claim.recalibration_id, status="applied", outcome={"when": datetime.now()}
        )
    (rec,) = repo.recalibrations()
    assert rec.status == "pending"


def test_an_applied_result_whose_outcome_cannot_be_recorded_is_rolled_back(
    repo: Repository, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store blips while the applied outcome is written: the model must not keep
    statistics the store records as failed -- they are put back, and the outcome says so."""
    model = small_cnn()
    before = model[4].running_mean.clone()  # type: ignore[index]
    real = repo.finish_recalibration

    def blip(rid: int, **kw: Any) -> Any:
        if kw.get("status") == "applied":
            raise sa_exc.OperationalError("UPDATE recalibrations", {}, Exception("server closed"))
        return real(rid, **kw)

    monkeypatch.setattr(repo, "finish_recalibration", blip)
    applied = Trigger(
        CallbackAction(lambda event: bnwatch.recalibrate(model, batches(8, shift=2.5)))
    )
    ((rid, outcome),) = applied.on_alerts(repo, [drift_alert()])
    assert outcome.status == "failed"
    rec = repo.recalibration(rid)
    assert rec.status == "failed" and rec.outcome is not None
    assert "OperationalError" in rec.outcome["error"]
    assert rec.outcome["rolled_back"] == "the model's previous statistics were put back"
    assert torch.equal(model[4].running_mean, before)  # type: ignore[index]


def test_a_callback_returning_an_unfinished_result_is_failed(repo: Repository) -> None:
    model = small_cnn()
    computed = bnwatch.recalibrate(model, batches(8), apply=False)  # neither applied nor judged
    ((_, outcome),) = Trigger(CallbackAction(lambda event: computed)).on_alerts(
        repo, [drift_alert()]
    )
    assert outcome.status == "failed"
    (rec,) = repo.recalibrations()
    assert rec.status == "failed" and "pending RecalibrationResult" in rec.outcome["error"]  # type: ignore[index]


def test_too_few_kept_inputs_fail_and_watch_asks_for_enough(db_url: str) -> None:
    model = small_cnn()
    with pytest.raises(ConfigError, match=f"keep_inputs=32 .*>= {MIN_KEPT_INPUTS}"):
        bnwatch.watch(model, store=db_url, keep_inputs=32, recalibrate=True)
    mon = bnwatch.watch(model, window_seconds=None, keep_inputs=8)
    feed(model, mon, batches(1), every=1)
    event = TriggerEvent(1, "cnn", "1", 1, "drift", "4", {})
    outcome = RecalibrateAction(model, mon)(event)
    mon.close()
    # failed, not rejected: nothing was judged, and a later alert may try again
    assert outcome.status == "failed"
    assert outcome.details == {"error": f"only 4 kept inputs (need {MIN_KEPT_INPUTS})"}


def test_a_model_error_that_is_not_about_shapes_keeps_its_message() -> None:
    """An eps=0 BatchNorm cannot run in training mode: that is the model's problem, said as
    torch says it -- not a ShapeError sending the user after their data."""
    model = small_cnn()
    model[1].eps = 0.0  # type: ignore[index]
    with pytest.raises((RuntimeError, ValueError), match="eps must be positive") as info:
        bnwatch.recalibrate(model, batches(4), progress=False)
    assert not isinstance(info.value, ShapeError)
    with pytest.raises(ShapeError, match=r"recalibration data.*\(8, 4, 5, 5\)"):
        bnwatch.recalibrate(small_cnn(), [torch.randn(8, 4, 5, 5)], progress=False)


def test_watch_refuses_to_recalibrate_a_model_with_an_eps_0_batchnorm(db_url: str) -> None:
    model = small_cnn()
    model[1].eps = 0.0  # type: ignore[index]
    with pytest.raises(ConfigError, match=r"recalibrate.*'1'.*eps=0.*positive eps"):
        bnwatch.watch(model, store=db_url, keep_inputs=256, recalibrate=True)
    bnwatch.watch(model, store=db_url, window_seconds=None).close()  # watched: fine


def test_watch_recalibrates_a_model_with_a_layer_without_running_statistics(
    db_url: str,
) -> None:
    """Such a layer is left out of a triggered recalibration (every one failed on it, and
    spent the daily cap); only a model with no layer left to recalibrate is refused."""
    model: Any = small_cnn()
    model[4] = torch.nn.BatchNorm2d(4, track_running_stats=False)
    mon = recalibrating_monitor(model, db_url, TriggerPolicy(cooldown_seconds=0))
    feed(model, mon, batches(32, seed=1), every=8)
    feed(model, mon, batches(48, seed=2, shift=2.5), every=16)
    mon.close()
    engine = engine_for(db_url)
    try:
        recs = Repository(engine).recalibrations()
    finally:
        engine.dispose()
    assert recs and recs[-1].status == "applied", recs
    assert recs[-1].outcome is not None
    assert recs[-1].outcome["left_out"] == {
        "4": "no running statistics (track_running_stats=False)"
    }
    model[1] = torch.nn.BatchNorm2d(6, track_running_stats=False)
    model[7] = torch.nn.BatchNorm1d(5, track_running_stats=False)
    with pytest.raises(ConfigError, match=r"recalibrate.*track_running_stats=False.*none to"):
        bnwatch.watch(model, store=db_url, keep_inputs=256, recalibrate=True)


def test_watch_refuses_actions_given_as_triggers(db_url: str) -> None:
    """An action passed as a trigger failed after every stored batch, never ran, and kept
    ``recalibrate=True``'s trigger from running too."""
    action = CallbackAction(lambda event: None)
    for given in ([action], action, [Trigger(action), WebhookAction("http://x", "s")]):
        with pytest.raises(ConfigError, match=r"triggers=.*wrap an action.*Trigger\(Callback"):
            bnwatch.watch(small_cnn(), store=db_url, triggers=given)  # type: ignore[arg-type]


class _Recording(Trigger):
    """A trigger that notes the alerts it was given, or raises on them."""

    def __init__(self, fail: bool) -> None:
        super().__init__(CallbackAction(lambda event: None))
        self.fail = fail
        self.given: list[Any] = []

    def on_alerts(self, repository: Any, changes: Any, *, now: Any = None) -> Any:
        if self.fail:
            raise AttributeError("broken")
        self.given.append(changes)
        return []

    def check_open(self, *args: Any, **kwargs: Any) -> Any:
        return []

    def claim_requested(self, *args: Any, **kwargs: Any) -> Any:
        return []


def test_a_trigger_that_raises_does_not_stop_the_others(caplog: pytest.LogCaptureFixture) -> None:
    class _Engine:
        def on_stored(self, repository: Any, records: Any) -> list[Any]:
            return ["change"]

    broken, working = _Recording(fail=True), _Recording(fail=False)
    pipeline = trigger_core.AlertPipeline(_Engine(), [broken, working])  # type: ignore[arg-type]
    record = type("Record", (), {"model": "cnn", "version": "1"})()
    pipeline.on_stored(None, [record])  # type: ignore[arg-type]
    assert working.given == [["change"]]
    assert "trigger CallbackAction failed" in caplog.text and "broken" in caplog.text


def test_policy_validation_names_the_field() -> None:
    with pytest.raises(ConfigError, match="kinds"):
        TriggerPolicy(kinds=("weather",))
    with pytest.raises(ConfigError, match="daily_cap"):
        TriggerPolicy(daily_cap=0)
    with pytest.raises(ConfigError, match="secret"):
        WebhookAction("http://x", "")


def test_hook_free_copy_keeps_the_original_watched() -> None:
    model = small_cnn()
    mon = bnwatch.watch(model, window_seconds=None)
    clone = hook_free_copy(model)
    assert not any(m._forward_pre_hooks for m in clone.modules())
    assert not clone._forward_hooks
    assert model[1]._forward_pre_hooks  # type: ignore[index]
    assert torch.equal(clone[1].running_mean, model[1].running_mean)  # type: ignore[index]
    mon.close()


def recalibrating_monitor(model: Any, db_url: str, policy: TriggerPolicy) -> bnwatch.Monitor:
    """A monitor of cnn@1 whose drift alert (open after one window) recalibrates in process
    on its 256 kept inputs; the baseline warms up on 64 samples."""
    return bnwatch.watch(
        model,
        name="cnn",
        version="1",
        store=db_url,
        window_seconds=None,
        overhead_budget=None,
        keep_inputs=256,
        recalibrate=policy,
        alerts=AlertConfig(drift=Rule(open_after=1, resolve_after=1)),
        config=bnwatch.DriftConfig(warmup_samples=64, min_samples=8),
    )


def test_drift_recalibrates_in_process_and_records_everything(db_url: str) -> None:
    """Production shifts; a drift alert opens; the monitor's kept inputs recalibrate the live
    model, which is judged on held-out kept inputs, applied, stored with its lineage."""
    model = small_cnn()
    mon = recalibrating_monitor(model, db_url, TriggerPolicy(cooldown_seconds=0))
    before = model[4].running_mean.clone()  # type: ignore[index]
    started = datetime.now(timezone.utc)
    feed(model, mon, batches(32, seed=1), every=8)  # clean traffic: the warm-up baseline
    feed(model, mon, batches(96, seed=2, shift=2.5), every=16)  # drifted traffic
    fed = datetime.now(timezone.utc)
    mon.close()
    engine = engine_for(db_url)
    repo = Repository(engine)
    recs = repo.recalibrations()
    assert recs, "no recalibration was triggered"
    assert recs[-1].status == "applied", recs[-1].outcome
    assert recs[-1].outcome is not None and recs[-1].outcome["improved"] is True
    data = recs[-1].outcome["data"]  # which data: the kept inputs, and when they arrived
    assert data["kept"] == data["fit"] + data["held_out"] and data["held_out"] > 0
    assert data["kept"] <= 256 and "keep_inputs" in data["source"]
    first, last = (datetime.fromisoformat(data[k]) for k in ("first_at", "last_at"))
    assert started <= first <= last <= fed
    assert not torch.equal(model[4].running_mean, before)  # type: ignore[index]
    with engine.connect() as conn:
        import sqlalchemy as sa

        rows = conn.execute(sa.text("SELECT kind, count(*) FROM refs GROUP BY kind")).all()
        kinds: dict[str, int] = {str(k): int(n) for k, n in rows}
        ids = list(recs[-1].outcome["references"].values())
        lineages: Any = conn.execute(
            sa.select(sa.column("lineage"))
            .select_from(sa.table("refs"))
            .where(sa.column("id").in_(ids))
        ).scalars()
        stored = [v if isinstance(v, dict) else json.loads(v) for v in lineages]
    assert kinds.get("recalibrated", 0) >= 1
    assert len(stored) == len(ids) > 0 and all(lin["data"] == data for lin in stored)
    assert not [a for a in repo.alerts() if a.kind == "running_stats_mutated"]
    engine.dispose()


def test_a_notification_trigger_beside_recalibrate_leaves_it_its_alert(db_url: str) -> None:
    """``watch(triggers=[notify], recalibrate=True)``: the drift alert runs both.  The
    notification (a callback returning None) is recorded ``notified`` -- not an ``applied``
    recalibration -- and does not spend the alert, the cooldown or the cap of the in-process
    recalibration, which runs and is recorded as without ``triggers=``."""
    told: list[str] = []

    def notify(event: TriggerEvent) -> None:
        told.append(event.kind)

    model = small_cnn()
    before = model[4].running_mean.clone()  # type: ignore[index]
    mon = bnwatch.watch(
        model,
        name="cnn",
        version="1",
        store=db_url,
        window_seconds=None,
        overhead_budget=None,
        keep_inputs=256,
        triggers=[Trigger(CallbackAction(notify), TriggerPolicy(cooldown_seconds=3600))],
        recalibrate=TriggerPolicy(cooldown_seconds=3600),
        alerts=AlertConfig(drift=Rule(open_after=1, resolve_after=1)),
        config=bnwatch.DriftConfig(warmup_samples=64, min_samples=8),
    )
    feed(model, mon, batches(32, seed=1), every=8)
    feed(model, mon, batches(96, seed=2, shift=2.5), every=16)
    mon.close()
    engine = engine_for(db_url)
    try:
        recs = Repository(engine).recalibrations()
    finally:
        engine.dispose()
    assert told == ["drift"]
    by_method = {r.method: r for r in recs}
    assert len(recs) == 2 and set(by_method) == {"CallbackAction", "precise"}, recs
    notified = by_method["CallbackAction"]
    assert notified.status == "notified" and "references" not in (notified.outcome or {})
    recalibrated = by_method["precise"]
    assert recalibrated.status == "applied", recalibrated.outcome
    assert recalibrated.alert_id == notified.alert_id
    assert not torch.equal(model[4].running_mean, before)  # type: ignore[index]


class _PixelValues(torch.nn.Module):
    """A model called with keywords only, as Hugging Face vision models are
    (``model(pixel_values=x)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.body: Any = small_cnn()
        self.eval()

    def forward(self, *, pixel_values: torch.Tensor, return_dict: bool = True) -> Any:
        logits = self.body(pixel_values)
        return {"logits": logits} if return_dict else logits


class _Served(torch.nn.Module):
    """A model served one request at a time, as a dict with an option beside it."""

    def __init__(self) -> None:
        super().__init__()
        self.body: Any = small_cnn()
        self.eval()

    def forward(self, request: dict[str, Any], *, temperature: float = 1.0) -> Any:
        return self.body(request["image"]) / temperature


def _by_keyword(model: Any, x: torch.Tensor) -> None:
    model(pixel_values=x)


def _one_request_at_a_time(model: Any, x: torch.Tensor) -> None:
    for sample in x.split(1):
        model({"image": sample}, temperature=2.0)


@pytest.mark.parametrize(
    ("model_type", "serve", "lineage"),
    [
        # the kept inputs remember their keyword, and the model is called with it
        (_PixelValues, _by_keyword, lambda data: data["keyword"] == "pixel_values"),
        # neither one tensor nor a batch: the calls are kept whole, joined into batches (its
        # BatchNorm1d cannot take one sample in training mode) and replayed as they came
        (_Served, _one_request_at_a_time, lambda data: data["calls"] == data["kept"]),
    ],
    ids=["keyword", "dict-per-request"],
)
def test_a_model_not_called_with_one_batch_tensor_is_recalibrated_as_it_was_called(
    db_url: str, model_type: Any, serve: Any, lineage: Any
) -> None:
    """Keyword-only models, and models served a dict per request, are recalibrated in process
    on their kept inputs, not failed."""
    model = model_type()
    mon = recalibrating_monitor(model, db_url, TriggerPolicy(cooldown_seconds=0))
    before = model.body[4].running_mean.clone()
    with torch.no_grad():
        for i, x in enumerate(batches(32, seed=1) + batches(96, seed=2, shift=2.5)):
            serve(model, x)
            if i % 8 == 7:
                mon.flush()
    mon.close()
    engine = engine_for(db_url)
    try:
        recs = Repository(engine).recalibrations()
    finally:
        engine.dispose()
    assert recs, "no recalibration was triggered"
    assert recs[-1].status == "applied", recs[-1].outcome
    assert recs[-1].outcome is not None
    data = recs[-1].outcome["data"]
    assert lineage(data), data
    assert data["kept"] == data["fit"] + data["held_out"] and data["held_out"] > 0
    assert not torch.equal(model.body[4].running_mean, before)


def test_an_alert_that_persisted_recalibrates_in_process(
    db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """persist_seconds > 0: the drift alert's trigger waits until the alert has been open that
    long, and a later stored batch of windows acts on it."""
    # The trigger's clock is held an hour back while the first drifted windows are stored, so
    # "not open long enough yet" does not depend on how fast a loaded machine feeds and stores
    # them (with the real clock this test failed under load), then runs true.
    held_back = [True]

    def trigger_clock() -> datetime:
        now = utcnow()
        return now - timedelta(hours=1) if held_back[0] else now

    monkeypatch.setattr(trigger_core, "utcnow", trigger_clock)
    model = small_cnn()
    persist = 0.3
    policy = TriggerPolicy(cooldown_seconds=600, persist_seconds=persist)
    mon = recalibrating_monitor(model, db_url, policy)
    engine = engine_for(db_url)
    repo = Repository(engine)
    try:
        feed(model, mon, batches(32, seed=1), every=8)  # clean: the warm-up baseline
        feed(model, mon, batches(32, seed=2, shift=2.5), every=16)  # drifted: the alert opens
        wait_for(lambda: bool(repo.alerts(state="open")), "the drift alert")
        feed(model, mon, batches(16, seed=4, shift=2.5), every=16)  # one more drifted window
        sink = mon.sink
        assert isinstance(sink, StoreSink) and sink.flush()  # stored, the trigger consulted
        assert repo.recalibrations() == []  # opened, but not open for long enough yet
        held_back[0] = False
        drifted = batches(400, seed=3, shift=2.5)
        deadline = time.monotonic() + 60
        while not repo.recalibrations() and time.monotonic() < deadline:
            feed(model, mon, drifted[:16], every=16)  # windows keep being stored
            drifted = drifted[16:] + drifted[:16]
        (rec,) = repo.recalibrations()
        alert = next(a for a in repo.alerts() if a.id == rec.alert_id)
        assert (rec.created_at - alert.opened_at).total_seconds() >= persist
        wait_for(lambda: repo.recalibration(rec.id).status != "pending", "the outcome")
        assert repo.recalibration(rec.id).status == "applied"
    finally:
        mon.close()
        engine.dispose()


def test_a_requested_recalibration_is_carried_out_by_the_watching_process(db_url: str) -> None:
    """The dashboard's "Request a recalibration" records a pending row; the next stored batch
    of a monitor of that model version hands it to the monitor's trigger -- outside the
    policy, with the method asked for -- and the outcome is recorded.  Requests for other
    model versions are left to their own monitors."""
    seen: list[TriggerEvent] = []

    def act(event: TriggerEvent) -> Outcome:
        seen.append(event)
        return Outcome("applied", {"by": "callback"})

    model = small_cnn()
    engine = engine_for(db_url)
    repo = Repository(engine)
    mon = bnwatch.watch(
        model,
        name="cnn",
        version="1",
        store=db_url,
        window_seconds=None,
        overhead_budget=None,  # measure every forward
        triggers=[Trigger(CallbackAction(act), TriggerPolicy(daily_cap=1))],
    )
    try:
        with torch.no_grad():
            model(batches(1)[0])
        mon.flush()
        wait_for(lambda: repo.models(), "the first window")
        rid = repo.start_recalibration("cnn", "1", method="mix")
        other = repo.start_recalibration("other", "1", method="precise")
        with torch.no_grad():
            model(batches(1, seed=1)[0])
        mon.flush()
        wait_for(lambda: repo.recalibration(rid).status != "pending", "the request's outcome")
        (event,) = seen
        assert (event.recalibration_id, event.requested, event.method) == (rid, True, "mix")
        assert (event.alert_id, event.kind) == (None, "request")
        assert event.to_json()["alert"] is None and event.to_json()["requested"] is True
        done = repo.recalibration(rid)
        assert done.status == "applied" and done.outcome == {"by": "callback", "references": {}}
        assert repo.recalibration(other).outcome is None  # another model version's: not ours
    finally:
        mon.close()
        engine.dispose()
