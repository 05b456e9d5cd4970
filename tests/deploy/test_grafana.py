"""deploy/grafana/: the dashboard JSON and the provisioning files.

Every PromQL query of the dashboard may name only metrics the exporters really emit: the set is
collected from a :class:`StoreCollector` over a seeded SQLite store, from a
:class:`MonitorExporter` fed the same windows (histograms as their ``_bucket``, ``_sum`` and
``_count`` samples) and from a service's :class:`TriggerQueueCollector`, not copied from a
list.  Queries are also checked by Prometheus's own
parser (``promtool check rules``) and the label matchers against the labels the metrics carry.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from bnwatch.export import names
from bnwatch.export.monitor import MonitorExporter
from bnwatch.export.service import TriggerQueueCollector
from bnwatch.export.store import StoreCollector
from bnwatch.service.triggers import TriggerRunner
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import Repository
from bnwatch.triggers import Trigger, TriggerPolicy, WebhookAction
from tests.deploy.helpers import COMPOSE_FILE, GRAFANA, PROMETHEUS, ROOT, load_yaml, tool
from tests.store.helpers import record_windows

DASHBOARD = GRAFANA / "dashboards" / "bnwatch.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "bnwatch.yml"

TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus adds to every scraped series (plus those of the target files)."""


# --------------------------------------------------------------------------------------------
# What the exporters emit
# --------------------------------------------------------------------------------------------
def sample_labels(registry: CollectorRegistry) -> dict[str, set[str]]:
    """{sample name: its label names} of everything ``registry`` exports now."""
    out: dict[str, set[str]] = {}
    for family in registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


@pytest.fixture(scope="module")
def emitted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """{sample name: label names} the store's and the monitor's exporters emit, for real."""
    windows = [
        dataclasses.replace(w, monitor={**w.monitor, "overhead_ratio": 0.01, "windows_dropped": 1})
        for w in record_windows(3)
    ]
    engine = engine_for(f"sqlite:///{tmp_path_factory.mktemp('store') / 'bnwatch.db'}")
    try:
        repo = Repository(engine)
        repo.write_windows(windows)
        # a pending recalibration, so that its oldest-pending gauge emits too
        repo.start_recalibration(windows[0].model, windows[0].version, method="precise")
        store = CollectorRegistry()
        store.register(StoreCollector(repo))
        found = sample_labels(store)
    finally:
        engine.dispose()
    monitor = MonitorExporter()
    for window in windows:
        monitor.observe(window)
    for name, labels in sample_labels(monitor.registry).items():
        found.setdefault(name, set()).update(labels)
    service = CollectorRegistry()  # the service process's own trigger queue
    hook = WebhookAction("http://127.0.0.1:9/hook", "secret")
    service.register(TriggerQueueCollector(TriggerRunner(Trigger(hook, TriggerPolicy()))))
    for name, labels in sample_labels(service).items():
        found.setdefault(name, set()).update(labels)
    # the seeded data makes every family emit (else a missing name would pass unnoticed)
    for spec in names.ALL_METRICS:
        suffixes = ("_bucket", "_sum", "_count") if spec.type == "histogram" else ("",)
        for suffix in suffixes:
            assert spec.name + suffix in found, spec.name + suffix
    extra = set(TARGET_LABELS)
    for path in (PROMETHEUS / "targets").glob("*.yml"):
        for group in load_yaml(path) or []:
            extra.update(group.get("labels", {}))
    return {name: labels | extra for name, labels in found.items()}


# --------------------------------------------------------------------------------------------
# The dashboard's queries
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target."""
    return [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def variable_queries(dashboard: dict[str, Any]) -> dict[str, str]:
    """{variable: query} of the dashboard's query variables (``label_values(...)``)."""
    out = {}
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        out[variable["name"]] = query["query"] if isinstance(query, dict) else query
    return out


