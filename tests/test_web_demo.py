"""`emix demo` prints a link with which a newcomer sees the sample study in the browser."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest

from emix_core.testing import free_port
from tests.test_web import browser  # noqa: F401  (fixture)
from tests.web_browser import Shots, new_context

pytestmark = pytest.mark.e2e


def test_demo_link_opens_the_sample_study(tmp_path, browser):  # noqa: F811
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "emix_core", "demo", "--home", str(tmp_path / "demo")]
        + ["--port", str(port), "--slices", "12", "--no-viewer"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        link = None
        deadline = time.monotonic() + 240
        output = []
        while link is None and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            match = re.search(r"http://127\.0\.0\.1:\d+/signin/\S+", line)
            link = match.group(0) if match else None
        assert link, "".join(output)
        shots = Shots("demo")
        page = new_context(browser).new_page()
        page.goto(link)
        shots(page, "demo-link")
        page.get_by_role("button", name="Continue").click()
        page.wait_for_url("**/inbox")
        assert "mercy-general" in page.content()
        page.locator("table.inbox a", has_text="Open").first.click()
        page.wait_for_url("**/packages/*")
        page.wait_for_load_state("networkidle")
        widths = page.eval_on_selector_all(".series img", "els => els.map(e => e.naturalWidth)")
        assert widths and all(w > 0 for w in widths)
        shots(page, "demo-package")
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
