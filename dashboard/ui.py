"""What the pages share: the sidebar pickers (model version, time range, auto-refresh), the
empty-database guide and a few chart helpers.

The sidebar is drawn by ``app.py`` on every run, before the page, so its choices hold across
pages; :func:`current` gives a page the :class:`Context` they make.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import sqlalchemy as sa
import streamlit as st
from sqlalchemy.exc import ArgumentError

import data
from bnwatch.store.engine import redacted

RANGES: dict[str, timedelta | None] = {
    "last hour": timedelta(hours=1),
    "last 6 hours": timedelta(hours=6),
    "last 24 hours": timedelta(days=1),
    "last 7 days": timedelta(days=7),
    "last 30 days": timedelta(days=30),
    "whole history": None,
}
REFRESH: dict[str, int | None] = {
    "off": None,
    "every 30 s": 30,
    "every minute": 60,
    "every 5 min": 300,
}
_CONTEXT = "bnwatch_context"
_LAST_RUN = "bnwatch_last_full_run"
_LAYER = "bnwatch_layer"
LAYER_KEY = "layer"
"""The key of the layer pickers' select box (the Layer, Batch size and Reports pages)."""
_MARKDOWN_PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")
"""Every ASCII punctuation character: CommonMark lets a backslash escape any of them."""


def escape_markdown(text: object) -> str:
    """``text`` as Markdown that renders as itself, for names users chose (models, versions,
    layers, sources) put into a title, caption or message: those render Markdown, and a
    version ``2025*06*01 `rc` \\_x`` showed as ``20250601 rc _x`` in italics and code.
    Every ASCII punctuation character is backslash-escaped (CommonMark allows it for all of
    them, and which ones start markup depends on where the name lands: ``#``, ``-`` or
    ``1.`` only at the start of a line, ``$`` is LaTeX and ``:`` a colour directive in
    Streamlit); line breaks become spaces, so a name cannot end a paragraph."""
    flat = " ".join(str(text).splitlines())
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", flat)


def code_span(text: object) -> str:
    """``text`` as an inline code span (shown verbatim, in monospace): fenced by one backtick
    more than its longest run of backticks, so a backtick in a name cannot close the span
    early, and padded with spaces when it starts or ends with one (CommonMark strips one
    space from each side of such a span)."""
    flat = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall("`+", flat)), default=0) + 1)
    pad = " " if flat.startswith("`") or flat.endswith("`") else ""
    return f"{fence}{pad}{flat}{pad}{fence}"


@dataclass(frozen=True)
class Context:
    """The choices of the sidebar: which database, model version and time range."""

    url: str
    model: str
    version: str
    range_label: str
    start: datetime | None
    end: datetime | None = None

    @property
    def span_seconds(self) -> float | None:
        delta = RANGES[self.range_label]
        return delta.total_seconds() if delta is not None else None


def current() -> Context:
    """The context the sidebar set up for this run (``app.py`` draws it before any page)."""
    ctx = st.session_state.get(_CONTEXT)
    if not isinstance(ctx, Context):
        st.error("Open the dashboard through its entry script: `bnwatch dashboard`.")
        st.stop()
    return ctx


def sidebar(url: str, models: pd.DataFrame) -> Context:
    """Draw the pickers and remember the :class:`Context` they make for the pages."""
    st.session_state[_LAST_RUN] = time.monotonic()
    with st.sidebar:
        keys = list(zip(models["name"], models["version"], strict=True))
        labels = {key: f"{key[0]} @ {key[1]}" for key in keys}
        # the options are the model versions themselves, not positions: the list is ordered by
        # activity, so a position chosen on one run named another model version on the next
        chosen = st.selectbox(
            "Model version",
            keys,
            format_func=lambda key: labels[key],
            key="model_version",
            help="Every stored model version (windows or a profile), newest activity first.",
        )
        model, version = chosen if chosen is not None else keys[0]
        range_label = str(st.selectbox("Time range", list(RANGES), index=2, key="time_range"))
        refresh = str(st.selectbox("Auto-refresh", list(REFRESH), index=0, key="auto_refresh"))
        # a callback runs before the rerun reads anything (app.py reads the model list first)
        st.button(
            "Refresh now", help="Read the database again, ignoring the cache.", on_click=data.clear
        )
        st.caption(f"Database: {code_span(redacted(url))}")
    seconds = REFRESH[refresh]
    if seconds:
        _auto_refresh(seconds)
    ctx = Context(url, model, version, range_label, data.since(RANGES[range_label]))
    st.session_state[_CONTEXT] = ctx
    return ctx


