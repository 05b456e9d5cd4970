"""Recalibration triggers in the service: claimed where alerts open, run on a background worker.

With ``BNWATCH_WEBHOOK_URL`` and ``BNWATCH_WEBHOOK_SECRET`` set, :func:`create_app
<bnwatch.service.create_app>` builds a :class:`TriggerRunner` around
``Trigger(WebhookAction(url, secret), settings.triggers)``:

* **claim** in the thread that saw the alert open (an ingest request's thread, or the periodic
  job's): :meth:`Trigger.claim <bnwatch.triggers.Trigger.claim>` checks the policy and records
  the ``pending`` recalibration in one locked transaction
  (:meth:`~bnwatch.store.repository.Repository.claim_recalibration`), so the workers of
  ``bnwatch serve`` and other replicas on the database never both trigger one model version
  inside the cooldown.  It is one short transaction, taken only for an alert the policy
  allows now: a refusal (the cooldown, the daily cap, an alert already handled -- what the
  periodic job mostly meets) is read without a lock;
* **run** the action -- the webhook: up to ``attempts`` POSTs, each with a ``timeout``, with
  backoff in between -- on one background thread, fed by a bounded queue.  An ingest request
  never waits for a webhook and never fails because of one.  When the queue is full the event
  is not queued: the recalibration is recorded ``failed`` with the reason, logged, and counted
  (:attr:`TriggerRunner.dropped`); the submitting thread never blocks.  ``GET /metrics``
  exports the queue's depth and that count (``bnwatch_trigger_queue_depth``,
  ``bnwatch_trigger_queue_dropped_total``).

:meth:`TriggerRunner.stop` (the app's lifespan shutdown) lets the action in flight finish (up
to ``stop_timeout`` seconds), records the events still queued as ``failed`` ("the service
stopped before delivering it"), and joins the thread.  Give the process that long to stop
(docker-compose.yml: ``stop_grace_period: 60s``; Docker's default of 10 s kills it first).  A
process killed anyway leaves its claims ``pending``: the periodic job of a running worker
records them ``failed`` once they are 30 minutes old
(:data:`~bnwatch.store.repository.ABANDONED_CLAIM_SECONDS`), and their alerts are triggered
again after the cooldown.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Sequence
from urllib.parse import urlsplit

from bnwatch.alerts import AlertChange
from bnwatch.errors import check_positive_int
from bnwatch.service.settings import Settings
from bnwatch.store.repository import Repository
from bnwatch.triggers import Trigger, TriggerEvent, WebhookAction

logger = logging.getLogger("bnwatch.service")

DEFAULT_QUEUE_SIZE = 256
"""Claimed events waiting for the worker, at most (each is a few hundred bytes)."""
DEFAULT_STOP_TIMEOUT = 45.0
"""Seconds shutdown waits for the action in flight: a webhook's 3 attempts of at most 10 s each
(the whole request, answer included), plus its backoff, fit."""


def webhook_host(url: str) -> str:
    """The host (and port) of a webhook URL: what logs may show of it (no path, no query, no
    credentials)."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{host}:{parts.port}" if parts.port else host


