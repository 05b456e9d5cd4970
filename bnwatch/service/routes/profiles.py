"""Reference profiles: uploads from ``bnwatch.profile(..., store="http(s)://...")``, and the
stored profile of a model version for ``bnwatch.load_profile``."""

from __future__ import annotations

import functools
from datetime import datetime, timezone
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter, Request

from bnwatch.schema import LayerProfile, Profile
from bnwatch.service.deps import Authorized, RepositoryDep, StateDep
from bnwatch.service.errors import ApiError
from bnwatch.service.ingest import ingest_profile
from bnwatch.service.routes.common import (
    ModelName,
    VersionName,
    check_content_type,
    error_response,
    ingest_responses,
    not_found,
    read_body,
)
from bnwatch.service.settings import MAX_PROFILE_ENV
from bnwatch.stats import ChannelMoments, LayerStats, Reservoir
from bnwatch.wire import ProfileResult, WireProfile, profile_body

router = APIRouter(tags=["profiles"])

ENDPOINT = "/api/v1/profiles"
TOO_LARGE_ADVICE = "record the profile with a smaller reservoir_size, or raise the service's limit"


def example_profile() -> dict[str, Any]:
    """A small valid ``WireProfile`` (one layer of two channels) for the docs."""
    rng = np.random.default_rng(0)
    means = rng.normal(size=(8, 2))
    moments = ChannelMoments.from_rows(means, rng.gamma(4.0, 0.25, (8, 2)), 64.0)
    layer = LayerProfile(
        layer="bn1",
        kind="BatchNorm2d",
        eps=1e-5,
        stats=LayerStats(
            moments=moments, batch_sizes={4: 2}, n_batches=2, batches_seen=2, samples_seen=8
        ),
        reservoir=Reservoir.from_rows(means[:4], seen=8, capacity=4),
        running_mean=np.array([0.0, 0.1]),
        running_var=np.array([1.0, 0.9]),
    )
    created = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
    profile = Profile(name="resnet50", version="2025-06-01", created=created, layers={"bn1": layer})
    return profile_body(profile)


PROFILE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "a reference profile (bnwatch.wire.WireProfile), at most max_profile_bytes",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/WireProfile"}}},
    }
}
"""The body, documented by hand as for windows: the route reads it itself, bounded, and
parses it in a thread.  ``create_app`` adds the schema and the example."""


@router.post(
    ENDPOINT,
    response_model=ProfileResult,
    summary="Store a reference profile (one transaction)",
    responses=ingest_responses("WireProfile"),
    openapi_extra=PROFILE_BODY,
)
async def ingest_profile_route(request: Request, state: StateDep, _: Authorized) -> ProfileResult:
    """Store a reference profile of a model version (kind ``profile``, with its reservoirs)
    in one transaction, all or nothing; the dashboard and ``bnwatch report`` use it.

    References are deduplicated by their statistics: sending the same profile again stores
    nothing and answers the same reference ids.  A layer whose channel count differs from
    the layer already stored under that name is refused (409) and nothing is stored.
    """
    check_content_type(request)
    body = await read_body(
        request,
        state.settings.max_profile_bytes,
        advice=TOO_LARGE_ADVICE,
        setting=MAX_PROFILE_ENV,
    )
    return await anyio.to_thread.run_sync(
        functools.partial(ingest_profile, state.repository, body),
        limiter=state.ingest_limiter(),
    )


@router.get(
    "/api/v1/models/{model}/versions/{version}/profile",
    response_model=WireProfile,
    summary="The reference profile of a model version",
    responses={404: error_response("unknown model version, or no profile stored for it")},
)
def read_profile(model: ModelName, version: VersionName, repository: RepositoryDep) -> Any:
    """The newest stored reference profile of a model version, in the form ``POST
    /api/v1/profiles`` takes: for monitors to judge drift against it
    (``bnwatch.load_profile("http://...", model, version)``)."""
    try:
        profile = repository.load_profile(model, version)
    except KeyError:
        raise not_found(model, version) from None
    if profile is None or not profile.layers:
        raise ApiError(
            404,
            f"no reference profile of model {model!r} version {version!r} is stored (record "
            "one with bnwatch profile, or bnwatch.profile(..., store=...))",
        )
    return profile_body(profile)
