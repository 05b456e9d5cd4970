"""Everything the dashboard reads, in one module: cached functions over the store's query layer.

Each function takes the database URL first, so one process can serve several databases, and
returns plain data (pandas frames, numpy arrays, frozen dataclasses) that ``st.cache_data``
can copy.  Reads are cached for :data:`TTL_SECONDS`; the two writes the dashboard makes
(acknowledging an alert, requesting a recalibration) clear the cache.  Time ranges are
``[start, end)`` in UTC with ``end=None`` meaning "up to now", so a page that reruns every
few seconds hits the cache instead of the database.

Nothing here imports torch (the import-linter contract on ``bnwatch.store`` and this
package's tests check it).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
import streamlit as st
from numpy.typing import NDArray

from bnwatch.drift import DriftConfig
from bnwatch.schema import FLAG_METRICS
from bnwatch.store.engine import SchemaError, redacted
from bnwatch.store.migrate import engine_for
from bnwatch.store.repository import (
    METRIC_COLUMNS,
    RecalibrationInfo,
    RecalibrationRequest,
    Repository,
    judged_at,
)

DATABASE_ENV = "BNWATCH_DATABASE_URL"
DEFAULT_DATABASE_URL = "sqlite:///bnwatch.db"
TTL_SECONDS = 30
"""How long a read is reused before the database is asked again."""
MAX_BUCKETS = 120
"""Time axes of heatmaps and sparklines have at most this many columns."""
NICE_RESOLUTIONS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400)
"""Bucket lengths (seconds) the dashboard aggregates to, from 10 ms (a demo or a test closes
windows in milliseconds) to 1 week -- never shorter than the windows themselves."""

METRIC_LABELS: dict[str, str] = {
    "drift_d_rms": "drift: RMS standardized mean shift d (vs baseline)",
    "drift_log_r_rms": "drift: RMS log std ratio (vs baseline)",
    "drift_kl_mean": "drift: mean KL divergence (vs baseline)",
    "frac_drifted": "drift: share of drifted channels",
    "d_rms": "gap: RMS d (vs running statistics)",
    "log_r_rms": "gap: RMS log r (vs running statistics)",
    "kl_mean": "gap: mean KL (vs running statistics)",
    "frac_gap": "gap: share of channels off the running statistics",
    "batch_noise_d": "batch noise: predicted RMS d at the observed batch sizes",
}
"""The layer metrics a heatmap can show, with what they mean."""


class NoDatabaseError(Exception):
    """The dashboard cannot read a bnwatch database at the URL; the message says what to do."""


def database_url() -> str:
    """The database the dashboard shows: ``$BNWATCH_DATABASE_URL`` or ``sqlite:///bnwatch.db``."""
    return os.environ.get(DATABASE_ENV) or DEFAULT_DATABASE_URL


@st.cache_resource(show_spinner=False)
def repository(url: str) -> Repository:
    """The store at ``url``; an absent SQLite file is not created, an empty or outdated
    database is not migrated (both raise :class:`NoDatabaseError` with the command to run)."""
    try:
        return Repository(engine_for(url, create=False, argument="--db"))
    except SchemaError as err:
        raise NoDatabaseError(str(err)) from err
    except (sa.exc.OperationalError, sa.exc.ArgumentError, ValueError) as err:
        raise NoDatabaseError(f"cannot open {redacted(url)}: {err}") from err


def clear() -> None:
    """Forget every cached read (after a write, or when the user asks for fresh data)."""
    st.cache_data.clear()


# ------------------------------------------------------------------------------------------
# Time
# ------------------------------------------------------------------------------------------
def now() -> datetime:
    return datetime.now(timezone.utc)


def resolution_for(span_seconds: float, native_seconds: float = 60.0) -> float:
    """The smallest :data:`NICE_RESOLUTIONS` bucket that is at least the windows' own length
    and splits ``span_seconds`` into at most :data:`MAX_BUCKETS` buckets."""
    wanted = max(native_seconds, span_seconds / MAX_BUCKETS, NICE_RESOLUTIONS[0])
    for seconds in NICE_RESOLUTIONS:
        if seconds >= wanted:
            return seconds
    return math.ceil(wanted / NICE_RESOLUTIONS[-1]) * NICE_RESOLUTIONS[-1]


