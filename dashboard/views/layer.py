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
layer = ui.layer_picker(
    layers, data.window_counts(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end)
)
window_span = data.span(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end)
if window_span is None:
    ui.no_windows(ctx)
    st.stop()
seconds = window_span.resolution
view = data.channel_view(ctx.url, ctx.model, ctx.version, layer, ctx.start, ctx.end, seconds)
if view is None:  # this layer has none in the range, others have
    ui.no_windows(ctx, layer)
    st.stop()

a, b, c, d = st.columns(4)
a.metric("Channels", view.channels)
b.metric("Samples in range", f"{view.range_samples:,}")
# the whole range merged into one window and judged again, at the thresholds the monitors
# reported (those that decided the stored windows' flags), or the default when none did
JUDGED = f"judged on the whole range merged, {ui.thresholds_note(view.thresholds)}"
c.metric(
    "Drifted (range)",
    "yes" if view.range_drifted else "no",
    help=f"vs {ui.escape_markdown(view.baseline)}; {JUDGED}",
)
d.metric(
    "Gap (range)",
    "yes" if view.range_gap else "no",
    help=f"vs the running statistics; {JUDGED}",
)

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
        bucket_seconds=seconds,
        diverging=True,
    ),
    key="channel_heatmap",
)

st.subheader(f"Observed and reference statistics over the {ctx.range_label}")
channels = np.arange(view.channels)


def observed_vs_reference(
    what: str,
    observed: np.ndarray,
    running: np.ndarray,
    running_name: str,
    baseline: np.ndarray | None,
    baseline_name: str,
    error: np.ndarray | None = None,
) -> go.Figure:
    """Per channel: the observed ``what`` (with 95 % error bars when given), the running
    statistic and, when there is one, the baseline's."""
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=channels,
            y=observed,
            error_y=None if error is None else {"type": "data", "array": error, "visible": True},
            mode="markers",
            name=f"observed {what}" + ("" if error is None else " (95% CI)"),
        )
    )
    fig.add_trace(go.Scatter(x=channels, y=running, mode="markers", name=running_name))
    if baseline is not None:
        fig.add_trace(
            go.Scatter(x=channels, y=baseline, mode="markers", name=f"{baseline_name} {what}")
        )
    fig.update_layout(
        xaxis_title="channel", yaxis_title=what, height=320, margin={"t": 10, "b": 10}
    )
    return fig


st.plotly_chart(
    observed_vs_reference(
        "mean",
        view.mean,
        view.running_mean,
        "running_mean",
        view.baseline_mean,
        view.baseline,
        error=1.96 * view.mean_stderr,
    ),
    key="means",
)
st.plotly_chart(
    observed_vs_reference(
        "std", view.std, view.running_std, "sqrt(running_var)", view.baseline_std, view.baseline
    ),
    key="stds",
)

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
