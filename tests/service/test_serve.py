"""A real ``bnwatch serve`` (uvicorn subprocess on a free port of 127.0.0.1): concurrent
clients into PostgreSQL, the body limit on the wire, schema handling at startup."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bnwatch.cli import main
from bnwatch.store.engine import create_engine
from bnwatch.store.migrate import current_revision, downgrade, engine_for, head_revision
from bnwatch.wire import batch_of
from tests.service.helpers import AUTH, ENDPOINT, LAYERS, Monitor, row_counts, serve

CLIENTS = 8
WINDOWS_PER_CLIENT = 40
"""Enough for the clients to race all along, not only for the first rows (100 took 30 s)."""
RESENT = 10
"""Windows each client sends a second time at the end (retried deliveries)."""


def test_concurrent_clients_store_every_window_exactly_once(
    postgres_url: str, tmp_path: Path
) -> None:
    bodies = [
        [batch_of([r]) for r in Monitor(source=f"replica-{i}", seed=i).records(WINDOWS_PER_CLIENT)]
        for i in range(CLIENTS)
    ]
    answers: list[list[dict[str, int]]] = [[] for _ in range(CLIENTS)]
    failures: list[str] = []
    start = threading.Barrier(CLIENTS)

    def client(i: int, url: str) -> None:
        try:
            with httpx.Client(base_url=url, headers=AUTH, timeout=60.0) as http:
                start.wait()
                for body in [*bodies[i], *bodies[i][:RESENT]]:
                    answer = http.post(ENDPOINT, json=body)
                    if answer.status_code != 200:
                        failures.append(f"client {i}: {answer.status_code} {answer.text}")
                        return
                    answers[i].append(answer.json())
        except Exception as err:  # reported below, with the server's log
            failures.append(f"client {i}: {err!r}")

    with serve(postgres_url, tmp_path / "serve.log", workers=2) as server:
        threads = [threading.Thread(target=client, args=(i, server.url)) for i in range(CLIENTS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not failures, f"{failures[:3]}\n{server.output()[-3000:]}"
        models = httpx.get(f"{server.url}/api/v1/models").json()

    per_client = [sum(a["stored"] for a in client_answers) for client_answers in answers]
    assert per_client == [WINDOWS_PER_CLIENT] * CLIENTS
    assert all(sum(a["duplicates"] for a in client_answers) == RESENT for client_answers in answers)
    engine = create_engine(postgres_url)
    try:
        counts = row_counts(engine)
        with engine.connect() as conn:
            distinct = conn.exec_driver_sql("SELECT count(DISTINCT uid) FROM windows").scalar()
    finally:
        engine.dispose()
    assert distinct == CLIENTS * WINDOWS_PER_CLIENT == 320
    assert counts["windows"] == 320 * len(LAYERS)
    assert counts["models"] == 1 and counts["layers"] == len(LAYERS)
    assert counts["sources"] == CLIENTS
    assert models[0]["windows"] == 320 * len(LAYERS)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'served.db'}"


def test_serve_creates_the_schema_and_enforces_limits_on_the_wire(
    sqlite_url: str, tmp_path: Path
) -> None:
    body = json.dumps(Monitor().body(1)).encode()
    limit = {"BNWATCH_MAX_BODY_BYTES": str(len(body) - 10)}

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 1024):
            yield body[i : i + 1024]

    with serve(sqlite_url, tmp_path / "serve.log", extra_env=limit) as server:
        health = httpx.get(f"{server.url}/healthz").json()
        assert health == {"status": "ok", "database": "ok", "schema_revision": head_revision()}
        url = f"{server.url}{ENDPOINT}"
        declared = httpx.post(
            url, content=body, headers={**AUTH, "Content-Type": "application/json"}
        )
        assert declared.status_code == 413
        chunked = httpx.post(url, content=chunks(), headers=AUTH)
        assert chunked.status_code == 413
        assert "BNWATCH_MAX_BODY_BYTES" in chunked.json()["error"]["message"]
        small = httpx.post(url, json=Monitor(seed=5, layers=[("bn", 1)]).body(1), headers=AUTH)
        assert small.status_code == 200, small.text
        assert httpx.get(f"{server.url}/docs").status_code == 200
        process = server.process
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it (exit status -SIGTERM)
    assert process.returncode in (0, -signal.SIGTERM)
    engine = engine_for(sqlite_url, create=False)
    assert row_counts(engine)["windows"] == 1
    engine.dispose()


def test_serve_without_a_token_refuses_ingest(sqlite_url: str, tmp_path: Path) -> None:
    with serve(sqlite_url, tmp_path / "serve.log", token=None) as server:
        answer = httpx.post(f"{server.url}{ENDPOINT}", json=Monitor().body(1), headers=AUTH)
        assert answer.status_code == 503
        assert "BNWATCH_API_TOKEN" in answer.json()["error"]["message"]
    assert "BNWATCH_API_TOKEN is not set" in server.output()


def test_serve_refuses_an_outdated_database(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = engine_for(sqlite_url)
    downgrade(engine, "-1")
    old = current_revision(engine)
    engine.dispose()
    assert main(["serve", "--db", sqlite_url, "--port", "1"]) == 1
    err = capsys.readouterr().err
    assert f"schema revision {old}" in err and "bnwatch db upgrade" in err


def test_serve_rejects_a_malformed_token(
    sqlite_url: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BNWATCH_API_TOKEN", "has a space")
    assert main(["serve", "--db", sqlite_url]) == 1
    err = capsys.readouterr().err
    assert "BNWATCH_API_TOKEN" in err and "has a space" not in err  # never echo the secret
