"""The service's settings: one frozen value, built from the environment by ``bnwatch serve``.

====================================  ======================================  ====================
environment variable                  meaning                                 default
====================================  ======================================  ====================
``BNWATCH_DATABASE_URL``              SQLAlchemy URL of the store             sqlite:///bnwatch.db
``BNWATCH_API_TOKEN``                 bearer token that ingest requires       unset: ingest is
                                      (``POST /api/v1/windows``,              refused (503)
                                      ``/api/v1/profiles`` and
                                      ``/api/v1/recalibrations/{id}/outcome``)
``BNWATCH_MAX_BODY_BYTES``            largest request body accepted (413      64 MiB
                                      above)
``BNWATCH_MAX_PROFILE_BYTES``         largest profile upload accepted (413    256 MiB
                                      above)
``BNWATCH_INGEST_THREADS``            ingest requests processed at once per   4
                                      process
``BNWATCH_RECOMPUTE``                 ``1``: recompute every received         ``0``
                                      window's metrics with the service's
                                      thresholds
``BNWATCH_WEBHOOK_URL``               http(s) URL that recalibration          unset: no triggers
                                      triggers POST to (set with the secret)
``BNWATCH_WEBHOOK_SECRET``            shared secret that signs each webhook   unset
                                      (HMAC-SHA256; set with the URL)
``BNWATCH_TRIGGER_KINDS``             comma-separated alert kinds that        ``drift``
                                      trigger
``BNWATCH_TRIGGER_PERSIST_SECONDS``   an alert must be open this long first   ``0``
``BNWATCH_TRIGGER_COOLDOWN_SECONDS``  least time between two triggers of a    ``3600``
                                      model version
``BNWATCH_TRIGGER_DAILY_CAP``         most triggers of a model version per    ``3``
                                      24 hours
====================================  ======================================  ====================

Ingest **requires** a token: a service started without ``BNWATCH_API_TOKEN`` serves every read
endpoint but answers every ingest ``POST`` (windows, profiles, recalibration outcomes) with 503
and a message saying to set it (503, not 401: the sender's token is not wrong, the service is not
configured -- and HTTP sinks retry a 503 with backoff, so delivery resumes once the operator
sets the token).

**Triggers** are on when ``BNWATCH_WEBHOOK_URL`` and ``BNWATCH_WEBHOOK_SECRET`` are set (both or
neither): an alert of ``BNWATCH_TRIGGER_KINDS`` that is open (for
``BNWATCH_TRIGGER_PERSIST_SECONDS``) records a ``pending`` recalibration -- at most one per
model version per ``BNWATCH_TRIGGER_COOLDOWN_SECONDS`` and ``BNWATCH_TRIGGER_DAILY_CAP`` per 24
hours, across every worker and replica on the database -- and POSTs it, signed, to the URL
(:class:`bnwatch.triggers.WebhookAction`; docs/deploy.md describes what the receiver gets).
The receiver reports how it ended with ``bnwatch.report_recalibration`` (``POST
/api/v1/recalibrations/{id}/outcome``); until then the recalibration stays ``pending``.
The ``BNWATCH_TRIGGER_*`` variables are the fields of :class:`bnwatch.triggers.TriggerPolicy`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from bnwatch.drift import DriftConfig
from bnwatch.errors import UNSET, ConfigError, check_positive_int
from bnwatch.schema import ALERT_KINDS
from bnwatch.store.engine import DEFAULT_URL
from bnwatch.triggers.core import TriggerPolicy

DATABASE_ENV = "BNWATCH_DATABASE_URL"
TOKEN_ENV = "BNWATCH_API_TOKEN"
MAX_BODY_ENV = "BNWATCH_MAX_BODY_BYTES"
MAX_PROFILE_ENV = "BNWATCH_MAX_PROFILE_BYTES"
INGEST_THREADS_ENV = "BNWATCH_INGEST_THREADS"
RECOMPUTE_ENV = "BNWATCH_RECOMPUTE"
WEBHOOK_URL_ENV = "BNWATCH_WEBHOOK_URL"
WEBHOOK_SECRET_ENV = "BNWATCH_WEBHOOK_SECRET"
TRIGGER_KINDS_ENV = "BNWATCH_TRIGGER_KINDS"
TRIGGER_PERSIST_ENV = "BNWATCH_TRIGGER_PERSIST_SECONDS"
TRIGGER_COOLDOWN_ENV = "BNWATCH_TRIGGER_COOLDOWN_SECONDS"
TRIGGER_CAP_ENV = "BNWATCH_TRIGGER_DAILY_CAP"
_POLICY_ENV = {
    "kinds": TRIGGER_KINDS_ENV,
    "persist_seconds": TRIGGER_PERSIST_ENV,
    "cooldown_seconds": TRIGGER_COOLDOWN_ENV,
    "daily_cap": TRIGGER_CAP_ENV,
}
"""The environment variable of each :class:`~bnwatch.triggers.TriggerPolicy` field."""
_SETTINGS_ENV = {
    "database_url": DATABASE_ENV,
    "api_token": TOKEN_ENV,
    "max_body_bytes": MAX_BODY_ENV,
    "max_profile_bytes": MAX_PROFILE_ENV,
    "ingest_threads": INGEST_THREADS_ENV,
    "recompute": RECOMPUTE_ENV,
    "webhook_url": WEBHOOK_URL_ENV,
    "webhook_secret": WEBHOOK_SECRET_ENV,
}
"""The environment variable of each :class:`Settings` attribute read from one."""
_SECRET_SETTINGS = frozenset({"api_token", "webhook_secret"})
"""Attributes whose values error messages never show."""

DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
DEFAULT_MAX_PROFILE_BYTES = 256 * 1024 * 1024
"""A profile keeps up to 512 float32 rows of reservoir per layer: ResNet-50's is ~72 MB of JSON
(base64), uploaded once per model version."""
DEFAULT_INGEST_THREADS = 4

# RFC 6750 b64token: what may follow "Bearer " in an Authorization header
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Settings:
    """Everything :func:`bnwatch.service.create_app` needs besides the engine.

    Attributes:
        database_url: SQLAlchemy URL of the store (used when no engine is injected).
        api_token: the bearer token ingest requires; ``None`` refuses ingest (503).  Never
            shown in ``repr``.
        max_body_bytes: request bodies above this are refused with 413 (checked against
            ``Content-Length`` before reading, and counted while a chunked body streams).
        max_profile_bytes: the same for ``POST /api/v1/profiles``: a profile's reservoirs
            make it larger than any batch of windows, and it comes once per model version.
        drift: thresholds the service recomputes received windows' metrics with (windows that
            arrive without metrics, or all of them with ``recompute``).
        recompute: recompute every received window's metrics and decisions with ``drift``
            instead of storing the metrics its monitor computed (one judgement for the whole
            fleet, at several times the ingest CPU).
        ingest_threads: ingest requests parsed, assessed and written at once in one process
            (each holds its body in memory: memory grows up to ``ingest_threads`` times
            ``max_body_bytes`` plus the bodies being read).
        webhook_url: where recalibration triggers POST (``None``: no triggers); set together
            with ``webhook_secret``.
        webhook_secret: the shared secret that signs each webhook (HMAC-SHA256).  Never shown
            in ``repr``, logs or error messages.
        triggers: when an alert triggers a recalibration (kinds, persistence, cooldown, daily
            cap); used only with a webhook.
    """

    database_url: str = DEFAULT_URL
    api_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_profile_bytes: int = DEFAULT_MAX_PROFILE_BYTES
    drift: DriftConfig = field(default_factory=DriftConfig)
    ingest_threads: int = DEFAULT_INGEST_THREADS
    recompute: bool = False
    webhook_url: str | None = None
    webhook_secret: str | None = field(default=None, repr=False)
    triggers: TriggerPolicy = field(default_factory=TriggerPolicy)

    @property
    def triggers_enabled(self) -> bool:
        """Whether alerts trigger recalibration webhooks (a webhook URL and secret are set)."""
        return self.webhook_url is not None

    def __post_init__(self) -> None:
        check_positive_int("max_body_bytes", self.max_body_bytes)
        check_positive_int("max_profile_bytes", self.max_profile_bytes)
        check_positive_int("ingest_threads", self.ingest_threads)
        if not isinstance(self.drift, DriftConfig):
            raise ConfigError("drift", self.drift, "a bnwatch.DriftConfig")
        if self.api_token is not None and not (
            isinstance(self.api_token, str) and _TOKEN.fullmatch(self.api_token)
        ):
            raise ConfigError(
                "api_token",
                "<hidden>",
                "letters, digits and -._~+/ (optionally ending in =), as a bearer token "
                "must be; check for stray whitespace or quotes",
            )
        if not isinstance(self.triggers, TriggerPolicy):
            raise ConfigError("triggers", self.triggers, "a bnwatch.triggers.TriggerPolicy")
        if self.webhook_url is not None and not _is_webhook_url(self.webhook_url):
            raise ConfigError("webhook_url", self.webhook_url, _WEBHOOK_URL)
        if self.webhook_secret is not None and not (
            isinstance(self.webhook_secret, str) and self.webhook_secret
        ):
            raise ConfigError("webhook_secret", "<hidden>", "a non-empty string")
        if (self.webhook_url is None) != (self.webhook_secret is None):
            missing = "webhook_secret" if self.webhook_secret is None else "webhook_url"
            raise ConfigError(
                missing, UNSET, "set together with the other (a webhook needs a URL and a secret)"
            )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``BNWATCH_*`` environment variables (see the module docstring);
        keyword ``overrides`` win over the environment.  An empty (or blank) variable counts
        as unset; values are stripped of surrounding whitespace, except the webhook secret,
        which signs exactly as set."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "")
            if not value.strip():
                return None
            # the secret signs as set, trailing newline and all (a Kubernetes secret read
            # from a file has one): a receiver reading the same variable must verify it
            return value if name == WEBHOOK_SECRET_ENV else value.strip()

        values: dict[str, Any] = {
            "database_url": get(DATABASE_ENV) or DEFAULT_URL,
            "api_token": get(TOKEN_ENV),
        }
        for attribute, example in (
            ("max_body_bytes", DEFAULT_MAX_BODY_BYTES),
            ("max_profile_bytes", DEFAULT_MAX_PROFILE_BYTES),
            ("ingest_threads", DEFAULT_INGEST_THREADS),
        ):
            name = _SETTINGS_ENV[attribute]
            text = get(name)
            if text is not None:
                try:
                    values[attribute] = int(text)
                except ValueError:
                    raise ConfigError(name, text, f"a whole number, e.g. {example}") from None
        recompute = get(RECOMPUTE_ENV)
        if recompute is not None:
            if recompute.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(RECOMPUTE_ENV, recompute, "1 or 0 (true/false)")
            values["recompute"] = recompute.lower() in ("1", "true", "yes")
        values.update(_webhook_from_env(get))
        values["triggers"] = _policy_from_env(get)
        values.update(overrides)
        try:
            return cls(**values)
        except ConfigError as err:
            # the checks of __post_init__ name the attribute; what an operator must fix is
            # the variable it came from (an override keeps the attribute's name)
            variable = _SETTINGS_ENV.get(err.argument)
            if variable is None or err.argument in overrides or get(variable) is None:
                raise
            shown = "<hidden>" if err.argument in _SECRET_SETTINGS else get(variable)
            raise ConfigError(variable, shown, err.allowed) from None

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some attributes changed (validated again)."""
        return replace(self, **changes)


