"""Overview: every model version with its status, open alerts and a drift sparkline."""

from __future__ import annotations

import streamlit as st

import data
import ui

ctx = ui.current()
st.title("Overview")
st.caption(
    f"Every monitored model version; drift over the {ctx.range_label} "
    "(the largest RMS standardized mean shift against the baseline over all layers)."
)

models = data.models(ctx.url).copy()
open_alerts = data.alerts(ctx.url)
open_alerts = open_alerts[open_alerts.state == "open"]

total, alerting = len(models), int((models.status == "alert").sum())
# every version's sparkline and drifted layers in a few queries, not a few per version
per_version = data.overview(ctx.url, ctx.start, ctx.end)
sparks: list[list[float]] = []
drift_now: list[int] = []
for row in models.itertuples():
    if (row.name, row.version) in per_version.index:
        sparks.append(per_version.at[(row.name, row.version), "drift"])
        drift_now.append(int(per_version.at[(row.name, row.version), "drifted_layers"]))
    else:  # stored since the cached read: shown on the next one
        sparks.append([])
        drift_now.append(0)
drifting = sum(drifted > 0 for drifted in drift_now)
models["drift"] = sparks
models["drifted_layers"] = drift_now

left, mid, right = st.columns(3)
left.metric("Model versions", total)
mid.metric("With open alerts", alerting)
right.metric("Drifting now", drifting)

st.dataframe(
    models[
        [
            "name",
            "version",
            "status",
            "open_alerts",
            "alert_kinds",
            "drifted_layers",
            "drift",
            "layers",
            "windows",
            "last_window_end",
        ]
    ],
    hide_index=True,
    width="stretch",
    column_config={
        "name": "Model",
        "version": "Version",
        "status": st.column_config.TextColumn(
            "Status",
            help="alert: open alerts; drift: the latest window drifted; gap: off the "
            "running statistics (recalibrate on clean data); ok; no data",
        ),
        "open_alerts": st.column_config.NumberColumn("Open alerts"),
        "alert_kinds": "Alert kinds",
        "drifted_layers": st.column_config.NumberColumn(
            "Drifted layers", help="layers whose latest window drifted from the baseline"
        ),
        "drift": st.column_config.LineChartColumn(
            f"Drift ({ctx.range_label})", y_min=0.0, help="max RMS d vs baseline over layers"
        ),
        "layers": "BN layers",
        "windows": st.column_config.NumberColumn(
            "Windows stored", help="stored windows, one row per layer"
        ),
        "last_window_end": st.column_config.DatetimeColumn(
            "Last window", format="YYYY-MM-DD HH:mm:ss"
        ),
    },
)

st.subheader("Open alerts")
if open_alerts.empty:
    st.success("No open alerts.")
else:
    st.dataframe(
        open_alerts[
            ["id", "model", "version", "layer", "kind", "opened_at", "acknowledged", "values"]
        ],
        hide_index=True,
        width="stretch",
    )
