"""deploy/prometheus/: promtool checks, rule unit tests, and a real Prometheus scraping bnwatch."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from prometheus_client import CollectorRegistry, start_http_server

from bnwatch.alerts import AlertConfig, AlertEngine, Rule
from bnwatch.export import names
from bnwatch.export.store import StoreCollector
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from tests.export.helpers import DEPLOY, binary, promtool, with_layers
from tests.store.helpers import record_windows

T = TypeVar("T")


def test_prometheus_config_is_valid() -> None:
    result = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def test_alert_rules_are_valid_and_lint_clean() -> None:
    result = promtool("check", "rules", str(DEPLOY / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rule_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(DEPLOY / "alerts.test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def alert_names(text: str) -> set[str]:
    return set(re.findall(r"^\s*-?\s*alert(?:name)?:\s*(\w+)\s*$", text, flags=re.MULTILINE))


RULES = len(alert_names((DEPLOY / "alerts.yml").read_text()))
"""The alert rules Prometheus must load from ``alerts.yml``."""


def test_every_alert_kind_has_a_rule_and_every_rule_a_test() -> None:
    rules = (DEPLOY / "alerts.yml").read_text()
    tests = (DEPLOY / "alerts.test.yml").read_text()
    assert set(re.findall(r'bnwatch_alerts_active\{kind="(\w+)"\}', rules)) == set(
        names.ALERT_KINDS
    )
    defined = alert_names(rules)
    assert len(defined) == RULES == 12
    assert alert_names(tests) == defined
    # each alert is tested both firing (exp_alerts with labels) and quiet (exp_alerts: [])
    blocks = re.split(r"\n\s*- eval_time:", tests)[1:]
    firing = {b.split("alertname:")[1].split()[0] for b in blocks if "exp_labels" in b}
    quiet = {b.split("alertname:")[1].split()[0] for b in blocks if "exp_alerts: []" in b}
    assert firing == quiet == defined


# --------------------------------------------------------------------------------------------
# A real Prometheus
# --------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Prometheus:
    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=5) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def wait_for(self, what: str, probe: Callable[[], T | None], timeout: float = 90.0) -> T:
        """Poll ``probe`` until it returns something (never a fixed sleep)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited: {self.log.read_text()[-3000:]}")
            try:
                found = probe()
            except OSError:  # not listening yet
                found = None
            if found is not None:
                return found
            time.sleep(0.2)
        pytest.fail(f"timed out waiting for {what}; prometheus log: {self.log.read_text()[-3000:]}")


@contextmanager
def start_prometheus(tmp_path: Path, target: str) -> Iterator[Prometheus]:
    """Run Prometheus with deploy/prometheus/ (its rules too), scraping ``target`` every 1 s."""
    exe = binary("prometheus")
    config_dir = tmp_path / "prometheus"
    shutil.copytree(DEPLOY, config_dir)
    config = config_dir / "prometheus.yml"
    text = config.read_text()
    fast = text.replace("scrape_interval: 15s", "scrape_interval: 1s")
    fast = fast.replace("evaluation_interval: 15s", "evaluation_interval: 1s")
    fast = fast.replace("scrape_timeout: 10s", "scrape_timeout: 1s")
    assert fast.count(": 1s") == 3, "deploy/prometheus/prometheus.yml changed its intervals"
    config.write_text(fast)
    (config_dir / "targets" / "bnwatch.yml").write_text(f'- targets: ["{target}"]\n')
    port = free_port()
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                exe,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield Prometheus(f"http://127.0.0.1:{port}", process, log)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Repository]:
    """A store with three windows of which the last two drifted in layer 4 (an open alert)."""
    records = record_windows(3)
    records[1:] = [with_layers(r, {"4": {"drifted": True}}) for r in records[1:]]
    engine = engine_for(f"sqlite:///{tmp_path / 'store.db'}")
    repo = Repository(engine)
    repo.write_windows(records)
    AlertEngine(AlertConfig(drift=Rule(open_after=2, resolve_after=2))).evaluate(repo, "cnn", "1")
    yield repo
    engine.dispose()


def test_prometheus_scrapes_the_store_collector_and_evaluates_the_rules(
    tmp_path: Path, store: Repository
) -> None:
    registry = CollectorRegistry()
    registry.register(StoreCollector(store))
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        target = f"127.0.0.1:{server.server_port}"
        with start_prometheus(tmp_path, target) as prometheus:
            check_prometheus(prometheus, registry, target)
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def check_prometheus(prometheus: Prometheus, registry: CollectorRegistry, target: str) -> None:
    def kl_series() -> list[Any] | None:
        result: list[Any] = prometheus.api("query", query="bnwatch_layer_kl_mean")["result"]
        return result if len(result) == 3 else None

    series = prometheus.wait_for("bnwatch_layer_kl_mean", kl_series)
    for s in series:
        labels = s["metric"]
        assert labels["job"] == "bnwatch" and labels["instance"] == target
        assert (labels["model"], labels["version"]) == ("cnn", "1")
        expected = registry.get_sample_value(
            "bnwatch_layer_kl_mean", {k: labels[k] for k in ("model", "version", "layer")}
        )
        assert float(s["value"][1]) == pytest.approx(expected)
    assert {s["metric"]["layer"] for s in series} == {"1", "4", "7"}

    def rules_evaluated() -> list[Any] | None:
        groups: list[Any] = prometheus.api("rules")["groups"]
        rules = [r for g in groups for r in g["rules"]]
        if len(rules) < RULES or any(r["lastEvaluation"].startswith("0001") for r in rules):
            return None
        return rules

    rules = prometheus.wait_for("the alert rules to be evaluated", rules_evaluated)
    assert len(rules) == RULES
    assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]

    def firing() -> set[str] | None:
        alerts = prometheus.api("alerts")["alerts"]
        active = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        return active or None

    assert prometheus.wait_for("BnwatchDrift to fire", firing) == {"BnwatchDrift"}


def test_prometheus_scrapes_a_real_bnwatch_serve(tmp_path: Path, store: Repository) -> None:
    """The deployment path: Prometheus scraping `bnwatch serve`'s /metrics."""
    import os
    import sys

    url = str(store.engine.url)
    port = free_port()
    env = {**os.environ, "BNWATCH_API_TOKEN": "test-token"}
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bnwatch",
                "serve",
                "--db",
                url,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            if serve.poll() is not None:
                pytest.fail(f"bnwatch serve exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"bnwatch serve did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.1)
        registry = CollectorRegistry()  # the expected values, from the same store
        registry.register(StoreCollector(store))
        target = f"127.0.0.1:{port}"
        with start_prometheus(tmp_path, target) as prometheus:
            check_prometheus(prometheus, registry, target)
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
