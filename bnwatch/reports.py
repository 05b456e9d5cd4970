"""Evidently data-drift reports of one BatchNorm layer's per-sample channel means.

:func:`drift_report` reads two reservoirs of per-sample channel means from the store -- the
*reference* (the layer's reference profile, ``bnwatch.profile(..., store=URL)``; without one,
the warm-up windows that formed the drift baseline) and the *current* production sample (the
windows of a time range, pooled so that every sample had the same chance to be kept) -- and
runs Evidently's data-drift test on them, one numerical column per channel (``ch000``,
``ch001``, ...): the two-sample Kolmogorov-Smirnov test (Evidently ``ValueDrift``, method
``ks``), a p-value per channel.

Why a Bonferroni threshold.  Evidently flags a column when its p-value is at most 0.05.  With
``C`` channels and no drift at all, at least one channel is then flagged in
``1 - 0.95^C`` of the reports: 64 % for 20 channels, 96 % for 64 -- a drift report that
is almost always red.  bnwatch passes Evidently the per-channel threshold ``alpha / C``
(Bonferroni), so that the chance of flagging *any* channel when none drifted -- the
family-wise false-alarm rate -- is at most ``alpha`` (default 0.05), whatever the correlation
between channels.  The price is power on single channels, which the sample sizes of a
reservoir (hundreds to thousands of rows) easily pay for a shift of half a standard
deviation of the per-sample means.  The report's table and its HTML and JSON say so.

Per-sample means are the unit of independence (DESIGN §2): spatial positions within a sample
are correlated, samples are not, so a test on them has the false-alarm rate it claims.

Why not every channel is plotted.  Evidently's ``ValueDrift`` draws each column's two
distributions; for a layer of ResNet-50 that is up to 2,048 plots -- 90 s and a 76 MB HTML
page, which the dashboard sends twice (inline and as a download).  So every channel is
*tested* with Evidently's ``ks`` stattest, the very function ``ValueDrift`` calls, and
Evidently's report -- its plots and its JSON -- covers the ``plots`` channels with the
smallest p-values (default :data:`PLOTS`: all channels of most layers, and every drifted one
unless more than that drifted).  The per-channel table always holds every channel; the HTML
lists those not plotted.

This module never imports torch; Evidently is imported when a report is built.
"""

from __future__ import annotations

import contextlib
import html as html_lib
import json
import math
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from bnwatch.errors import BnwatchError, ConfigError, check_positive_int, check_probability
from bnwatch.files import atomic_path
from bnwatch.store.repository import Repository, StoredReservoir
from bnwatch.wire import json_ready

__all__ = [
    "PLOTS",
    "REPORT_FORMATS",
    "DriftReport",
    "ReportError",
    "channel_columns",
    "channel_list",
    "drift_report",
    "per_channel_threshold",
    "report_format",
]

STATTEST = "ks"
"""Evidently's stattest for every channel: two-sample Kolmogorov-Smirnov, a p-value."""
PLOTS = 64
"""Channels Evidently's report plots by default: those with the smallest p-values."""
REPORT_FORMATS = (".html", ".json")
"""File suffixes :meth:`DriftReport.save` writes."""
TABLE_COLUMNS = (
    "channel",
    "column",
    "stattest",
    "p_value",
    "threshold",
    "drifted",
    "reference_mean",
    "current_mean",
    "shift_sd",
)
"""Columns of :attr:`DriftReport.table`, one row per channel."""


class ReportError(BnwatchError, LookupError):
    """A report cannot be built from what the store holds (unknown model version or layer;
    the message lists what exists)."""


def per_channel_threshold(alpha: float, channels: int) -> float:
    """Bonferroni: ``alpha / channels``, the p-value at or below which a channel is drifted so
    that the chance of any false alarm among ``channels`` undrifted channels is <= ``alpha``."""
    return alpha / max(1, channels)


def channel_columns(channels: int) -> list[str]:
    """Column names of the channels: ``ch000``, ``ch001``, ... (wider past 1000 channels, so
    that they sort in channel order)."""
    width = max(3, len(str(channels - 1)))
    return [f"ch{c:0{width}d}" for c in range(channels)]


