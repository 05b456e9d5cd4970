"""POST /api/v1/recalibrations/{id}/outcome: the way back of a recalibration -- authenticated,
bounded, once per recalibration, all or nothing, with errors that name the field."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from bnwatch.codec import decode_arrays
from bnwatch.store.repository import Repository
from bnwatch.wire import MAX_OUTCOME_BYTES, outcome_body
from tests.service.helpers import AUTH, ENDPOINT, TOKEN, Monitor, b64, edited, row_counts
from tests.store.rows import random_buffers

LAYERS = {"bn1": 4, "layer1.bn2": 3, "head.bn": 5}  # tests.service.helpers.LAYERS


def url(rid: int) -> str:
    return f"/api/v1/recalibrations/{rid}/outcome"


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    return error


def new_buffers(
    channels: dict[str, int] = LAYERS, seed: int = 0
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    return random_buffers(channels, seed)


@pytest.fixture
def rid(client: TestClient, engine: Engine) -> int:
    """A pending recalibration of a stored model version (cnn@1, three layers)."""
    assert client.post(ENDPOINT, json=Monitor().body(2), headers=AUTH).status_code == 200
    return Repository(engine).start_recalibration("cnn", "1", method="WebhookAction")


def stored(engine: Engine, rid: int) -> Any:
    (rec,) = [r for r in Repository(engine).recalibrations() if r.id == rid]
    return rec


# -- accepted ----------------------------------------------------------------------------------
def test_an_applied_report_stores_the_buffers_and_answers_the_recalibration(
    client: TestClient, engine: Engine, rid: int
) -> None:
    buffers = new_buffers()
    summary = {"samples": 256, "kl_before": 0.5, "kl_after": 0.1, "per_layer": {"bn1": [1, 2]}}
    body = json.loads(json.dumps(outcome_body("applied", summary, buffers)))  # real JSON
    answer = client.post(url(rid), json=body, headers=AUTH)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (result["id"], result["model"], result["version"]) == (rid, "cnn", "1")
    assert result["status"] == "applied" and result["finished_at"] is not None
    assert {k: result["outcome"][k] for k in summary} == summary
    references = result["outcome"]["references"]
    assert sorted(references) == sorted(LAYERS)
    # the list and the read endpoints show the same, and the store holds the statistics bit
    # for bit
    assert client.get("/api/v1/recalibrations").json() == [result]
    assert client.get(f"/api/v1/recalibrations/{rid}").json() == result
    with engine.connect() as conn:
        import sqlalchemy as sa

        rows = conn.execute(
            sa.text(
                "SELECT refs.id, layers.name, refs.mean_var, refs.kind FROM refs "
                "JOIN layers ON layers.id = refs.layer_id WHERE refs.kind = 'recalibrated'"
            )
        ).all()
    assert {row.name: row.id for row in rows} == references
    for row in rows:
        arrays = decode_arrays(row.mean_var)
        assert np.array_equal(arrays[0], buffers[row.name][0])
        assert np.array_equal(arrays[1], buffers[row.name][1])


@pytest.mark.parametrize(
    ("status", "outcome"),
    [("rejected", {"improved": False}), ("failed", {"error": "CUDA out of memory"})],
)
def test_rejected_and_failed_reports_carry_no_buffers(
    client: TestClient, engine: Engine, rid: int, status: str, outcome: dict[str, Any]
) -> None:
    refs = row_counts(engine)["refs"]
    answer = client.post(url(rid), json={"status": status, "outcome": outcome}, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == status
    assert answer.json()["outcome"] == {**outcome, "references": {}}
    assert row_counts(engine)["refs"] == refs


def test_the_documented_examples_are_accepted(client: TestClient, engine: Engine) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/api/v1/recalibrations/{recalibration_id}/outcome"]["post"]
    assert {"200", "401", "404", "409", "413", "415", "422", "503"} <= set(operation["responses"])
    content = operation["requestBody"]["content"]["application/json"]
    assert content["schema"] == {"$ref": "#/components/schemas/WireRecalibrationOutcome"}
    assert set(content["examples"]) == {"applied", "failed"}
    assert set(spec["components"]["schemas"]["WireRecalibrationOutcome"]["properties"]) == {
        "schema_version",
        "status",
        "outcome",
        "buffers",
    }
    # the example's layer is the profile example's: store that model version first
    profile = spec["paths"]["/api/v1/profiles"]["post"]["requestBody"]["content"]
    example_profile = profile["application/json"]["examples"]["one layer"]["value"]
    assert client.post("/api/v1/profiles", json=example_profile, headers=AUTH).status_code == 200
    repository = Repository(engine)
    for name, example in content["examples"].items():
        rid = repository.start_recalibration("resnet50", "2025-06-01", method="precise")
        answer = client.post(url(rid), json=example["value"], headers=AUTH)
        assert answer.status_code == 200, (name, answer.text)
        assert answer.json()["status"] == example["value"]["status"]


# -- refusals ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}],
    ids=["missing", "wrong", "not bearer"],
)
def test_a_missing_or_wrong_token_is_401_and_changes_nothing(
    client: TestClient, engine: Engine, rid: int, headers: dict[str, str]
) -> None:
    before = stored(engine, rid)
    answer = client.post(url(rid), json={"status": "failed", "outcome": {}}, headers=headers)
    assert answer.status_code == 401, answer.text
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert "BNWATCH_API_TOKEN" in error_of(answer)["message"]
    assert stored(engine, rid) == before


def test_without_a_configured_token_reports_are_refused(
    make_app: Callable[..., FastAPI], engine: Engine
) -> None:
    rid = Repository(engine).start_recalibration("cnn", "1", method="precise")
    with TestClient(make_app(api_token=None)) as client:
        answer = client.post(url(rid), json={"status": "failed", "outcome": {}}, headers=AUTH)
    assert answer.status_code == 503
    assert "BNWATCH_API_TOKEN" in error_of(answer)["message"]
    assert stored(engine, rid).status == "pending"


def test_an_unknown_recalibration_is_404(client: TestClient, engine: Engine) -> None:
    before = row_counts(engine)
    answer = client.post(url(31337), json={"status": "failed", "outcome": {}}, headers=AUTH)
    assert answer.status_code == 404, answer.text
    assert "no recalibration 31337" in error_of(answer)["message"]
    assert row_counts(engine) == before


def test_a_second_report_is_409_naming_the_status(
    client: TestClient, engine: Engine, rid: int
) -> None:
    first = client.post(
        url(rid),
        json=outcome_body("applied", {"samples": 64}, new_buffers()),
        headers=AUTH,
    )
    assert first.status_code == 200, first.text
    before = row_counts(engine)
    again = client.post(url(rid), json={"status": "failed", "outcome": {}}, headers=AUTH)
    assert again.status_code == 409, again.text
    error = error_of(again)
    assert f"recalibration {rid} is already applied" in error["message"]
    assert error["field"] == "status"
    assert row_counts(engine) == before
    assert client.get("/api/v1/recalibrations").json() == [first.json()]


def _valid() -> dict[str, Any]:
    return outcome_body("applied", {"samples": 64}, new_buffers())


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (
            lambda b: {**b, "buffers": {**b["buffers"], "layer9.bn": b["buffers"]["bn1"]}},
            "buffers.layer9.bn",
            "'layer9.bn' is not a stored layer of cnn@1 (3 stored layer(s)",
        ),
        (
            lambda b: {**b, "buffers": {**b["buffers"], "layer1.bn2": new_wire_buffers(5)}},
            "buffers.layer1.bn2.running_mean",
            "has 3 channels in the store but its buffers have 5",
        ),
        (
            lambda b: edited(b, "buffers.bn1.running_var", b64([[1.0, -1.0, 1.0, 1.0]])),
            "buffers.bn1.running_var",
            "must not be negative",
        ),
        (
            lambda b: edited(b, "buffers.bn1.running_mean", b64([[1.0, float("nan"), 1, 1]])),
            "buffers.bn1.running_mean",
            "NaN or infinite",
        ),
        (
            lambda b: edited(b, "buffers.bn1.running_var", b64([[1.0, 1.0]])),
            "buffers.bn1.running_var",
            "expected 4 values like running_mean, got 2",
        ),
        (
            lambda b: edited(b, "buffers.bn1.running_mean", "not base64!"),
            "buffers.bn1.running_mean",
            "not a base64 bnwatch array blob",
        ),
        (lambda b: edited(b, "buffers.bn1.eps", 0), "buffers.bn1.eps", "greater than 0"),
        (lambda b: edited(b, "status", "pending"), "status", "'applied', 'rejected' or 'failed'"),
        (
            lambda b: edited(b, "status", "rejected"),
            "buffers",
            "only an applied recalibration has statistics to store",
        ),
        (lambda b: {k: v for k, v in b.items() if k != "outcome"}, "outcome", "Field required"),
        (lambda b: edited(b, "outcome", [1, 2]), "outcome", "should be an object"),
        (
            lambda b: edited(b, "outcome", {"log": "x" * MAX_OUTCOME_BYTES}),
            "outcome",
            f"at most {MAX_OUTCOME_BYTES}",
        ),
        (lambda b: edited(b, "outcome", {"references": {}}), "outcome.references", "reserved"),
        (lambda b: edited(b, "outcome", {"note": "a\x00b"}), "outcome.note", "NUL"),
        (lambda b: {**b, "extra": 1}, "extra", "Extra inputs are not permitted"),
        (lambda b: edited(b, "schema_version", 2), "schema_version", "wire format version 1"),
    ],
    ids=[
        "unknown layer",
        "channel count",
        "negative var",
        "nan mean",
        "var length",
        "not base64",
        "eps",
        "pending",
        "buffers when rejected",
        "no outcome",
        "outcome not an object",
        "outcome too large",
        "reserved key",
        "nul",
        "extra field",
        "schema version",
    ],
)
def test_an_invalid_report_is_422_naming_the_field_and_changes_nothing(
    client: TestClient,
    engine: Engine,
    rid: int,
    change: Callable[[dict[str, Any]], dict[str, Any]],
    field: str,
    message: str,
) -> None:
    before = row_counts(engine)
    answer = client.post(url(rid), json=change(_valid()), headers=AUTH)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["field"] == field, error
    assert message in error["message"], error
    assert row_counts(engine) == before
    assert stored(engine, rid).status == "pending"


def new_wire_buffers(channels: int) -> dict[str, Any]:
    body = outcome_body("applied", {}, new_buffers({"x": channels}))
    wire: dict[str, Any] = body["buffers"]["x"]
    return wire


@pytest.mark.parametrize("bad_id", ["0", "-1", "abc", str(2**63)])
def test_an_invalid_id_is_422(client: TestClient, bad_id: str) -> None:
    answer = client.post(
        f"/api/v1/recalibrations/{bad_id}/outcome",
        json={"status": "failed", "outcome": {}},
        headers=AUTH,
    )
    assert answer.status_code == 422, answer.text
    assert error_of(answer)["field"] == "recalibration_id"


def test_a_body_over_the_limit_is_413_with_advice(
    make_app: Callable[..., FastAPI], engine: Engine
) -> None:
    rid = Repository(engine).start_recalibration("cnn", "1", method="precise")
    body = json.dumps(outcome_body("failed", {"error": "x" * 4000})).encode()
    with TestClient(make_app(max_body_bytes=1000)) as client:
        answer = client.post(
            url(rid), content=body, headers={**AUTH, "Content-Type": "application/json"}
        )
    assert answer.status_code == 413, answer.text
    message = error_of(answer)["message"]
    assert "1,000 bytes" in message and "BNWATCH_MAX_BODY_BYTES" in message
    assert "fewer layers" in message
    assert stored(engine, rid).status == "pending"


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"Content-Type": "text/plain"}, "Content-Type: application/json"),
        ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, "uncompressed"),
    ],
)
def test_a_body_that_is_not_plain_json_is_415(
    client: TestClient, engine: Engine, rid: int, headers: dict[str, str], message: str
) -> None:
    body = json.dumps({"status": "failed", "outcome": {}}).encode()
    answer = client.post(url(rid), content=body, headers={**AUTH, **headers})
    assert answer.status_code == 415, answer.text
    assert message in error_of(answer)["message"]
    assert stored(engine, rid).status == "pending"


def test_reading_one_recalibration(client: TestClient, rid: int) -> None:
    """GET /api/v1/recalibrations/{id}: no token needed (a read); 404 names what to do."""
    answer = client.get(f"/api/v1/recalibrations/{rid}")
    assert answer.status_code == 200
    assert (answer.json()["id"], answer.json()["status"]) == (rid, "pending")
    missing = client.get(f"/api/v1/recalibrations/{rid + 1000}")
    assert missing.status_code == 404
    assert f"no recalibration {rid + 1000}" in error_of(missing)["message"]
    assert client.get("/api/v1/recalibrations/0").status_code == 422