class TriggerRunner:
    """A :class:`~bnwatch.triggers.Trigger` whose claims are taken by the caller and whose
    actions run on one background thread (see the module docstring).

    Args:
        trigger: the trigger (its action and policy).
        queue_size: most claimed events waiting for the worker; more are recorded ``failed``.
        stop_timeout: seconds :meth:`stop` waits for the action in flight.
    """

    def __init__(
        self,
        trigger: Trigger,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> None:
        check_positive_int("queue_size", queue_size)
        self.trigger = trigger
        self.stop_timeout = stop_timeout
        self._queue: queue.Queue[tuple[Repository, TriggerEvent] | None] = queue.Queue(queue_size)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.dropped = 0
        """Events recorded ``failed`` because the queue was full."""
        self.completed = 0
        """Events whose action ran and whose outcome was recorded."""

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    ) -> TriggerRunner | None:
        """``Trigger(WebhookAction(url, secret), settings.triggers)`` on a runner (``None``
        when ``settings`` configure no webhook)."""
        if settings.webhook_url is None or settings.webhook_secret is None:
            return None
        action = WebhookAction(settings.webhook_url, settings.webhook_secret)
        return cls(
            Trigger(action, settings.triggers), queue_size=queue_size, stop_timeout=stop_timeout
        )

    def describe(self) -> str:
        """For the startup log: the webhook's host and the policy (never the secret)."""
        policy = self.trigger.policy
        url = getattr(self.trigger.action, "url", None)
        target = f"webhook to {webhook_host(url)}" if isinstance(url, str) else self.trigger.method
        return (
            f"{target} on {', '.join(policy.kinds)} alerts (open >= {policy.persist_seconds:g} s, "
            f"cooldown {policy.cooldown_seconds:g} s, at most {policy.daily_cap} per model "
            "version per 24 h)"
        )

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (once)."""
        with self._lock:
            if self._thread is not None:
                return
            self._stopping.clear()
            self._thread = threading.Thread(target=self._work, name="bnwatch-triggers", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Finish the action in flight (up to ``stop_timeout`` s), record what is still queued
        as ``failed``, and end the thread.  Events submitted from now on are recorded
        ``failed`` too."""
        with self._lock:
            thread, self._thread = self._thread, None
            self._stopping.set()
        if thread is None:
            self._fail_queued("the service stopped before delivering it")
            return
        with contextlib.suppress(queue.Full):  # wakes an idle worker; a busy one sees _stopping
            self._queue.put_nowait(None)
        thread.join(self.stop_timeout)
        if thread.is_alive():
            logger.error(
                "bnwatch service: the trigger worker did not finish its action within %g s; "
                "its recalibration stays pending",
                self.stop_timeout,
            )
        self._fail_queued("the service stopped before delivering it")

    @property
    def running(self) -> bool:
        """Whether the worker thread is up."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def stopping(self) -> bool:
        """Whether :meth:`stop` was called (events are no longer queued)."""
        return self._stopping.is_set()

    @property
    def depth(self) -> int:
        """Claimed events waiting for the worker now (not the one it is running); exported
        as ``bnwatch_trigger_queue_depth``, with :attr:`dropped` as
        ``bnwatch_trigger_queue_dropped_total``."""
        return self._queue.qsize()

    # -- claims (the caller's thread) ----------------------------------------------------------
    def on_alerts(self, repository: Repository, changes: Sequence[AlertChange]) -> int:
        """Claim and queue the alerts that opened among ``changes``; returns how many were
        queued.  Never raises: failures are logged."""
        try:
            events = self.trigger.claim_opened(repository, changes)
        except Exception:
            logger.exception("bnwatch service: claiming a recalibration trigger failed")
            return 0
        return sum(self.submit(repository, event) for event in events)

    def check_open(self, repository: Repository) -> int:
        """Claim and queue the open alerts the policy allows now (the periodic job: needed for
        ``persist_seconds`` > 0, and to retry a failed trigger after the cooldown), and the
        recalibrations requested by hand (the dashboard's "Request a recalibration": sent as
        ``requested`` events, outside the policy); returns how many were queued.  Never
        raises: failures are logged.

        :meth:`Trigger.claim_open <bnwatch.triggers.Trigger.claim_open>` first records
        ``failed`` the claims a killed process abandoned (no outcome 30 minutes after the
        claim), so that their alerts are triggered again after the cooldown."""
        events = []
        for claim, what in (
            (self.trigger.claim_open, "triggers of the open alerts"),
            (self.trigger.claim_requested, "requested recalibrations"),
        ):
            try:
                events.extend(claim(repository))
            except Exception:
                logger.exception("bnwatch service: claiming %s failed", what)
        return sum(self.submit(repository, event) for event in events)

    def submit(self, repository: Repository, event: TriggerEvent) -> bool:
        """Queue a claimed event for the worker without blocking; a full queue (or a stopped
        runner) records its recalibration ``failed`` and returns ``False``."""
        # checked and queued under the lock stop() marks the runner stopping with: an event is
        # either queued before -- then stop() records it failed when it drains the queue -- or
        # refused here, never queued behind a worker that has gone (it stayed pending)
        with self._lock:
            stopping = self._stopping.is_set() or self._thread is None
            if not stopping:
                try:
                    self._queue.put_nowait((repository, event))
                    return True
                except queue.Full:
                    self.dropped += 1
        if stopping:
            self._fail(repository, event, "the service is stopping: the webhook was not sent")
            return False
        logger.error(
            "bnwatch service: the trigger queue is full (%d waiting): recalibration %d of "
            "%s@%s recorded as failed; %d dropped so far",
            self._queue.maxsize,
            event.recalibration_id,
            event.model,
            event.version,
            self.dropped,
        )
        self._fail(
            repository,
            event,
            f"the service's trigger queue was full ({self._queue.maxsize} waiting): the "
            "webhook was not sent",
        )
        return False

    # -- the worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping.is_set():
            job = self._queue.get()
            if job is None:
                continue
            repository, event = job
            try:
                self.trigger.run(repository, event)  # records the outcome; never raises ...
            except Exception:  # ... but for the store itself: never let the worker die
                logger.exception(
                    "bnwatch service: recording the outcome of recalibration %d failed",
                    event.recalibration_id,
                )
            with self._lock:
                self.completed += 1

    def _fail_queued(self, reason: str) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._fail(job[0], job[1], reason)

    @staticmethod
    def _fail(repository: Repository, event: TriggerEvent, reason: str) -> None:
        try:
            repository.finish_recalibration(
                event.recalibration_id, status="failed", outcome={"error": reason}
            )
        except Exception:
            logger.exception(
                "bnwatch service: recording recalibration %d as failed (%s) failed",
                event.recalibration_id,
                reason,
            )
