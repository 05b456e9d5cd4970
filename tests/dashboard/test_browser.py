"""`bnwatch dashboard` in a real headless Chromium: the Overview page of a seeded database
renders (Streamlit sends its elements over a websocket after the page loads: the test waits
for them and for the app to finish running, it never sleeps a fixed time), shows the seeded
model and its alerts, the Model page draws its heatmap, and the Reports page shows Evidently's
report, drawn by its scripts in an iframe."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.dashboard.seed import MODEL, VERSION, seed
from tests.service.helpers import free_port

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def chromium() -> str:
    """Debian's chromium; skipped without it -- except in CI (``CI=true``), where it fails."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    message = "chromium is not installed (apt-get install chromium; `make test` does as root)"
    if os.environ.get("CI"):
        pytest.fail(message + "; CI requires it")
    pytest.skip(message)


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[str]:
    """``bnwatch dashboard`` serving a seeded SQLite database on a free port; its URL."""
    url = f"sqlite:///{tmp_path / 'bnwatch.db'}"
    seed(url)
    port = free_port()
    log = tmp_path / "dashboard.log"
    env = {k: v for k, v in os.environ.items() if k != "BNWATCH_DATABASE_URL"}
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bnwatch",
                "dashboard",
                "--db",
                url,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                pytest.fail(f"bnwatch dashboard exited: {log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{address}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"dashboard not healthy after 60 s: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield address
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_overview_renders_in_chromium(dashboard: str, tmp_path: Path) -> None:
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            errors: list[str] = []
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(dashboard)
            # the elements arrive over the websocket; then the app stops running
            page.get_by_text("Model versions", exact=True).wait_for(timeout=60_000)
            page.wait_for_function(
                "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                timeout=60_000,
            )
            page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=60_000)

            metrics = dict(
                zip(
                    page.locator('[data-testid="stMetricLabel"]').all_inner_texts(),
                    page.locator('[data-testid="stMetricValue"]').all_inner_texts(),
                    strict=True,
                )
            )
            assert metrics == {"Model versions": "1", "With open alerts": "1", "Drifting now": "1"}
            sidebar = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').first
            chosen = sidebar.locator("input").input_value() + (sidebar.text_content() or "")
            assert f"{MODEL} @ {VERSION}" in chosen
            assert "Open alerts" in page.inner_text("main")
            assert page.locator('[data-testid="stException"]').count() == 0
            shot = tmp_path / "overview.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000  # a rendered page, not a blank one

            # the first change to a sidebar picker on a fresh server sticks (with the pickers
            # drawn before st.navigation it snapped back, and the page kept the old range)
            picker = page.locator('[data-testid="stSidebar"] [data-testid="stSelectbox"]').nth(1)
            picker.locator("input").click()
            page.get_by_role("option", name="last 7 days", exact=True).click()
            page.get_by_text("drift over the last 7 days", exact=False).wait_for(timeout=60_000)
            page.wait_for_function(
                "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                timeout=60_000,
            )
            assert picker.locator("input").input_value() == "last 7 days"

            page.get_by_role("link", name="Model").first.click()
            page.get_by_text("Depth profile", exact=True).wait_for(timeout=60_000)
            page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
            assert page.locator('[data-testid="stException"]').count() == 0
            # the Reports page embeds Evidently's page in an iframe whose scripts run: its
            # per-channel widgets are drawn by them, not in the HTML sent
            page.get_by_role("link", name="Reports").first.click()
            page.get_by_text("Drift report", exact=True).wait_for(timeout=60_000)
            report = page.frame_locator("iframe").first
            report.get_by_text("Data drift detected", exact=False).first.wait_for(timeout=120_000)
            assert page.locator('[data-testid="stException"]').count() == 0
            assert errors == []
        finally:
            browser.close()


def test_a_page_opened_by_its_url_on_a_fresh_server_renders(dashboard: str) -> None:
    """A bookmark or a tab left open across a restart: the first visit to ``/model`` said
    "Open the dashboard through its entry script" and listed the raw page files, for every
    visitor until one opened ``/`` (Streamlit auto-discovered a ``pages/`` directory until
    ``st.navigation`` had run once)."""
    executable = chromium()
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{dashboard}/model")
            page.get_by_text(f"Model {MODEL} @ {VERSION}", exact=False).first.wait_for(
                timeout=60_000
            )
            page.wait_for_function(
                "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                timeout=60_000,
            )
            assert "entry script" not in page.inner_text("body")
            assert page.locator('[data-testid="stException"]').count() == 0
        finally:
            browser.close()
