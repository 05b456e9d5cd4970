"""Windows: bulk ingest from remote monitors, and reads of a model version's windows."""

from __future__ import annotations

import base64
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Query, Request, Response
from pydantic import AwareDatetime, BeforeValidator

from bnwatch.codec import encode_arrays, encode_moments
from bnwatch.schema import SCHEMA_VERSION
from bnwatch.service.deps import Authorized, RepositoryDep, SettingsDep, StateDep
from bnwatch.service.errors import ApiError
from bnwatch.service.routes.common import (
    MAX_PAGE,
    ModelName,
    PageAfter,
    Text,
    VersionName,
    check_content_type,
    error_response,
    ingest_responses,
    link_next,
    not_found,
    paged_answer,
    parse_cursor,
    read_body,
)
from bnwatch.service.schemas import WindowPublic
from bnwatch.stats import ChannelMoments
from bnwatch.store.repository import Repository, WindowKey
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


_SPACE_FOR_PLUS = re.compile(r"[0-9]{2}:[0-9]{2}(:[0-9]{2}([.,][0-9]+)?)? [0-9]{2}(:?[0-9]{2})?$")
"""A time of day followed by a space and an offset without its sign: ``12:02:00 00:00``."""


def _plus_decoded_as_space(value: Any) -> Any:
    """Refuse a time whose ``+`` offset arrived as a space, saying why: in a URL's query a
    ``+`` means a space, so ``?start=2026-03-01T12:02:00+00:00`` typed as is (curl, a
    browser) reaches the service as ``12:02:00 00:00`` -- which pydantic calls "unexpected
    extra characters"."""
    if isinstance(value, str) and _SPACE_FOR_PLUS.search(value):
        time, offset = value.rsplit(" ", 1)
        raise ValueError(
            f"{value!r} has a space where its UTC offset's sign should be: a + in a URL "
            f"query means a space, so write + as %2B in a URL ({time}%2B{offset}), or use Z "
            "for a time in UTC"
        )
    return value


QueryTime = Annotated[AwareDatetime, BeforeValidator(_plus_decoded_as_space)]
"""A time given as a query parameter: ISO 8601 with a zone (``Z``, or an offset whose ``+`` is
written ``%2B``)."""

TIME_HELP = "(ISO 8601 with a zone: Z, or an offset with its + written %2B in a URL)"


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
    summary="Windows of a model version (a page at a time)",
    responses={
        200: paged_answer("the page's windows"),
        404: error_response("unknown model version or layer"),
        422: error_response("invalid parameter"),
    },
)
def list_windows(
    model: ModelName,
    version: VersionName,
    request: Request,
    response: Response,
    repository: RepositoryDep,
    settings: SettingsDep,
    layer: Annotated[Text | None, Query(description="only this layer")] = None,
    start: Annotated[
        QueryTime | None, Query(description=f"windows ending at or after this time {TIME_HELP}")
    ] = None,
    end: Annotated[
        QueryTime | None, Query(description=f"windows ending before this time {TIME_HELP}")
    ] = None,
    source: Annotated[Text | None, Query(description="only windows of this monitor")] = None,
    resolution: Annotated[
        float | None,
        Query(
            ge=1,
            le=MAX_RESOLUTION_SECONDS,
            allow_inf_nan=False,
            description="merge windows into epoch-aligned buckets of this many seconds "
            "(exactly: metrics are recomputed from the merged statistics, and flags decided at "
            "the thresholds that decided the stored windows' flags)",
        ),
    ] = None,
    stats: Annotated[bool, Query(description="include per-channel mean and variances")] = False,
    limit: Annotated[
        int,
        Query(
            ge=1,
            le=MAX_PAGE,
            description=f"at most this many windows (at most {MAX_PAGE:,}, the default); the "
            'Link header (rel="next") gives the next page',
        ),
    ] = MAX_PAGE,
    after: PageAfter = None,
) -> list[WindowPublic]:
    """Windows whose end lies in ``[start, end)``, by layer depth, then time, at most ``limit``
    (1,000) per answer.

    When more follow, the answer has a ``Link: <URL>; rel="next"`` header: the same query
    with ``after=`` set to a cursor -- the last window's place in that order, not an offset:
    windows stored while the pages are read shift nothing, none is shown twice.  With
    ``resolution`` the pages are of merged windows; every page merges the whole range (all
    layers of a bucket are judged together), so a coarser resolution or a narrower range
    is cheaper than paging.  Only ``stats=true`` reads the windows' per-channel statistics
    (merging reads them to merge them, and answers without them unless asked).
    """
    start_utc, end_utc = _utc(start, "start"), _utc(end, "end")
    if start_utc is not None and end_utc is not None and end_utc <= start_utc:
        raise ApiError(422, "end: must be after start", field="end")
    cursor = parse_cursor(after, WindowKey.parse)
    _check_exists(repository, model, version, layer)
    try:
        page = repository.window_page(
            model,
            version,
            layer=layer,
            start=start_utc,
            end=end_utc,
            source=source,
            resolution=resolution,
            with_stats=stats,
            reservoirs=False,  # no answer holds one
            # merged buckets are judged as their windows were: at the thresholds the monitors
            # (or this service, when it recomputes) stored, else at the service's own
            config=(repository.drift_config(model, version) or settings.drift)
            if resolution
            else None,
            limit=limit,
            after=cursor,
        )
    except KeyError:  # the model version was deleted meanwhile
        raise not_found(model, version) from None
    link_next(request, response, page.next)
    return [WindowPublic.of(w, with_stats=stats) for w in page.windows]


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