def channel_list(channels: Sequence[int], limit: int | None = None) -> str:
    """``"4, 11, 17"``; past ``limit`` channels, the first ``limit`` and how many more (for a
    terminal or a banner: a wide layer under drift can have a thousand); ``"none"`` if empty."""
    if not channels:
        return "none"
    named = channels[:limit]
    shown = ", ".join(str(c) for c in named)
    rest = len(channels) - len(named)
    return f"{shown} and {rest} more" if rest else shown


def report_format(path: str | Path) -> str:
    """``.html`` or ``.json`` from ``path``'s suffix (ConfigError naming the path otherwise)."""
    suffix = Path(path).suffix.lower()
    if suffix not in REPORT_FORMATS:
        raise ConfigError("path", str(path), "a file name ending in .html or .json")
    return suffix


def _describe(alpha: float, channels: int, threshold: float) -> str:
    uncorrected = 1.0 - (1.0 - 0.05) ** channels
    return (
        f"Per channel, Evidently's two-sample Kolmogorov-Smirnov test (stattest "
        f"'{STATTEST}', what its ValueDrift runs) of the per-sample channel means, production "
        "against the reference.  "
        f"A channel is drifted when its p-value is <= alpha / C = {alpha:g} / {channels} = "
        f"{threshold:.3g} (Bonferroni correction), so that the chance of flagging any of the "
        f"{channels} channels when none drifted is at most alpha = {alpha:g}.  Evidently's "
        f"default threshold (p <= 0.05 for every column) would flag at least one of "
        f"{channels} undrifted channels in {uncorrected:.0%} of reports."
    )