# ------------------------------------------------------------------------------------------
# Models, layers, alerts, recalibrations
# ------------------------------------------------------------------------------------------
@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def models(url: str) -> pd.DataFrame:
    """One row per model version: name, version, layers, windows, last window end, the count
    of open alerts and a status (``alert``, ``drift``, ``gap``, ``ok`` or ``no data``)."""
    repo = repository(url)
    rows = repo.models()
    open_alerts = pd.DataFrame(
        [(a.model, a.version, a.kind) for a in repo.alerts(state="open")],
        columns=["name", "version", "kind"],
    )
    latest = latest_flags(url)
    out = []
    for m in rows:
        mine = open_alerts[(open_alerts.name == m.name) & (open_alerts.version == m.version)]
        now_ = latest[(latest.name == m.name) & (latest.version == m.version)]
        if m.windows == 0:
            status = "no data"
        elif len(mine):
            status = "alert"
        elif now_.drifted.any():
            status = "drift"
        elif now_.gap.any():
            status = "gap"
        else:
            status = "ok"
        out.append(
            {
                "name": m.name,
                "version": m.version,
                "status": status,
                "layers": m.layers,
                "windows": m.windows,
                "open_alerts": len(mine),
                "alert_kinds": ", ".join(sorted(set(mine.kind))),
                "last_window_end": m.last_window_end,
                "created_at": m.created_at,
            }
        )
    columns = [
        "name",
        "version",
        "status",
        "layers",
        "windows",
        "open_alerts",
        "alert_kinds",
        "last_window_end",
        "created_at",
    ]
    return pd.DataFrame(out, columns=columns)


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def latest_flags(url: str) -> pd.DataFrame:
    """The newest window of every layer of every model version, in one query: ``name``,
    ``version``, ``layer``, and whether it ``drifted`` and found a ``gap``."""
    return pd.DataFrame(
        [
            (w.model, w.version, w.layer, bool(w.drifted), bool(w.gap))
            for w in repository(url).latest_metrics()
        ],
        columns=["name", "version", "layer", "drifted", "gap"],
    )


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def layers(url: str, model: str, version: str) -> pd.DataFrame:
    """The model version's BatchNorm layers in depth order (name, kind, channels, depth)."""
    rows = repository(url).layers(model, version)
    return pd.DataFrame(
        [(r.name, r.kind, r.channels, r.depth) for r in rows],
        columns=["layer", "kind", "channels", "depth"],
    )


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def alerts(url: str, model: str | None = None, version: str | None = None) -> pd.DataFrame:
    """Alerts, newest first, with the values that opened them flattened to text."""
    rows = repository(url).alerts(model=model, version=version)
    return pd.DataFrame(
        [
            {
                "id": a.id,
                "model": a.model,
                "version": a.version,
                "layer": a.layer or "",
                "kind": a.kind,
                "state": a.state,
                "acknowledged": a.acknowledged_at is not None,
                "opened_at": a.opened_at,
                "last_seen_at": a.last_seen_at,
                "resolved_at": a.resolved_at,
                "values": _describe(a.values),
            }
            for a in rows
        ],
        columns=[
            "id",
            "model",
            "version",
            "layer",
            "kind",
            "state",
            "acknowledged",
            "opened_at",
            "last_seen_at",
            "resolved_at",
            "values",
        ],
    )


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def recalibrations(url: str, model: str | None = None, version: str | None = None) -> pd.DataFrame:
    """Recalibrations (triggered, requested or run by hand), newest first."""
    rows = repository(url).recalibrations(model=model, version=version)
    return pd.DataFrame(
        [
            {
                "id": r.id,
                "model": r.model,
                "version": r.version,
                "status": r.status,
                "method": r.method,
                "alert_id": r.alert_id,
                "created_at": r.created_at,
                "finished_at": r.finished_at,
                "outcome": _describe(r.outcome or {}),
            }
            for r in rows
        ],
        columns=[
            "id",
            "model",
            "version",
            "status",
            "method",
            "alert_id",
            "created_at",
            "finished_at",
            "outcome",
        ],
    )


