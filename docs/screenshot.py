"""Take the README's dashboard screenshot from a running demo (`scripts/run.sh`) with headless Chromium.

    .venv/bin/python docs/screenshot.py [--url http://127.0.0.1:8501] [--page Funnel] [--out docs/dashboard.png]

Signs in as demo/demo (the demo runs with DEMO_MODE=true), opens the page from the sidebar and saves a PNG.
Needs Debian's chromium at /usr/bin/chromium (Playwright's own browser download is not used).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--no-first-run", "--disable-sync",
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8501")
    parser.add_argument("--page", default="Funnel", help="sidebar entry to open after signing in")
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("dashboard.png"))
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as profile, sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            profile, executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True,
            viewport={"width": 1440, "height": 1000}, device_scale_factor=1,
        )
        page = browser.new_page()
        page.goto(args.url, wait_until="networkidle")
        page.get_by_label("User", exact=True).fill("demo")
        page.get_by_label("Password", exact=True).fill("demo")
        page.get_by_role("button", name="Sign in").click()
        page.get_by_text("Signed in as").wait_for(timeout=30_000)
        if args.page:
            page.get_by_role("link", name=args.page).first.click()
        # Streamlit draws skeletons while the page script runs: wait for a chart, then for the run to finish.
        page.locator(".js-plotly-plot").first.wait_for(timeout=90_000)
        page.wait_for_function(
            "!document.querySelector('[data-testid=\"stSkeleton\"]')"
            " && !document.querySelector('[data-testid=\"stStatusWidget\"]')",
            timeout=90_000,
        )
        page.wait_for_timeout(2000)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(args.out), full_page=False)
        browser.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
