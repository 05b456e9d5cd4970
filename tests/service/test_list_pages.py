"""``GET /api/v1/alerts`` and ``GET /api/v1/recalibrations`` a page at a time (``limit``, the
``Link`` header's next page), as ``GET .../windows``: they answered every stored row in one
answer -- a year of alerts, 300,000 of them, was 145 MB in 63 s -- and ignored ``?limit=``."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session

from bnwatch.service.routes.common import MAX_PAGE
from bnwatch.store.models import Alert, Model, Recalibration
from bnwatch.wire import batch_of
from tests.service.helpers import AUTH, ENDPOINT, Monitor

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
LISTS = ["/api/v1/alerts", "/api/v1/recalibrations"]


@pytest.fixture
def stored(client: TestClient, engine: Engine) -> None:
    """cnn@1 and other@1, with 30 alerts and 30 recalibrations between them: every third
    shares its time with the one before (the id decides), some resolved, some acknowledged."""
    for model in ("cnn", "other"):
        answer = client.post(ENDPOINT, json=batch_of(Monitor(model=model).records(1)), headers=AUTH)
        assert answer.status_code == 200, answer.text
    with Session(engine) as session, session.begin():
        models = {m.name: m.id for m in session.query(Model)}
        for i in range(30):
            at = T0 + timedelta(minutes=i - i % 3 // 2)  # 0, 1, 1, 3, 4, 4, ...
            model_id = models["cnn" if i % 4 else "other"]
            session.add(
                Alert(
                    model_id=model_id,
                    layer_id=None,
                    kind="drift",
                    state="resolved" if i % 5 == 0 else "open",
                    opened_at=at,
                    last_seen_at=at,
                    acknowledged_at=at if i % 7 == 0 and i % 5 else None,
                    values={"i": i},
                )
            )
            session.add(
                Recalibration(
                    model_id=model_id,
                    status="failed",
                    method="WebhookAction",
                    created_at=at,
                    outcome={"i": i},
                )
            )


def walk(client: TestClient, path: str, params: dict[str, Any]) -> tuple[list[Any], int]:
    """Every row of the pages from ``params`` on, following the Link headers; and the number of
    pages."""
    rows: list[Any] = []
    url: str | None = path
    pages = 0
    while url is not None:
        answer = client.get(url, params=params if pages == 0 and params else None)
        assert answer.status_code == 200, answer.text
        rows += answer.json()
        pages += 1
        url = answer.links.get("next", {}).get("url")
        assert pages < 100
    return rows, pages


@pytest.mark.parametrize(
    ("path", "at", "filters"),
    [
        ("/api/v1/alerts", "opened_at", [{"model": "cnn"}, {"state": "open"}]),
        ("/api/v1/alerts", "opened_at", [{"state": "acknowledged"}, {"model": "other"}]),
        ("/api/v1/recalibrations", "created_at", [{"model": "cnn", "version": "1"}]),
    ],
)
def test_limit_is_honoured_and_the_link_header_gives_the_next_page(
    client: TestClient, stored: None, path: str, at: str, filters: list[dict[str, str]]
) -> None:
    """``?limit=10`` was silently ignored; now the pages, walked, are the whole list in its
    order (newest first, then by id) -- with the filters kept from page to page."""
    everything = client.get(path).json()
    assert len(everything) == 30 <= MAX_PAGE
    assert client.get(path).headers.get("link") is None
    keys = [(row[at], row["id"]) for row in everything]
    assert keys == sorted(keys, reverse=True)
    first = client.get(path, params={"limit": 10})
    assert [row["id"] for row in first.json()] == [row["id"] for row in everything[:10]]
    assert first.links["next"]["url"].startswith(f"http://testserver{path}?")
    walked, pages = walk(client, path, {"limit": 7})
    assert walked == everything and pages == 5
    for params in filters:
        alone = client.get(path, params=params).json()
        assert 0 < len(alone) < 30
        walked, pages = walk(client, path, {**params, "limit": 2})
        assert walked == alone and pages == (len(alone) + 1) // 2
    if path == "/api/v1/alerts":
        acknowledged, _ = walk(client, path, {"state": "acknowledged", "limit": 1})
        assert acknowledged
        assert all(a["acknowledged_at"] and a["state"] == "open" for a in acknowledged)


def test_a_row_added_while_paging_shifts_nothing(
    client: TestClient, stored: None, engine: Engine
) -> None:
    """The cursor is the last row's place, not an offset: an alert opened between two pages
    appears on none of the following ones and moves none of them."""
    everything = client.get("/api/v1/alerts").json()
    first = client.get("/api/v1/alerts", params={"limit": 10})
    with Session(engine) as session, session.begin():
        at = T0 + timedelta(days=1)
        session.add(
            Alert(model_id=1, kind="drift", state="open", opened_at=at, last_seen_at=at, values={})
        )
    rest, _ = walk(client, first.links["next"]["url"], {})
    assert first.json() + rest == everything


@pytest.mark.parametrize("path", LISTS)
def test_the_limit_and_the_cursor_are_checked(client: TestClient, stored: None, path: str) -> None:
    for limit in ("0", str(MAX_PAGE + 1), "ten"):
        answer = client.get(path, params={"limit": limit})
        assert answer.status_code == 422
        assert answer.json()["error"]["field"] == "limit"
    for after in ("yesterday", "1.2.3", "99999999999999999999.1", f"1.{2**63}"):
        answer = client.get(path, params={"after": after})
        assert answer.status_code == 422, after
        error = answer.json()["error"]
        assert error["field"] == "after" and "Link header" in error["message"]


@pytest.mark.parametrize("path", LISTS)
def test_the_openapi_description_tells_how_to_page(client: TestClient, path: str) -> None:
    schema = client.get("/openapi.json").json()["paths"][path]["get"]
    params = {p["name"]: p for p in schema["parameters"]}
    assert params["limit"]["schema"]["maximum"] == MAX_PAGE
    assert params["limit"]["schema"]["default"] == MAX_PAGE
    assert "after" in params
    assert "Link" in schema["responses"]["200"]["headers"]
    assert 'rel="next"' in schema["description"]