def _auto_refresh(seconds: int) -> None:
    """Rerun the whole app every ``seconds`` (a timed fragment that reruns the app once the
    interval has passed since the last full run)."""

    @st.fragment(run_every=seconds)
    def tick() -> None:
        if time.monotonic() - st.session_state.get(_LAST_RUN, 0.0) >= 0.9 * seconds:
            st.rerun(scope="app")

    tick()


def layer_picker(layers: pd.DataFrame, windows: pd.Series | None = None) -> str:
    """A layer select box whose choice holds across pages and reruns.

    The box has a fixed key: unkeyed, Streamlit derives a widget's id from its arguments, and
    an ``index`` following the last choice gave it a new id after every change -- the
    browser's next pick went to the box that was gone, and every second choice was lost.
    The choice is kept apart from the widget (stored by its ``on_change``) and loaded into
    the box before it is drawn: a keyed widget's id still depends on the page, and
    Streamlit drops its state on a page that does not draw it.  Without a choice (or when
    it is not a layer of this model version) the box starts at the first layer with
    ``windows`` (windows per layer in the range, :func:`data.window_counts`): a profile
    records every layer, a monitor given ``exclude=`` stores windows of some only."""
    names = list(layers["layer"])
    counts = windows if windows is not None else pd.Series(dtype=int)
    remembered = st.session_state.get(_LAYER)
    if remembered not in names:
        remembered = next((n for n in names if counts.get(n, 0) > 0), names[0])
    st.session_state[LAYER_KEY] = remembered
    none = ", no windows in this range" if windows is not None else ""
    label = {
        r.layer: f"{r.layer} ({r.kind}, {r.channels} channels{'' if counts.get(r.layer) else none})"
        for r in layers.itertuples()
    }
    chosen = st.selectbox(
        "Layer", names, format_func=label.__getitem__, key=LAYER_KEY, on_change=_remember_layer
    )
    st.session_state[_LAYER] = chosen
    return str(chosen)


def _remember_layer() -> None:
    """Keep the layer just picked (a callback: it runs before the script, so the picker
    loads the new choice, not the one before)."""
    st.session_state[_LAYER] = st.session_state[LAYER_KEY]


def getting_started(url: str, reason: str | None = None) -> None:
    """What an empty or missing database shows instead of data.  The URL is shown with its
    password hidden, in the code sample too (whoever sees the page need not know it): the
    sample says to put it back."""
    shown = redacted(url)
    try:
        secret = sa.make_url(url).password is not None
    except (ArgumentError, ValueError, TypeError):  # redacted() shows no part of it
        secret = False
    note = "  # the password is hidden: put it back in place of ***" if secret else ""
    st.title("bnwatch")
    if reason:
        st.subheader("Cannot read this database")
        st.error(reason)
    else:
        st.subheader("No monitored models here yet")
    st.markdown(
        f"""
The dashboard reads {code_span(shown)} and found nothing to show. To fill it:

1. **See it work in one command** -- trains a small CNN on scikit-learn digits and sends it
   clean, corrupted and misconfigured traffic:
   ```bash
   bnwatch demo
   bnwatch dashboard --db sqlite:///bnwatch-demo/bnwatch.db
   ```
2. **Watch your own model** -- windows of BatchNorm statistics land in the database:
   ```python
   import bnwatch
   mon = bnwatch.watch(model, name="resnet50", version="2025-06-01",
                       store={json.dumps(shown, ensure_ascii=False)}){note}
   ```
3. **A database created by hand** needs the schema: `bnwatch db upgrade --db URL`.

Pick another database with `bnwatch dashboard --db URL` or `$BNWATCH_DATABASE_URL`.
"""
    )