TOKEN = re.compile(
    r"""(?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
      | (?P<range>\[[^\]]*\])
      | (?P<number>\d[\w.]*)
      | (?P<ident>[A-Za-z_:][\w:]*)
      | (?P<punct>[{}(),])
      | (?P<other>\S)""",
    re.VERBOSE,
)
GROUPING = {"by", "without", "on", "ignoring", "group_left", "group_right"}
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
    "bottomk", "topk", "quantile", "limitk", "limit_ratio",
}  # fmt: skip


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) of every vector selector of a PromQL expression.

    A small PromQL lexer: strings, range/subquery brackets and numbers (durations included) are
    skipped; an identifier followed by ``(`` (or an aggregation followed by ``by``/``without``)
    is a function or aggregation; the identifiers in a
    ``by``/``without``/``on``/``ignoring``/``group_*`` list are labels; the identifiers inside
    ``{...}`` are label names of the selector before them; every other identifier is a metric.
    """
    tokens = [(m.lastgroup, m.group()) for m in TOKEN.finditer(expr)]
    found: list[tuple[str, set[str]]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text.lower() in GROUPING and following == "(":
            i = _closing(tokens, i + 1)
        elif kind == "ident" and following == "(":
            pass  # a function or an aggregation
        elif kind == "ident" and text in AGGREGATIONS and following in GROUPING:
            pass  # `sum by (...) (...)`
        elif kind == "ident" and text.lower() in KEYWORDS:
            pass
        elif kind == "ident":
            labels: set[str] = set()
            if following == "{":
                end = _closing(tokens, i + 1)
                labels = {t for k, t in tokens[i + 2 : end] if k == "ident"}
                i = end
            found.append((text, labels))
        elif text == "{":
            pytest.fail(f"{expr!r}: a selector without a metric name")
        i += 1
    return found


def _closing(tokens: list[tuple[str | None, str]], start: int) -> int:
    """The index of the bracket closing the one at ``start``."""
    pairs = {"(": ")", "{": "}"}
    opening = tokens[start][1]
    depth = 0
    for j in range(start, len(tokens)):
        if tokens[j][1] == opening:
            depth += 1
        elif tokens[j][1] == pairs[opening]:
            depth -= 1
            if depth == 0:
                return j
    pytest.fail(f"unbalanced {opening!r} in {''.join(t for _, t in tokens)!r}")


def test_selector_lexer() -> None:
    expr = (
        'histogram_quantile(0.5, sum by (model, le) (rate(m_bucket{model=~"$m",a="x{y}"}'
        "[$__rate_interval] offset 5m))) / on (model) group_left (layer) n_total and "
        'bool time() - 1e3 * sum without (x) (g{b!="c"})'
    )
    assert selectors(expr) == [
        ("m_bucket", {"model", "a"}),
        ("n_total", set()),
        ("g", {"b"}),
    ]


def test_dashboard_json_parses_and_is_well_formed(dashboard: dict[str, Any]) -> None:
    assert dashboard["uid"] == "bnwatch" and dashboard["title"]
    panels = list(all_panels(dashboard["panels"]))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    occupied: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in occupied, f"{panel['title']} overlaps {occupied[x, y]}"
                occupied[x, y] = panel["title"]
        if panel["type"] != "row":
            assert panel.get("targets"), f"{panel['title']} has no query"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel["title"]


def test_every_query_names_only_emitted_metrics(
    dashboard: dict[str, Any], emitted: dict[str, set[str]]
) -> None:
    checked = [*queries(dashboard), *variable_queries(dashboard).items()]
    assert len(checked) > 20
    for where, expr in checked:
        found = selectors(label_values_selector(expr) or expr)
        assert found, f"{where}: {expr!r} names no metric"
        for metric, labels in found:
            assert metric in emitted, f"{where}: {metric} is not a metric bnwatch exports"
            unknown = labels - emitted[metric]
            assert not unknown, f"{where}: {metric} has no label {sorted(unknown)}"


def label_values_selector(query: str) -> str | None:
    """The selector of Grafana's ``label_values(selector, label)`` (``None``: not one)."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.DOTALL)
    return match.group(1) if match else None


def test_queries_follow_the_dashboard_variables(
    dashboard: dict[str, Any], emitted: dict[str, set[str]]
) -> None:
    """Each selector filters on the model/version/layer variables its metric has labels for."""
    variables = variable_queries(dashboard)
    assert list(variables) == ["job", "model", "version", "layer"]
    for where, expr in queries(dashboard):
        for metric, labels in selectors(expr):
            wanted = {"model", "version", "layer"} & emitted.get(metric, set())
            assert wanted <= labels, f"{where}: {metric} is not filtered by {wanted - labels}"
            for label in wanted:
                assert f'{label}=~"${label}"' in expr, f"{where}: {label}"
            # one scrape job at a time: the service's /metrics and the monitors' exporters
            # carry the same series, and a sum over both counted every sample twice
            assert "job" in labels and 'job=~"$job"' in expr, f"{where}: {metric} has no $job"
    (job,) = [v for v in dashboard["templating"]["list"] if v["name"] == "job"]
    assert not job["multi"] and not job["includeAll"] and job["current"]["value"] == "bnwatch"
    for name, query in variables.items():
        selector = label_values_selector(query)
        assert selector is not None, name
        assert query.rstrip().rstrip(")").endswith(name), f"{name}: label_values(..., {name})"


def test_dashboard_covers_the_metrics_operators_need(dashboard: dict[str, Any]) -> None:
    used = {metric for _, expr in queries(dashboard) for metric, _ in selectors(expr)}
    required = {
        "bnwatch_layer_kl_mean",  # drift and gap distances
        "bnwatch_layer_drift_mean_shift_rms",
        "bnwatch_layer_mean_shift_rms",
        "bnwatch_layer_log_std_ratio_rms",
        "bnwatch_layer_drifted_channels_ratio",
        "bnwatch_layer_train_inference_gap",  # the train/inference gap
        "bnwatch_layer_gap_channels_ratio",
        "bnwatch_samples_total",  # rates
        "bnwatch_windows_total",
        "bnwatch_batch_size_bucket",  # batch-size heatmap and quantiles
        "bnwatch_layer_batch_stat_mode",
        "bnwatch_alerts_active",  # alerts by kind
        "bnwatch_monitor_overhead_ratio",
        "bnwatch_monitor_windows_dropped_total",
        "bnwatch_recalibrations",  # recalibrations by status, the oldest pending one's age
        "bnwatch_recalibration_oldest_pending_timestamp_seconds",
        "bnwatch_trigger_queue_depth",  # the service's webhook queue
        "bnwatch_trigger_queue_dropped_total",
    }
    assert required <= used, sorted(required - used)
    heatmaps = [p for p in all_panels(dashboard["panels"]) if p["type"] == "heatmap"]
    assert any(t.get("format") == "heatmap" for p in heatmaps for t in p["targets"])


def grafana_to_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, for Prometheus's parser."""
    expr = re.sub(r"\$__(rate_interval|interval|range)\b", "5m", expr)
    return re.sub(r"\$\{?\w+(?::\w+)?\}?", "x", expr)


def test_every_query_parses_as_promql(dashboard: dict[str, Any], tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "grafana",
                "rules": [
                    {"record": f"bnwatch:grafana_query_{i}", "expr": grafana_to_promql(expr)}
                    for i, (_, expr) in enumerate(queries(dashboard))
                ],
            }
        ]
    }
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(
        [tool("promtool", "prometheus"), "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_panels_use_the_provisioned_datasource(dashboard: dict[str, Any]) -> None:
    (source,) = load_yaml(DATASOURCES)["datasources"]
    expected = {"type": "prometheus", "uid": source["uid"]}
    for panel in all_panels(dashboard["panels"]):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"] == expected, variable["name"]


# --------------------------------------------------------------------------------------------
# Provisioning, as the compose stack mounts it
# --------------------------------------------------------------------------------------------
def grafana_mounts() -> dict[str, Path]:
    """{container path: repository path} of the grafana service's bind mounts."""
    grafana = load_yaml(COMPOSE_FILE)["services"]["grafana"]
    out = {}
    for volume in grafana["volumes"]:
        source, target, *_ = volume.split(":")
        if source.startswith("."):
            out[target] = (ROOT / source).resolve()
    return out


def test_datasource_is_the_compose_prometheus() -> None:
    provisioning = load_yaml(DATASOURCES)
    assert provisioning["apiVersion"] == 1
    (source,) = provisioning["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    compose = load_yaml(COMPOSE_FILE)["services"]
    host, port = source["url"].removeprefix("http://").split(":")
    assert host in compose
    assert any(p.endswith(f":{port}") for p in compose[host]["ports"])
    scrape = load_yaml(PROMETHEUS / "prometheus.yml")["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape  # $__rate_interval spans scrapes


def test_dashboard_provider_points_at_the_mounted_dashboards() -> None:
    mounts = grafana_mounts()
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    provisioning = load_yaml(PROVIDERS)
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert mounts[path] == DASHBOARD.parent
    assert DASHBOARD.is_file()
    grafana = load_yaml(COMPOSE_FILE)["services"]["grafana"]
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{path}/{DASHBOARD.name}"