def _describe(values: Any) -> str:
    """A one-line ``key=value`` rendering of a JSON mapping (numbers to 4 significant digits)."""
    if not isinstance(values, dict):
        return str(values)
    parts = []
    for key, value in values.items():
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, dict):
            value = "{" + _describe(value) + "}"
        parts.append(f"{key}={value}")
    return ", ".join(parts)


def acknowledge(url: str, alert_id: int) -> bool:
    """Acknowledge an alert (``False``: it already was); clears the cache."""
    changed = repository(url).acknowledge_alert(alert_id)
    clear()
    return changed


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def waiting_request(url: str, model: str, version: str) -> RecalibrationInfo | None:
    """The model version's recalibration request that nobody has taken yet (``None``: none);
    while it waits, another request records nothing."""
    return repository(url).waiting_request(model, version)


def request_recalibration(
    url: str, model: str, version: str, *, method: str, alert_id: int | None = None
) -> RecalibrationRequest:
    """Record a recalibration request (status ``pending``, for the trigger runner or an
    operator running ``bnwatch recalibrate``) unless the model version has one waiting
    already -- checked by the store, atomically, so two dashboards cannot both record one --
    and clear the cache.  Returns what the store did: the request recorded (``queued``), or
    the one that was waiting."""
    made = repository(url).request_recalibration(model, version, method=method, alert_id=alert_id)
    clear()
    return made


# ------------------------------------------------------------------------------------------
# Layer metrics over time (stored columns, aggregated by the database)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Span:
    """The windows of a range: first start, last end, rows, and the newest window's length."""

    first: datetime
    last: datetime
    rows: int
    window_seconds: float

    @property
    def resolution(self) -> float:
        """The bucket length of a time axis over this span (:func:`resolution_for`)."""
        return resolution_for((self.last - self.first).total_seconds(), self.window_seconds)


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def span(
    url: str,
    model: str,
    version: str,
    start: datetime | None,
    end: datetime | None = None,
    layer: str | None = None,
) -> Span | None:
    """:class:`Span` of the model version's windows in ``[start, end)`` (of one ``layer``'s,
    when given), or ``None``."""
    found = repository(url).window_span(model, version, start=start, end=end, layer=layer)
    return Span(*found) if found is not None else None


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def buckets(
    url: str,
    model: str,
    version: str,
    start: datetime | None,
    end: datetime | None,
    seconds: float | None,
    columns: tuple[str, ...],
    layer: str | None = None,
) -> pd.DataFrame:
    """Per layer and time bucket of ``seconds`` (``None``: the whole range), the windows,
    samples, and ``max_<c>``/``avg_<c>`` of each metric column (flags as 0/1), aggregated
    in the database: a month of one-minute windows is a few thousand rows here."""
    names, rows = repository(url).metric_buckets(
        model, version, seconds=seconds, columns=columns, start=start, end=end, layer=layer
    )
    frame = pd.DataFrame.from_records(rows, columns=list(names))
    frame["bucket_start"] = pd.to_datetime(frame["bucket_start"], utc=True)
    return frame


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def window_counts(
    url: str, model: str, version: str, start: datetime | None, end: datetime | None = None
) -> pd.Series:
    """Windows per layer in ``[start, end)``, in depth order, indexed by layer; a layer
    without any is left out.  Not every stored layer has windows: a profile records every
    layer, a monitor given ``exclude=`` stores windows of some only."""
    frame = buckets(url, model, version, start, end, None, ())
    return pd.Series(
        frame["windows"].to_numpy(dtype=int), index=list(frame["layer"]), name="windows"
    )


def heatmap(frame: pd.DataFrame, metric: str) -> pd.DataFrame:
    """A layer x time table of a :func:`buckets` frame: rows in depth order, one column per
    bucket holding the largest value of its windows (the worst moment: a mean would hide
    a short incident)."""
    if frame.empty:
        return pd.DataFrame()
    table = frame.pivot_table(
        index=["depth", "layer"], columns="bucket_start", values=f"max_{metric}", aggfunc="max"
    )
    # every layer and bucket, also where the metric is undefined (a baseline still warming
    # up): pivot_table drops all-NaN rows and columns, and the heatmap came out empty
    rows = pd.MultiIndex.from_frame(
        frame[["depth", "layer"]].drop_duplicates().sort_values(["depth", "layer"])
    )
    table = table.reindex(index=rows, columns=sorted(frame["bucket_start"].unique()))
    table.index = table.index.get_level_values("layer")
    return table


