"""The dashboard in a real browser: `streamlit run` on a loopback port, headless Debian Chromium via Playwright.

Signs in, opens every page from the sidebar, saves a screenshot of each under artifacts/screenshots/, and
fails on any Streamlit exception block or a chart missing where the page must draw one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from core.auth import hash_password
from tests.conftest import free_port
from tests.test_dashboard_apptest import seed_database

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
# Sidebar label → charts the page must show with the seeded data.
PAGES = {
    "Overview": 2,
    "States": 2,
    "Funnel": 3,
    "Transition latency": 3,
    "Stalled users": 1,
    "Campaigns": 2,
    "Health": 4,
}
CHART = '.js-plotly-plot, [data-testid="stPlotlyChart"]'
EXCEPTION = '[data-testid="stException"]'

pytestmark = pytest.mark.browser


def _require_chromium() -> None:
    if CHROMIUM.exists():
        return
    reason = f"{CHROMIUM} is missing (install it with `apt-get install -y chromium`)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(reason)
    pytest.skip(reason)


def _wait_healthy(base: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"streamlit exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/_stcore/health", timeout=2) as response:
                if response.read().strip() == b"ok":
                    return
        except OSError:
            time.sleep(0.3)
    pytest.fail(f"streamlit did not answer on {base} within {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def dashboard(sqlite_template: Path, tmp_path: Path) -> Iterator[str]:
    _require_chromium()
    database = tmp_path / "dashboard.db"
    shutil.copyfile(sqlite_template, database)
    seed_database(f"sqlite:///{database}", datetime.now(UTC))
    port = free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"sqlite:///{database}",
        "DASHBOARD_USERS": f"alice:admin:{hash_password('browser-secret', iterations=1000)}",
        "DEMO_MODE": "false",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("FLOWS_DIR", None)
    log = tmp_path / "streamlit.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "streamlit_app.py", "--server.headless", "true",
             "--server.port", str(port), "--server.address", "127.0.0.1", "--browser.gatherUsageStats", "false",
             "--server.fileWatcherType", "none"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(base, process, log)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _settle(page: object, charts: int, timeout: float = 30) -> None:
    """Wait until the script run is over: the expected charts are drawn (or an exception block shows)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        running = page.locator('[data-testid="stStatusWidget"]').count()  # type: ignore[attr-defined]
        drawn = page.locator(".js-plotly-plot").count()  # type: ignore[attr-defined]
        failed = page.locator(EXCEPTION).count()  # type: ignore[attr-defined]
        if failed or (not running and drawn >= charts):
            break
        page.wait_for_timeout(250)  # type: ignore[attr-defined]
    page.wait_for_timeout(500)  # type: ignore[attr-defined]


def test_every_page_in_a_real_browser(dashboard: str) -> None:
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(dashboard, wait_until="domcontentloaded")
        page.get_by_role("textbox", name="User").fill("alice")
        page.get_by_role("textbox", name="Password").fill("wrong")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Wrong user name or password").wait_for(timeout=20000)
        assert page.locator(CHART).count() == 0
        page.get_by_role("textbox", name="Password").fill("browser-secret")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Active sessions").wait_for(timeout=30000)
        for number, (label, charts) in enumerate(PAGES.items(), start=1):
            page.locator('[data-testid="stSidebarNav"]').get_by_text(label, exact=True).click()
            page.get_by_role("heading", name=label).first.wait_for(timeout=30000)
            _settle(page, charts)
            name = label.lower().replace(" ", "_")
            page.screenshot(path=str(SCREENSHOTS / f"{number}_{name}.png"), full_page=True)
            if page.locator(EXCEPTION).count():
                problems.append(f"{label}: exception: {page.locator(EXCEPTION).first.inner_text()[:500]}")
            drawn = page.locator(".js-plotly-plot").count()
            if drawn < charts:
                problems.append(f"{label}: {drawn} chart(s) drawn, expected {charts}")
        browser.close()
    assert not problems, problems
