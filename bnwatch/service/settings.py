"""The service's settings: one frozen value, built from the environment by ``bnwatch serve``.

===============================  ===============================================  =================
environment variable             meaning                                          default
===============================  ===============================================  =================
``BNWATCH_DATABASE_URL``         SQLAlchemy URL of the store                      ``sqlite:///bnwatch.db``
``BNWATCH_API_TOKEN``            bearer token that ``POST /api/v1/windows``       unset: ingest is
                                 and ``/api/v1/profiles`` require                 refused (503)
``BNWATCH_MAX_BODY_BYTES``       largest request body accepted (413 above)        64 MiB
``BNWATCH_MAX_PROFILE_BYTES``    largest profile upload accepted (413 above)      256 MiB
``BNWATCH_INGEST_THREADS``       ingest requests processed at once per process    4
===============================  ===============================================  =================

Ingest **requires** a token: a service started without ``BNWATCH_API_TOKEN`` serves every read
endpoint but answers ``POST /api/v1/windows`` and ``POST /api/v1/profiles`` with 503 and a
message saying to set it (503, not 401: the sender's token is not wrong, the service is not
configured -- and HTTP sinks retry a 503 with backoff, so delivery resumes once the operator
sets the token).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from bnwatch.drift import DriftConfig
from bnwatch.errors import ConfigError, check_positive_int
from bnwatch.store.engine import DEFAULT_URL

DATABASE_ENV = "BNWATCH_DATABASE_URL"
TOKEN_ENV = "BNWATCH_API_TOKEN"
MAX_BODY_ENV = "BNWATCH_MAX_BODY_BYTES"
MAX_PROFILE_ENV = "BNWATCH_MAX_PROFILE_BYTES"
INGEST_THREADS_ENV = "BNWATCH_INGEST_THREADS"
RECOMPUTE_ENV = "BNWATCH_RECOMPUTE"

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
    """

    database_url: str = DEFAULT_URL
    api_token: str | None = field(default=None, repr=False)
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_profile_bytes: int = DEFAULT_MAX_PROFILE_BYTES
    drift: DriftConfig = field(default_factory=DriftConfig)
    ingest_threads: int = DEFAULT_INGEST_THREADS
    recompute: bool = False

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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from ``BNWATCH_*`` environment variables (see the module docstring);
        keyword ``overrides`` win over the environment.  An empty variable counts as unset."""
        env = os.environ if environ is None else environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        values: dict[str, Any] = {
            "database_url": get(DATABASE_ENV) or DEFAULT_URL,
            "api_token": get(TOKEN_ENV),
        }
        for attribute, name in (
            ("max_body_bytes", MAX_BODY_ENV),
            ("max_profile_bytes", MAX_PROFILE_ENV),
            ("ingest_threads", INGEST_THREADS_ENV),
        ):
            text = get(name)
            if text is not None:
                try:
                    values[attribute] = int(text)
                except ValueError:
                    raise ConfigError(name, text, "a whole number, e.g. 67108864") from None
        recompute = get(RECOMPUTE_ENV)
        if recompute is not None:
            if recompute.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ConfigError(RECOMPUTE_ENV, recompute, "1 or 0 (true/false)")
            values["recompute"] = recompute.lower() in ("1", "true", "yes")
        values.update(overrides)
        return cls(**values)

    def with_changes(self, **changes: Any) -> Settings:
        """A copy with some attributes changed (validated again)."""
        return replace(self, **changes)
