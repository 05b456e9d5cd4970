"""``GET /healthz``: is the service up, and can it reach its database at the right schema?"""

from __future__ import annotations

import logging
from typing import Literal

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse

from bnwatch.service.deps import StateDep
from bnwatch.service.errors import ErrorBody
from bnwatch.service.schemas import HealthPublic
from bnwatch.store.migrate import current_revision, is_known_revision

router = APIRouter(tags=["health"])
logger = logging.getLogger("bnwatch.service")

HEALTH_TIMEOUT_SECONDS = 5.0
"""A database that does not answer within this is reported unreachable."""


class HealthError(HealthPublic):
    """``GET /healthz`` when the database is unreachable or at another schema."""

    error: ErrorBody


@router.get(
    "/healthz",
    response_model=HealthPublic,
    summary="Liveness and database health",
    responses={503: {"model": HealthError, "description": "the database is not usable"}},
)
async def healthz(state: StateDep) -> HealthPublic | JSONResponse:
    """200 when the database answers at the schema this service needs, else 503: the database
    is unreachable, outdated (behind: run ``bnwatch db upgrade``) or newer (a newer bnwatch
    migrated it to a revision this service does not know: upgrade this service)."""
    revision: str | None = None
    problem: str | None = None
    with anyio.move_on_after(HEALTH_TIMEOUT_SECONDS) as scope:
        try:
            revision = await anyio.to_thread.run_sync(
                current_revision, state.engine, abandon_on_cancel=True
            )
        except Exception as err:  # any failure to read the revision means "unreachable"
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            problem = f"the database is unreachable: {first[:200]}"
    if scope.cancelled_caught:
        problem = f"the database did not answer within {HEALTH_TIMEOUT_SECONDS:g} s"
    if problem is not None:
        logger.warning("bnwatch service: health check failed: %s", problem)
        body = HealthError(
            status="error",
            database="unreachable",
            schema_revision=None,
            error=ErrorBody(message=problem),
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    if revision != state.head_revision:
        # the revisions are read from the migration scripts once (then cached): not on the loop
        known = await anyio.to_thread.run_sync(is_known_revision, revision)
        if known:
            state_of_database: Literal["outdated", "newer"] = "outdated"
            message = (
                f"the database is at schema revision {revision or 'none'} but this service "
                f"needs {state.head_revision}: run `bnwatch db upgrade`"
            )
        else:  # `bnwatch db upgrade` of this version would refuse it: it is this service
            state_of_database = "newer"
            message = (
                f"the database is at schema revision {revision}, which this service's bnwatch "
                f"version does not know (it needs {state.head_revision}): a newer bnwatch "
                "migrated it -- upgrade this bnwatch service"
            )
        body = HealthError(
            status="error",
            database=state_of_database,
            schema_revision=revision,
            error=ErrorBody(message=message),
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    return HealthPublic(status="ok", database="ok", schema_revision=revision)
