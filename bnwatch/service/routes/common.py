"""Parameters and answers shared by the routes -- among them the paging of lists (``limit``,
and a ``Link`` header whose ``rel="next"`` URL carries a keyset cursor, ``after=``) -- and the
request bodies of ingest (JSON, uncompressed, bounded: :func:`check_content_type`,
:func:`read_body`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Protocol, TypeVar
from urllib.parse import quote

from fastapi import Path, Query, Request, Response
from pydantic import StringConstraints
from starlette.datastructures import URL

from bnwatch.service.errors import ApiError, ErrorResponse
from bnwatch.service.settings import MAX_BODY_ENV

Key = TypeVar("Key")

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


MAX_PAGE = 1000
"""Most rows one answer of a paged list holds (``limit``'s default and maximum): windows --
every answer is built in memory, and a window of a 2,048-channel layer with ``stats`` is 120 KB
of JSON, a page of them peaks at 0.75 GB of server memory -- and alerts and recalibrations
(a year of alerts of a 60-layer model, 300,000 of them, was one answer of 145 MB, a minute);
the ``Link`` header gives the next page."""

PageLimit = Annotated[
    int,
    Query(
        ge=1,
        le=MAX_PAGE,
        description=f"at most this many (at most {MAX_PAGE:,}, the default); the Link "
        'header (rel="next") gives the next page',
    ),
]
PageAfter = Annotated[
    str | None,
    Query(
        max_length=100,
        description='where the page begins: set by the Link header\'s rel="next" URL (a '
        "cursor, not a time)",
    ),
]


def paged_answer(description: str) -> dict[str, Any]:
    """The 200 answer of the OpenAPI ``responses`` of a paged list, with its ``Link`` header."""
    return {
        "description": description,
        "headers": {
            "Link": {
                "description": '<URL>; rel="next": the next page (absent on the last)',
                "schema": {"type": "string"},
            }
        },
    }


def parse_cursor(after: str | None, parse: Callable[[str], Key]) -> Key | None:
    """The cursor ``after=`` of a paged list, read by ``parse`` (``WindowKey.parse``,
    ``NewestKey.parse``); 422 for text no ``Link`` header wrote."""
    if after is None:
        return None
    try:
        return parse(after)
    except ValueError:
        raise ApiError(
            422,
            "after: not a cursor of this endpoint: take the next page's URL from the Link "
            'header (rel="next") of the previous answer',
            field="after",
        ) from None


def this_url(request: Request) -> URL:
    """The request's URL with its path parameters percent-encoded again.

    ``request.url`` holds the *decoded* path: a version ``p%32`` would come back as ``p2``
    (another version), a space would make the URL invalid and a non-Latin-1 name could not be
    sent in a header at all."""
    route = request.scope["route"]
    quoted = {name: quote(str(value), safe="") for name, value in request.path_params.items()}
    path = request.scope.get("root_path", "") + route.url_path_for(route.name, **quoted)
    return request.url.replace(path=path)


class _Cursor(Protocol):
    def token(self) -> str: ...


def link_next(request: Request, response: Response, after: _Cursor | None) -> None:
    """Set the answer's ``Link: <URL>; rel="next"`` header: the same query with ``after=``
    set to the next page's cursor (no header for ``None``: the last page)."""
    if after is not None:
        following = this_url(request).include_query_params(after=after.token())
        response.headers["Link"] = f'<{following}>; rel="next"'


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
