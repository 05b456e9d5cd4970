"""Dependencies of the routes, as ``Annotated`` aliases: ``StateDep``, ``SettingsDep``,
``RepositoryDep`` and ``Authorized`` (the bearer-token check of ingest).

Everything a route needs hangs off ``app.state.bnwatch`` (a :class:`ServiceState`), built by
:func:`bnwatch.service.create_app`: no module-level engine, app or settings.
"""

from __future__ import annotations

import hmac
import threading
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.engine import Engine

from bnwatch.service.errors import ApiError
from bnwatch.service.ingest import Ingestor
from bnwatch.service.settings import TOKEN_ENV, Settings
from bnwatch.service.triggers import TriggerRunner
from bnwatch.store.repository import Repository


@dataclass
class ServiceState:
    """The per-app state every request reads."""

    settings: Settings
    engine: Engine
    repository: Repository
    ingestor: Ingestor
    head_revision: str
    triggers: TriggerRunner | None = None
    _limiter: anyio.CapacityLimiter | None = field(default=None, repr=False)
    _registry: Any = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def ingest_limiter(self) -> anyio.CapacityLimiter:
        """Bounds ingest requests in worker threads (created in the event loop, on first use)."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.settings.ingest_threads)
        return self._limiter

    def metrics_registry(self) -> Any:
        """This app's Prometheus registry with a ``StoreCollector`` and, with triggers, a
        ``TriggerQueueCollector`` of their queue (created on first scrape; ``bnwatch.export``
        is imported only then)."""
        with self._lock:
            if self._registry is None:
                from prometheus_client import CollectorRegistry

                from bnwatch.export.service import TriggerQueueCollector
                from bnwatch.export.store import StoreCollector

                registry = CollectorRegistry()
                registry.register(StoreCollector(self.repository))
                if self.triggers is not None:
                    registry.register(TriggerQueueCollector(self.triggers))
                self._registry = registry
            return self._registry


def get_state(request: Request) -> ServiceState:
    state: ServiceState = request.app.state.bnwatch
    return state


def get_settings(request: Request) -> Settings:
    return get_state(request).settings


def get_repository(request: Request) -> Repository:
    return get_state(request).repository


StateDep = Annotated[ServiceState, Depends(get_state)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
RepositoryDep = Annotated[Repository, Depends(get_repository)]

bearer_scheme = HTTPBearer(
    auto_error=False,
    scheme_name="bearer",
    description=f"the service's API token (${TOKEN_ENV}), as `Authorization: Bearer <token>`",
)


async def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> None:
    """Admit the request only with the service's bearer token (compared in constant time).

    Raises:
        ApiError: 503 when the service has no token (ingest is then disabled), 401 with
            ``WWW-Authenticate: Bearer`` when the token is missing or wrong.
    """
    expected = settings.api_token
    if expected is None:
        raise ApiError(
            503,
            f"ingest is disabled because the service has no API token: set {TOKEN_ENV} where "
            "the service runs, restart it, and send that token as 'Authorization: Bearer <token>'",
        )
    if credentials is None:
        raise ApiError(
            401,
            "missing bearer token: send 'Authorization: Bearer <token>' with the service's "
            f"{TOKEN_ENV}",
            headers={"WWW-Authenticate": "Bearer"},
        )
    given = credentials.credentials.encode("utf-8", "surrogateescape")
    if not hmac.compare_digest(given, expected.encode("utf-8")):
        raise ApiError(
            401,
            f"invalid bearer token: send the service's {TOKEN_ENV}",
            headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
        )


Authorized = Annotated[None, Depends(require_token)]
