"""Read endpoints, /healthz, /metrics and the error shape of 404/405/422/500/503."""

from __future__ import annotations

import dataclasses
import logging
from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.engine import Engine

from bnwatch.drift import DriftConfig, config_account
from bnwatch.schema import utcnow
from bnwatch.service.schemas import WindowMetrics
from bnwatch.store.models import Alert, Layer, Model
from bnwatch.store.repository import METRIC_COLUMNS, Repository
from bnwatch.wire import batch_of
from tests.service.helpers import AUTH, ENDPOINT, LAYERS, T0, Monitor

BASE = "/api/v1/models/cnn/versions/1"


@pytest.fixture
def stored(client: TestClient) -> Monitor:
    """Six windows of model cnn@1 from two monitors (three each)."""
    one, two = Monitor(source="replica-1"), Monitor(source="replica-2", seed=1)
    answer = client.post(ENDPOINT, json=batch_of(one.records(3) + two.records(3)), headers=AUTH)
    assert answer.json()["stored"] == 6
    return one


def error_of(answer: Any, status: int) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    error: dict[str, Any] = answer.json()["error"]
    assert error["message"]
    return error


def test_models_and_layers(client: TestClient, stored: Monitor) -> None:
    models = client.get("/api/v1/models").json()
    assert [(m["name"], m["version"], m["layers"], m["windows"]) for m in models] == [
        ("cnn", "1", len(LAYERS), 6 * len(LAYERS))
    ]
    assert models[0]["last_window_end"].startswith("2026-03-01T12:03:00")
    layers = client.get(f"{BASE}/layers").json()
    assert [(la["name"], la["channels"], la["depth"]) for la in layers] == [
        (name, channels, depth) for depth, (name, channels) in enumerate(LAYERS)
    ]


def test_windows_filters(client: TestClient, stored: Monitor) -> None:
    everything = client.get(f"{BASE}/windows").json()
    assert len(everything) == 6 * len(LAYERS)
    first = everything[0]
    assert first["layer"] == "bn1" and first["stats"] is None
    assert set(first["metrics"]) == set(METRIC_COLUMNS)
    assert isinstance(first["metrics"]["gap"], bool)
    one_layer = client.get(f"{BASE}/windows", params={"layer": "head.bn"}).json()
    assert {w["layer"] for w in one_layer} == {"head.bn"} and len(one_layer) == 6
    mine = client.get(f"{BASE}/windows", params={"source": "replica-2"}).json()
    assert {w["source"] for w in mine} == {"replica-2"} and len(mine) == 3 * len(LAYERS)
    start = (T0 + timedelta(minutes=2)).isoformat()
    end = (T0 + timedelta(minutes=3)).isoformat()
    ranged = client.get(f"{BASE}/windows", params={"start": start, "end": end}).json()
    # windows ending in [12:02, 12:03): the second window of each monitor
    assert len(ranged) == 2 * len(LAYERS)
    assert {w["end"] for w in ranged} == {"2026-03-01T12:02:00Z"}


def test_windows_merged_to_a_resolution(client: TestClient, stored: Monitor) -> None:
    merged = client.get(f"{BASE}/windows", params={"resolution": 3600, "stats": "true"}).json()
    assert len(merged) == len(LAYERS)  # one hour bucket per layer, both monitors merged
    for window, (name, channels) in zip(merged, LAYERS, strict=True):
        assert window["layer"] == name
        assert window["merged_from"] == 6
        assert window["source"] == "*"
        assert window["resolution_seconds"] == 3600
        assert window["n_samples"] == 6 * 16
        assert len(window["stats"]["mean"]) == channels
        assert all(isinstance(x, float) for x in window["stats"]["var"])


