"""Layer: one layer's channels -- a channel x time heatmap of d or log r, observed against
reference mean and std per channel, and the channels that drift most."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import data
import ui

ctx = ui.current()
layers = data.layers(ctx.url, ctx.model, ctx.version)
st.title("Layer")
if layers.empty:
    ui.no_windows(ctx)
    st.stop()
layer = ui.layer_picker(layers)
window_span = data.span(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end)
if window_span is None:
    ui.no_windows(ctx)
    st.stop()
seconds = window_span.resolution
view = data.channel_view(ctx.url, ctx.model, ctx.version, layer, ctx.start, ctx.end, seconds)
if view is None:
    ui.no_windows(ctx)
    st.stop()

a, b, c, d = st.columns(4)
a.metric("Channels", view.channels)
b.metric("Samples in range", f"{view.range_samples:,}")
c.metric("Drifted (range)", "yes" if view.range_drifted else "no", help=f"vs {view.baseline}")
d.metric("Gap (range)", "yes" if view.range_gap else "no", help="vs the running statistics")

QUANTITIES = {
    "drift_d": "d vs baseline (standardized mean shift)",
    "drift_log_r": "log r vs baseline (log std ratio)",
    "d": "d vs running statistics",
    "log_r": "log r vs running statistics",
}
quantity = str(
    st.radio("Heatmap", list(QUANTITIES), format_func=QUANTITIES.__getitem__, horizontal=True)
)
values = getattr(view, quantity)  # [T, C]
table = pd.DataFrame(values.T, index=[f"ch {i}" for i in range(view.channels)], columns=view.times)
st.plotly_chart(
    ui.heatmap_figure(
        table,
        title=f"{QUANTITIES[quantity]} per channel and {ui.duration(seconds)} (merged exactly)",
        colorbar=quantity,
        diverging=True,
    ),
    key="channel_heatmap",
)

st.subheader(f"Observed and reference statistics over the {ctx.range_label}")
channels = np.arange(view.channels)
mean_fig = go.Figure()
mean_fig.add_trace(
    go.Scatter(
        x=channels,
        y=view.mean,
        error_y={"type": "data", "array": 1.96 * view.mean_stderr, "visible": True},
        mode="markers",
        name="observed mean (95% CI)",
    )
)
mean_fig.add_trace(go.Scatter(x=channels, y=view.running_mean, mode="markers", name="running_mean"))
if view.baseline_mean is not None:
    mean_fig.add_trace(
        go.Scatter(x=channels, y=view.baseline_mean, mode="markers", name=f"{view.baseline} mean")
    )
mean_fig.update_layout(
    xaxis_title="channel", yaxis_title="mean", height=320, margin={"t": 10, "b": 10}
)
st.plotly_chart(mean_fig, key="means")

std_fig = go.Figure()
std_fig.add_trace(go.Scatter(x=channels, y=view.std, mode="markers", name="observed std"))
std_fig.add_trace(
    go.Scatter(x=channels, y=view.running_std, mode="markers", name="sqrt(running_var)")
)
if view.baseline_std is not None:
    std_fig.add_trace(
        go.Scatter(x=channels, y=view.baseline_std, mode="markers", name=f"{view.baseline} std")
    )
std_fig.update_layout(
    xaxis_title="channel", yaxis_title="std", height=320, margin={"t": 10, "b": 10}
)
st.plotly_chart(std_fig, key="stds")

st.subheader("Top drifting channels")
top = pd.DataFrame(
    {
        "channel": channels,
        "z (vs baseline)": view.range_drift_z,
        "d (vs baseline)": view.range_drift_d,
        "log r (vs baseline)": view.range_drift_log_r,
        "d (vs running)": view.range_d,
        "log r (vs running)": view.range_log_r,
        "mean": view.mean,
        "std": view.std,
    }
)
order = np.argsort(-np.nan_to_num(np.abs(view.range_drift_z), nan=-1.0))
st.dataframe(
    top.iloc[order[:20]],
    hide_index=True,
    width="stretch",
    column_config={
        name: st.column_config.NumberColumn(name, format="%.3f")
        for name in top.columns
        if name != "channel"
    },
)
