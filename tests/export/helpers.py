"""Shared helpers of the exporter tests: real binaries, real windows, scraping."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import urllib.request
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bnwatch.schema import WindowRecord

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "prometheus"
T0 = datetime(2026, 6, 1, 12, 0, tzinfo=timezone.utc)


def binary(name: str) -> str:
    """The path of a Prometheus binary; skips without it -- except in CI (``CI=true``)."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install prometheus)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI requires it")
        pytest.skip(message)
    return path


def promtool(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``promtool args...``; the caller asserts on the result."""
    return subprocess.run(
        [binary("promtool"), *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def check_exposition(text: str) -> None:
    """Assert ``text`` is clean under ``promtool check metrics`` (no errors, no lint).

    Without promtool this check alone is left out (the calling test's other assertions still
    run; ``test_exposition_is_promtool_clean`` reports the skip) -- except in CI, which fails.
    """
    if shutil.which("promtool") is None and not os.environ.get("CI"):
        return
    result = promtool("check", "metrics", stdin=text.encode())
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def check_metrics(registry: CollectorRegistry) -> str:
    """The exposition text of ``registry``, asserted clean under ``promtool check metrics``."""
    text = generate_latest(registry).decode()
    check_exposition(text)
    return text


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse exposition text into {(sample name, labels): value}."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        body: bytes = response.read()
    return body.decode()


def at_minute(record: WindowRecord, i: int, **changes: object) -> WindowRecord:
    """``record`` moved to the i-th one-minute window after T0 (a fresh uid)."""
    start = T0 + timedelta(minutes=i)
    values: dict[str, object] = {
        "uid": uuid.uuid4().hex,
        "start": start,
        "end": start + timedelta(minutes=1),
    }
    values.update(changes)
    return dataclasses.replace(record, **values)  # type: ignore[arg-type]


def with_layers(
    record: WindowRecord, layer_changes: Mapping[str, Mapping[str, object]]
) -> WindowRecord:
    """``record`` with fields of named layers' reports replaced (``{"4": {"drifted": True}}``)."""
    reports = dict(record.reports)
    for name, changes in layer_changes.items():
        reports[name] = dataclasses.replace(reports[name], **changes)  # type: ignore[arg-type]
    return dataclasses.replace(record, reports=reports)
