"""Model: where drift enters the network -- a layer x time heatmap, the depth profile and a
table of every layer's current metrics."""

from __future__ import annotations

import plotly.graph_objects as go
import streamlit as st

import data
import ui

ctx = ui.current()
st.title(f"Model {ui.escape_markdown(ctx.model)} @ {ui.escape_markdown(ctx.version)}")

window_span = data.span(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end)
if window_span is None:
    ui.no_windows(ctx)
    st.stop()

metric = str(
    st.selectbox(
        "Metric",
        list(data.METRIC_LABELS),
        format_func=data.METRIC_LABELS.__getitem__,
        key="model_metric",
        help="Drift compares production with the baseline (a reference profile, or the first "
        "production windows); the gap compares it with the running statistics the model "
        "normalizes with.",
    )
)
seconds = window_span.resolution
frame = data.buckets(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end, seconds, (metric,))
table = data.heatmap(frame, metric)
if table.isna().all().all():
    st.info(
        f"{data.METRIC_LABELS[metric]} is undefined in every window of this range"
        + (
            ": the drift baseline is still warming up (a monitor given a reference profile, "
            "`watch(..., reference=profile)`, judges drift from its first window)."
            if data.METRIC_LABELS[metric].startswith("drift")
            else "."
        )
    )
st.plotly_chart(
    ui.heatmap_figure(
        table,
        title=f"{data.METRIC_LABELS[metric]}, largest per {ui.duration(seconds)}",
        colorbar=metric,
        bucket_seconds=seconds,
    ),
    key="model_heatmap",
)

latest = data.latest(ctx.url, ctx.model, ctx.version)
st.subheader("Depth profile")
st.caption(
    "Drift against layer depth: a shift in the input shows in the first layers and "
    "propagates; a shift that starts mid-network points at what changed there."
)
whole = data.buckets(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end, None, (metric,))
mean_over_range = whole.set_index("layer")[f"avg_{metric}"].reindex(latest.index)
profile = go.Figure()
profile.add_trace(
    go.Scatter(x=list(latest.index), y=latest[metric], mode="lines+markers", name="latest window")
)
profile.add_trace(
    go.Scatter(
        x=list(latest.index),
        y=mean_over_range,
        mode="lines",
        name=f"mean over the {ctx.range_label}",
        line={"dash": "dot"},
    )
)
profile.update_layout(
    xaxis_title="layer (input -> output)",
    yaxis_title=metric,
    height=320,
    margin={"l": 10, "r": 10, "t": 10, "b": 10},
)
st.plotly_chart(profile, key="depth_profile")

st.subheader("Layers now")
st.caption(f"The latest window of each layer (ending {ui.format_time(latest['end'].max())}).")
columns = [
    "depth",
    "n_samples",
    "drifted",
    "drift_d_rms",
    "drift_log_r_rms",
    "frac_drifted",
    "p_value",
    "gap",
    "d_rms",
    "log_r_rms",
    "batch_stat_mode",
    "small_batch_mismatch",
    "running_stats_mutated",
    "end",
]
st.dataframe(
    latest[columns],
    width="stretch",
    column_config={
        "n_samples": "Samples",
        "drifted": st.column_config.CheckboxColumn("Drifted", help="vs baseline"),
        "drift_d_rms": st.column_config.NumberColumn("RMS d (drift)", format="%.3f"),
        "drift_log_r_rms": st.column_config.NumberColumn("RMS log r (drift)", format="%.3f"),
        "frac_drifted": st.column_config.ProgressColumn(
            "Drifted channels", min_value=0.0, max_value=1.0, format="percent"
        ),
        "p_value": st.column_config.NumberColumn("p (drift)", format="%.2e"),
        "gap": st.column_config.CheckboxColumn("Gap", help="vs running statistics"),
        "d_rms": st.column_config.NumberColumn("RMS d (gap)", format="%.3f"),
        "log_r_rms": st.column_config.NumberColumn("RMS log r (gap)", format="%.3f"),
        "batch_stat_mode": st.column_config.CheckboxColumn("Batch-stat mode"),
        "small_batch_mismatch": st.column_config.CheckboxColumn("Small-batch mismatch"),
        "running_stats_mutated": st.column_config.CheckboxColumn("Buffers mutated"),
        "end": st.column_config.DatetimeColumn("Window end", format="YYYY-MM-DD HH:mm:ss"),
    },
)

st.subheader("Monitors")
st.caption(
    "Every monitor (replica: `source`, by default host:pid) that sent windows of this version, "
    "newest first, with its last account of itself: its own cost, windows it could not "
    "deliver, errors caught in its hooks, and the DriftConfig thresholds that decided its "
    "last window's flags (none: a monitor of a bnwatch that did not report them)."
)
st.dataframe(
    data.monitors(ctx.url, ctx.model, ctx.version),
    width="stretch",
    hide_index=True,
    column_config={
        "source": "Source",
        "last_window_end": st.column_config.DatetimeColumn(
            "Last window end", format="YYYY-MM-DD HH:mm:ss"
        ),
        "first_seen": st.column_config.DatetimeColumn("First seen", format="YYYY-MM-DD HH:mm:ss"),
        "windows": st.column_config.NumberColumn("Windows", help="windows it stored"),
        "overhead_ratio": st.column_config.NumberColumn(
            "Overhead", help="hook time / model time, as it reported", format="percent"
        ),
        "windows_dropped": st.column_config.NumberColumn(
            "Dropped", help="windows it could not deliver"
        ),
        "hook_errors": st.column_config.NumberColumn("Hook errors"),
        "thresholds": st.column_config.TextColumn("Thresholds (DriftConfig)", width="large"),
    },
)
