"""Recalibrations: triggered, validated, applied or rejected, with their lineage; and the way
back -- whoever ran a pending recalibration (a webhook's receiver, ``bnwatch recalibrate
--recalibration ID``) reports how it ended."""

from __future__ import annotations

import functools
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Path, Query, Request, Response

from bnwatch.errors import RecalibrationNotFoundError
from bnwatch.service.deps import Authorized, RepositoryDep, StateDep
from bnwatch.service.errors import ApiError
from bnwatch.service.ingest import ingest_outcome
from bnwatch.service.routes.common import (
    MAX_PAGE,
    PageAfter,
    PageLimit,
    Text,
    check_content_type,
    error_response,
    link_next,
    paged_answer,
    parse_cursor,
    read_body,
)
from bnwatch.service.schemas import RecalibrationPublic
from bnwatch.service.settings import MAX_BODY_ENV
from bnwatch.store.repository import NewestKey
from bnwatch.wire import outcome_body

router = APIRouter(tags=["recalibrations"])

OUTCOME_ENDPOINT = "/api/v1/recalibrations/{recalibration_id}/outcome"
TOO_LARGE_ADVICE = "report the buffers of fewer layers, or raise the service's limit"
MAX_ID = 2**63 - 1
"""Largest id the store's keys hold (64-bit)."""

RecalibrationId = Annotated[
    int,
    Path(
        ge=1,
        le=MAX_ID,
        description="the recalibration's id (the trigger event's recalibration_id)",
    ),
]


@router.get(
    "/api/v1/recalibrations",
    response_model=list[RecalibrationPublic],
    summary="Recalibrations (a page at a time)",
    responses={
        200: paged_answer("the page's recalibrations"),
        422: error_response("invalid parameter"),
    },
)
def list_recalibrations(
    request: Request,
    response: Response,
    repository: RepositoryDep,
    model: Annotated[Text | None, Query(description="only this model")] = None,
    version: Annotated[Text | None, Query(description="only this version")] = None,
    limit: PageLimit = MAX_PAGE,
    after: PageAfter = None,
) -> list[RecalibrationPublic]:
    """Recalibrations, newest first (by ``created_at``, then id), at most ``limit`` (1,000)
    per answer (an unknown model or version gives an empty list).

    When more follow, the answer has a ``Link: <URL>; rel="next"`` header: the same query
    with ``after=`` set to a cursor (the last recalibration's place in that order), as for
    ``GET /api/v1/alerts``.
    """
    cursor = parse_cursor(after, NewestKey.parse)
    page = repository.recalibration_page(model=model, version=version, limit=limit, after=cursor)
    link_next(request, response, page.next)
    return [RecalibrationPublic.of(info) for info in page.recalibrations]


@router.get(
    "/api/v1/recalibrations/{recalibration_id}",
    response_model=RecalibrationPublic,
    summary="One recalibration",
    responses={404: error_response("no recalibration with this id")},
)
def get_recalibration(
    recalibration_id: RecalibrationId, repository: RepositoryDep
) -> RecalibrationPublic:
    """One recalibration: its status and outcome (e.g. whether a requested one is still
    ``pending`` before carrying it out)."""
    try:
        return RecalibrationPublic.of(repository.recalibration(recalibration_id))
    except RecalibrationNotFoundError as err:
        raise ApiError(404, str(err)) from err


def example_outcome() -> dict[str, Any]:
    """A small valid ``WireRecalibrationOutcome`` (an applied recalibration of one layer of two
    channels: the layer of the profile example) for the docs."""
    return outcome_body(
        "applied",
        {"method": "precise", "samples": 512, "kl_before": 0.41, "kl_after": 0.02},
        {"bn1": ([0.05, 0.12], [0.98, 0.91], 1e-5)},
    )


OUTCOME_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "how the recalibration ended (bnwatch.wire.WireRecalibrationOutcome), "
        "at most max_body_bytes",
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/WireRecalibrationOutcome"},
                "examples": {
                    "failed": {
                        "summary": "a recalibration that could not run",
                        "value": outcome_body(
                            "failed", {"error": "NotEnoughDataError: saw 3 samples, needs 16"}
                        ),
                    },
                },
            }
        },
    }
}
"""The body, documented by hand as for windows: the route reads it itself, bounded.
``create_app`` adds the schema and the ``applied`` example."""


@router.post(
    OUTCOME_ENDPOINT,
    response_model=RecalibrationPublic,
    summary="Report how a pending recalibration ended (one transaction)",
    responses={
        400: error_response("a malformed request (e.g. Content-Length)"),
        401: error_response("missing or wrong bearer token"),
        404: error_response("no recalibration with this id"),
        409: error_response(
            "the recalibration is no longer pending (the message names its status)"
        ),
        413: error_response("the body exceeds the service's limit"),
        415: error_response("the body is not JSON, or compressed"),
        422: error_response(
            "the body is not a valid WireRecalibrationOutcome, or a layer's buffers do not fit "
            "the stored layer (unknown layer, other channel count); the field is named"
        ),
        503: error_response("the service has no API token, or the database is unavailable"),
    },
    openapi_extra=OUTCOME_BODY,
)
async def report_outcome(
    recalibration_id: RecalibrationId, request: Request, state: StateDep, _: Authorized
) -> RecalibrationPublic:
    """Finish a pending recalibration -- ``applied``, ``rejected`` or ``failed`` -- with its
    outcome, in one transaction, all or nothing: the reply of a webhook's receiver, or of
    ``bnwatch recalibrate --recalibration ID``.

    With ``applied``, ``buffers`` (layer -> new ``running_mean``, ``running_var``, ``eps``) are
    stored as references of kind ``recalibrated`` with their lineage (the recalibration, its
    alert, its method), and the stored outcome lists them under ``references``.  A
    recalibration is finished once: a second report is refused (409) and changes nothing.
    """
    check_content_type(request)
    body = await read_body(
        request, state.settings.max_body_bytes, advice=TOO_LARGE_ADVICE, setting=MAX_BODY_ENV
    )
    info = await anyio.to_thread.run_sync(
        functools.partial(ingest_outcome, state.repository, recalibration_id, body),
        limiter=state.ingest_limiter(),
    )
    return RecalibrationPublic.of(info)