@dataclass(frozen=True, eq=False)
class DriftReport:
    """An Evidently data-drift report of one layer: reference against production.

    Attributes:
        model, version, layer: what was compared.
        start, end: the production range asked for (windows whose end lies in
            ``[start, end)``; ``None``: unbounded).
        reference_rows, current_rows: rows of per-sample channel means compared.
        table: one row per channel -- :data:`TABLE_COLUMNS`: ``channel``, ``column``
            (``ch000``...), ``stattest`` (Evidently's name of the test), ``p_value``,
            ``threshold`` (alpha / C), ``drifted`` (p_value <= threshold), the reference and
            current means and their difference in reference standard deviations
            (``shift_sd``).  A channel without a finite value on either side has a NaN p-value
            and is not drifted.
        drifted_channels: the drifted channels' indices, ascending.
        untested_channels: the channels not tested, ascending: those without a finite value
            on both sides (e.g. every production value NaN); not drifted, not plotted.
        alpha: the family-wise false-alarm rate across channels.
        threshold: the per-channel p-value threshold, ``alpha / C``.
        reference_kind: ``profile`` or ``warmup`` (see
            :meth:`~bnwatch.store.repository.Repository.reference_reservoir`).
        current_windows: production windows pooled.
        description: how the channels were tested and why the threshold is alpha / C.
        plotted_channels: the channels Evidently's report (``snapshot``, the HTML's plots,
            the JSON's ``evidently``) covers, ascending: at most ``plots`` of them, those with
            the smallest p-values.  Every channel is tested and in ``table``.
    """

    model: str
    version: str
    layer: str
    start: datetime | None
    end: datetime | None
    reference_rows: int
    current_rows: int
    table: pd.DataFrame
    drifted_channels: list[int]
    untested_channels: list[int] = field(default_factory=list)
    alpha: float = 0.05
    threshold: float = 0.05
    reference_kind: str = "profile"
    current_windows: int = 0
    description: str = ""
    plotted_channels: list[int] = field(default_factory=list)
    snapshot: Any = field(default=None, repr=False)
    """Evidently's ``Snapshot`` of the run (``snapshot.dict()``, ``get_html_str``...)."""

    @property
    def channels(self) -> int:
        return len(self.table)

    def summary(self) -> dict[str, Any]:
        """Everything but the per-channel table and Evidently's output, JSON-ready."""
        return {
            "model": self.model,
            "version": self.version,
            "layer": self.layer,
            "start": _iso(self.start),
            "end": _iso(self.end),
            "channels": self.channels,
            "reference": {"kind": self.reference_kind, "rows": self.reference_rows},
            "current": {"rows": self.current_rows, "windows": self.current_windows},
            "stattest": STATTEST,
            "correction": "bonferroni",
            "alpha": self.alpha,
            "threshold": self.threshold,
            "drifted_channels": list(self.drifted_channels),
            "untested_channels": list(self.untested_channels),
            "plotted_channels": list(self.plotted_channels),
            "description": self.description,
        }

    def json(self) -> str:
        """The report as JSON: ``bnwatch`` (the summary and the per-channel table) and
        ``evidently`` (Evidently's own result dictionary)."""
        evidently: Any = None
        if self.snapshot is not None:
            evidently = json.loads(self.snapshot.json())
        payload = {
            "bnwatch": {**self.summary(), "table": self.table.to_dict(orient="records")},
            "evidently": evidently,
        }
        return json.dumps(json_ready(payload), indent=2, allow_nan=False)

    def html(self) -> str:
        """Evidently's standalone HTML report, headed by bnwatch's summary and the test's
        description (the Bonferroni threshold)."""
        drifted = channel_list(self.drifted_channels)
        span = f"{_iso(self.start) or 'the first window'} to {_iso(self.end) or 'the last'}"
        header = (
            '<section id="bnwatch-summary" style="font-family: sans-serif; margin: 16px 24px;">'
            f"<h1>bnwatch drift report: layer {_esc(self.layer)} of "
            f"{_esc(self.model)}@{_esc(self.version)}</h1>"
            f"<p>Production {_esc(span)}: {self.current_rows} rows of per-sample channel means "
            f"from {self.current_windows} windows, against the {_esc(self.reference_kind)} "
            f"reference ({self.reference_rows} rows).</p>"
            f"<p><strong>Drifted channels ({len(self.drifted_channels)} of {self.channels}):"
            f"</strong> {_esc(drifted)}</p>"
            f"{self._untested_html()}"
            f"<p>{_esc(self.description)}</p>"
            f"{self._unplotted_html()}"
            "</section>"
        )
        body = "" if self.snapshot is None else self.snapshot.get_html_str(as_iframe=False)
        at = body.find("<body")
        close = body.find(">", at) if at >= 0 else -1
        if close < 0:
            return f"<!DOCTYPE html><html><body>{header}{body}</body></html>"
        return body[: close + 1] + header + body[close + 1 :]

    def _untested_html(self) -> str:
        """Which channels were not tested, and why (empty if every one was)."""
        if not self.untested_channels:
            return ""
        return (
            f"<p><strong>Untested channels ({len(self.untested_channels)} of {self.channels}):"
            f"</strong> {_esc(channel_list(self.untested_channels))} -- no finite value on "
            "both sides (production and reference): not drifted, not plotted.</p>"
        )

    def _unplotted_html(self) -> str:
        """Which channels Evidently plots, and a table of the others (empty if it plots all)."""
        if len(self.plotted_channels) == self.channels:
            return ""
        plotted = set(self.plotted_channels)
        rest = self.table[~self.table["channel"].isin(plotted)].sort_values(
            ["p_value", "channel"], na_position="last"
        )
        rows = "".join(
            f"<tr><td>{int(r.channel)}</td><td>{_fmt(r.p_value, '.3g')}</td>"
            f"<td>{'yes' if r.drifted else 'no'}</td><td>{_fmt(r.shift_sd, '+.2f')}</td></tr>"
            for r in rest.itertuples(index=False)
        )
        shown = (
            f"Evidently's plots below: the {len(self.plotted_channels)} channels with the "
            f"smallest p-values, of {self.channels}."
            if self.plotted_channels
            else "No channel is plotted."
        )
        return (
            f"<p>{shown}  The other {len(rest)}:</p>"
            '<details id="bnwatch-unplotted"><summary>channels not plotted, by p-value</summary>'
            "<table><thead><tr><th>channel</th><th>p-value</th><th>drifted</th>"
            f"<th>shift (reference sd)</th></tr></thead><tbody>{rows}</tbody></table></details>"
        )

    def save(self, path: str | Path) -> Path:
        """Write the report to ``path`` -- HTML or JSON by its suffix -- atomically (a
        temporary file in the same directory, renamed over ``path``); returns ``path``.

        Raises:
            ConfigError: the suffix is neither ``.html`` nor ``.json``.
        """
        out = Path(path)
        text = self.html() if report_format(out) == ".html" else self.json()
        _write_atomic(out, text)
        return out


