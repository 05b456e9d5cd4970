"""Error answers: every error the service gives is JSON of one shape::

    {"error": {"message": "what is wrong, what to fix", "field": "windows.0.layers.3.channels"}}

``field`` is the dotted path of the offending value in the request body (or the name of the
query or path parameter), ``null`` when no single value is at fault.  Validation errors add
``details``: one ``{"message", "field"}`` per problem found (the first one is the ``message``).

A 500 never carries a traceback: the exception is logged with the request line and the
client is told to look at the service log.  A database that is down or busy gives 503 with
``Retry-After``, since the same request will succeed later.  A database that refuses the data
itself -- a value out of range or too long, a constraint it breaks: what the background
writer rejects for good (:func:`bnwatch.store.writer.refused_by_database`) -- gives 422, since
the same request would fail the same way: a sender retrying it (the HTTP sink retries 5xx)
would hold every later window behind it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy import exc as sa_exc
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from bnwatch.errors import first_line
from bnwatch.schema import SCHEMA_VERSION
from bnwatch.store.writer import refused_by_database

logger = logging.getLogger("bnwatch.service")

MAX_DETAILS = 20
"""Validation problems listed in ``details`` (the count of the others is in the message)."""
RETRY_AFTER_SECONDS = 5
"""``Retry-After`` of a 503 caused by an unavailable or busy database."""

_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})
# a value error whose message starts by naming a field: "moments: ...", "end must ..."
_NAMED_FIELD = re.compile(r"^([A-Za-z_][\w.]*)(?::\s| must )")


class ErrorDetail(BaseModel):
    """One problem: what is wrong, and where."""

    message: str
    field: str | None = None


class ErrorBody(ErrorDetail):
    """The ``error`` object of every error answer."""

    details: list[ErrorDetail] | None = None


class ErrorResponse(BaseModel):
    """What every error answer looks like (documented in the OpenAPI schema)."""

    error: ErrorBody


class ApiError(Exception):
    """An error answer: raised anywhere below a route, rendered by :func:`install`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        field: str | None = None,
        headers: Mapping[str, str] | None = None,
        details: Sequence[ErrorDetail] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = dict(headers or {})
        self.details = list(details) if details is not None else None

    def response(self) -> JSONResponse:
        error: dict[str, Any] = {"message": self.message, "field": self.field}
        if self.details is not None:
            error["details"] = [d.model_dump(mode="json") for d in self.details]
        return JSONResponse({"error": error}, status_code=self.status, headers=self.headers or None)


def field_path(loc: Sequence[str | int]) -> str | None:
    """``("body", "windows", 0, "uid")`` -> ``"windows.0.uid"`` (the location prefix of a
    request parameter is dropped: ``("query", "start")`` -> ``"start"``)."""
    parts = list(loc)
    if parts and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(str(p) for p in parts) or None


def _detail(error: Mapping[str, Any]) -> ErrorDetail:
    """One pydantic error as an :class:`ErrorDetail` whose message names the field."""
    loc = tuple(error.get("loc", ()))
    kind = error.get("type", "")
    message = str(error.get("msg", "invalid value"))
    if kind == "json_invalid":
        return ErrorDetail(message=f"the body is not valid JSON: {message}", field=None)
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
        named = _NAMED_FIELD.match(message)
        # "moments: count must not be negative" raised by the layer's validator: the field
        # is the layer's "moments", one level below where pydantic puts the error
        if named is not None and (not loc or named.group(1) != loc[-1]):
            loc = (*loc, *named.group(1).split("."))
            if message[named.end(1) :].startswith(":"):
                message = message[named.end(1) + 1 :].strip()
    field = field_path(loc)
    if field == "schema_version" and kind in ("literal_error", "missing"):
        found = error.get("input", "nothing") if kind == "literal_error" else "nothing"
        message = (
            f"this service reads wire format version {SCHEMA_VERSION}, got {found!r}: "
            f"send schema_version {SCHEMA_VERSION} (or upgrade the service)"
        )
    return ErrorDetail(message=f"{field}: {message}" if field else message, field=field)


