"""Batch size: the batch sizes production sends, which layers normalize with batch statistics,
and the noise such normalization would add at each batch size (the small-batch mismatch)."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

import data
import ui

ctx = ui.current()
st.title("Batch size")
window_span = data.span(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end)
if window_span is None:
    ui.no_windows(ctx)
    st.stop()

counts = data.batch_size_counts(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end)
st.subheader("Batch sizes seen")
if counts.empty:
    st.info("No measured batches in this range.")
else:
    total = int(counts["batches"].sum())
    single = int(counts.loc[counts["batch_size"] == 1, "batches"].sum())
    a, b, c = st.columns(3)
    a.metric("Batches", f"{total:,}")
    b.metric("Samples", f"{int(counts['samples'].sum()):,}")
    c.metric("Single-sample batches", f"{single / total:.0%}")
    hist = go.Figure(go.Bar(x=counts["batch_size"].astype(str), y=counts["batches"]))
    hist.update_layout(
        xaxis_title="batch size", yaxis_title="batches", height=280, margin={"t": 10, "b": 10}
    )
    st.plotly_chart(hist, key="batch_histogram")

st.subheader("Layers normalizing with batch statistics")
st.caption(
    "Batch-stat mode: the layer used batch statistics at inference (left in train(), or no "
    "running statistics). Small-batch mismatch: the batches are small enough for that noise "
    "to exceed the effect-size tolerance. Buffers mutated: running statistics changed while "
    "watched."
)
FLAG_COLUMNS = ("batch_stat_mode", "small_batch_mismatch", "running_stats_mutated")
whole = data.buckets(
    ctx.url, ctx.model, ctx.version, ctx.start, ctx.end, None, (*FLAG_COLUMNS, "batch_noise_d")
).set_index("layer")
flags = pd.DataFrame({c: whole[f"max_{c}"] > 0 for c in FLAG_COLUMNS})
flags["batch_noise_d"] = whole["max_batch_noise_d"]
flagged = flags[flags[list(FLAG_COLUMNS)].any(axis=1)]
if flagged.empty:
    st.success(f"Every layer used its running statistics in the {ctx.range_label}.")
else:
    st.warning(f"{len(flagged)} layer(s) normalized with batch statistics in this range.")
    st.dataframe(
        flagged,
        width="stretch",
        column_config={
            "batch_stat_mode": st.column_config.CheckboxColumn("Batch-stat mode"),
            "small_batch_mismatch": st.column_config.CheckboxColumn("Small-batch mismatch"),
            "running_stats_mutated": st.column_config.CheckboxColumn("Buffers mutated"),
            "batch_noise_d": st.column_config.NumberColumn("RMS d noise (max)", format="%.3f"),
        },
    )

st.subheader("Predicted batch noise")
layers = data.layers(ctx.url, ctx.model, ctx.version)
layer = ui.layer_picker(
    layers, data.window_counts(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end)
)
view = data.channel_view(ctx.url, ctx.model, ctx.version, layer, ctx.start, ctx.end, None)
if view is None:  # this layer has none in the range, others have
    ui.no_windows(ctx, layer)
    st.stop()
st.caption(
    "If this layer normalized each batch with its own statistics, by how much would they "
    "differ from the population's? RMS over channels of d and log r, predicted from the "
    "between- and within-sample variance; observed batch sizes are marked."
)
curve = view.batch_noise
noise = go.Figure()
noise.add_trace(
    go.Scatter(x=curve["batch_size"], y=curve["rms_d"], mode="lines+markers", name="RMS d")
)
noise.add_trace(
    go.Scatter(x=curve["batch_size"], y=curve["rms_log_r"], mode="lines+markers", name="RMS log r")
)
for size in sorted(view.observed_batch_sizes):
    noise.add_vline(x=size, line={"dash": "dot", "color": "grey"})
noise.update_layout(
    xaxis={"type": "log", "title": "batch size (dotted: observed)"},
    yaxis_title="predicted RMS",
    height=320,
    margin={"t": 10, "b": 10},
)
st.plotly_chart(noise, key="batch_noise")
st.dataframe(curve, hide_index=True, width="content")
