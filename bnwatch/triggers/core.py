"""The trigger core: from alerts to actions, recorded and rate-limited -- without torch.

Everything here imports without torch (a bnwatch service runs triggers and must never import
it); the in-process :class:`~bnwatch.triggers.recalibrate.RecalibrateAction` lives in
:mod:`bnwatch.triggers.recalibrate`.  See :mod:`bnwatch.triggers` for the whole story.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import json
import logging
import math
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

import httpx

from bnwatch.alerts import AlertChange, AlertEngine
from bnwatch.client import RequestWatchdog
from bnwatch.errors import (
    ConfigError,
    RecalibrationNotFoundError,
    RecalibrationStateError,
    check_positive_int,
)
from bnwatch.schema import ALERT_KINDS, WindowRecord, utcnow
from bnwatch.store.repository import Repository

if TYPE_CHECKING:
    from bnwatch.recalibration import RecalibrationResult

logger = logging.getLogger("bnwatch")


_CAP_PERIOD = timedelta(days=1)
"""A daily cap's period: a refusal by it is logged at INFO again, for an alert, after this."""

MIN_KEPT_INPUTS = 64
"""Fewest kept inputs an in-process recalibration runs on (a quarter of them held out)."""


@dataclass(frozen=True)
class TriggerEvent:
    """What a trigger hands its action.

    ``requested`` events come from a recalibration requested by hand (the dashboard's "Request
    a recalibration", :meth:`Repository.request_recalibration
    <bnwatch.store.repository.Repository.request_recalibration>`): ``method`` is the method asked
    for, and the alert (``alert_id``, ``kind``, ``layer``, ``values``) is the one the request
    names -- ``alert_id`` ``None`` and ``kind`` ``"request"`` when it names none.

    ``still_pending``, set by :meth:`Trigger.run`, says whether the recalibration is still
    ``pending`` in the store now: an action that would act again (a webhook's retry) asks it
    first, since a receiver may have reported how it ended meanwhile.  ``None`` when the
    event is not run by a trigger; it is not part of :meth:`to_json`.
    """

    recalibration_id: int
    model: str
    version: str
    alert_id: int | None
    kind: str
    layer: str | None
    values: Mapping[str, Any]
    requested: bool = False
    method: str | None = None
    still_pending: Callable[[], bool] | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        alert = None
        if self.alert_id is not None:
            alert = {
                "id": self.alert_id,
                "kind": self.kind,
                "layer": self.layer,
                "values": dict(self.values),
            }
        return {
            "recalibration_id": self.recalibration_id,
            "model": self.model,
            "version": self.version,
            "alert": alert,
            "requested": self.requested,
            "method": self.method,
        }


@dataclass(frozen=True)
class Outcome:
    """How an action ended: ``applied``, ``rejected``, ``failed``, ``pending`` (handed on: a
    receiver reports how it ended) or ``notified`` (the action only told someone: nothing was
    recalibrated, and nobody reports back)."""

    status: str
    details: Mapping[str, Any] = field(default_factory=dict)
    result: RecalibrationResult | None = None


class Action(Protocol):
    def __call__(self, event: TriggerEvent) -> Outcome: ...


class CallbackAction:
    """Call ``fn(event)``; it returns an :class:`Outcome`, a RecalibrationResult, or None: a
    notification (recorded ``notified`` -- a callback that returns nothing recalibrated
    nothing, and was recorded ``applied`` with no statistics).  An exception marks the
    trigger ``failed``."""

    def __init__(self, fn: Callable[[TriggerEvent], Outcome | RecalibrationResult | None]):
        self.fn = fn

    def __call__(self, event: TriggerEvent) -> Outcome:
        value = self.fn(event)
        if value is None:
            return Outcome("notified", {"callback": getattr(self.fn, "__qualname__", "callback")})
        if isinstance(value, Outcome):
            return value
        # a RecalibrationResult: its module is loaded if fn made one (no torch import here)
        recalibration = sys.modules.get("bnwatch.recalibration")
        if recalibration is not None and isinstance(value, recalibration.RecalibrationResult):
            if value.status not in ("applied", "rejected"):
                raise ValueError(
                    f"the trigger callback returned a {value.status} RecalibrationResult: "
                    "apply() it, or return one that held-out data judged (apply='if_better'), "
                    "or an Outcome"
                )
            return Outcome(value.status, value.summary(), value)
        raise TypeError(
            f"the trigger callback returned a {type(value).__name__}: return an Outcome, a "
            "bnwatch.recalibration.RecalibrationResult, or None (a notification)"
        )


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``X-Bnwatch-Signature`` header value of ``body``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},sha256={digest.hexdigest()}"


