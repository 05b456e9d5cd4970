"""Parameters and answers shared by the routes, and the request bodies of ingest (JSON,
uncompressed, bounded: :func:`check_content_type`, :func:`read_body`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Request
from pydantic import StringConstraints

from bnwatch.service.errors import ApiError, ErrorResponse
from bnwatch.service.settings import MAX_BODY_ENV

_NO_NUL = r"^[^\x00]+$"
_JSON_TYPES = ("application/json",)

Text = Annotated[str, StringConstraints(min_length=1, max_length=500, pattern=_NO_NUL)]
"""A name given as a query parameter (no NUL characters: the store cannot hold them)."""

ModelName = Annotated[
    str, Path(min_length=1, max_length=200, pattern=_NO_NUL, description="model name")
]
VersionName = Annotated[
    str, Path(min_length=1, max_length=200, pattern=_NO_NUL, description="model version")
]


def not_found(model: str, version: str) -> ApiError:
    """404 for a model version the store does not have."""
    return ApiError(
        404,
        f"no model {model!r} version {version!r} in the store (GET /api/v1/models lists them)",
    )


def error_response(description: str) -> dict[str, Any]:
    """An error answer of the OpenAPI ``responses`` of a route."""
    return {"model": ErrorResponse, "description": description}


def ingest_responses(body: str) -> dict[int | str, dict[str, Any]]:
    """The error answers of an ingest route whose body is a ``body`` (e.g. ``WindowBatch``)."""
    return {
        400: error_response("a malformed request (e.g. Content-Length)"),
        401: error_response("missing or wrong bearer token"),
        409: error_response(
            "a layer's channel count differs from the stored layer; nothing stored"
        ),
        413: error_response("the body exceeds the service's limit"),
        415: error_response("the body is not JSON, or compressed"),
        422: error_response(f"the body is not a valid {body}; the field is named"),
        503: error_response("the service has no API token, or the database is unavailable"),
    }


def check_content_type(request: Request) -> None:
    """415 unless the body is JSON (``application/json`` or ``*+json``) and uncompressed."""
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media not in _JSON_TYPES and not media.endswith("+json"):
            raise ApiError(
                415,
                f"the body must be JSON: send Content-Type: application/json, not {media!r}",
            )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ApiError(
            415, f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
        )


def _too_large(limit: int, advice: str, setting: str) -> ApiError:
    return ApiError(
        413,
        f"the request body exceeds the service's limit of {limit:,} bytes ({setting}): {advice}",
    )


async def read_body(
    request: Request,
    limit: int,
    *,
    advice: str = "send fewer windows per request",
    setting: str = MAX_BODY_ENV,
) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes:
    from ``Content-Length`` before reading, or while a chunked body streams in (``advice``
    ends the 413's message: what the sender can do; ``setting`` names the variable that
    raises the limit)."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            length = int(declared)
        except ValueError:
            length = -1
        if length < 0:
            raise ApiError(400, f"Content-Length {declared!r} is not a byte count")
        if length > limit:
            raise _too_large(limit, advice, setting)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit, advice, setting)
        chunks.append(chunk)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)