def test_merged_windows_are_judged_at_the_thresholds_the_windows_were(client: TestClient) -> None:
    """``?resolution=`` re-judges merged windows: at the thresholds their monitor reported
    (which decided the stored flags), else at the service's own."""
    loose = DriftConfig(min_shift=50.0, min_log_ratio=50.0, min_samples=4, warmup_samples=16)
    reported = [
        dataclasses.replace(r, monitor={**r.monitor, **config_account(loose)})
        for r in Monitor(version="reported").records(3, shift=1.0)
    ]
    silent = Monitor(version="silent").records(3, shift=1.0)  # an account without thresholds
    answer = client.post(ENDPOINT, json=batch_of(reported + silent), headers=AUTH)
    assert answer.json()["stored"] == 6

    def drifted(version: str) -> list[bool]:
        merged = client.get(
            f"/api/v1/models/cnn/versions/{version}/windows", params={"resolution": 3600}
        ).json()
        assert [w["merged_from"] for w in merged] == [3] * len(LAYERS)
        return [w["metrics"]["drifted"] for w in merged]

    assert drifted("silent") == [True] * len(LAYERS)  # the service's default thresholds
    assert drifted("reported") == [False] * len(LAYERS)


def test_latest_windows(client: TestClient, stored: Monitor) -> None:
    latest = client.get(f"{BASE}/windows/latest", params={"stats": True}).json()
    assert [w["layer"] for w in latest] == [name for name, _ in LAYERS]
    assert {w["end"] for w in latest} == {"2026-03-01T12:03:00Z"}
    assert [len(w["stats"]["between_var"]) for w in latest] == [c for _, c in LAYERS]


def test_metric_fields_follow_the_store() -> None:
    assert list(WindowMetrics.model_fields) == list(METRIC_COLUMNS)


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/models/nope/versions/1/layers",
        "/api/v1/models/cnn/versions/2/windows",
        "/api/v1/models/cnn/versions/2/windows/latest",
    ],
)
def test_unknown_model_versions_are_404(client: TestClient, stored: Monitor, path: str) -> None:
    error = error_of(client.get(path), 404)
    assert "GET /api/v1/models" in error["message"]


def test_unknown_layer_is_404(client: TestClient, stored: Monitor) -> None:
    error = error_of(client.get(f"{BASE}/windows", params={"layer": "nope"}), 404)
    assert error["field"] == "layer"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"start": "2026-03-01T12:00:00"}, "start"),
        ({"start": "yesterday"}, "start"),
        ({"start": "2026-03-01T12:00:00Z", "end": "2026-03-01T11:00:00Z"}, "end"),
        ({"resolution": "0"}, "resolution"),
        ({"resolution": "1e300"}, "resolution"),
        ({"stats": "maybe"}, "stats"),
    ],
)
def test_bad_parameters_are_422_naming_them(
    client: TestClient, stored: Monitor, params: dict[str, str], field: str
) -> None:
    error = error_of(client.get(f"{BASE}/windows", params=params), 422)
    assert error["field"] == field
    assert error["message"].startswith(f"{field}: ")


def test_alerts_and_recalibrations(client: TestClient, engine: Engine, stored: Monitor) -> None:
    repository = Repository(engine)
    with engine.begin() as conn:
        model_id = conn.execute(sa.select(Model.id)).scalar_one()
        layer_id = conn.execute(sa.select(Layer.id).where(Layer.name == "bn1")).scalar_one()
        now = utcnow()
        for state in ("open", "resolved"):
            conn.execute(
                sa.insert(Alert).values(
                    model_id=model_id,
                    layer_id=layer_id,
                    kind="drift",
                    state=state,
                    opened_at=now,
                    last_seen_at=now,
                    resolved_at=now if state == "resolved" else None,
                    values={"d_rms": 1.5},
                )
            )
    rec = repository.start_recalibration("cnn", "1", method="precise")
    repository.finish_recalibration(rec, status="applied", outcome={"samples": 128})

    alerts = client.get("/api/v1/alerts").json()
    assert sorted(a["state"] for a in alerts) == ["open", "resolved"]
    open_ = client.get("/api/v1/alerts", params={"state": "open", "model": "cnn"}).json()
    assert [(a["layer"], a["kind"], a["values"]) for a in open_] == [
        ("bn1", "drift", {"d_rms": 1.5})
    ]
    assert client.get("/api/v1/alerts", params={"model": "other"}).json() == []
    assert client.get("/api/v1/alerts", params={"state": "acknowledged"}).json() == []
    error = error_of(client.get("/api/v1/alerts", params={"state": "sleepy"}), 422)
    assert error["field"] == "state"

    recs = client.get("/api/v1/recalibrations", params={"model": "cnn", "version": "1"}).json()
    assert [(r["status"], r["method"], r["outcome"]["samples"]) for r in recs] == [
        ("applied", "precise", 128)
    ]