def verify_signature(
    body: bytes,
    header: str | None,
    secret: str,
    *,
    tolerance_seconds: float = 300.0,
    now: float | None = None,
) -> bool:
    """Check a webhook's signature header (and that it is recent, against replays).

    Any header that is not ``t=<unix seconds>,sha256=<64 hex digits>`` -- none at all, missing
    fields, repeated ones, a time too large to be one, non-ASCII text -- is ``False``, never an
    error.
    """
    if not isinstance(header, str):  # headers.get(...) of a request without one: None
        return False
    try:
        fields = [item.split("=", 1) for item in header.split(",")]
        parts = dict(fields)
        if len(parts) != len(fields):
            return False  # a repeated field: which one would be meant?
        timestamp = int(parts["t"])
        given = parts["sha256"]
        if abs((now if now is not None else time.time()) - timestamp) > tolerance_seconds:
            return False
    except (KeyError, ValueError, OverflowError):
        return False
    if not given.isascii():
        return False
    expected = sign(body, secret, timestamp).split("sha256=", 1)[1]
    return hmac.compare_digest(expected, given)


class _Deadline(RequestWatchdog):
    """One webhook request's whole-time limit (:class:`~bnwatch.client.RequestWatchdog`), which
    also says whether the request's body went out (:attr:`sent`): after that the receiver may
    have the event, and it must not be sent again."""

    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.sent = False
        self._seconds = seconds
        self._limit = contextlib.ExitStack()

    def __enter__(self) -> _Deadline:
        self._limit.enter_context(self.limit(self._seconds))
        return self

    def __exit__(self, *exc: object) -> None:
        self._limit.close()

    def trace(self, name: str, info: Mapping[str, Any]) -> None:
        if name.endswith(".send_request_body.complete"):
            self.sent = True
        else:
            super().trace(name, info)


class WebhookAction:
    """POST the event as JSON to ``url``, signed with HMAC-SHA256 over a shared secret.

    Each attempt takes at most ``timeout`` seconds in all -- connecting, sending and the
    whole answer (a watchdog cuts the request then; httpx's own timeout is per read).  A 2xx
    leaves the recalibration ``pending``: the receiver acts, then reports how it ended with
    :func:`bnwatch.report_recalibration` (``POST /api/v1/recalibrations/{id}/outcome``).
    Retried (``attempts``, exponential backoff) only when the event surely did not arrive or
    the receiver said it failed: a connection error, an error before the request was sent, a
    5xx.  A request that was sent but not answered in time (or whose connection broke before
    the answer) is never sent again -- the receiver may have it and act on it -- and stays
    ``pending`` with a note saying so: the receiver's report finishes it as usual.  Anything
    else (a 3xx, a 4xx) fails it.  Before each retry the action asks the event whether the
    recalibration is still pending (:attr:`TriggerEvent.still_pending`): a receiver that
    reported how it ended and then answered 5xx (a proxy's timeout, a crash after its report)
    is not sent the event again.
    """

    def __init__(self, url: str, secret: str, *, timeout: float = 10.0, attempts: int = 3):
        if not url.startswith(("http://", "https://")):
            raise ConfigError("url", url, "an http:// or https:// URL")
        if not secret:
            raise ConfigError("secret", "", "a non-empty shared secret")
        self.url = url
        self._secret = secret
        self.timeout = timeout
        self.attempts = attempts

    def __call__(self, event: TriggerEvent) -> Outcome:
        body = json.dumps(event.to_json(), sort_keys=True, default=str).encode()
        delay = 0.5
        last: str = ""
        for attempt in range(self.attempts):
            if attempt > 0 and event.still_pending is not None and not event.still_pending():
                # decided meanwhile (the receiver reported, then answered 5xx): the store keeps
                # that decision, and the receiver must not get the event again
                return Outcome(
                    "failed",
                    {
                        "webhook": self.url,
                        "error": last,
                        "note": "not sent again: the recalibration was decided meanwhile",
                    },
                )
            headers = {
                "Content-Type": "application/json",
                "X-Bnwatch-Signature": sign(body, self._secret, int(time.time())),
                "X-Bnwatch-Event": "recalibration",
            }
            timed_out = False
            with _Deadline(self.timeout) as deadline:
                try:
                    with httpx.Client(timeout=self.timeout) as client:
                        response = client.post(
                            self.url,
                            content=body,
                            headers=headers,
                            extensions={"trace": deadline.trace},
                        )
                except httpx.HTTPError as err:
                    response = None
                    timed_out = isinstance(err, httpx.TimeoutException)
                    last = f"{type(err).__name__}: {err}"
            if response is None and deadline.sent:
                # the receiver may have it (and may act on it): never sent twice
                why = (
                    f"no answer within {self.timeout:g} s"
                    if deadline.expired or timed_out
                    else f"the connection broke before the answer ({last})"
                )
                return Outcome(
                    "pending",
                    {
                        "webhook": self.url,
                        "http_status": None,
                        "note": f"sent, but {why}: the receiver may have it and reports how "
                        "it ended; if it never does, finish it by hand (bnwatch recalibrate "
                        "--recalibration ID)",
                    },
                )
            if response is not None:
                if 200 <= response.status_code < 300:
                    return Outcome(
                        "pending", {"webhook": self.url, "http_status": response.status_code}
                    )
                last = f"HTTP {response.status_code}"
                if response.status_code < 500:
                    break
            elif deadline.expired:
                last = f"not sent within {self.timeout:g} s ({last})"
            if attempt + 1 < self.attempts:
                time.sleep(delay)
                delay *= 2
        return Outcome("failed", {"webhook": self.url, "error": last})


