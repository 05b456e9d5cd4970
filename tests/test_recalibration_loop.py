"""The whole loop: production drifts, a drift alert opens, a webhook trigger calls a receiver
that verifies the signature, recalibrates and reports back through a real ``bnwatch serve`` --
and the recalibration ends ``applied`` with its references and their lineage.

The receiver is the one docs/recalibration.md shows ("Reporting back"): it answers 202 at once
and does the work in a thread of its own, as a receiver must within the webhook's timeout.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import pytest

import bnwatch
from bnwatch.alerts import AlertConfig, Rule
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from bnwatch.triggers import Trigger, TriggerPolicy, WebhookAction, verify_signature
from tests.service.helpers import TOKEN, serve
from tests.service.webhook import start_server, stop_server, wait_for
from tests.store.helpers import batches, feed, recalibrated_references, small_cnn

SECRET = "loop-s3cret"


DATA = {"source": "the last 24 production batches", "held_out": 8}
"""What the receiver says it recalibrated on: kept in every reference's lineage."""


class RecalibratingReceiver:
    """A webhook receiver on 127.0.0.1 (free port): verifies each event's signature (401
    otherwise), answers 202, then recalibrates a copy of the model on drifted data and reports
    the result to ``service`` with ``bnwatch.report_recalibration``."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.events: list[dict[str, Any]] = []
        self.refused = 0
        self.results: dict[int, Any] = {}
        self.errors: list[BaseException] = []
        self.workers: list[threading.Thread] = []
        owner = self

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                signature = self.headers.get("X-Bnwatch-Signature", "")
                if not verify_signature(body, signature, SECRET):
                    owner.refused += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                event = json.loads(body)
                owner.events.append(event)
                self.send_response(202)
                self.end_headers()
                worker = threading.Thread(target=owner.recalibrate_and_report, args=(event,))
                owner.workers.append(worker)
                worker.start()

            def log_message(self, *args: Any) -> None:
                pass

        self.server, self.url = start_server(Hook)

    def recalibrate_and_report(self, event: dict[str, Any]) -> None:
        rid = event["recalibration_id"]
        try:
            model = small_cnn()  # the deployed architecture and weights
            result = bnwatch.recalibrate(
                model,
                batches(24, seed=11, shift=2.5),  # recent production data
                held_out=batches(8, seed=12, shift=2.5),
                progress=False,
            )
            self.results[rid] = result
            bnwatch.report_recalibration(
                self.service, rid, result, outcome={"receiver": "test", "data": DATA}, token=TOKEN
            )
        except BaseException as err:  # the test asserts there were none
            self.errors.append(err)
            bnwatch.report_recalibration(
                self.service, rid, status="failed", outcome={"error": repr(err)}, token=TOKEN
            )

    def close(self) -> None:
        stop_server(self.server)
        for worker in self.workers:
            worker.join(60)


@pytest.fixture
def receiver_for(db_url: str, tmp_path: Path) -> Iterator[tuple[RecalibratingReceiver, str]]:
    with serve(db_url, tmp_path / "serve.log") as server:
        receiver = RecalibratingReceiver(server.url)
        try:
            yield receiver, server.url
        finally:
            receiver.close()


def test_a_drift_alert_is_recalibrated_by_a_webhook_receiver_and_reported_back(
    db_url: str, receiver_for: tuple[RecalibratingReceiver, str]
) -> None:
    receiver, _ = receiver_for
    model = small_cnn()
    mon = bnwatch.watch(
        model,
        name="cnn",
        version="1",
        store=db_url,
        window_seconds=None,
        overhead_budget=None,
        triggers=[
            Trigger(WebhookAction(receiver.url, SECRET), TriggerPolicy(cooldown_seconds=3600))
        ],
        alerts=AlertConfig(drift=Rule(open_after=1, resolve_after=1)),
        config=bnwatch.DriftConfig(warmup_samples=64, min_samples=8),
    )
    try:
        feed(model, mon, batches(32, seed=1), every=8)  # clean traffic: the warm-up baseline
        feed(model, mon, batches(32, seed=2, shift=2.5), every=8)  # drifted traffic
    finally:
        mon.close()  # the writer has stored every window and run the triggers

    engine = engine_for(db_url, create=False)
    try:
        repo = Repository(engine)
        wait_for(lambda: receiver.events, "the webhook")
        (event,) = receiver.events  # the cooldown lets one through
        rid = event["recalibration_id"]
        wait_for(
            lambda: [r for r in repo.recalibrations() if r.id == rid and r.status != "pending"],
            "the receiver's report",
        )
        assert not receiver.errors, receiver.errors
        assert receiver.refused == 0
        (rec,) = repo.recalibrations()
        alert = next(a for a in repo.alerts() if a.id == rec.alert_id)
        assert alert.kind == "drift" and event["alert"]["id"] == alert.id
        assert (rec.id, rec.status, rec.method) == (rid, "applied", "WebhookAction")
        assert rec.finished_at is not None and rec.outcome is not None
        result = receiver.results[rid]
        assert rec.outcome["receiver"] == "test" and rec.outcome["improved"] is True
        assert rec.outcome["samples"] == result.samples

        # the new statistics are stored as `recalibrated` references, with their lineage
        lineages, stored = recalibrated_references(engine, rec.outcome["references"], result)
        assert stored == set(rec.outcome["references"].values())
        for lineage in lineages.values():
            assert lineage == {
                "recalibration_id": rid,
                "alert_id": alert.id,
                "method": result.method,  # what ran; the webhook requested it
                "requested": "WebhookAction",
                "samples": result.samples,
                "data": DATA,
            }
    finally:
        engine.dispose()


def test_the_documented_receiver_is_valid_python_using_the_public_api() -> None:
    """docs/recalibration.md's receiver compiles, and what it calls exists."""
    import ast
    import re

    text = (Path(__file__).resolve().parents[1] / "docs" / "recalibration.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    (receiver,) = [b for b in blocks if "verify_signature" in b]
    tree = ast.parse(receiver)
    compile(tree, "docs/recalibration.md", "exec")
    called = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "bnwatch"
    }
    assert called == {"recalibrate", "report_recalibration"}
    assert all(callable(getattr(bnwatch, name)) for name in called)
    assert "from bnwatch.triggers import verify_signature" in receiver