def sparkline(frame: pd.DataFrame, metric: str) -> list[float]:
    """The largest ``metric`` over all layers per bucket of a :func:`buckets` frame; NaN
    where no layer has it (a baseline still warming up: undefined, not 0)."""
    if frame.empty:
        return []
    series = frame.groupby("bucket_start")[f"max_{metric}"].max()
    return [float(v) for v in series.to_numpy()]


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def latest(url: str, model: str, version: str) -> pd.DataFrame:
    """The newest window of every layer that has one (depth order, indexed by layer): its
    depth as stored, counts, batch sizes and every metric column.  The depth is the store's,
    not the row's position: layers without windows (``exclude=``) have no row."""
    repo = repository(url)
    rows = repo.latest_windows(model, version)
    depth = {layer.name: layer.depth for layer in repo.layers(model, version)}
    frame = pd.DataFrame(
        [
            {
                "layer": w.layer,
                "start": w.start,
                "end": w.end,
                "n_samples": w.n_samples,
                "n_batches": w.n_batches,
                **{c: w.metrics.get(c) for c in METRIC_COLUMNS},
            }
            for w in rows
        ],
        columns=["layer", "start", "end", "n_samples", "n_batches", *METRIC_COLUMNS],
    )
    for column in METRIC_COLUMNS:
        if column in FLAG_METRICS:
            frame[column] = frame[column].astype(bool)
        else:
            frame[column] = pd.to_numeric(frame[column], errors="coerce").astype(float)
    frame.insert(1, "depth", [depth[name] for name in frame["layer"]])
    return frame.set_index("layer")


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def overview(url: str, start: datetime | None, end: datetime | None = None) -> pd.DataFrame:
    """Per model version (indexed by ``name`` and ``version``, every stored one): ``drift``,
    its :func:`sparkline` of ``drift_d_rms`` over ``[start, end)`` at its :class:`Span`'s
    resolution (empty without windows there), and ``drifted_layers``, how many layers'
    newest windows drifted (what :func:`latest` says of each version).  A fixed number of
    queries for all versions together, not a few per version: the Overview lists them all."""
    repo = repository(url)
    spans = {key: Span(*found) for key, found in repo.window_spans(start=start, end=end).items()}
    maxima = repo.metric_maxima(
        "drift_d_rms",
        {key: s.resolution for key, s in spans.items()},
        start=start,
        end=end,
    )
    latest = latest_flags(url)
    drifted = latest[latest["drifted"].astype(bool)].groupby(["name", "version"]).size()
    stored = models(url)
    keys = list(zip(stored["name"], stored["version"], strict=True))
    return pd.DataFrame(
        {
            "drift": [
                [math.nan if v is None else v for _, v in maxima.get(key, [])] for key in keys
            ],
            "drifted_layers": [int(drifted.get(key, 0)) for key in keys],
        },
        index=pd.MultiIndex.from_arrays(
            [list(stored["name"]), list(stored["version"])], names=["name", "version"]
        ),
        columns=["drift", "drifted_layers"],
    )


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def batch_size_counts(
    url: str, model: str, version: str, start: datetime | None, end: datetime | None = None
) -> pd.DataFrame:
    """Batches measured per batch size in ``[start, end)`` as ``batch_size``, ``batches``,
    ``samples`` -- read from the windows of one layer (every layer sees the same batches):
    the one with most windows in the range, not the first, which may have none (a monitor
    given ``exclude=`` stores windows of some of the layers a profile recorded)."""
    per_layer = window_counts(url, model, version, start, end)
    counts: dict[int, int] = {}
    if not per_layer.empty:
        counts = repository(url).batch_size_counts(
            model, version, layer=str(per_layer.idxmax()), start=start, end=end
        )
    out = pd.DataFrame(sorted(counts.items()), columns=["batch_size", "batches"])
    out["samples"] = out["batch_size"] * out["batches"]
    return out


