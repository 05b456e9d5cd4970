"""Model versions and their layers."""

from __future__ import annotations

from fastapi import APIRouter

from bnwatch.service.deps import RepositoryDep
from bnwatch.service.errors import ErrorResponse
from bnwatch.service.routes.common import ModelName, VersionName, not_found
from bnwatch.service.schemas import LayerPublic, ModelPublic

router = APIRouter(tags=["models"])


@router.get("/api/v1/models", response_model=list[ModelPublic], summary="Stored model versions")
def list_models(repository: RepositoryDep) -> list[ModelPublic]:
    """Every stored model version, most recent activity first."""
    return [ModelPublic.of(info) for info in repository.models()]


@router.get(
    "/api/v1/models/{model}/versions/{version}/layers",
    response_model=list[LayerPublic],
    summary="Layers of a model version",
    responses={404: {"model": ErrorResponse, "description": "unknown model version"}},
)
def list_layers(
    model: ModelName, version: VersionName, repository: RepositoryDep
) -> list[LayerPublic]:
    """The BatchNorm layers of a model version, in depth order."""
    try:
        layers = repository.layers(model, version)
    except KeyError:
        raise not_found(model, version) from None
    return [LayerPublic.of(info) for info in layers]
