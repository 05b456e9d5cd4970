"""``GET /metrics``: the store's latest state in the Prometheus text format, read at scrape
time by :class:`bnwatch.export.store.StoreCollector` (one registry per app)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter
from fastapi.responses import Response

from bnwatch.service.deps import ServiceState, StateDep

router = APIRouter(tags=["metrics"])


def _scrape(state: ServiceState) -> bytes:
    from prometheus_client import generate_latest

    body: bytes = generate_latest(state.metrics_registry())
    return body


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format"}},
)
async def metrics(state: StateDep) -> Response:
    """Per model, version and layer: latest metrics, running totals, monitors, open alerts."""
    from prometheus_client import CONTENT_TYPE_LATEST

    body = await anyio.to_thread.run_sync(_scrape, state)
    return Response(content=body, media_type=CONTENT_TYPE_LATEST)
