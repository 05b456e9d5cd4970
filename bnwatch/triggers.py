"""Recalibration triggers: from alerts to actions, recorded and rate-limited.

A :class:`Trigger` watches the alert changes of a store.  When an alert of one of its
``kinds`` is open (for at least ``persist_seconds``) and the model version is outside its
``cooldown`` and under its ``daily_cap``, it records a recalibration (status ``pending``)
and starts its action:

* a Python callback (:class:`CallbackAction`);
* a webhook (:class:`WebhookAction`): an HTTP POST of the event as JSON, signed with
  HMAC-SHA256 over ``timestamp.body`` with a shared secret (header
  ``X-Bnwatch-Signature: t=<timestamp>,sha256=<hex>``) -- verify with :func:`verify_signature`;
* an in-process recalibration (:class:`RecalibrateAction`) on the inputs a monitor kept
  (``watch(..., keep_inputs=N)``): a hook-free copy of the model is recalibrated on most of
  them, judged on the rest, and the new statistics are copied into the live model only if
  the held-out inputs moved closer to them (otherwise ``rejected``).

Every trigger ends ``applied``, ``rejected`` or ``failed`` (a webhook that was delivered stays
``pending``: the receiver decides), with its outcome, in the ``recalibrations`` table;
recalibrated statistics are stored as references of kind ``recalibrated`` with their lineage.
"""

from __future__ import annotations

import copy
import hashlib
import hmac
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Protocol

import httpx
import torch
from torch import nn

from bnwatch.alerts import AlertChange, AlertEngine
from bnwatch.capture import Monitor
from bnwatch.errors import ConfigError
from bnwatch.recalibration import RecalibrationResult, recalibrate
from bnwatch.schema import ALERT_KINDS, WindowRecord, utcnow
from bnwatch.store.repository import Repository

logger = logging.getLogger("bnwatch")


@dataclass(frozen=True)
class TriggerEvent:
    """What a trigger hands its action."""

    recalibration_id: int
    model: str
    version: str
    alert_id: int
    kind: str
    layer: str | None
    values: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "recalibration_id": self.recalibration_id,
            "model": self.model,
            "version": self.version,
            "alert": {
                "id": self.alert_id,
                "kind": self.kind,
                "layer": self.layer,
                "values": dict(self.values),
            },
        }


@dataclass(frozen=True)
class Outcome:
    """How an action ended: ``applied``, ``rejected``, ``failed`` or ``pending``."""

    status: str
    details: Mapping[str, Any] = field(default_factory=dict)
    result: RecalibrationResult | None = None


class Action(Protocol):
    def __call__(self, event: TriggerEvent) -> Outcome: ...


class CallbackAction:
    """Call ``fn(event)``; it returns an :class:`Outcome`, a RecalibrationResult, or None
    (applied).  An exception marks the trigger ``failed``."""

    def __init__(self, fn: Callable[[TriggerEvent], Outcome | RecalibrationResult | None]):
        self.fn = fn

    def __call__(self, event: TriggerEvent) -> Outcome:
        value = self.fn(event)
        if value is None:
            return Outcome("applied")
        if isinstance(value, RecalibrationResult):
            status = "applied" if value.status == "applied" else "rejected"
            return Outcome(status, value.summary(), value)
        return value


def sign(body: bytes, secret: str, timestamp: int) -> str:
    """The ``X-Bnwatch-Signature`` header value of ``body``."""
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},sha256={digest.hexdigest()}"


def verify_signature(
    body: bytes,
    header: str,
    secret: str,
    *,
    tolerance_seconds: float = 300.0,
    now: float | None = None,
) -> bool:
    """Check a webhook's signature header (and that it is recent, against replays)."""
    try:
        parts = dict(item.split("=", 1) for item in header.split(","))
        timestamp = int(parts["t"])
        given = parts["sha256"]
    except (KeyError, ValueError):
        return False
    if abs((now if now is not None else time.time()) - timestamp) > tolerance_seconds:
        return False
    expected = sign(body, secret, timestamp).split("sha256=", 1)[1]
    return hmac.compare_digest(expected, given)


