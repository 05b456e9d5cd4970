"""Recalibrations: triggered, validated, applied or rejected, with their lineage."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from bnwatch.service.deps import RepositoryDep
from bnwatch.service.routes.common import Text
from bnwatch.service.schemas import RecalibrationPublic

router = APIRouter(tags=["recalibrations"])


@router.get(
    "/api/v1/recalibrations", response_model=list[RecalibrationPublic], summary="Recalibrations"
)
def list_recalibrations(
    repository: RepositoryDep,
    model: Annotated[Text | None, Query(description="only this model")] = None,
    version: Annotated[Text | None, Query(description="only this version")] = None,
) -> list[RecalibrationPublic]:
    """Recalibrations, newest first (an unknown model or version gives an empty list)."""
    return [
        RecalibrationPublic.of(info)
        for info in repository.recalibrations(model=model, version=version)
    ]
