"""Windows: bulk ingest from remote monitors, and reads of a model version's windows."""

from __future__ import annotations

import base64
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request
from pydantic import AwareDatetime

from bnwatch.codec import encode_arrays, encode_moments
from bnwatch.schema import SCHEMA_VERSION
from bnwatch.service.deps import Authorized, RepositoryDep, SettingsDep, StateDep
from bnwatch.service.errors import ApiError
from bnwatch.service.routes.common import (
    ModelName,
    Text,
    VersionName,
    check_content_type,
    error_response,
    ingest_responses,
    not_found,
    read_body,
)
from bnwatch.service.schemas import WindowPublic
from bnwatch.stats import ChannelMoments
from bnwatch.store.repository import Repository, StoredWindow
from bnwatch.wire import IngestResult

router = APIRouter(tags=["windows"])

MAX_RESOLUTION_SECONDS = 10 * 366 * 86400
"""Coarsest ``resolution`` of a windows query (ten years)."""


def example_batch() -> dict[str, Any]:
    """A small valid ``WindowBatch`` (one window, one layer of two channels) for the docs."""
    rng = np.random.default_rng(0)
    moments = ChannelMoments.from_rows(rng.normal(size=(8, 2)), rng.gamma(4.0, 0.25, (8, 2)), 64.0)
    running = np.array([[0.0, 0.1], [1.0, 0.9]])
    start = datetime(2025, 6, 1, 12, 0, tzinfo=timezone.utc)
    return {
        "schema_version": SCHEMA_VERSION,
        "windows": [
            {
                "uid": "0123456789abcdef0123456789abcdef",
                "model": "resnet50",
                "version": "2025-06-01",
                "source": "replica-1",
                "start": start.isoformat(),
                "end": (start + timedelta(minutes=1)).isoformat(),
                "monitor": {"overhead_ratio": 0.01, "windows_dropped": 0, "hook_errors": 0},
                "layers": [
                    {
                        "layer": "bn1",
                        "kind": "BatchNorm2d",
                        "channels": 2,
                        "depth": 0,
                        "eps": 1e-5,
                        "moments": base64.b64encode(encode_moments(moments)).decode(),
                        "running": base64.b64encode(encode_arrays(running)).decode(),
                        "baseline": None,
                        "batch_sizes": {"4": 2},
                        "n_batches": 2,
                        "batches_seen": 2,
                        "samples_seen": 8,
                        "batch_stat_batches": 0,
                        "running_stats_mutated": False,
                    }
                ],
            }
        ],
    }


INGEST_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "closed windows (bnwatch.wire.WindowBatch), at most max_body_bytes",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/WindowBatch"}}},
    }
}
"""The body, documented by hand: the route reads it itself, bounded, and parses it in a
thread (FastAPI would parse it on the event loop).  ``create_app`` adds the schema and the
example."""


@router.post(
    "/api/v1/windows",
    response_model=IngestResult,
    summary="Store closed windows (bulk, one transaction)",
    responses=ingest_responses("WindowBatch"),
    openapi_extra=INGEST_BODY,
)
async def ingest_windows(request: Request, state: StateDep, _: Authorized) -> IngestResult:
    """Store the windows of a ``WindowBatch`` in one transaction, all or nothing.

    The metrics each layer carries -- computed by its monitor, with the monitor's drift
    configuration -- are stored as sent.  A window with a layer that carries none has every
    metric recomputed from the sufficient statistics with the service's drift configuration;
    a service started with ``BNWATCH_RECOMPUTE=1`` recomputes every window's metrics that way.
    A window whose ``uid`` is already stored (a retried delivery) counts as a duplicate and
    is not stored again.
    """
    check_content_type(request)
    body = await read_body(request, state.settings.max_body_bytes)
    return await anyio.to_thread.run_sync(
        state.ingestor.ingest, body, limiter=state.ingest_limiter()
    )


def _utc(value: datetime | None, name: str) -> datetime | None:
    if value is None:
        return None
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise ApiError(422, f"{name}: out of range once converted to UTC", field=name) from None


def _check_exists(repository: Repository, model: str, version: str, layer: str | None) -> None:
    """404 for an unknown model version or layer."""
    try:
        layers = repository.layers(model, version)
    except KeyError:
        raise not_found(model, version) from None
    if layer is not None and layer not in {info.name for info in layers}:
        raise ApiError(
            404,
            f"layer: model {model!r} version {version!r} has no layer {layer!r} "
            f"(GET /api/v1/models/{model}/versions/{version}/layers lists them)",
            field="layer",
        )


@router.get(
    "/api/v1/models/{model}/versions/{version}/windows",
    response_model=list[WindowPublic],
    summary="Windows of a model version",
    responses={
        404: error_response("unknown model version or layer"),
        422: error_response("invalid parameter"),
    },
)
def list_windows(
    model: ModelName,
    version: VersionName,
    repository: RepositoryDep,
    settings: SettingsDep,
    layer: Annotated[Text | None, Query(description="only this layer")] = None,
    start: Annotated[
        AwareDatetime | None, Query(description="windows ending at or after (ISO 8601, with zone)")
    ] = None,
    end: Annotated[
        AwareDatetime | None, Query(description="windows ending before (ISO 8601, with zone)")
    ] = None,
    source: Annotated[Text | None, Query(description="only windows of this monitor")] = None,
    resolution: Annotated[
        float | None,
        Query(
            ge=1,
            le=MAX_RESOLUTION_SECONDS,
            description="merge windows into epoch-aligned buckets of this many seconds "
            "(exactly: metrics are recomputed from the merged statistics, and flags decided at "
            "the thresholds that decided the stored windows' flags)",
        ),
    ] = None,
    stats: Annotated[bool, Query(description="include per-channel mean and variances")] = False,
) -> list[WindowPublic]:
    """Windows whose end lies in ``[start, end)``, by layer depth then time."""
    start_utc, end_utc = _utc(start, "start"), _utc(end, "end")
    if start_utc is not None and end_utc is not None and end_utc <= start_utc:
        raise ApiError(422, "end: must be after start", field="end")
    _check_exists(repository, model, version, layer)
    try:
        windows: list[StoredWindow] = repository.windows(
            model,
            version,
            layer=layer,
            start=start_utc,
            end=end_utc,
            source=source,
            resolution=resolution,
            with_stats=stats,
            # merged buckets are judged as their windows were: at the thresholds the monitors
            # (or this service, when it recomputes) stored, else at the service's own
            config=(repository.drift_config(model, version) or settings.drift)
            if resolution
            else None,
        )
    except KeyError:  # the model version was deleted meanwhile
        raise not_found(model, version) from None
    return [WindowPublic.of(w, with_stats=stats) for w in windows]


@router.get(
    "/api/v1/models/{model}/versions/{version}/windows/latest",
    response_model=list[WindowPublic],
    summary="The latest window of every layer",
    responses={
        404: error_response("unknown model version"),
        422: error_response("invalid parameter"),
    },
)
def latest_windows(
    model: ModelName,
    version: VersionName,
    repository: RepositoryDep,
    stats: Annotated[bool, Query(description="include per-channel mean and variances")] = False,
) -> list[WindowPublic]:
    """The most recent window of every layer of a model version, in depth order."""
    try:
        windows = repository.latest_windows(model, version, with_stats=stats)
    except KeyError:
        raise not_found(model, version) from None
    return [WindowPublic.of(w, with_stats=stats) for w in windows]