# ------------------------------------------------------------------------------------------
# One layer's channels (decoded and merged exactly)
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChannelView:
    """One layer over a time range, merged exactly from its stored sufficient statistics.

    ``times`` are bucket starts, as :func:`buckets` labels its buckets (a window is in the
    bucket its end falls in); ``[T, C]`` arrays hold each bucket's per-channel ``d`` and
    ``log_r`` against the running statistics and ``drift_d``/``drift_log_r`` against the
    baseline.  The ``[C]`` arrays describe the whole range merged into one window: observed
    mean and std with the standard error of the mean (``sqrt(between_var / n)``), the running
    statistics, the baseline's mean and std where there is one, and the shift test.
    """

    layer: str
    channels: int
    resolution_seconds: float | None
    times: list[datetime]
    n_samples: list[int]
    d: NDArray[np.float64]
    log_r: NDArray[np.float64]
    drift_d: NDArray[np.float64]
    drift_log_r: NDArray[np.float64]
    mean: NDArray[np.float64]
    std: NDArray[np.float64]
    mean_stderr: NDArray[np.float64]
    running_mean: NDArray[np.float64]
    running_std: NDArray[np.float64]
    baseline: str
    baseline_mean: NDArray[np.float64] | None
    baseline_std: NDArray[np.float64] | None
    range_d: NDArray[np.float64]
    range_log_r: NDArray[np.float64]
    range_drift_d: NDArray[np.float64]
    range_drift_log_r: NDArray[np.float64]
    range_drift_z: NDArray[np.float64]
    range_samples: int
    range_drifted: bool
    range_gap: bool
    eps: float
    batch_noise: pd.DataFrame
    """Predicted RMS ``d`` and ``log r`` of batch-statistics normalization by batch size."""
    observed_batch_sizes: dict[int, int]
    batch_stat_mode: bool
    small_batch_mismatch: bool
    thresholds: Thresholds
    """The thresholds ``range_drifted`` and ``range_gap`` were judged at."""


@dataclass(frozen=True)
class Thresholds:
    """The :class:`DriftConfig` a view judges merged windows at, and where it came from."""

    config: DriftConfig
    reported: bool
    """A source reported these thresholds (the newest that did: ``Repository.drift_config``);
    ``False``: none did, and ``config`` is the default."""
    sources: int
    """Sources (monitors) of the model version."""
    differing: tuple[str, ...]
    """Sources whose last window was judged at other thresholds (or reported none) while
    ``config`` was reported by another."""


