"""POST /api/v1/windows: auth, validation naming the field, all-or-nothing, counting."""

from __future__ import annotations

import base64
import json
import logging
import struct
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine

from bnwatch.codec import MAGIC
from bnwatch.store.repository import Repository
from bnwatch.wire import batch_of
from tests.service.helpers import (
    AUTH,
    ENDPOINT,
    LAYERS,
    Monitor,
    b64,
    edited,
    row_counts,
    stored_windows,
)


def post(client: TestClient, body: Any, headers: dict[str, str] | None = None) -> Any:
    return client.post(ENDPOINT, json=body, headers=AUTH if headers is None else headers)


def error_of(response: Any) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


# -- storing and counting ----------------------------------------------------------------------
def test_windows_are_stored_once_and_duplicates_counted(client: TestClient, engine: Engine) -> None:
    mon = Monitor()
    records = mon.records(3)
    answer = post(client, batch_of(records))
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"received": 3, "stored": 3, "duplicates": 0}
    assert stored_windows(engine) == 3
    assert row_counts(engine)["windows"] == 3 * len(LAYERS)

    # a retried delivery plus one new window; a uid repeated within the request
    again = batch_of([*records, *mon.records(1)])
    again["windows"].append(again["windows"][-1])
    answer = post(client, again)
    assert answer.json() == {"received": 5, "stored": 1, "duplicates": 4}
    assert stored_windows(engine) == 4
    assert row_counts(engine)["windows"] == 4 * len(LAYERS)


def test_mixed_layer_counts_are_counted_per_window(client: TestClient, engine: Engine) -> None:
    """Windows of two models with different layer counts, some already stored."""
    a = Monitor(model="a", layers=[("bn1", 4), ("bn2", 3), ("bn3", 2)])
    b = Monitor(model="b", layers=[("x", 6)], seed=1)
    ra, rb = a.records(2), b.records(3)
    assert post(client, batch_of([ra[0], rb[0], rb[1]])).json()["stored"] == 3
    answer = post(client, batch_of([*ra, *rb]))
    assert answer.json() == {"received": 5, "stored": 2, "duplicates": 3}
    assert row_counts(engine)["windows"] == 2 * 3 + 3 * 1


def test_stored_windows_read_back_in_utc(client: TestClient, engine: Engine) -> None:
    """Offsets other than UTC are normalized (SQLite keeps no offset)."""
    mon = Monitor()
    record = mon.records(1)[0]
    body = batch_of([record])
    body["windows"][0]["start"] = "2026-03-01T17:00:00+05:00"  # 12:00 UTC
    body["windows"][0]["end"] = "2026-03-01T07:01:00-05:00"  # 12:01 UTC
    assert post(client, body).status_code == 200
    got = Repository(engine).windows("cnn", "1", layer="bn1")
    assert len(got) == 1
    assert got[0].start == datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)
    assert got[0].end == datetime(2026, 3, 1, 12, 1, tzinfo=timezone.utc)
    assert got[0].n_samples == record.reports["bn1"].n_samples


@pytest.mark.parametrize("recompute", [False, True])
def test_metrics_are_stored_as_sent_unless_the_service_recomputes_them(
    make_app: Callable[..., FastAPI], engine: Engine, recompute: bool
) -> None:
    """What the OpenAPI description of the route says: it said every metric was recomputed,
    which only BNWATCH_RECOMPUTE=1 does."""
    body = Monitor().body(1)
    sent = {"drifted": True, "p_value": 0.9, "kl_mean": 123.0}
    body["windows"][0]["layers"][0]["metrics"].update(sent)
    with TestClient(make_app(recompute=recompute), raise_server_exceptions=False) as client:
        assert post(client, body).status_code == 200
        stored = client.get("/api/v1/models/cnn/versions/1/windows", params={"layer": "bn1"})
        metrics = stored.json()[0]["metrics"]
        description = client.get("/openapi.json").json()["paths"][ENDPOINT]["post"]["description"]
    kept = {name: metrics[name] for name in sent}
    assert (kept == sent) is not recompute
    assert "stored as sent" in description and "BNWATCH_RECOMPUTE=1" in description
    assert "Every metric is recomputed" not in description


