"""The application factory: ``create_app(settings, engine=..., on_stored=...)``.

No module-level engine or app: each :func:`create_app` call builds one app around one engine
(injected, or created from ``settings.database_url``), so tests and processes build as many
as they need.  ``bnwatch serve`` runs :func:`app_from_env` in each uvicorn worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from importlib import metadata
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy.engine import Engine

from bnwatch.alerts import AlertChange
from bnwatch.service import errors
from bnwatch.service.deps import ServiceState
from bnwatch.service.ingest import Ingestor, OnStored
from bnwatch.service.routes import (
    alerts,
    health,
    metrics,
    models,
    profiles,
    recalibrations,
    windows,
)
from bnwatch.service.settings import TOKEN_ENV, WEBHOOK_SECRET_ENV, WEBHOOK_URL_ENV, Settings
from bnwatch.service.triggers import TriggerRunner
from bnwatch.store.engine import redacted
from bnwatch.store.migrate import engine_for, ensure_schema, head_revision
from bnwatch.store.repository import Repository
from bnwatch.wire import WindowBatch, WireProfile, WireRecalibrationOutcome

if TYPE_CHECKING:
    from bnwatch.alerts import AlertConfig

logger = logging.getLogger("bnwatch.service")

LOG_LEVEL_ENV = "BNWATCH_LOG_LEVEL"
ALERTS_CONFIG_ENV = "BNWATCH_ALERTS_CONFIG"
"""A TOML file with the alert thresholds (``[alerts]`` table) of ``bnwatch serve``."""

DESCRIPTION = """\
bnwatch's service: remote monitors POST closed windows of BatchNorm statistics and reference
profiles; the dashboard, Prometheus and operators read models, layers, windows, alerts and
recalibrations.

Ingest (windows, profiles and recalibration outcomes) requires `Authorization: Bearer
<BNWATCH_API_TOKEN>`.  Every
error is JSON: `{"error": {"message": "...", "field": "windows.0.layers.3.channels" | null}}`.
"""


def _version() -> str:
    # not ``bnwatch.__version__``: importing the top-level package would bring its lazy
    # torch-backed API into the service's import graph (import-linter counts it)
    try:
        return metadata.version("bnwatch")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


def create_app(
    settings: Settings,
    *,
    engine: Engine | None = None,
    on_stored: OnStored | None = None,
    periodic: Callable[[Repository], object] | None = None,
    period_seconds: float = 60.0,
    triggers: TriggerRunner | None = None,
) -> FastAPI:
    """The bnwatch FastAPI app.

    Args:
        settings: the service's settings (``Settings.from_env()`` in ``bnwatch serve``).
        engine: the store's engine; by default one is created from ``settings.database_url``
            and disposed when the app shuts down (an injected engine is left to its owner).
            Either way an empty database gets the current schema, and a database at another
            schema revision raises :class:`~bnwatch.store.engine.SchemaError` saying what
            to do.
        on_stored: called as ``on_stored(repository, records)`` in the ingest thread after
            every ingest transaction that stored at least one window (e.g.
            ``AlertEngine().on_stored``); its exceptions are logged and never fail the
            request.
        periodic: run as ``periodic(repository)`` in a worker thread every
            ``period_seconds`` while the app is up (``AlertEngine().check_silence``: the
            no-data alerts, which no ingest can raise); exceptions are logged.
        triggers: the recalibration triggers; by default the webhook trigger of
            ``settings`` (:meth:`TriggerRunner.from_settings
            <bnwatch.service.triggers.TriggerRunner.from_settings>`; ``None`` without
            ``settings.webhook_url``).  The alert changes that ``on_stored`` and ``periodic``
            return (``AlertEngine.on_stored`` and ``check_silence`` return theirs) are claimed
            in the calling thread, and the periodic job also claims the open alerts
            (:meth:`~bnwatch.triggers.Trigger.claim_open`: ``persist_seconds``); the actions
            run on the runner's background thread, started and stopped with the app.
    """
    owns_engine = engine is None
    if engine is None:
        engine = engine_for(settings.database_url, argument="database_url")
    else:
        ensure_schema(engine)
    repository = Repository(engine)
    if triggers is None:
        triggers = TriggerRunner.from_settings(settings)
    if triggers is not None:
        on_stored = _triggering(on_stored, triggers)
        periodic = _triggering_periodic(periodic, triggers)
    state = ServiceState(
        settings=settings,
        engine=engine,
        repository=repository,
        ingestor=Ingestor(repository, settings.drift, on_stored, recompute=settings.recompute),
        head_revision=head_revision(),
        triggers=triggers,
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        logger.info(
            "bnwatch service: store %s; ingest %s",
            redacted(engine.url),
            "requires a bearer token"
            if settings.api_token
            else f"DISABLED (set {TOKEN_ENV} to accept windows)",
        )
        if triggers is not None:
            logger.info("bnwatch service: recalibration triggers ON: %s", triggers.describe())
            triggers.start()
        else:
            logger.info(
                "bnwatch service: recalibration triggers off (set %s and %s to turn them on)",
                WEBHOOK_URL_ENV,
                WEBHOOK_SECRET_ENV,
            )
        task = (
            asyncio.create_task(_every(period_seconds, periodic, repository)) if periodic else None
        )
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if triggers is not None:
                await asyncio.to_thread(triggers.stop)
            if owns_engine:
                engine.dispose()

    app = FastAPI(
        title="bnwatch",
        version=_version(),
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.bnwatch = state
    errors.install(app)
    for module in (windows, profiles, models, alerts, recalibrations, health, metrics):
        app.include_router(module.router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            _document_body(
                schema,
                "/api/v1/windows",
                WindowBatch,
                "one window",
                "one window of one layer with two channels",
                windows.example_batch(),
            )
            _document_body(
                schema,
                profiles.ENDPOINT,
                WireProfile,
                "one layer",
                "a profile of one layer with two channels",
                profiles.example_profile(),
            )
            _document_body(
                schema,
                recalibrations.OUTCOME_ENDPOINT,
                WireRecalibrationOutcome,
                "applied",
                "an applied recalibration of one layer with two channels",
                recalibrations.example_outcome(),
            )
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _document_body(
    schema: dict[str, Any],
    path: str,
    model: type[BaseModel],
    example: str,
    summary: str,
    value: dict[str, Any],
) -> None:
    """Add ``model``'s schema (and an example) for the body ``POST path`` reads itself."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    body = model.model_json_schema(ref_template="#/components/schemas/{model}")
    for name, definition in body.pop("$defs", {}).items():
        components.setdefault(name, definition)
    components[model.__name__] = body
    content = schema["paths"][path]["post"]["requestBody"]["content"]
    examples = content["application/json"].setdefault("examples", {})  # keep the route's own
    content["application/json"]["examples"] = {
        example: {"summary": summary, "value": value},
        **examples,
    }


