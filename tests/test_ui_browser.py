"""A real browser (Debian's chromium through Playwright) uploads an image, reads the label, saves a correction.

Skipped with the reason where chromium is absent; .ci/run installs it. Playwright never
downloads a browser here: it drives /usr/bin/chromium.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install chromium)")


def test_upload_label_correct_screenshot(tiny_bundle: Path, colour_data: Path, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    from dermaclass.ui import build_app

    port = free_port()
    app = build_app(tiny_bundle, review_dir=tmp_path / "review")
    app.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, share=False, quiet=True)
    shots = Path(os.environ.get("DERMACLASS_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded")
            expect(page.get_by_text("not a diagnostic device").first).to_be_visible(timeout=30_000)
            page.locator("input[type=file]").first.set_input_files(str(colour_data / "nv" / "7.png"))
            page.get_by_role("button", name="Diagnose").click()
            expect(page.locator("#verdict")).to_contain_text(
                re.compile("Most likely|Refer to a dermatologist"), timeout=60_000
            )
            page.get_by_label("Right label").click()
            page.get_by_role("option", name="melanoma (mel)").click()
            page.get_by_role("button", name="Save correction").click()
            expect(page.locator("#saved")).to_contain_text("Saved", timeout=30_000)
            page.screenshot(path=str(shots / "app_diagnose.png"), full_page=True)
            browser.close()
    finally:
        app.close()
    assert pd.read_csv(tmp_path / "review" / "labels.csv")["label"].tolist() == ["mel"]
    assert (shots / "app_diagnose.png").stat().st_size > 10_000