def test_references_are_remembered_once_per_monitor(app: FastAPI, client: TestClient) -> None:
    """Decoded references are interned, so the repository recognizes them by identity and
    does not keep one copy per window alive."""
    mon = Monitor()
    for _ in range(5):
        assert post(client, mon.body(2)).status_code == 200
    repository: Repository = app.state.bnwatch.repository
    # one running and one baseline reference per layer, whatever the number of windows
    assert len(repository._ids.by_identity) == 2 * len(LAYERS)


# -- the hook ----------------------------------------------------------------------------------
def test_on_stored_runs_after_each_storing_transaction_and_never_fails_it(
    make_app: Callable[..., FastAPI], engine: Engine, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[tuple[Repository, list[str]]] = []

    def hook(repository: Repository, records: list[Any]) -> None:
        calls.append((repository, [r.uid for r in records]))
        assert stored_windows(repository.engine) > 0  # called after the commit
        raise RuntimeError("alert engine exploded")

    records = Monitor().records(2)
    with TestClient(make_app(on_stored=hook), raise_server_exceptions=False) as client:
        with caplog.at_level(logging.ERROR, logger="bnwatch.service"):
            answer = post(client, batch_of(records))
        assert answer.status_code == 200
        assert answer.json()["stored"] == 2
        assert [uids for _, uids in calls] == [[r.uid for r in records]]
        assert "after-store hook failed" in caplog.text
        assert "alert engine exploded" in caplog.text
        assert post(client, batch_of(records)).json()["duplicates"] == 2
        assert len(calls) == 1  # nothing stored: no evaluation


def test_the_alert_engine_plugs_in(make_app: Callable[..., FastAPI], engine: Engine) -> None:
    from bnwatch.alerts import AlertConfig, AlertEngine

    alerts = AlertEngine(AlertConfig())
    mon = Monitor()
    with TestClient(make_app(on_stored=alerts.on_stored)) as client:
        assert post(client, mon.body(6)).status_code == 200
        assert post(client, mon.body(6, shift=3.0)).status_code == 200
        opened = client.get("/api/v1/alerts", params={"state": "open"}).json()
    assert {a["kind"] for a in opened} >= {"drift"}
    assert {a["layer"] for a in opened if a["kind"] == "drift"} <= {name for name, _ in LAYERS}


# -- authentication ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": "Basic dGVzdDp0ZXN0"},
        {"Authorization": "Bearer"},
        {"Authorization": "test-token_0123456789"},
    ],
    ids=["missing", "wrong", "basic", "empty", "no-scheme"],
)
def test_wrong_or_missing_token_is_401_and_writes_nothing(
    client: TestClient, engine: Engine, headers: dict[str, str]
) -> None:
    before = row_counts(engine)
    answer = post(client, Monitor().body(1), headers=headers)
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"].startswith("Bearer")
    assert "BNWATCH_API_TOKEN" in error_of(answer)["message"]
    assert row_counts(engine) == before


def test_the_scheme_name_is_case_insensitive(client: TestClient) -> None:
    headers = {"Authorization": AUTH["Authorization"].replace("Bearer", "bearer")}
    assert post(client, Monitor().body(1), headers=headers).status_code == 200


def test_without_a_configured_token_ingest_is_refused_with_advice(
    make_app: Callable[..., FastAPI], engine: Engine
) -> None:
    with TestClient(make_app(api_token=None)) as client:
        answer = post(client, Monitor().body(1))
        assert answer.status_code == 503
        assert "set BNWATCH_API_TOKEN" in error_of(answer)["message"]
        assert client.get("/api/v1/models").status_code == 200  # reads stay open
    assert stored_windows(engine) == 0


# -- rejections name the field and write nothing -------------------------------------------------
def _with_moments(body: dict[str, Any], layer: int, field: str, value: float) -> dict[str, Any]:
    """``body`` with one moment field of one layer replaced (all channels)."""
    from bnwatch.codec import decode_arrays
    from bnwatch.stats import MOMENT_FIELDS

    text = body["windows"][0]["layers"][layer]["moments"]
    arrays = decode_arrays(__import__("base64").b64decode(text)).copy()
    arrays[MOMENT_FIELDS.index(field)] = value
    return edited(body, f"windows.0.layers.{layer}.moments", b64(arrays))


def _huge_batches(body: dict[str, Any], layer: int, size: int, count: int) -> dict[str, Any]:
    """``body`` whose layer ``layer`` of window 0 measured ``count`` batches of ``size``."""
    at = f"windows.0.layers.{layer}"
    body = edited(body, f"{at}.batch_sizes", {str(size): count})
    return edited(edited(body, f"{at}.n_batches", count), f"{at}.batches_seen", count)