class AlertPipeline:
    """What runs after each stored batch of windows: the alert engine, then the triggers.

    ``bnwatch.watch(store=URL, ...)`` installs one as the writer's ``on_stored`` hook.
    """

    def __init__(self, engine: AlertEngine, triggers: Sequence[Trigger] = ()) -> None:
        self.engine = engine
        self.triggers: list[Trigger] = list(triggers)

    def on_stored(self, repository: Repository, records: Sequence[WindowRecord]) -> None:
        """Evaluate the alerts, then run each trigger on them; a trigger that raises is
        logged and the others still run (one broken trigger must not silence the rest)."""
        changes = self.engine.on_stored(repository, records)
        versions = sorted({(r.model, r.version) for r in records})
        for trigger in self.triggers:
            try:
                self._run_trigger(trigger, repository, changes, versions)
            except Exception:
                logger.exception(
                    "bnwatch: trigger %s failed; the other triggers still run",
                    getattr(trigger, "method", type(trigger).__name__),
                )

    @staticmethod
    def _run_trigger(
        trigger: Trigger,
        repository: Repository,
        changes: Sequence[AlertChange],
        versions: Sequence[tuple[str, str]],
    ) -> None:
        trigger.on_alerts(repository, changes)
        for model, version in versions:
            # the open alerts whose time has come (persist_seconds, a cooldown that ended),
            # as a service's periodic job does, and what was requested
            trigger.check_open(repository, model=model, version=version)
            for event in trigger.claim_requested(repository, model=model, version=version):
                trigger.run(repository, event)


@dataclass(frozen=True)
class TriggerPolicy:
    """When a trigger acts.

    Attributes:
        kinds: alert kinds that start it.
        persist_seconds: the alert must have been open this long.
        cooldown_seconds: at least this long between two triggers of a model version.
        daily_cap: at most this many triggers of a model version per 24 hours.
    """

    kinds: tuple[str, ...] = ("drift",)
    persist_seconds: float = 0.0
    cooldown_seconds: float = 3600.0
    daily_cap: int = 3

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in ALERT_KINDS]
        if not self.kinds or unknown:
            raise ConfigError("kinds", self.kinds, f"alert kinds among {list(ALERT_KINDS)}")
        for name in ("persist_seconds", "cooldown_seconds"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not 0 <= value < math.inf  # NaN fails too
            ):
                raise ConfigError(name, value, "a finite number of seconds >= 0")
        check_positive_int("daily_cap", self.daily_cap)