def config_text(c: DriftConfig) -> str:
    """The thresholds of ``c`` that decide flags, as ``alpha=..., min_shift=...``."""
    return (
        f"alpha={c.alpha:g}, channel_fdr={c.channel_fdr:g}, min_shift={c.min_shift:g}, "
        f"min_log_ratio={c.min_log_ratio:g}, min_samples={c.min_samples}, "
        f"min_drifted_fraction={c.min_drifted_fraction:g}"
    )


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def monitors(url: str, model: str, version: str) -> pd.DataFrame:
    """The monitors (sources) of ``model``/``version`` and their last account of themselves,
    the one that reported most recently first; ``thresholds`` is the ``DriftConfig`` their
    last window was judged at (:func:`config_text`), or ``None`` when it carried none."""
    rows = sorted(
        repository(url).sources(model, version), key=lambda s: s.last_window_end, reverse=True
    )
    columns = [
        "source",
        "last_window_end",
        "first_seen",
        "windows",
        "overhead_ratio",
        "windows_dropped",
        "hook_errors",
        "thresholds",
    ]
    return pd.DataFrame(
        [
            (
                s.source,
                s.last_window_end,
                s.first_seen,
                s.windows,
                s.overhead_ratio,
                s.windows_dropped,
                s.hook_errors,
                None if s.drift_config is None else config_text(s.drift_config),
            )
            for s in rows
        ],
        columns=columns,
    )


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False)
def thresholds(url: str, model: str, version: str) -> Thresholds:
    """The thresholds the windows of ``model``/``version`` were judged at (:class:`Thresholds`):
    the stored flags were decided at them, so a merged range judged at them agrees."""
    sources = repository(url).sources(model, version)
    config = judged_at(sources)
    if config is None:
        return Thresholds(DriftConfig(), False, len(sources), ())
    differing = tuple(s.source for s in sources if s.drift_config != config)
    return Thresholds(config, True, len(sources), differing)


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False, max_entries=64)
def channel_view(
    url: str,
    model: str,
    version: str,
    layer: str,
    start: datetime | None,
    end: datetime | None,
    resolution_seconds: float | None,
) -> ChannelView | None:
    """:class:`ChannelView` of one layer, or ``None`` when it has no window in the range.
    ``resolution_seconds=None`` skips the time axis (one bucket: the whole range).  Merged
    windows are judged at the thresholds the stored windows were (:func:`thresholds`)."""
    resolutions = (resolution_seconds, None) if resolution_seconds else (None,)
    judged = thresholds(url, model, version)
    views = repository(url).layer_reports_at(
        model, version, layer, resolutions=resolutions, start=start, end=end, config=judged.config
    )
    if not views[-1]:
        return None
    over_time, report = views[0], views[-1][0][1]
    baseline = report.baseline_moments
    return ChannelView(
        layer=layer,
        channels=report.channels,
        resolution_seconds=resolution_seconds,
        times=[w.start for w, _ in over_time],
        n_samples=[r.n_samples for _, r in over_time],
        d=np.stack([r.d for _, r in over_time]),
        log_r=np.stack([r.log_r for _, r in over_time]),
        drift_d=np.stack([r.drift_d for _, r in over_time]),
        drift_log_r=np.stack([r.drift_log_r for _, r in over_time]),
        mean=report.mean,
        std=np.sqrt(report.var),
        mean_stderr=np.sqrt(report.between_var / max(report.n_samples, 1)),
        running_mean=report.ref_mean,
        running_std=np.sqrt(report.ref_var),
        baseline=report.baseline,
        baseline_mean=baseline.mean if baseline is not None else None,
        baseline_std=np.sqrt(baseline.var) if baseline is not None else None,
        range_d=report.d,
        range_log_r=report.log_r,
        range_drift_d=report.drift_d,
        range_drift_log_r=report.drift_log_r,
        range_drift_z=report.drift_z,
        range_samples=report.n_samples,
        range_drifted=bool(report.drifted),
        range_gap=bool(report.gap),
        eps=report.eps,
        batch_noise=pd.DataFrame(
            [(b.batch_size, b.rms_d, b.rms_log_r) for b in report.batch_noise],
            columns=["batch_size", "rms_d", "rms_log_r"],
        ),
        observed_batch_sizes={int(k): int(v) for k, v in report.batch_sizes.items()},
        batch_stat_mode=bool(report.batch_stat_mode),
        small_batch_mismatch=bool(report.small_batch_mismatch),
        thresholds=judged,
    )


# ------------------------------------------------------------------------------------------
# Evidently reports
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportFiles:
    """An Evidently drift report rendered for display and download."""

    html: str
    json: str
    table: pd.DataFrame
    drifted_channels: list[int]
    untested_channels: list[int]
    reference_rows: int
    current_rows: int


@st.cache_data(ttl=TTL_SECONDS, show_spinner=False, max_entries=16)
def drift_report(
    url: str,
    model: str,
    version: str,
    layer: str,
    start: datetime | None,
    end: datetime | None,
) -> ReportFiles:
    """Evidently's data drift report of one layer's per-sample channel means: the reference
    profile's reservoir against the production reservoirs of ``[start, end)``."""
    from bnwatch.reports import drift_report as build

    report = build(repository(url), model=model, version=version, layer=layer, start=start, end=end)
    return ReportFiles(
        html=report.html(),
        json=report.json(),
        table=report.table,
        drifted_channels=list(report.drifted_channels),
        untested_channels=list(report.untested_channels),
        reference_rows=report.reference_rows,
        current_rows=report.current_rows,
    )


def since(delta: timedelta | None) -> datetime | None:
    """The start of a range reaching back ``delta`` from now, floored to the minute (so the
    cache key changes once a minute, not on every rerun); ``None`` for all time."""
    if delta is None:
        return None
    start = now() - delta
    return start.replace(second=0, microsecond=0)