class WebhookAction:
    """POST the event as JSON to ``url``, signed with HMAC-SHA256 over a shared secret.

    Retried (``attempts``, exponential backoff) on connection errors and 5xx; a 2xx leaves
    the recalibration ``pending`` (the receiver acts); anything else fails it.
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
            headers = {
                "Content-Type": "application/json",
                "X-Bnwatch-Signature": sign(body, self._secret, int(time.time())),
                "X-Bnwatch-Event": "recalibration",
            }
            try:
                response = httpx.post(self.url, content=body, headers=headers, timeout=self.timeout)
            except httpx.HTTPError as err:
                last = f"{type(err).__name__}: {err}"
            else:
                if 200 <= response.status_code < 300:
                    return Outcome(
                        "pending", {"webhook": self.url, "http_status": response.status_code}
                    )
                last = f"HTTP {response.status_code}"
                if response.status_code < 500:
                    break
            if attempt + 1 < self.attempts:
                time.sleep(delay)
                delay *= 2
        return Outcome("failed", {"webhook": self.url, "error": last})


def hook_free_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` without any of its hooks (a monitor's hooks must not run, or
    be copied, when the copy is recalibrated)."""
    memo: dict[int, Any] = {}
    for module in model.modules():
        for name, value in vars(module).items():
            hooks = name.endswith(("hooks", "hooks_with_kwargs", "hooks_always_called"))
            if name.startswith("_") and hooks and isinstance(value, (dict, set)):
                memo[id(value)] = type(value)()
    return copy.deepcopy(model, memo)


class RecalibrateAction:
    """Recalibrate in process on the monitor's kept inputs (``watch(..., keep_inputs=N)``).

    ``holdout`` of the kept inputs judge the result and are not used to estimate it; the
    live model receives the new statistics only when they are better on them.  A forward
    running at that instant may see some layers updated and others not: apply from a quiet
    moment if that matters.
    """

    def __init__(
        self,
        model: nn.Module,
        monitor: Monitor,
        *,
        method: str = "precise",
        prior_strength: float = 16.0,
        holdout: float = 0.25,
        batch_size: int = 64,
        min_samples: int = 64,
    ) -> None:
        if not 0 < holdout < 1:
            raise ConfigError("holdout", holdout, "a fraction in (0, 1)")
        self.model = model
        self.monitor = monitor
        self.method = method
        self.prior_strength = prior_strength
        self.holdout = holdout
        self.batch_size = batch_size
        self.min_samples = min_samples
        self._lock = threading.Lock()

    def __call__(self, event: TriggerEvent) -> Outcome:
        inputs = self.monitor.inputs()
        if inputs is None or inputs.shape[0] < self.min_samples:
            kept = 0 if inputs is None else int(inputs.shape[0])
            return Outcome(
                "rejected", {"reason": f"only {kept} kept inputs (need {self.min_samples})"}
            )
        g = torch.Generator().manual_seed(event.recalibration_id)
        order = torch.randperm(inputs.shape[0], generator=g)
        cut = int(inputs.shape[0] * (1 - self.holdout))
        fit, judge = inputs[order[:cut]], inputs[order[cut:]]
        with self._lock:
            clone = hook_free_copy(self.model)
            result = recalibrate(
                clone,
                list(torch.split(fit, self.batch_size)),
                num_samples=int(fit.shape[0]),
                method=self.method,  # type: ignore[arg-type]
                prior_strength=self.prior_strength,
                held_out=list(torch.split(judge, self.batch_size)),
                apply="if_better",
                progress=False,
            )
            if result.status == "applied":
                live = result.bound_to(self.model)
                # applied and adopted at once: intended, not a "mutation" of a closing window
                self.monitor.adopt_running_statistics(live.apply)
                return Outcome("applied", result.summary(), live)
        return Outcome("rejected", result.summary(), result)