class Trigger:
    """Start an action when an alert calls for it (see :mod:`bnwatch.triggers`).

    Each act is two steps, which a caller may also take apart (the service claims in its
    ingest thread and runs the action on a background worker):

    1. :meth:`claim` -- the policy's checks, and the ``pending`` recalibration recorded by
       :meth:`~bnwatch.store.repository.Repository.claim_recalibration` in one locked
       transaction, so that processes sharing a database never both act on
       one model version inside the cooldown (or twice on one alert);
    2. :meth:`run` -- the action, and its outcome recorded.

    The cooldown, the daily cap and "once per alert" are the trigger's :attr:`method`'s:
    two triggers of one monitor -- a notification callback in ``watch(triggers=[...])`` and
    the in-process recalibration of ``recalibrate=True`` -- both act on a drift alert, and
    neither spends the other's limits.  Processes that run the same trigger share them.
    """

    def __init__(self, action: Action, policy: TriggerPolicy | None = None) -> None:
        self.action = action
        self.policy = policy or TriggerPolicy()
        # (model, version, alert id) -> when its refusal by the daily cap was said at INFO
        self._capped: dict[tuple[str, str, int | None], datetime] = {}
        self._capped_lock = threading.Lock()

    @property
    def method(self) -> str:
        """What the ``recalibrations`` table records as the method: the action's ``method``
        attribute, else its class name (``WebhookAction``, ``CallbackAction``)."""
        return str(getattr(self.action, "method", type(self.action).__name__))

    def on_alerts(
        self, repository: Repository, changes: Sequence[AlertChange], *, now: datetime | None = None
    ) -> list[tuple[int, Outcome]]:
        """Act on newly opened alerts (the alert engine's output); returns what was done."""
        return [
            (event.recalibration_id, self.run(repository, event))
            for event in self.claim_opened(repository, changes, now=now)
        ]

    def check_open(
        self,
        repository: Repository,
        *,
        now: datetime | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> list[tuple[int, Outcome]]:
        """Act on alerts that are open now, optionally of one model version (for
        ``persist_seconds`` > 0: call periodically)."""
        return [
            (event.recalibration_id, self.run(repository, event))
            for event in self.claim_open(repository, now=now, model=model, version=version)
        ]

    def claim_opened(
        self, repository: Repository, changes: Sequence[AlertChange], *, now: datetime | None = None
    ) -> list[TriggerEvent]:
        """:meth:`claim` the newly opened alerts of the policy's kinds among ``changes``."""
        events = []
        for change in changes:
            if change.action != "opened" or change.kind not in self.policy.kinds:
                continue
            event = self.claim(repository, change, now=now)
            if event is not None:
                events.append(event)
        return events

    def claim_open(
        self,
        repository: Repository,
        *,
        now: datetime | None = None,
        model: str | None = None,
        version: str | None = None,
    ) -> list[TriggerEvent]:
        """:meth:`claim` the alerts of the policy's kinds that are open now (of one model
        version, if given).

        First, claims abandoned by a process killed while its action ran (no outcome 30
        minutes after the claim) are recorded ``failed``
        (:meth:`~bnwatch.store.repository.Repository.fail_abandoned_claims`): they held their
        alerts for good, and are now retried after the cooldown as any failed trigger."""
        repository.fail_abandoned_claims(model=model, version=version, now=now)
        events = []
        for alert in repository.alerts(state="open", model=model, version=version):
            if alert.kind not in self.policy.kinds:
                continue
            change = AlertChange(
                "opened",
                alert.id,
                alert.kind,
                alert.model,
                alert.version,
                alert.layer,
                alert.values,
            )
            event = self.claim(repository, change, now=now, opened_at=alert.opened_at)
            if event is not None:
                events.append(event)
        return events

    def claim_requested(
        self,
        repository: Repository,
        *,
        model: str | None = None,
        version: str | None = None,
        now: datetime | None = None,
    ) -> list[TriggerEvent]:
        """Take the recalibrations requested by hand and not yet taken
        (:meth:`~bnwatch.store.repository.Repository.take_requested`: exactly one taker gets
        each) as ``requested`` events for this trigger's action.  A request is an operator's
        decision: the policy's kinds, persistence, cooldown and cap do not apply to it."""
        events = []
        for info, alert in repository.take_requested(model=model, version=version, now=now):
            events.append(
                TriggerEvent(
                    info.id,
                    info.model,
                    info.version,
                    info.alert_id,
                    alert.kind if alert is not None else "request",
                    alert.layer if alert is not None else None,
                    dict(alert.values) if alert is not None else {},
                    requested=True,
                    method=info.method,
                )
            )
        return events

    def consider(
        self,
        repository: Repository,
        change: AlertChange,
        *,
        now: datetime | None = None,
        opened_at: datetime | None = None,
    ) -> tuple[int, Outcome] | None:
        """Run the action for one open alert if the policy allows it now."""
        event = self.claim(repository, change, now=now, opened_at=opened_at)
        if event is None:
            return None
        return event.recalibration_id, self.run(repository, event)

    def claim(
        self,
        repository: Repository,
        change: AlertChange,
        *,
        now: datetime | None = None,
        opened_at: datetime | None = None,
    ) -> TriggerEvent | None:
        """Record a ``pending`` recalibration for one open alert if the policy allows it now;
        returns the event to hand the action, or ``None`` (too early, cooldown, daily cap, or
        the alert already has a recalibration that did not fail)."""
        now = now or utcnow()
        if (
            opened_at is not None
            and (now - opened_at).total_seconds() < self.policy.persist_seconds
        ):
            return None
        if opened_at is None and self.policy.persist_seconds > 0:
            return None  # just opened: check_open will take it once it persisted
        claim = repository.claim_recalibration(
            change.model,
            change.version,
            method=self.method,
            alert_id=change.alert_id,
            cooldown_seconds=self.policy.cooldown_seconds,
            daily_cap=self.policy.daily_cap,
            now=now,
        )
        self._note_cap(change, claim.refused, now)
        if claim.recalibration_id is None:
            return None
        return TriggerEvent(
            claim.recalibration_id,
            change.model,
            change.version,
            change.alert_id,
            change.kind,
            change.layer,
            change.values,
        )

    def _note_cap(self, change: AlertChange, refused: str | None, now: datetime) -> None:
        """Log a refusal by the daily cap at INFO once per alert and cap period, at DEBUG after.

        An open alert is claimed again at every check (a service's periodic job: every minute)
        until the cap lets it through, and was logged at INFO each time.  A cap period ends when
        a claim of the model version gets past the cap (claimed, or refused by the cooldown) or
        a day after the alert was last said, whichever comes first.  Per trigger, so per
        process: each worker of ``bnwatch serve`` says it once.
        """
        version = (change.model, change.version)
        with self._capped_lock:
            if refused != "daily_cap":
                if refused != "alert":  # "alert" is checked first: it says nothing of the cap
                    for key in [k for k in self._capped if k[:2] == version]:
                        del self._capped[key]
                return
            key = (*version, change.alert_id)
            said = self._capped.get(key)
            first = said is None or now - said >= _CAP_PERIOD
            if first:
                self._capped = {k: t for k, t in self._capped.items() if now - t < _CAP_PERIOD}
                self._capped[key] = now
        logger.log(
            logging.INFO if first else logging.DEBUG,
            "bnwatch: recalibration of %s@%s for its %s alert %s skipped: daily cap %d reached%s",
            change.model,
            change.version,
            change.kind,
            change.alert_id,
            self.policy.daily_cap,
            " (retried at every check while the alert is open; repeats are logged at DEBUG)"
            if first
            else "",
        )

    def run(self, repository: Repository, event: TriggerEvent) -> Outcome:
        """Run the action for a claimed event and record its outcome.  An exception in the
        action, and an outcome the store refuses (an unknown status, details JSON cannot
        carry, statistics that do not fit the stored layers, a store that is down), are
        recorded as ``failed``, never raised: the recalibration must not stay ``pending`` after
        its action ran.

        An action that applied new statistics to the live model (a RecalibrationResult
        ``applied`` in process) whose outcome cannot be recorded is rolled back first: the
        model must never run on statistics the store says were not applied.  If even
        ``failed`` cannot be recorded (the store is down), the error is raised and the claim
        is left as claimed -- :meth:`Repository.fail_abandoned_claims
        <bnwatch.store.repository.Repository.fail_abandoned_claims>` (run by
        :meth:`claim_open`) records it failed once it is older than
        :data:`~bnwatch.store.repository.ABANDONED_CLAIM_SECONDS`.

        A recalibration decided elsewhere while the action ran (its receiver's report, ``bnwatch
        recalibrate --recalibration ID``) keeps that decision: the action's outcome is not
        recorded (an applied in-process result is rolled back), the fact is logged at INFO, and
        the stored outcome is returned.  The action learns it too, through the event's
        :attr:`~TriggerEvent.still_pending` (a webhook does not retry then)."""
        rid = event.recalibration_id
        if event.still_pending is None:
            event = replace(event, still_pending=functools.partial(_still_pending, repository, rid))
        outcome: Outcome | None = None
        try:
            outcome = self.action(event)
            buffers = None
            if outcome.result is not None and outcome.status == "applied":
                buffers = {
                    u.name: (
                        u.new_mean.double().cpu().numpy(),
                        u.new_var.double().cpu().numpy(),
                        float(u.module.eps),
                    )
                    for u in outcome.result.updates
                }
            repository.finish_recalibration(
                rid, status=outcome.status, outcome=dict(outcome.details), buffers=buffers
            )
        except RecalibrationNotFoundError:
            # deleted meanwhile (its model version): no statistics of it to keep in the model
            _roll_back(outcome, rid)
            raise
        except RecalibrationStateError as err:
            # decided elsewhere meanwhile: nothing of this action to record, and no statistics
            # of it to keep in the model
            _roll_back(outcome, rid)
            return _decided_elsewhere(repository, event, err, outcome)
        except Exception as err:
            logger.exception("bnwatch: recalibration trigger %d failed", rid)
            details: dict[str, Any] = {"error": f"{type(err).__name__}: {err}"}
            rolled_back = _roll_back(outcome, rid)
            if rolled_back is not None:
                details["rolled_back"] = rolled_back
            outcome = Outcome("failed", details)
            try:
                repository.finish_recalibration(rid, status="failed", outcome=dict(outcome.details))
            except RecalibrationStateError as decided:
                return _decided_elsewhere(repository, event, decided, outcome)
        logger.warning(
            "bnwatch: recalibration %d of %s@%s (%s alert): %s",
            rid,
            event.model,
            event.version,
            event.kind,
            outcome.status,
        )
        return outcome


def _still_pending(repository: Repository, rid: int) -> bool:
    """Whether the recalibration ``rid`` is still ``pending`` in the store (``True`` when the
    store cannot say: the action then does what it did before it could ask)."""
    try:
        return repository.recalibration(rid).status == "pending"
    except RecalibrationNotFoundError:
        return False
    except Exception as err:
        logger.debug("bnwatch: reading recalibration %d's status failed: %s", rid, err)
        return True


def _decided_elsewhere(
    repository: Repository,
    event: TriggerEvent,
    err: RecalibrationStateError,
    outcome: Outcome | None,
) -> Outcome:
    """The stored outcome of a recalibration decided while its action ran, logged at INFO: a
    benign race (a receiver that reported, then answered 5xx), not an error."""
    logger.info(
        "bnwatch: recalibration %d of %s@%s (%s alert) was decided elsewhere meanwhile (%s, "
        "e.g. its receiver's report): that decision stands; this trigger's outcome (%s) is not "
        "recorded",
        event.recalibration_id,
        event.model,
        event.version,
        event.kind,
        err.status,
        outcome.status if outcome is not None else "none",
    )
    try:
        stored = repository.recalibration(event.recalibration_id)
    except Exception:
        return Outcome(err.status)
    return Outcome(stored.status, dict(stored.outcome or {}))


def _roll_back(outcome: Outcome | None, rid: int) -> str | None:
    """Put back the model's statistics of an applied in-process result whose outcome could
    not be recorded; says what happened (for the outcome), ``None`` when nothing was applied."""
    result = outcome.result if outcome is not None else None
    if result is None or result.status != "applied":
        return None
    try:
        result.rollback()
    except Exception as err:
        logger.exception("bnwatch: rolling back recalibration %d failed", rid)
        return f"failed ({type(err).__name__}: {err}): the model keeps the new statistics"
    logger.warning(
        "bnwatch: recalibration %d was rolled back: its outcome could not be recorded", rid
    )
    return "the model's previous statistics were put back"