def drift_report(
    repo: Repository,
    *,
    model: str,
    version: str,
    layer: str,
    start: datetime | None = None,
    end: datetime | None = None,
    alpha: float = 0.05,
    plots: int | None = PLOTS,
) -> DriftReport:
    """Evidently's data-drift report of ``layer``: the reference reservoir against the
    production reservoir of the windows whose end lies in ``[start, end)`` (a naive
    ``datetime`` is UTC, whatever the database's time zone; the report says the same).

    The reference is the layer's newest reference profile; without one, the warm-up windows
    that formed the drift baseline (then the production sample leaves them out).  Each
    channel is tested with Evidently's two-sample Kolmogorov-Smirnov test at ``alpha / C``
    (Bonferroni; see the module docstring): at most ``alpha`` chance of any false alarm.
    Evidently's report plots the ``plots`` channels with the smallest p-values (``None``:
    every channel; 0: none, the table only).

    Raises:
        ReportError: the model version or the layer is not in the store (the message lists
            what is).
        NoReservoirError: no reference or no production reservoir (the message says how to
            record one).
        ConfigError: ``alpha`` is not in (0, 1), ``plots`` is negative, or ``end`` is not
            after ``start``.
    """
    alpha = check_probability("alpha", alpha)
    if plots is not None:
        check_positive_int("plots", plots, minimum=0)
    if start is not None and end is not None and not end > start:
        raise ConfigError("end", end, f"a time after start ({start})")
    try:
        reference = repo.reference_reservoir(model, version, layer)
        current = repo.production_reservoir(
            model, version, layer, start=start, end=end, after_warmup=reference.kind == "warmup"
        )
    except KeyError as err:
        raise ReportError(_known(repo, model, version, err)) from None
    return _report(reference, current, start=start, end=end, alpha=alpha, plots=plots)


def _known(repo: Repository, model: str, version: str, err: KeyError) -> str:
    """The message of a lookup error, with the model versions stored when the model is unknown."""
    message = str(err.args[0]) if err.args else str(err)
    if message.startswith("no model "):
        models = [f"{m.name}@{m.version}" for m in repo.models()]
        message += f"; models: {', '.join(models) or '(none: the store is empty)'}"
    return message


def _report(
    reference: StoredReservoir,
    current: StoredReservoir,
    *,
    start: datetime | None,
    end: datetime | None,
    alpha: float,
    plots: int | None,
) -> DriftReport:
    ref_rows = reference.reservoir.rows
    cur_rows = current.reservoir.rows
    channels = ref_rows.shape[1]
    threshold = per_channel_threshold(alpha, channels)
    description = _describe(alpha, channels, threshold)
    table, plotted, snapshot = _evidently_drift(
        ref_rows,
        cur_rows,
        threshold,
        plots=channels if plots is None else plots,
        metadata={
            "bnwatch_model": current.model,
            "bnwatch_version": current.version,
            "bnwatch_layer": current.layer,
            "bnwatch_reference": reference.kind,
            "description": description,
        },
    )
    drifted = [int(c) for c in table.loc[table["drifted"], "channel"]]
    untested = [int(c) for c in table.loc[table["p_value"].isna(), "channel"]]
    return DriftReport(
        model=current.model,
        version=current.version,
        layer=current.layer,
        start=start,
        end=end,
        reference_rows=int(ref_rows.shape[0]),
        current_rows=int(cur_rows.shape[0]),
        table=table,
        drifted_channels=drifted,
        untested_channels=untested,
        alpha=alpha,
        threshold=threshold,
        reference_kind=reference.kind,
        current_windows=current.windows,
        description=description,
        plotted_channels=plotted,
        snapshot=snapshot,
    )