def _alert_changes(value: object) -> list[AlertChange]:
    """The alert changes a hook returned (``AlertEngine.on_stored``/``check_silence``), else
    none."""
    if isinstance(value, (list, tuple)):
        return [change for change in value if isinstance(change, AlertChange)]
    return []


def _triggering(on_stored: OnStored | None, triggers: TriggerRunner) -> OnStored:
    """``on_stored``, then the triggers claim (and queue) the alerts it opened."""

    def hook(repository: Repository, records: list[Any]) -> object:
        changes = on_stored(repository, records) if on_stored is not None else None
        triggers.on_alerts(repository, _alert_changes(changes))
        return changes

    return hook


def _triggering_periodic(
    periodic: Callable[[Repository], object] | None, triggers: TriggerRunner
) -> Callable[[Repository], object]:
    """``periodic``, then the triggers claim the alerts it opened and the open alerts whose
    time has come (even when ``periodic`` failed)."""

    def job(repository: Repository) -> None:
        changes: list[AlertChange] = []
        if periodic is not None:
            try:
                changes = _alert_changes(periodic(repository))
            except Exception:
                logger.exception("bnwatch service: the periodic job failed")
        triggers.on_alerts(repository, changes)
        triggers.check_open(repository)

    return job


async def _every(
    seconds: float, job: Callable[[Repository], object], repository: Repository
) -> None:
    """Run ``job(repository)`` in a thread every ``seconds`` until cancelled."""
    while True:
        await asyncio.sleep(seconds)
        try:
            await asyncio.to_thread(job, repository)
        except Exception:
            logger.exception("bnwatch service: the periodic job failed")


def alert_config_from_env(environ: Mapping[str, str] | None = None) -> AlertConfig:
    """Alert thresholds from the TOML file named by ``$BNWATCH_ALERTS_CONFIG`` (defaults
    when unset)."""
    from bnwatch.alerts import AlertConfig

    path = (os.environ if environ is None else environ).get(ALERTS_CONFIG_ENV, "").strip()
    return AlertConfig.from_toml(path) if path else AlertConfig()


def alert_hook_from_env(environ: Mapping[str, str] | None = None) -> OnStored:
    """``AlertEngine(config).on_stored``, thresholds from the TOML file named by
    ``$BNWATCH_ALERTS_CONFIG`` (the defaults when unset)."""
    from bnwatch.alerts import AlertEngine

    return AlertEngine(alert_config_from_env(environ)).on_stored


def app_from_env() -> FastAPI:
    """The app of one ``bnwatch serve`` worker: settings from ``BNWATCH_*`` variables, alerts
    evaluated after every stored batch, bnwatch's log records at ``$BNWATCH_LOG_LEVEL``
    (default ``info``) on stderr (each worker is a process of its own)."""
    level = os.environ.get(LOG_LEVEL_ENV, "info").strip().upper() or "INFO"
    logging.basicConfig(format="%(levelname)s:     %(message)s")
    logging.getLogger("bnwatch").setLevel(level)
    from bnwatch.alerts import AlertEngine

    engine = AlertEngine(alert_config_from_env())
    return create_app(
        Settings.from_env(), on_stored=engine.on_stored, periodic=engine.check_silence
    )
