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

The check and the record are one locked transaction
(:meth:`~bnwatch.store.repository.Repository.claim_recalibration`): processes sharing a
database -- the workers of ``bnwatch serve``, several writers -- never both start a
recalibration of one model version inside the cooldown, nor two for one alert (unless the
first failed).  Those limits are per method (the action's ``method``, else its class name):
a notification trigger next to the in-process recalibration does not use up its alert, its
cooldown or its cap.  Every trigger ends ``applied``, ``rejected``, ``failed`` or
``notified`` (a callback that returned ``None``: it told someone, nothing was recalibrated)
-- a webhook that was delivered, or sent without an answer in time, stays ``pending`` until
its receiver reports back with :func:`bnwatch.report_recalibration` -- with its outcome, in the
``recalibrations`` table; recalibrated statistics are stored as references of kind
``recalibrated`` with their lineage.

Modules: :mod:`bnwatch.triggers.core` (everything above but the in-process action; imports
without torch, so a bnwatch service runs webhook triggers) and
:mod:`bnwatch.triggers.recalibrate` (:class:`RecalibrateAction`: torch; with
:func:`hook_free_copy`, from :mod:`bnwatch.recalibration.core`), which this package loads only
when one of these names is asked for.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from bnwatch.triggers.core import (
    MIN_KEPT_INPUTS,
    Action,
    AlertPipeline,
    CallbackAction,
    Outcome,
    Trigger,
    TriggerEvent,
    TriggerPolicy,
    WebhookAction,
    sign,
    verify_signature,
)

if TYPE_CHECKING:
    from bnwatch.recalibration.core import hook_free_copy
    from bnwatch.triggers.recalibrate import RecalibrateAction

_TORCH = {
    "RecalibrateAction": "bnwatch.triggers.recalibrate",
    "hook_free_copy": "bnwatch.recalibration.core",
}
"""Names that need torch, and their modules: imported on first use."""


def __getattr__(name: str) -> Any:
    if name in _TORCH:
        return getattr(importlib.import_module(_TORCH[name]), name)
    raise AttributeError(f"module 'bnwatch.triggers' has no attribute {name!r}")


__all__ = [
    "MIN_KEPT_INPUTS",
    "Action",
    "AlertPipeline",
    "CallbackAction",
    "Outcome",
    "RecalibrateAction",
    "Trigger",
    "TriggerEvent",
    "TriggerPolicy",
    "WebhookAction",
    "hook_free_copy",
    "sign",
    "verify_signature",
]
