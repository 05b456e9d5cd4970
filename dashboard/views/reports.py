"""Reports: Evidently's data drift report of one layer's per-sample channel means, reference
profile against production, shown inline and downloadable as HTML or JSON."""

from __future__ import annotations

import streamlit as st

import data
import ui
from bnwatch.errors import BnwatchError
from bnwatch.reports import PLOTS, channel_list

ctx = ui.current()
st.title("Drift report")
st.caption(
    "Evidently's data drift report per channel: the reference reservoir of per-sample channel "
    "means (the profile's, or the warm-up windows') against the production reservoirs of the "
    f"{ctx.range_label}. Each channel is tested at alpha / channels (Bonferroni), so a report "
    "on an unchanged layer flags no channel 95% of the time. Every channel is in the table; "
    f"Evidently plots at most {PLOTS} channels, those with the smallest p-values."
)
layers = data.layers(ctx.url, ctx.model, ctx.version)
if layers.empty:
    ui.no_windows(ctx)
    st.stop()
windows = data.window_counts(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end)
layer = ui.layer_picker(layers, windows)
if not windows.get(layer):  # no production windows to compare with the reference
    ui.no_windows(ctx, layer)
    st.stop()
try:
    report = data.drift_report(ctx.url, ctx.model, ctx.version, layer, ctx.start, ctx.end)
except (KeyError, ValueError, BnwatchError) as err:
    st.warning(ui.escape_markdown(str(err).strip("'\"")))  # it names the model and layer
    st.stop()

a, b, c = st.columns(3)
a.metric("Reference samples", report.reference_rows)
b.metric("Production samples", report.current_rows)
c.metric("Drifted channels", len(report.drifted_channels))
if report.drifted_channels:
    st.warning("Drifted channels: " + channel_list(report.drifted_channels, limit=100))
elif len(report.untested_channels) < len(report.table):
    st.success("No channel drifted.")
if report.untested_channels:  # no finite value on one side: neither drifted nor clean
    st.info(
        f"Untested channels ({len(report.untested_channels)} of {len(report.table)}): "
        + channel_list(report.untested_channels, limit=100)
        + " -- no finite value in the reference or in production."
    )
stem = f"bnwatch-{ctx.model}-{ctx.version}-{layer}".replace("/", "_").replace(" ", "_")
left, right = st.columns(2)
left.download_button("Download HTML", report.html, f"{stem}.html", mime="text/html")
right.download_button("Download JSON", report.json, f"{stem}.json", mime="application/json")
st.dataframe(report.table, hide_index=True, width="stretch")
st.iframe(report.html, height=900)  # Evidently's page, its scripts in the iframe
