"""The metric specification: naming rules, one source of truth, and no torch."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bnwatch import alerts, schema
from bnwatch.export import names
from bnwatch.schema import BatchNoise, LayerReport
from bnwatch.store.repository import METRIC_COLUMNS
from tests.export.helpers import ROOT

UNIT_WORDS = (
    *("nats", "dimensionless", "ratio", "probability", "1 if", "seconds"),
    *("samples", "batches", "windows", "values", "errors", "alerts", "events"),
)


@pytest.mark.parametrize("spec", names.ALL_METRICS, ids=lambda s: s.name)
def test_names_follow_the_prometheus_conventions(spec: names.MetricSpec) -> None:
    assert re.fullmatch(r"bnwatch_[a-z0-9_]+", spec.name)
    assert spec.name.endswith("_total") == (spec.type == "counter")
    assert "channel" not in spec.labels  # never per channel (cardinality)
    assert not re.search(r"_(milliseconds|ms|percent|bytes_k)\b", spec.name)  # base units
    if spec.name.endswith("_timestamp_seconds"):
        assert "seconds since the Unix epoch" in spec.help
    assert any(word in spec.help for word in UNIT_WORDS), spec.help


def test_label_sets() -> None:
    for spec in names.LAYER_METRICS:
        assert spec.labels == ("model", "version", "layer")
    for spec in names.MONITOR_METRICS:
        assert spec.labels == ("model", "version", "source")
    assert names.ALERTS_ACTIVE.labels == ("model", "version", "kind")
    for spec in names.SERVICE_ONLY:
        assert spec.labels == ()  # one service process's own state
    assert len({s.name for s in names.ALL_METRICS}) == len(names.ALL_METRICS)


def test_layer_gauges_read_stored_layer_metrics() -> None:
    fields = [s.field for s in names.LAYER_GAUGES]
    assert all(f in METRIC_COLUMNS for f in fields)
    report_fields = set(LayerReport.__dataclass_fields__) | {"batch_noise_d", "batch_noise_log_r"}
    assert set(fields) <= report_fields
    assert {s.field for s in names.LAYER_GAUGES if s.boolean} == {
        "drifted",
        "gap",
        "batch_stat_mode",
        "running_stats_mutated",
        "small_batch_mismatch",
    }
    assert {"rms_d", "rms_log_r"} <= set(BatchNoise.__dataclass_fields__)


def test_alert_kinds_are_the_alert_engines() -> None:
    assert names.ALERT_KINDS == schema.ALERT_KINDS
    assert set(alerts.LAYER_KINDS) | {"no_data"} == set(schema.ALERT_KINDS)


@pytest.mark.parametrize(
    "module", ["bnwatch.export", "bnwatch.export.store", "bnwatch.export.monitor"]
)
def test_exporters_import_without_torch(module: str) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None  # any 'import torch' now raises ImportError\n"
        f"import {module}\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 0, result.stderr
