"""Alerts and recalibrations: history with filters, acknowledging an alert, and requesting a
recalibration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pandas as pd
import streamlit as st

import data
import ui

if TYPE_CHECKING:
    from bnwatch.store.repository import RecalibrationInfo


def _label(frame: pd.DataFrame, alert_id: int) -> str:
    row = frame[frame["id"] == alert_id].iloc[0]
    return f"#{alert_id} {row['kind']} {row['layer']}".strip()


def _waiting(rec: RecalibrationInfo) -> str:
    because = f" because of alert #{rec.alert_id}" if rec.alert_id is not None else ""
    return (
        f"Recalibration #{rec.id} ({ui.escape_markdown(rec.method)}{because}) was requested at "
        f"{ui.format_time(rec.created_at)} and is still waiting to be taken: it will be carried "
        "out as requested, so a second request is not recorded. Once it is taken, you can "
        "request another."
    )


ctx = ui.current()
st.title("Alerts and recalibrations")

alerts = data.alerts(ctx.url, ctx.model, ctx.version)
st.subheader("Alerts")
left, mid, right = st.columns(3)
states = left.multiselect("State", ["open", "resolved"], default=["open", "resolved"])
kinds = mid.multiselect("Kind", sorted(set(alerts["kind"])), placeholder="every kind")
layers = right.multiselect("Layer", sorted(set(alerts["layer"]) - {""}), placeholder="every layer")
shown = alerts[alerts["state"].isin(states)]
if kinds:
    shown = shown[shown["kind"].isin(kinds)]
if layers:
    shown = shown[shown["layer"].isin(layers)]
if alerts.empty:
    st.success(
        f"{ui.escape_markdown(ctx.model)} @ {ui.escape_markdown(ctx.version)} "
        "has never raised an alert."
    )
else:
    st.dataframe(
        shown.drop(columns=["model", "version"]),
        hide_index=True,
        width="stretch",
        column_config={
            "acknowledged": st.column_config.CheckboxColumn("Ack."),
            "values": st.column_config.TextColumn("What opened it", width="large"),
        },
    )

    pending = alerts[(alerts["state"] == "open") & ~alerts["acknowledged"]]
    if not pending.empty:
        with st.form("acknowledge"):
            alert_id = st.selectbox(
                "Acknowledge an open alert",
                list(pending["id"]),
                format_func=lambda i: _label(pending, i),
            )
            if st.form_submit_button("Acknowledge"):
                data.acknowledge(ctx.url, int(alert_id))
                st.toast(f"Alert {alert_id} acknowledged")
                st.rerun()


st.subheader("Recalibrations")
recals = data.recalibrations(ctx.url, ctx.model, ctx.version)
if recals.empty:
    st.info("No recalibration yet.")
else:
    st.dataframe(
        recals.drop(columns=["model", "version"]),
        hide_index=True,
        width="stretch",
        column_config={"outcome": st.column_config.TextColumn("Outcome", width="large")},
    )

with st.expander("Request a recalibration"):
    st.caption(
        "Records a pending recalibration for this model version. A bnwatch service with "
        "webhook triggers sends it to the receiver within a minute; a process watching this "
        "model version with triggers takes it on its next stored window. Whoever carries it "
        "out records the outcome against its id (`bnwatch recalibrate ... --recalibration ID`, "
        "or `bnwatch.report_recalibration`)."
    )
    waiting = data.waiting_request(ctx.url, ctx.model, ctx.version)
    if waiting is not None:
        st.info(_waiting(waiting))
    else:
        with st.form("recalibrate"):
            method = st.selectbox("Method", ["precise", "mix"])
            open_ids = [None, *alerts.loc[alerts["state"] == "open", "id"]]
            alert_id = st.selectbox(
                "Because of alert",
                open_ids,
                format_func=lambda i: "-" if i is None else _label(alerts, i),
            )
            if st.form_submit_button("Request recalibration"):
                made = data.request_recalibration(
                    ctx.url,
                    ctx.model,
                    ctx.version,
                    method=str(method),
                    alert_id=None if alert_id is None else int(alert_id),
                )
                rid = made.recalibration.id
                if made.queued:
                    st.toast(f"Recalibration #{rid} requested (pending)")
                else:  # another operator's request got there first: the rerun shows it
                    st.toast(f"Not requested: recalibration #{rid} is already waiting")
                st.rerun()
