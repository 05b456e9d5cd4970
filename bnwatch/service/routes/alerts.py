"""Alerts (opened and resolved by the alert engine after each stored batch)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from bnwatch.service.deps import RepositoryDep
from bnwatch.service.routes.common import Text
from bnwatch.service.schemas import AlertPublic, AlertState

router = APIRouter(tags=["alerts"])


@router.get("/api/v1/alerts", response_model=list[AlertPublic], summary="Alerts")
def list_alerts(
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
) -> list[AlertPublic]:
    """Alerts, newest first (an unknown model or version gives an empty list).

    ``acknowledged`` is not a stored state (acknowledging an alert sets ``acknowledged_at``
    and leaves it open): it selects the open alerts whose ``acknowledged_at`` is set.
    """
    if state == "acknowledged":
        alerts = repository.alerts(model=model, version=version, state="open")
        alerts = [info for info in alerts if info.acknowledged_at is not None]
    else:
        alerts = repository.alerts(model=model, version=version, state=state)
    return [AlertPublic.of(info) for info in alerts]
