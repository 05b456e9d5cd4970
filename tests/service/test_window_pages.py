"""``GET .../windows`` a page at a time (``limit``, the ``Link`` header's next page), and
query parameters whose errors say what to fix."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, unquote, urlsplit

import anyio
import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from bnwatch.service.routes.common import MAX_PAGE
from bnwatch.wire import batch_of
from tests.service.helpers import AUTH, ENDPOINT, LAYERS, Monitor

BASE = "/api/v1/models/cnn/versions/1"


@pytest.fixture
def stored(client: TestClient) -> None:
    """Ten windows of cnn@1 from two monitors closing them at the same instants."""
    one, two = Monitor(source="replica-1"), Monitor(source="replica-2", seed=1)
    answer = client.post(ENDPOINT, json=batch_of(one.records(5) + two.records(5)), headers=AUTH)
    assert answer.json()["stored"] == 10


def walk(client: TestClient, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Every window of the pages from ``params`` on, following the Link headers; and the
    number of pages."""
    windows: list[dict[str, Any]] = []
    url: str | None = f"{BASE}/windows"
    pages = 0
    while url is not None:
        answer = client.get(url, params=params if pages == 0 else None)
        assert answer.status_code == 200, answer.text
        windows += answer.json()
        pages += 1
        url = answer.links.get("next", {}).get("url")
        assert pages < 100
    return windows, pages


def test_limit_is_honoured_and_the_link_header_gives_the_next_page(
    client: TestClient, stored: None
) -> None:
    """``?limit=10`` was silently ignored: every window came back, however many."""
    everything = client.get(f"{BASE}/windows").json()
    assert len(everything) == 10 * len(LAYERS) <= MAX_PAGE
    first = client.get(f"{BASE}/windows", params={"limit": 4, "source": "replica-2"})
    assert len(first.json()) == 4
    assert first.links["next"]["url"].startswith("http://testserver/api/v1/models/")
    mine = [w for w in everything if w["source"] == "replica-2"]
    walked, pages = walk(client, {"limit": 4, "source": "replica-2"})
    assert walked == mine and pages == 4  # 15 windows: the filters are kept
    walked, pages = walk(client, {"limit": 5, "stats": "true"})
    assert pages == 6 and all(w["stats"] is not None for w in walked)
    assert [(w["layer"], w["end"], w["source"]) for w in walked] == [
        (w["layer"], w["end"], w["source"]) for w in everything
    ]
    last = client.get(f"{BASE}/windows", params={"limit": len(everything)})
    assert "link" not in last.headers  # a full last page has no next one


def test_merged_windows_come_in_pages_too(client: TestClient, stored: None) -> None:
    merged = client.get(f"{BASE}/windows", params={"resolution": 120}).json()
    assert [w["merged_from"] for w in merged] == [4, 4, 2] * len(LAYERS)
    walked, pages = walk(client, {"resolution": 120, "limit": 2})
    assert walked == merged and pages == 5
    assert all(w["stats"] is None for w in walked)


def test_the_limit_and_the_cursor_are_checked(client: TestClient, stored: None) -> None:
    for limit in ("0", str(MAX_PAGE + 1), "many"):
        error = client.get(f"{BASE}/windows", params={"limit": limit}).json()["error"]
        assert error["field"] == "limit"
    # the last three parse as numbers but exceed the columns: SQLite answered 500, PostgreSQL
    # "the database refused the data"
    huge = "9" * 19
    for after in (
        "2026-03-01T12:00:00Z",
        "1.2.3",
        "x" * 101,
        "2147483648.0.0.0",
        f"0.0.0.{huge}",
        f"0.-{huge}.0.0",
    ):
        answer = client.get(f"{BASE}/windows", params={"after": after})
        assert answer.status_code == 422
        error = answer.json()["error"]
        assert error["field"] == "after"
        assert error["message"].startswith("after: ")


@pytest.mark.parametrize(
    "query",
    [
        "start=2026-03-01T12:02:00+00:00",
        "end=2026-03-01T14:02:00.5+02:00",
        "start=2026-03-01 12:02+0000",
    ],
)
def test_a_plus_sent_unencoded_is_explained(client: TestClient, stored: None, query: str) -> None:
    """A ``+`` in a URL's query is a space: the usual ISO 8601 offset typed into curl or a
    browser got "unexpected extra characters at the end of the input"."""
    answer = client.get(f"{BASE}/windows?{query}")  # sent as typed: the + is not encoded
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    field = query.split("=", 1)[0]
    assert error["field"] == field
    assert error["message"].startswith(f"{field}: ")
    assert "write + as %2B" in error["message"] and "use Z" in error["message"]
    assert query.split("=", 1)[1].replace("+", "%2B") in error["message"]  # the value to send
    encoded = client.get(f"{BASE}/windows?{query.replace('+', '%2B')}")
    assert encoded.status_code == 200, encoded.text


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_a_resolution_that_is_not_a_number_says_so(
    client: TestClient, stored: None, value: str
) -> None:
    """``?resolution=nan`` answered "less than or equal to 316224000"."""
    error = client.get(f"{BASE}/windows", params={"resolution": value}).json()["error"]
    assert error["field"] == "resolution"
    assert "finite number" in error["message"]
    assert "316224000" not in error["message"]


def test_the_openapi_description_tells_how_to_page(client: TestClient) -> None:
    operation = client.get("/openapi.json").json()["paths"][
        "/api/v1/models/{model}/versions/{version}/windows"
    ]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert parameters["limit"]["schema"]["maximum"] == MAX_PAGE
    assert parameters["limit"]["schema"]["default"] == MAX_PAGE
    assert 'rel="next"' in parameters["after"]["description"]
    assert "%2B" in parameters["start"]["description"]
    assert "Link" in operation["description"] and "limit" in operation["description"]
    assert "Link" in operation["responses"]["200"]["headers"]


def asgi_get(app: FastAPI, url: str) -> httpx.Response:
    """GET through httpx's ASGI transport: Starlette's TestClient decodes a path twice (its
    ``%2532`` reaches the app as ``2``), which would hide what the Link encodes."""

    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.get(url)

    return anyio.run(get)


@pytest.mark.parametrize(
    ("model", "version"),
    [("分类 模型", "2025-06-01"), ("pcnt", "p%32"), ("fraud model", "v 1")],
)
def test_the_link_names_the_same_model_version_whatever_its_characters(
    app: FastAPI, client: TestClient, model: str, version: str
) -> None:
    """The Link was built from the decoded path: a version ``p%32`` paged into version ``p2``,
    a space made the URL invalid, and a non-Latin-1 name made the first page a 500."""
    # the version and another whose name is what the first one's decodes to
    decoded = unquote(version) + ("" if "%" in version else "x")
    records = Monitor(model=model, version=version).records(3)
    records += Monitor(model=model, version=decoded, seed=1).records(2)
    assert client.post(ENDPOINT, json=batch_of(records), headers=AUTH).json()["stored"] == 5
    base = f"/api/v1/models/{quote(model, safe='')}/versions/{quote(version, safe='')}/windows"
    everything = asgi_get(app, base).json()
    assert len(everything) == 3 * len(LAYERS)
    walked: list[dict[str, Any]] = []
    url: str | None = f"{base}?limit=2"
    while url is not None:
        answer = asgi_get(app, url)
        assert answer.status_code == 200, answer.text
        walked += answer.json()
        url = answer.links["next"]["url"] if "link" in answer.headers else None
        if url is not None:
            assert url.isascii() and " " not in url
            assert urlsplit(url).path == base
    assert walked == everything