def test_acknowledged_lists_the_open_alerts_a_person_acknowledged(
    client: TestClient, engine: Engine, stored: Monitor
) -> None:
    """Acknowledging sets acknowledged_at and leaves the alert open: no alert ever has the
    state 'acknowledged', and the filter the OpenAPI schema offers answered [] for good."""
    with engine.begin() as conn:
        model_id = conn.execute(sa.select(Model.id)).scalar_one()
        now = utcnow()
        ids = {
            name: conn.execute(
                sa.insert(Alert)
                .values(
                    model_id=model_id,
                    layer_id=conn.execute(
                        sa.select(Layer.id).where(Layer.name == layer)
                    ).scalar_one(),
                    kind="drift",
                    state=state,
                    opened_at=now,
                    last_seen_at=now,
                    resolved_at=now if state == "resolved" else None,
                    values={},
                )
                .returning(Alert.id)
            ).scalar_one()
            for name, layer, state in (
                ("open, acknowledged", "bn1", "open"),
                ("open", "layer1.bn2", "open"),
                ("resolved, acknowledged", "head.bn", "resolved"),
            )
        }
    repository = Repository(engine)
    assert repository.acknowledge_alert(ids["open, acknowledged"])
    assert repository.acknowledge_alert(ids["resolved, acknowledged"])

    acknowledged = client.get("/api/v1/alerts", params={"state": "acknowledged"})
    assert acknowledged.status_code == 200
    assert [(a["id"], a["state"]) for a in acknowledged.json()] == [
        (ids["open, acknowledged"], "open")
    ]
    assert acknowledged.json()[0]["acknowledged_at"] is not None
    other = client.get("/api/v1/alerts", params={"state": "acknowledged", "model": "other"})
    assert other.json() == []
    opened = client.get("/api/v1/alerts", params={"state": "open"}).json()
    assert {a["id"] for a in opened} == {ids["open, acknowledged"], ids["open"]}
    schema = client.get("/openapi.json").json()["paths"]["/api/v1/alerts"]["get"]
    state = next(p for p in schema["parameters"] if p["name"] == "state")
    assert "acknowledged_at" in state["description"]


def test_unknown_paths_and_methods_are_json(client: TestClient) -> None:
    assert "no such endpoint" in error_of(client.get("/api/v1/nope"), 404)["message"]
    error = error_of(client.delete("/api/v1/models"), 405)
    assert "allowed: GET" in error["message"]
    error = error_of(client.get(ENDPOINT), 405)
    assert "POST" in error["message"]


