"""bnwatch dashboard: the entry script (``bnwatch dashboard`` runs ``streamlit run`` on it).

It reads the database of ``$BNWATCH_DATABASE_URL`` (``bnwatch dashboard --db URL`` sets it),
draws the shared sidebar and runs the chosen page.  An empty or missing database shows how
to fill it instead of a traceback.
"""

from __future__ import annotations

import streamlit as st

import data
import ui

st.set_page_config(page_title="bnwatch", page_icon=":material/monitoring:", layout="wide")

url = data.database_url()
try:
    models = data.models(url)
    problem = None
except data.NoDatabaseError as err:
    models, problem = None, str(err)

if models is None or models.empty:

    def getting_started() -> None:
        ui.getting_started(url, problem)

    st.navigation([st.Page(getting_started, title="Getting started")]).run()
    st.stop()

# navigation first, then the sidebar's pickers, then the page: with the pickers drawn before
# st.navigation, a fresh server lost the first change to one (it snapped back)
page = st.navigation(
    [
        st.Page("views/overview.py", title="Overview", icon=":material/dashboard:", default=True),
        st.Page("views/model.py", title="Model", icon=":material/stacks:"),
        st.Page("views/layer.py", title="Layer", icon=":material/view_column:"),
        st.Page("views/batch_size.py", title="Batch size", icon=":material/bar_chart:"),
        st.Page(
            "views/alerts.py", title="Alerts and recalibrations", icon=":material/notifications:"
        ),
        st.Page("views/reports.py", title="Reports", icon=":material/description:"),
    ]
)
ui.sidebar(url, models)
page.run()