def _huge_blob(rows: int, cols: int) -> str:
    """A moments blob of ``rows`` constant arrays whose header claims ``cols`` channels: a
    few hundred bytes that would decode to ``rows * cols`` float64."""
    header = struct.pack("<4s4sII", MAGIC, b"<f8\0", rows, cols)
    return base64.b64encode(header + (b"\x01" + b"\0" * 8) * rows).decode()


REJECTED: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], int, str, str]] = {
    # name: (edit, status, field, words in the message)
    "negative count": (
        lambda b: _with_moments(b, 1, "count", -5.0),
        422,
        "windows.0.layers.1.moments",
        "must not be negative",
    ),
    "negative n_batches": (
        lambda b: edited(b, "windows.0.layers.2.n_batches", -1),
        422,
        "windows.0.layers.2.n_batches",
        "greater than or equal to 0",
    ),
    "NaN in statistics": (
        lambda b: _with_moments(b, 0, "mean", float("nan")),
        422,
        "windows.0.layers.0.moments",
        "NaN",
    ),
    "NaN eps": (
        lambda b: edited(b, "windows.0.layers.0.eps", float("nan")),
        422,
        "windows.0.layers.0.eps",
        "finite number",
    ),
    "unknown schema version": (
        lambda b: edited(b, "schema_version", 2),
        422,
        "schema_version",
        "version 1",
    ),
    "channels disagree with the arrays": (
        lambda b: edited(b, "windows.0.layers.0.channels", 7),
        422,
        "windows.0.layers.0.moments",
        "7 channels",
    ),
    "bad uid": (lambda b: edited(b, "windows.0.uid", "not a uid!"), 422, "windows.0.uid", "uid"),
    "end before start": (
        lambda b: edited(b, "windows.0.end", "2020-01-01T00:00:00Z"),
        422,
        "windows.0.end",
        "before start",
    ),
    "naive timestamp": (
        lambda b: edited(b, "windows.0.start", "2026-03-01T12:00:00"),
        422,
        "windows.0.start",
        "timezone",
    ),
    "NUL in a name": (
        lambda b: edited(b, "windows.0.model", "cnn\x00"),
        422,
        "windows.0.model",
        "NUL",
    ),
    "count beyond the store": (
        lambda b: edited(b, "windows.0.layers.1.samples_seen", 2**40),
        422,
        "windows.0.layers.1.samples_seen",
        "less than or equal to 2147483647",
    ),
    "moment counts beyond the store": (
        lambda b: _with_moments(b, 2, "n", 1e300),
        422,
        "windows.0.layers.2.moments",
        "n must not exceed 2147483647",
    ),
    "timestamp overflows in UTC": (
        lambda b: edited(
            edited(b, "windows.0.start", "9999-12-31T23:00:00-05:00"),
            "windows.0.end",
            "9999-12-31T23:30:00-05:00",
        ),
        422,
        "windows.0.start",
        "out of range",
    ),
    "a window in year 1": (  # accepted, then hourly reads and compaction failed
        lambda b: edited(
            edited(b, "windows.0.start", "0001-01-01T00:00:00+00:00"),
            "windows.0.end",
            "0001-01-01T00:01:00+00:00",
        ),
        422,
        "windows.0.start",
        "must be from 1970-01-02T00:00:00+00:00 to before 2100-01-01T00:00:00+00:00: "
        "0001-01-01T00:00:00+00:00 is out of range",
    ),
    "a window ending in year 2100": (
        lambda b: edited(b, "windows.0.end", "2100-01-01T00:00:00+00:00"),
        422,
        "windows.0.end",
        "2100-01-01T00:00:00+00:00 is out of range",
    ),
    "measured batches holding more samples than a window may": (  # overflowed the totals
        lambda b: _huge_batches(b, 1, 2**31 - 1, 2**31 - 1),
        422,
        "windows.0.layers.1.batch_sizes",
        "the measured batches hold 4611686014132420609 samples (sum of size x count), more "
        "than the 2147483647 one window may hold",
    ),
    "a blob header claiming a huge shape": (  # was a MemoryError: 500, retried forever
        lambda b: edited(b, "windows.0.layers.0.moments", _huge_blob(13, 2**31)),
        422,
        "windows.0.layers.0.moments",
        "expected 13 arrays of 4 channels, got [13, 2147483648]",
    ),
    "unknown field": (lambda b: edited(b, "windows.0.extra", 1), 422, "windows.0.extra", ""),
    "no windows": (lambda b: edited(b, "windows", []), 422, "windows", ""),
}