def _evidently_drift(
    reference: NDArray[Any],
    current: NDArray[Any],
    threshold: float,
    *,
    plots: int,
    metadata: Mapping[str, str],
) -> tuple[pd.DataFrame, list[int], Any]:
    """Test every channel that has a finite value on both sides with Evidently's ``ks``
    stattest at ``threshold`` -- the function ``ValueDrift`` calls, on the values it passes
    (finite ones) -- and run Evidently's report, ``ValueDrift`` per channel, on the ``plots``
    channels with the smallest p-values; returns the per-channel table, the channels plotted
    and the snapshot (``None`` when nothing is plotted)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.legacy.calculations.stattests import ks_stat_test
    from evidently.legacy.core import ColumnType
    from evidently.metrics import ValueDrift

    channels = reference.shape[1]
    columns = channel_columns(channels)
    with np.errstate(invalid="ignore", over="ignore"):
        ref = np.where(np.isfinite(reference), reference, np.nan).astype(np.float64)
        cur = np.where(np.isfinite(current), current, np.nan).astype(np.float64)
    testable = np.asarray(np.isfinite(ref).any(axis=0) & np.isfinite(cur).any(axis=0))
    tested = np.flatnonzero(testable).tolist()
    p = np.full(channels, math.nan)
    for c in tested:
        r, k = ref[:, c], cur[:, c]
        result = ks_stat_test(
            pd.Series(r[np.isfinite(r)]),
            pd.Series(k[np.isfinite(k)]),
            ColumnType.Numerical,
            threshold,
        )
        p[c] = float(result.drift_score)
    ranked = sorted(tested, key=lambda c: (p[c], c))
    plotted = sorted(ranked[:plots])
    snapshot = None
    if plotted:
        shown = [columns[c] for c in plotted]
        definition = DataDefinition(numerical_columns=shown)
        report = Report(
            [ValueDrift(column=c, method=STATTEST, threshold=threshold) for c in shown],
            metadata=dict(metadata),
        )
        snapshot = report.run(
            Dataset.from_pandas(
                pd.DataFrame(cur[:, plotted], columns=shown), data_definition=definition
            ),
            Dataset.from_pandas(
                pd.DataFrame(ref[:, plotted], columns=shown), data_definition=definition
            ),
        )
    with np.errstate(invalid="ignore", divide="ignore"), _quiet_nan_warnings():
        ref_mean = np.nanmean(ref, axis=0) if ref.shape[0] else np.full(channels, np.nan)
        cur_mean = np.nanmean(cur, axis=0) if cur.shape[0] else np.full(channels, np.nan)
        ref_sd = np.nanstd(ref, axis=0) if ref.shape[0] else np.full(channels, np.nan)
        shift = (cur_mean - ref_mean) / ref_sd
    table = pd.DataFrame(
        {
            "channel": np.arange(channels),
            "column": columns,
            "stattest": ks_stat_test.display_name,
            "p_value": p,
            "threshold": threshold,
            "drifted": np.nan_to_num(p, nan=1.0) <= threshold,
            "reference_mean": ref_mean,
            "current_mean": cur_mean,
            "shift_sd": np.where(np.isfinite(shift), shift, np.nan),
        },
        columns=list(TABLE_COLUMNS),
    )
    return table, plotted, snapshot


@contextlib.contextmanager
def _quiet_nan_warnings() -> Iterator[None]:
    """No warnings for channels without a finite value (their statistics are NaN)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
        warnings.filterwarnings("ignore", message="Degrees of freedom", category=RuntimeWarning)
        yield


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    aware = value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)
    return aware.isoformat()


def _fmt(value: float, spec: str) -> str:
    return "n/a" if not math.isfinite(value) else format(value, spec)


def _esc(text: str) -> str:
    return html_lib.escape(text, quote=True)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename:
    readers see the old file or the new one, never a partial one."""
    with atomic_path(path) as tmp, tmp.open("w", encoding="utf-8") as out:
        out.write(text)
        out.flush()
        os.fsync(out.fileno())
