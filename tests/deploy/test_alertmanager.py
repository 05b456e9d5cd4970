"""deploy/alertmanager/alertmanager.yml in a real Alertmanager: which alerts its inhibit rules mute.

Alertmanager (Debian's ``prometheus-alertmanager``) runs with the repository's file on a free
loopback port, clustering off; the test posts alerts as Prometheus would and reads back each
alert's status from the v2 API.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from tests.deploy.helpers import ROOT, tool
from tests.export.test_prometheus import free_port

CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"


class Alertmanager:
    def __init__(self, url: str, process: subprocess.Popen[bytes], log: Path) -> None:
        self.url, self.process, self.log = url, process, log

    def post(self, *alerts: dict[str, str]) -> None:
        """Fire ``alerts`` (label sets) for the next hour, as Prometheus sends them."""
        now = datetime.now(timezone.utc)
        body = [
            {
                "labels": labels,
                "startsAt": now.isoformat(),
                "endsAt": (now + timedelta(hours=1)).isoformat(),
            }
            for labels in alerts
        ]
        request = urllib.request.Request(
            f"{self.url}/api/v2/alerts",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200

    def alerts(self) -> dict[str, dict[str, Any]]:
        """Every alert the API lists, by its ``model`` or else its ``job`` label -> status."""
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=5) as response:
            listed = json.loads(response.read())
        return {
            a["labels"].get("model") or a["labels"]["alertname"] + ":" + a["labels"]["job"]: a[
                "status"
            ]
            for a in listed
        }

    def wait_for(self, key: str, state: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll until alert ``key`` is listed in ``state`` (never a fixed sleep)."""
        deadline = time.monotonic() + timeout
        seen: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"alertmanager exited: {self.log.read_text()[-3000:]}")
            try:
                seen = self.alerts().get(key)
            except OSError:  # not listening yet
                seen = None
            if seen is not None and seen["state"] == state:
                return seen
            time.sleep(0.1)
        pytest.fail(f"alert {key} not {state} in {timeout} s (last: {seen})")


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[Alertmanager]:
    exe = tool("prometheus-alertmanager", "prometheus-alertmanager")
    port = free_port()
    log = tmp_path / "alertmanager.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                exe,
                f"--config.file={CONFIG}",
                f"--storage.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--cluster.listen-address=",  # one instance, no gossip port
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    manager = Alertmanager(f"http://127.0.0.1:{port}", process, log)
    try:
        deadline = time.monotonic() + 60
        while True:  # ready once the API answers
            try:
                manager.alerts()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"alertmanager did not start: {log.read_text()[-3000:]}")
                time.sleep(0.1)
        yield manager
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def model_alert(name: str, model: str) -> dict[str, str]:
    return {
        "alertname": name,
        "model": model,
        "version": "1",
        "job": "bnwatch",
        "severity": "warning",
    }


def test_a_monitor_exporter_that_cannot_be_scraped_mutes_no_model_alert(
    alertmanager: Alertmanager,
) -> None:
    """A gone replica's exporter (job bnwatch-monitor) is down: its ScrapeDown muted every
    model's Drift and NoData, because the inhibit rule matched ScrapeDown of any job."""
    alertmanager.post(
        {"alertname": "BnwatchScrapeDown", "job": "bnwatch-monitor", "instance": "w:9464"}
    )
    alertmanager.wait_for("BnwatchScrapeDown:bnwatch-monitor", "active")
    alertmanager.post(model_alert("BnwatchDrift", "a"), model_alert("BnwatchNoData", "b"))
    for key in ("a", "b"):
        assert alertmanager.wait_for(key, "active")["inhibitedBy"] == []
    # the service's own scrape failing mutes them (the control: the rules are loaded)
    alertmanager.post({"alertname": "BnwatchScrapeDown", "job": "bnwatch", "instance": "api:8000"})
    for key in ("a", "b"):
        assert alertmanager.wait_for(key, "suppressed")["inhibitedBy"]


def test_a_store_that_cannot_be_read_mutes_the_model_alerts_only(
    alertmanager: Alertmanager,
) -> None:
    alertmanager.post(
        model_alert("BnwatchDrift", "a"),
        model_alert("BnwatchSmallBatchMismatch", "b"),
        model_alert("BnwatchBatchStatMode", "c"),  # critical, and not stale: never muted
        {"alertname": "BnwatchStoreDown", "job": "bnwatch", "instance": "api:8000"},
    )
    for key in ("a", "b"):
        assert alertmanager.wait_for(key, "suppressed")["inhibitedBy"]
    assert alertmanager.wait_for("c", "active")["inhibitedBy"] == []
    assert alertmanager.wait_for("BnwatchStoreDown:bnwatch", "active")["inhibitedBy"] == []