@pytest.mark.parametrize("case", list(REJECTED))
def test_invalid_windows_are_rejected_naming_the_field(
    client: TestClient, engine: Engine, case: str
) -> None:
    edit, status, field, words = REJECTED[case]
    mon = Monitor()
    assert post(client, mon.body(1)).status_code == 200  # the model and its layers exist
    before = row_counts(engine)
    body = batch_of(mon.records(2))  # the first window is valid: nothing of the batch is stored
    body["windows"].reverse()
    content = json.dumps(edit(body)).encode()  # allows NaN, as a careless sender would send it
    answer = client.post(ENDPOINT, content=content, headers=AUTH)
    assert answer.status_code == status, answer.text
    error = error_of(answer)
    assert error["field"] == (field or None)
    if field:
        assert error["message"].startswith(field)
    assert words in error["message"]
    assert row_counts(engine) == before


def test_every_problem_is_listed(client: TestClient) -> None:
    body = edited(Monitor().body(1), "windows.0.layers.0.depth", -1)
    body = edited(body, "windows.0.layers.1.n_batches", -1)
    error = error_of(post(client, body))
    assert [d["field"] for d in error["details"]] == [
        "windows.0.layers.0.depth",
        "windows.0.layers.1.n_batches",
    ]
    assert "1 more problem" in error["message"]


def test_a_channel_count_change_is_409_naming_layer_and_counts(
    client: TestClient, engine: Engine
) -> None:
    assert post(client, Monitor().body(2)).status_code == 200
    before = row_counts(engine)
    changed = Monitor(layers=[("bn1", 4), ("layer1.bn2", 8), ("head.bn", 5)], seed=3)
    body = batch_of([*Monitor(seed=4).records(1), *changed.records(1)])
    answer = post(client, body)
    assert answer.status_code == 409, answer.text
    error = error_of(answer)
    assert error["field"] == "windows.1.layers.1.channels"
    assert "'layer1.bn2'" in error["message"]
    assert "3 channels" in error["message"] and "8" in error["message"]
    assert "nothing was stored" in error["message"]
    assert row_counts(engine) == before


def test_a_channel_count_change_within_one_request_is_409(
    client: TestClient, engine: Engine
) -> None:
    one = Monitor(seed=1).records(1)
    other = Monitor(layers=[("bn1", 9)], seed=2).records(1)
    answer = post(client, batch_of([*one, *other]))
    assert answer.status_code == 409
    assert error_of(answer)["field"] == "windows.1.layers.0.channels"
    assert row_counts(engine)["windows"] == 0
    assert row_counts(engine)["models"] == 0


def test_malformed_json_is_422(client: TestClient, engine: Engine) -> None:
    answer = client.post(ENDPOINT, content=b'{"schema_version": 1, "windows": [', headers=AUTH)
    assert answer.status_code == 422
    assert "not valid JSON" in error_of(answer)["message"]


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Content-Type": "text/plain"}, 415),
        ({"Content-Type": "application/json", "Content-Encoding": "gzip"}, 415),
        ({"Content-Type": "application/json; charset=utf-8"}, 200),
        ({"Content-Type": "application/vnd.bnwatch+json"}, 200),
    ],
)
def test_content_type(client: TestClient, headers: dict[str, str], status: int) -> None:
    body = json.dumps(Monitor().body(1)).encode()
    answer = client.post(ENDPOINT, content=body, headers={**AUTH, **headers})
    assert answer.status_code == status, answer.text


# -- the body limit ------------------------------------------------------------------------------
def test_bodies_over_the_limit_are_413_before_reading(
    make_app: Callable[..., FastAPI], engine: Engine
) -> None:
    body = json.dumps(Monitor().body(1)).encode()
    with TestClient(make_app(max_body_bytes=len(body) - 1)) as client:
        answer = client.post(
            ENDPOINT, content=body, headers={**AUTH, "Content-Type": "application/json"}
        )
        assert answer.status_code == 413
        assert "BNWATCH_MAX_BODY_BYTES" in error_of(answer)["message"]
    with TestClient(make_app(max_body_bytes=len(body))) as client:
        assert post(client, json.loads(body)).status_code == 200


