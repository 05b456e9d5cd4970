"""Alerts (opened and resolved by the alert engine after each stored batch)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from bnwatch.service.deps import RepositoryDep
from bnwatch.service.routes.common import (
    MAX_PAGE,
    PageAfter,
    PageLimit,
    Text,
    error_response,
    link_next,
    paged_answer,
    parse_cursor,
)
from bnwatch.service.schemas import AlertPublic, AlertState
from bnwatch.store.repository import NewestKey

router = APIRouter(tags=["alerts"])


@router.get(
    "/api/v1/alerts",
    response_model=list[AlertPublic],
    summary="Alerts (a page at a time)",
    responses={
        200: paged_answer("the page's alerts"),
        422: error_response("invalid parameter"),
    },
)
def list_alerts(
    request: Request,
    response: Response,
    repository: RepositoryDep,
    model: Annotated[Text | None, Query(description="only alerts of this model")] = None,
    version: Annotated[Text | None, Query(description="only alerts of this version")] = None,
    state: Annotated[
        AlertState | None,
        Query(
            description="only alerts in this state: open, resolved, or acknowledged (the open "
            "alerts a person has acknowledged: acknowledged_at is set)"
        ),
    ] = None,
    limit: PageLimit = MAX_PAGE,
    after: PageAfter = None,
) -> list[AlertPublic]:
    """Alerts, newest first (by ``opened_at``, then id), at most ``limit`` (1,000) per answer
    (an unknown model or version gives an empty list).

    When more follow, the answer has a ``Link: <URL>; rel="next"`` header: the same query
    with ``after=`` set to a cursor -- the last alert's place in that order, not an offset:
    alerts opened while the pages are read shift nothing, none is shown twice.

    ``acknowledged`` is not a stored state (acknowledging an alert sets ``acknowledged_at``
    and leaves it open): it selects the open alerts whose ``acknowledged_at`` is set.
    """
    cursor = parse_cursor(after, NewestKey.parse)
    page = repository.alert_page(
        model=model,
        version=version,
        state="open" if state == "acknowledged" else state,
        acknowledged=True if state == "acknowledged" else None,
        limit=limit,
        after=cursor,
    )
    link_next(request, response, page.next)
    return [AlertPublic.of(info) for info in page.alerts]