def test_a_500_is_json_without_a_traceback_and_logged(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    def broken() -> None:
        raise RuntimeError("secret internals at 0xdeadbeef")

    monkeypatch.setattr(app.state.bnwatch.repository, "models", broken)
    with caplog.at_level(logging.ERROR, logger="bnwatch.service"):
        answer = client.get("/api/v1/models")
    error = error_of(answer, 500)
    assert "service log" in error["message"]
    assert "secret" not in answer.text and "Traceback" not in answer.text
    assert "secret internals" in caplog.text and "Traceback" in caplog.text


def test_an_unavailable_database_is_503_with_retry_after(
    app: FastAPI, client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: Any, **kwargs: Any) -> None:
        raise sa.exc.OperationalError("SELECT 1", {}, Exception("connection refused"))

    monkeypatch.setattr(app.state.bnwatch.repository, "models", down)
    monkeypatch.setattr(app.state.bnwatch.repository, "write_windows", down)
    answer = client.get("/api/v1/models")
    assert "connection refused" in error_of(answer, 503)["message"]
    assert int(answer.headers["retry-after"]) > 0
    answer = client.post(ENDPOINT, json=Monitor().body(1), headers=AUTH)
    assert error_of(answer, 503)["message"].endswith("retry later")


@pytest.mark.parametrize(
    "error",
    [
        sa.exc.DataError("INSERT INTO layer_totals ...", {}, Exception("bigint out of range")),
        sa.exc.IntegrityError("INSERT INTO windows ...", {}, Exception("bigint out of range")),
        sa.exc.StatementError(  # sqlite3 binding an integer beyond 64 bits
            "bigint out of range", "INSERT INTO windows ...", {}, OverflowError("too large")
        ),
    ],
    ids=["DataError", "IntegrityError", "unbindable"],
)
def test_data_the_database_refuses_is_422_not_500(
    app: FastAPI,
    client: TestClient,
    monkeypatch: pytest.MonkeyPatch,
    caplog: Any,
    error: sa.exc.StatementError,
) -> None:
    """A window the database refused (an out-of-range value) was a 500, which the HTTP sink
    retries forever, every later window waiting behind it.  The background writer rejects
    such a window for good; the service says 422, which the sink rejects too."""

    def refusing(*args: Any, **kwargs: Any) -> None:
        raise error

    monkeypatch.setattr(app.state.bnwatch.repository, "write_windows", refusing)
    with caplog.at_level(logging.WARNING, logger="bnwatch.service"):
        answer = client.post(ENDPOINT, json=Monitor().body(1), headers=AUTH)
    error_ = error_of(answer, 422)
    first = str(error.orig)
    assert error_ == {
        "message": f"the database refused the data ({first}); the request changed nothing, "
        "and sending it again would fail the same way",
        "field": None,
    }
    assert "INSERT" not in answer.text and "Traceback" not in caplog.text
    assert f"POST {ENDPOINT}: the database refused the data: {first}" in caplog.text


def test_healthz(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnwatch.service.routes import health
    from bnwatch.store.migrate import head_revision

    assert client.get("/healthz").json() == {
        "status": "ok",
        "database": "ok",
        "schema_revision": head_revision(),
    }

    def unreachable(engine: Engine) -> str:
        raise sa.exc.OperationalError("SELECT", {}, Exception("could not connect"))

    monkeypatch.setattr(health, "current_revision", unreachable)
    answer = client.get("/healthz")
    assert answer.status_code == 503
    body = answer.json()
    assert (body["status"], body["database"]) == ("error", "unreachable")
    assert "could not connect" in body["error"]["message"]

    monkeypatch.setattr(health, "current_revision", lambda engine: "0001")
    body = client.get("/healthz").json()
    assert (body["database"], body["schema_revision"]) == ("outdated", "0001")
    assert "bnwatch db upgrade" in body["error"]["message"]


def test_healthz_of_a_stopped_database(make_app: Any, engine: Engine, tmp_path: Any) -> None:
    """A real unreachable database: the engine's server is gone."""
    from bnwatch.store.engine import create_engine

    app = make_app()
    dead = create_engine("postgresql://nobody@127.0.0.1:1/none")
    app.state.bnwatch.engine = dead
    with TestClient(app) as client:
        answer = client.get("/healthz")
    dead.dispose()
    assert answer.status_code == 503
    assert answer.json()["database"] == "unreachable"


def test_metrics_are_prometheus_text_from_the_store(client: TestClient, stored: Monitor) -> None:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    assert families["bnwatch_store_up"].samples[0].value == 1
    layers = {
        s.labels["layer"]
        for f in families.values()
        for s in f.samples
        if s.labels.get("model") == "cnn" and "layer" in s.labels
    }
    assert layers == {name for name, _ in LAYERS}
    assert all(f.name.startswith("bnwatch_") for f in families.values())
    again = client.get("/metrics")  # one registry per app: a second scrape works the same
    assert again.status_code == 200


def test_two_apps_have_their_own_state(make_app: Any) -> None:
    one, two = make_app(), make_app(api_token="another-token")
    assert one.state.bnwatch is not two.state.bnwatch
    with TestClient(two) as client:
        assert client.post(ENDPOINT, json=Monitor().body(1), headers=AUTH).status_code == 401


def test_healthz_of_a_database_a_newer_bnwatch_migrated(client: TestClient, engine: Engine) -> None:
    """A rolling deploy: a newer bnwatch migrated the database past this service's revisions.
    /healthz said "outdated: run `bnwatch db upgrade`", which cannot work (this bnwatch does
    not know the revision): the database is "newer", and this service is what to upgrade."""
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = '0099'"))
    answer = client.get("/healthz")
    assert answer.status_code == 503
    body = answer.json()
    assert (body["status"], body["database"], body["schema_revision"]) == (
        "error",
        "newer",
        "0099",
    )
    message = body["error"]["message"]
    assert "0099" in message and "upgrade this bnwatch service" in message
    assert "bnwatch db upgrade" not in message