def test_chunked_bodies_are_counted_while_they_stream(
    make_app: Callable[..., FastAPI], engine: Engine
) -> None:
    body = json.dumps(Monitor().body(1)).encode()
    consumed: list[int] = []

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 256):
            consumed.append(i)
            yield body[i : i + 256]

    with TestClient(make_app(max_body_bytes=1000)) as client:
        answer = client.post(ENDPOINT, content=chunks(), headers=AUTH)
        assert "content-length" not in {k.lower() for k in answer.request.headers}
    assert answer.status_code == 413
    assert row_counts(engine)["windows"] == 0


def test_a_huge_content_length_is_refused_without_reading(client: TestClient) -> None:
    answer = client.post(
        ENDPOINT,
        content=b"{}",
        headers={**AUTH, "Content-Length": str(2**40), "Content-Type": "application/json"},
    )
    assert answer.status_code in (413, 400)  # 413 from the service (the client may object)


def test_float_precision_of_statistics_survives(client: TestClient, engine: Engine) -> None:
    """The stored sufficient statistics are the sent ones, bit for bit."""
    record = Monitor().records(1)[0]
    assert post(client, batch_of([record])).status_code == 200
    got = Repository(engine).windows("cnn", "1", with_stats=True)
    for w in got:
        assert w.stats is not None
        sent = record.reports[w.layer].stats.moments
        for a, b in zip(sent.as_arrays(), w.stats.moments.as_arrays(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_window_overflowing_the_totals_is_refused_and_the_next_ones_stored(
    client: TestClient, engine: Engine
) -> None:
    """2**31-1 batches of 2**31-1 samples each fit the wire's bounds, but not the 64-bit total
    of measured samples: on PostgreSQL the third such window failed with 500 (retried by the
    HTTP sink forever, every later window queued behind it), on SQLite the total became a
    float.  Each is refused with 422 before anything is written; the totals stay exact."""
    mon = Monitor()
    assert post(client, mon.body(1)).status_code == 200
    before = row_counts(engine)
    totals = Repository(engine).totals()
    for _ in range(3):
        answer = post(client, _huge_batches(mon.body(1), 0, 2**31 - 1, 2**31 - 1))
        assert answer.status_code == 422, answer.text
        assert error_of(answer)["field"] == "windows.0.layers.0.batch_sizes"
    assert row_counts(engine) == before
    assert Repository(engine).totals() == totals
    assert post(client, mon.body(1)).json() == {"received": 1, "stored": 1, "duplicates": 0}
    samples = {t.layer: t.measured_samples for t in Repository(engine).totals()}
    assert samples == {t.layer: 2 * t.measured_samples for t in totals}


@pytest.mark.parametrize("path", [ENDPOINT, "/api/v1/profiles", "/api/v1/recalibrations/1/outcome"])
def test_a_client_gone_mid_body_is_one_info_line_not_a_500(
    client: TestClient, engine: Engine, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    """A sender that disconnects while its body streams in (its timeout, a dropped
    connection) was answered 500 and logged as two ERROR tracebacks (the catch-all handler's
    and the server's) for each such request: Starlette's ``ClientDisconnect`` reached the
    catch-all handler.  Now it is one INFO line, nothing is stored, and the answer (which no
    client reads) is a 400 of the documented shape."""
    head = b'{"schema_version": 1, "windows": [' + b" " * 1000
    events: list[dict[str, Any]] = [
        {"type": "http.request", "body": head, "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return events.pop(0) if events else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"host", b"testserver"),
            (b"authorization", AUTH["Authorization"].encode()),
            (b"content-type", b"application/json"),
            (b"content-length", b"100000"),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("testserver", 80),
        "state": {},
    }
    assert client.portal is not None
    with caplog.at_level(logging.DEBUG):
        client.portal.call(client.app, scope, receive, send)  # type: ignore[call-arg, arg-type]
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    (line,) = [r for r in caplog.records if "disconnected" in r.getMessage()]
    assert line.levelno == logging.INFO and line.exc_info is None
    assert path in line.getMessage()
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 400
    assert json.loads(sent[1]["body"])["error"]["message"].startswith("the client disconnected")
    assert row_counts(engine)["windows"] == 0