def validation_error(errors: Sequence[Mapping[str, Any]]) -> ApiError:
    """A 422 for pydantic errors: the first problem is the message, all are ``details``."""
    details = [_detail(e) for e in errors] or [ErrorDetail(message="invalid request")]
    message = details[0].message
    if len(details) > 1:
        message += f" (and {len(details) - 1} more problem(s), listed in details)"
    return ApiError(422, message, field=details[0].field, details=details[:MAX_DETAILS])


def _http_message(request: Request, exc: StarletteHTTPException) -> str:
    if exc.status_code == 404 and exc.detail == "Not Found":
        return (
            f"no such endpoint: {request.method} {request.url.path} (the API is described "
            "at /docs and /openapi.json)"
        )
    if exc.status_code == 405:
        allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow")
        extra = f"; allowed: {allowed}" if allowed else ""
        return f"{request.method} is not allowed on {request.url.path}{extra}"
    return str(exc.detail)


def database_unavailable(err: BaseException) -> ApiError:
    """A 503 for an unreachable, busy or deadlocked database (the request may be retried)."""
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return ApiError(
        503,
        f"the database is unavailable or busy ({first[:200]}); retry later",
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


_DATABASE_DOWN: tuple[type[Exception], ...] = (
    sa_exc.OperationalError,  # connection refused or lost, deadlock, SQLite "locked"
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # the connection pool is exhausted
)


def is_database_down(err: BaseException) -> bool:
    """Whether ``err`` means "the database is unavailable", as opposed to a bug."""
    if isinstance(err, _DATABASE_DOWN):
        return True
    return isinstance(err, sa_exc.DBAPIError) and bool(err.connection_invalidated)


def _first_line(err: BaseException) -> str:
    """The first line of what the driver said (never SQLAlchemy's statement and parameters:
    a window's arrays)."""
    return first_line(getattr(err, "orig", None) or err, 200)


def data_refused(err: BaseException) -> ApiError:
    """A 422 for data the database refused for good (sending it again cannot help)."""
    return ApiError(
        422,
        f"the database refused the data ({_first_line(err)}); the request changed nothing, "
        "and sending it again would fail the same way",
    )


def install(app: FastAPI) -> None:
    """Render every error of ``app`` as JSON of the documented shape."""

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, ApiError):  # registered for ApiError only
            raise exc
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, StarletteHTTPException):
            raise exc
        return ApiError(
            exc.status_code, _http_message(request, exc), headers=exc.headers
        ).response()

    async def request_invalid(request: Request, exc: Exception) -> JSONResponse:
        if not isinstance(exc, RequestValidationError):
            raise exc
        return validation_error(exc.errors()).response()

    async def client_gone(request: Request, exc: Exception) -> JSONResponse:
        # the client went away while its body was read (a sender's timeout, a dropped
        # connection): nothing was stored, and no answer can reach it -- uvicorn drops the 400
        # unsent (and logs no access line) -- so one INFO line, no ERROR, no traceback
        logger.info(
            "bnwatch service: %s %s: the client disconnected before its request body was "
            "read; nothing was stored",
            request.method,
            request.url.path,
        )
        return ApiError(400, "the client disconnected before its request body was read").response()

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        if is_database_down(exc):
            logger.warning(
                "bnwatch service: %s %s: database unavailable: %s",
                request.method,
                request.url.path,
                str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc),
            )
            return database_unavailable(exc).response()
        if isinstance(exc, sa_exc.SQLAlchemyError) and refused_by_database(exc):
            logger.warning(
                "bnwatch service: %s %s: the database refused the data: %s",
                request.method,
                request.url.path,
                _first_line(exc),
            )
            return data_refused(exc).response()
        logger.error(
            "bnwatch service: %s %s failed", request.method, request.url.path, exc_info=exc
        )
        return ApiError(500, "internal server error: the service log has the details").response()

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, request_invalid)
    app.add_exception_handler(ClientDisconnect, client_gone)
    for kind in _DATABASE_DOWN:
        app.add_exception_handler(kind, unexpected)
    app.add_exception_handler(sa_exc.DBAPIError, unexpected)
    app.add_exception_handler(Exception, unexpected)
