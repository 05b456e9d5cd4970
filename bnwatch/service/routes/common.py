"""Parameters and answers shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from pydantic import StringConstraints

from bnwatch.service.errors import ApiError

_NO_NUL = r"^[^\x00]+$"

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