_WEBHOOK_URL = "an http:// or https:// URL with a host, e.g. https://recalibrator.internal/hook"


def _is_webhook_url(url: object) -> bool:
    if not isinstance(url, str):
        return False
    try:
        parts = urlsplit(url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and parts.port != 0
    except ValueError:  # a bad port, an unbalanced [ of an IPv6 host
        return False


def _webhook_from_env(get: Callable[[str], str | None]) -> dict[str, str]:
    """``webhook_url`` and ``webhook_secret``: both set or neither (errors name the variable
    to set, and never show the secret)."""
    url, secret = get(WEBHOOK_URL_ENV), get(WEBHOOK_SECRET_ENV)
    if url is None and secret is None:
        return {}
    if url is None:
        raise ConfigError(
            WEBHOOK_URL_ENV,
            UNSET,
            f"{_WEBHOOK_URL}, since {WEBHOOK_SECRET_ENV} is set (set both, or unset both to "
            "run without triggers)",
        )
    if not _is_webhook_url(url):
        raise ConfigError(WEBHOOK_URL_ENV, url, _WEBHOOK_URL)
    if secret is None:
        raise ConfigError(
            WEBHOOK_SECRET_ENV,
            UNSET,
            f"a shared secret that signs the webhooks, since {WEBHOOK_URL_ENV} is set (e.g. "
            f"`openssl rand -hex 32`; or unset both to run without triggers)",
        )
    return {"webhook_url": url, "webhook_secret": secret}


def _policy_from_env(get: Callable[[str], str | None]) -> TriggerPolicy:
    """The trigger policy from ``BNWATCH_TRIGGER_*`` (the defaults where unset); errors name
    the variable."""
    texts = {field_: get(name) for field_, name in _POLICY_ENV.items()}
    values: dict[str, Any] = {}
    if texts["kinds"] is not None:
        values["kinds"] = tuple(k.strip() for k in texts["kinds"].split(",") if k.strip())
    for field_ in ("persist_seconds", "cooldown_seconds"):
        text = texts[field_]
        if text is not None:
            try:
                values[field_] = float(text)
            except ValueError:
                raise ConfigError(
                    _POLICY_ENV[field_], text, "a number of seconds >= 0, e.g. 300"
                ) from None
    text = texts["daily_cap"]
    if text is not None:
        try:
            values["daily_cap"] = int(text)
        except ValueError:
            raise ConfigError(TRIGGER_CAP_ENV, text, "a whole number >= 1, e.g. 3") from None
    try:
        return TriggerPolicy(**values)
    except ConfigError as err:  # the policy's own checks, named after the variable
        allowed = err.allowed
        if err.argument == "kinds":
            allowed = f"comma-separated alert kinds among {', '.join(ALERT_KINDS)}"
        raise ConfigError(_POLICY_ENV[err.argument], texts[err.argument], allowed) from None
