"""Property-based fuzzing of every endpoint from the app's own OpenAPI schema (schemathesis).

For every operation, schema-conforming ("positive") and schema-violating ("negative")
requests are generated; each answer must be no 5xx, documented (status code, content type,
body schema), and a request that was not accepted must leave every table as it was.  Ingest
requests carry the valid token, so they get past authentication to validation.  A model
version with windows is stored first so that reads of it have something to return.

Budget: ``EXAMPLES`` per operation and mode.  Each generated request is sent to an app on
SQLite and to one on PostgreSQL: generating the requests is most of the cost (80 % of it for
the window bodies), and both databases see the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy.engine import Engine

from bnwatch.service import Settings, create_app
from bnwatch.store.migrate import engine_for
from tests.service.helpers import AUTH, ENDPOINT, TOKEN, Monitor, row_counts

EXAMPLES = 50
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _operations(app: FastAPI) -> list[Any]:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), f"the OpenAPI schema is invalid: {result}"
        operations.append(result.ok())
    return operations


def test_the_schema_documents_every_endpoint(app: FastAPI) -> None:
    labels = {op.label for op in _operations(app)}
    assert labels == {
        "POST /api/v1/windows",
        "POST /api/v1/profiles",
        "GET /api/v1/models",
        "GET /api/v1/models/{model}/versions/{version}/layers",
        "GET /api/v1/models/{model}/versions/{version}/windows",
        "GET /api/v1/models/{model}/versions/{version}/windows/latest",
        "GET /api/v1/models/{model}/versions/{version}/profile",
        "GET /api/v1/alerts",
        "GET /api/v1/recalibrations",
        "GET /api/v1/recalibrations/{recalibration_id}",
        "POST /api/v1/recalibrations/{recalibration_id}/outcome",
        "GET /healthz",
        "GET /metrics",
    }


def test_the_documented_example_is_accepted(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    content = spec["paths"][ENDPOINT]["post"]["requestBody"]["content"]["application/json"]
    example = content["examples"]["one window"]["value"]
    assert client.post(ENDPOINT, json=example, headers=AUTH).json()["stored"] == 1


class Backend(NamedTuple):
    app: FastAPI
    engine: Engine


@pytest.fixture
def backends(tmp_path: Path, postgres_url: str) -> Iterator[list[Backend]]:
    """An app on SQLite and one on PostgreSQL, started (as a TestClient starts them), each
    with a model version stored."""
    with ExitStack() as stack:
        made = []
        for url in (f"sqlite:///{tmp_path / 'fuzz.db'}", postgres_url):
            engine = engine_for(url)
            stack.callback(engine.dispose)
            app = create_app(Settings(database_url=url, api_token=TOKEN), engine=engine)
            client = stack.enter_context(TestClient(app))
            assert client.post(ENDPOINT, json=Monitor().body(2), headers=AUTH).status_code == 200
            made.append(Backend(app, engine))
        yield made


def _fuzz(operation: Any, strategy: Any, backends: list[Backend], statuses: set[int]) -> None:
    """Run ``EXAMPLES`` generated requests of one operation through the checks, each on every
    backend."""

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=strategy)
    def check(case: Any) -> None:
        for backend in backends:
            before = row_counts(backend.engine)
            response = case.call(headers=AUTH, app=backend.app)
            statuses.add(response.status_code)
            case.validate_response(response, checks=CHECKS)
            if not (operation.method.upper() == "POST" and response.status_code == 200):
                assert row_counts(backend.engine) == before, (
                    f"{case.method} {case.formatted_path} answered {response.status_code} on "
                    f"{backend.engine.dialect.name} but changed the database"
                )

    check()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_endpoint_fails_and_rejected_requests_write_nothing(
    backends: list[Backend], mode: GenerationMode
) -> None:
    seen: dict[str, set[int]] = {}
    for operation in _operations(backends[0].app):
        statuses = seen.setdefault(operation.label, set())
        try:
            _fuzz(operation, operation.as_strategy(generation_mode=mode), backends, statuses)
        except Unsatisfiable:
            # nothing to violate: no parameters, or only path strings (any string is a path)
            assert mode == GenerationMode.NEGATIVE and not (operation.query or operation.body)
            seen.pop(operation.label)
            continue
        if "{model}" in operation.path and mode == GenerationMode.POSITIVE:
            # and reads of the stored model version, with generated query parameters
            stored = {"model": "cnn", "version": "1"}
            strategy = operation.as_strategy(generation_mode=mode, path_parameters=stored)
            _fuzz(operation, strategy, backends, statuses)
    assert all(seen.values()), seen
    assert {"POST /api/v1/windows", "GET /api/v1/models/{model}/versions/{version}/windows"} <= set(
        seen
    )