def no_windows(ctx: Context, layer: str | None = None) -> None:
    """Why a page has nothing to show, and what would help.  ``layer``: the page shows that
    layer, which can have no windows while the version has some (a profile records every
    layer, a monitor given ``exclude=`` stores windows of some only) -- then the message
    is about the layer, not "no windows yet" about the version."""
    who = f"{escape_markdown(ctx.model)} @ {escape_markdown(ctx.version)}"
    if layer is not None and data.span(ctx.url, ctx.model, ctx.version, ctx.start, ctx.end):
        name = f"Layer {escape_markdown(layer)} of {who}"
        if ctx.start is not None and data.span(ctx.url, ctx.model, ctx.version, None, None, layer):
            st.info(
                f"{name} has no windows in the {ctx.range_label}, other layers have: "
                "choose a longer time range in the sidebar, or another layer."
            )
        else:
            st.info(
                f"{name} has no windows, other layers have: no monitor watches this layer "
                "(one given `watch(..., exclude=...)`, perhaps). Choose another layer."
            )
    elif ctx.start is not None and data.span(ctx.url, ctx.model, ctx.version, None) is not None:
        st.info(
            f"{who} has no windows in the {ctx.range_label}: "
            "choose a longer time range in the sidebar."
        )
    else:  # none at all: a longer range cannot help
        call = f"bnwatch.watch(model, name={ctx.model!r}, version={ctx.version!r}, store=...)"
        st.info(
            f"{who} has no windows yet (a reference profile, perhaps): they arrive once a "
            f"model is watched with {code_span(call)} and serves traffic."
        )


def format_time(value: datetime | pd.Timestamp | None) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)) or pd.isna(value):
        return "-"
    stamp = pd.Timestamp(value)
    if stamp.tzinfo is not None:  # naive: UTC already, as bnwatch stores every time
        stamp = stamp.tz_convert("UTC")
    return str(stamp.strftime("%Y-%m-%d %H:%M:%S UTC"))


def duration(seconds: float) -> str:
    """``60`` -> ``"1 min"``, ``3600`` -> ``"1 h"``, ``86400`` -> ``"1 day"``."""
    for unit, size in (("week", 7 * 86400), ("day", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            plural = "s" if count > 1 and unit in ("week", "day") else ""
            return f"{count} {unit}{plural}"
    return f"{seconds:g} s"


def heatmap_figure(
    table: pd.DataFrame,
    *,
    title: str,
    colorbar: str,
    bucket_seconds: float,
    diverging: bool = False,
) -> go.Figure:
    """A heatmap of a (rows x time) table whose columns are the starts of time buckets of
    ``bucket_seconds`` (the x axis says so); diverging colors centered on 0 for signed
    values."""
    z = table.to_numpy(dtype=float)
    if diverging:
        bound = float(np.nanmax(np.abs(z))) if np.isfinite(z).any() else 1.0
        colors: dict[str, object] = {"colorscale": "RdBu_r", "zmin": -bound, "zmax": bound}
    else:
        colors = {"colorscale": "Viridis", "zmin": 0.0}
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(table.columns),
            y=[str(i) for i in table.index],
            colorbar={"title": {"text": colorbar}},
            hoverongaps=False,
            **colors,
        )
    )
    fig.update_layout(
        title=title,
        # 18 px a channel, at most 900 px: a 2,048-channel layer drew 37,000 px
        height=min(900, max(280, 18 * len(table.index) + 120)),
        margin={"l": 10, "r": 10, "t": 40, "b": 10},
        xaxis_title=f"start of each {duration(bucket_seconds)} bucket (UTC)",
        yaxis={"autorange": "reversed"},
    )
    return fig


def thresholds_note(judged: data.Thresholds) -> str:
    """Which thresholds a merged range was judged at, for a help text: the monitors' (and
    whether sources disagree) or the default, when no monitor reported its own."""
    values = data.config_text(judged.config)
    if not judged.reported:
        return f"at the default DriftConfig ({values}): no monitor reported its thresholds"
    if not judged.differing:
        return f"at the monitors' DriftConfig ({values})"
    others = ", ".join(escape_markdown(s) for s in judged.differing[:3]) + (
        ", ..." if len(judged.differing) > 3 else ""
    )
    return (
        f"at the newest monitor's DriftConfig ({values}); sources disagree: "
        f"{len(judged.differing)} of {judged.sources} last judged at other thresholds "
        f"or reported none ({others})"
    )
