"""Model names and versions are path segments of the read API: ingest refuses the ones that
could never be read back through it (or stored), and every other one round-trips through a
real ``bnwatch serve``."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from bnwatch.wire import profile_body
from tests.service.helpers import AUTH, ENDPOINT, Monitor, edited, row_counts, serve
from tests.service.profile_helpers import tiny_profile

REFUSED: list[tuple[str, str, str]] = [
    # (field, value, words in the message)
    ("model", "org/resnet50", "'/' is not allowed"),
    ("version", "2025/06/01", "'/' is not allowed"),
    ("model", ".", "'.' is not allowed"),
    ("version", "..", "'..' is not allowed"),
    ("model", "resnet50\n", "control characters are not allowed (found U+000A)"),
    ("version", "1\x7f", "control characters"),
    ("model", "x" * 201, "at most 200 characters"),
    ("model", "", "must not be empty"),
    ("source", "replica-1\r\n", "control characters"),
    ("source", "s" * 201, "at most 200 characters"),
]


def error_of(answer: Any) -> dict[str, Any]:
    body = answer.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    return error


@pytest.mark.parametrize(("field", "value", "words"), REFUSED)
def test_ingest_refuses_names_that_cannot_be_read_back_or_stored(
    client: TestClient, engine: Engine, field: str, value: str, words: str
) -> None:
    body = edited(Monitor().body(1), f"windows.0.{field}", value)
    answer = client.post(ENDPOINT, json=body, headers=AUTH)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["field"] == f"windows.0.{field}"
    assert error["message"].startswith(f"windows.0.{field}: ")
    assert words in error["message"]
    assert not any(row_counts(engine).values())


@pytest.mark.parametrize(("field", "value", "words"), [r for r in REFUSED if r[0] != "source"])
def test_profile_uploads_refuse_them_too(
    client: TestClient, engine: Engine, field: str, value: str, words: str
) -> None:
    body = edited(profile_body(tiny_profile()), field, value)
    answer = client.post("/api/v1/profiles", json=body, headers=AUTH)
    assert answer.status_code == 422, answer.text
    error = error_of(answer)
    assert error["field"] == field
    assert words in error["message"]
    assert not any(row_counts(engine).values())


ROUND_TRIP = ["a b", " lead", "a%b", "a?b", "a#b", "a\\b", "a;b", "a+b", "é", "a:b", "a.b"]
ROUND_TRIP += ["...", "~", "\u200b", "x" * 200, "é" * 200]


def test_every_other_name_round_trips_through_a_real_server(db_url: str, tmp_path: Path) -> None:
    """Percent-encoded by the client, decoded by the router: each name stored by ingest is
    found by the path routes (200-character names on PostgreSQL's VARCHAR(200) too)."""
    with (
        serve(db_url, tmp_path / "serve.log") as server,
        httpx.Client(base_url=server.url, timeout=60.0) as http,
    ):
        for name in ROUND_TRIP:
            mon = Monitor(model=name, version=name, source=name)
            stored = http.post(ENDPOINT, json=mon.body(1), headers=AUTH)
            assert stored.status_code == 200, (name, stored.text)
            base = f"/api/v1/models/{quote(name, safe='')}/versions/{quote(name, safe='')}"
            layers = http.get(f"{base}/layers")
            assert layers.status_code == 200, (name, layers.text)
            assert len(layers.json()) == 3
            windows = http.get(f"{base}/windows", params={"source": name})
            assert windows.status_code == 200, (name, windows.text)
            assert [w["source"] for w in windows.json()] == [name] * 3
        listed = {(m["name"], m["version"]) for m in http.get("/api/v1/models").json()}
        assert listed == {(name, name) for name in ROUND_TRIP}
        refused = http.post(ENDPOINT, json=Monitor(model="org/resnet50").body(1), headers=AUTH)
        assert refused.status_code == 422
        assert error_of(refused)["field"] == "windows.0.model"