class AlertPipeline:
    """What runs after each stored batch of windows: the alert engine, then the triggers.

    ``bnwatch.watch(store=URL, ...)`` installs one as the writer's ``on_stored`` hook.
    """

    def __init__(self, engine: AlertEngine, triggers: Sequence[Trigger] = ()) -> None:
        self.engine = engine
        self.triggers: list[Trigger] = list(triggers)

    def on_stored(self, repository: Repository, records: Sequence[WindowRecord]) -> None:
        changes = self.engine.on_stored(repository, records)
        for trigger in self.triggers:
            trigger.on_alerts(repository, changes)


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
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(name, value, "a number of seconds >= 0")
        if (
            isinstance(self.daily_cap, bool)
            or not isinstance(self.daily_cap, int)
            or self.daily_cap < 1
        ):
            raise ConfigError("daily_cap", self.daily_cap, "an integer >= 1")


class Trigger:
    """Start an action when an alert calls for it (see the module docstring)."""

    def __init__(self, action: Action, policy: TriggerPolicy | None = None) -> None:
        self.action = action
        self.policy = policy or TriggerPolicy()

    def on_alerts(
        self, repository: Repository, changes: Sequence[AlertChange], *, now: datetime | None = None
    ) -> list[tuple[int, Outcome]]:
        """Act on newly opened alerts (the alert engine's output); returns what was done."""
        done = []
        for change in changes:
            if change.action != "opened" or change.kind not in self.policy.kinds:
                continue
            outcome = self.consider(repository, change, now=now)
            if outcome is not None:
                done.append(outcome)
        return done

    def check_open(
        self, repository: Repository, *, now: datetime | None = None
    ) -> list[tuple[int, Outcome]]:
        """Act on alerts that are open now (for ``persist_seconds`` > 0: call periodically)."""
        done = []
        for alert in repository.alerts(state="open"):
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
            outcome = self.consider(repository, change, now=now, opened_at=alert.opened_at)
            if outcome is not None:
                done.append(outcome)
        return done

    def consider(
        self,
        repository: Repository,
        change: AlertChange,
        *,
        now: datetime | None = None,
        opened_at: datetime | None = None,
    ) -> tuple[int, Outcome] | None:
        """Run the action for one open alert if the policy allows it now."""
        now = now or utcnow()
        if (
            opened_at is not None
            and (now - opened_at).total_seconds() < self.policy.persist_seconds
        ):
            return None
        if opened_at is None and self.policy.persist_seconds > 0:
            return None  # just opened: check_open will take it once it persisted
        count, last = repository.recent_recalibrations(
            change.model, change.version, since=now - timedelta(days=1)
        )
        if count >= self.policy.daily_cap:
            logger.info(
                "bnwatch: recalibration of %s@%s skipped: daily cap %d reached",
                change.model,
                change.version,
                self.policy.daily_cap,
            )
            return None
        if last is not None and (now - last).total_seconds() < self.policy.cooldown_seconds:
            return None
        method = getattr(self.action, "method", type(self.action).__name__)
        rid = repository.start_recalibration(
            change.model, change.version, method=str(method), alert_id=change.alert_id
        )
        event = TriggerEvent(
            rid,
            change.model,
            change.version,
            change.alert_id,
            change.kind,
            change.layer,
            change.values,
        )
        try:
            outcome = self.action(event)
        except Exception as err:
            logger.exception("bnwatch: recalibration trigger %d failed", rid)
            outcome = Outcome("failed", {"error": f"{type(err).__name__}: {err}"})
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
        logger.warning(
            "bnwatch: recalibration %d of %s@%s (%s alert): %s",
            rid,
            change.model,
            change.version,
            change.kind,
            outcome.status,
        )
        return rid, outcome
