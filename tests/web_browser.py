"""Helpers for the browser tests: Debian's Chromium driven by Playwright, mails, screenshots."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "web"


def need_browser() -> None:
    """Skip without Chromium or Playwright, except under CI where that is a failure."""
    missing = None
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "playwright (pip install -e '.[test]')"
    if not os.path.exists(CHROMIUM):
        missing = "chromium (bash .ci/system-deps)"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"{missing} is not installed")
        pytest.skip(f"{missing} is not installed")


def mail_text(message) -> str:  # type: ignore[no-untyped-def]
    return message.get_payload(decode=True).decode()


def link_in(message) -> str:  # type: ignore[no-untyped-def]
    match = re.search(r"https?://\S+/signin/\S+", mail_text(message))
    assert match, mail_text(message)
    return match.group(0)


def code_in(message) -> str:  # type: ignore[no-untyped-def]
    match = re.search(r"code is (\d{4}) (\d{4})", mail_text(message))
    assert match, mail_text(message)
    return match.group(1) + match.group(2)


def wait_for_mail(smtp_server, count: int, timeout: float = 15):  # type: ignore[no-untyped-def]
    messages = smtp_server.wait_for(count, timeout)
    assert len(messages) >= count, f"expected {count} mails, got {len(messages)}"
    return messages[count - 1]


class Shots:
    """Screenshots of every page visited, kept under ``test-artifacts/web/<test>``."""

    def __init__(self, name: str) -> None:
        self.folder = ARTIFACTS / name
        self.folder.mkdir(parents=True, exist_ok=True)
        self.count = 0

    def __call__(self, page, label: str) -> Path:  # type: ignore[no-untyped-def]
        self.count += 1
        path = self.folder / f"{self.count:02d}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        return path


def new_context(browser, **kwargs):  # type: ignore[no-untyped-def]
    """A browser context that refuses any request leaving the machine."""
    context = browser.new_context(viewport={"width": 1280, "height": 860}, **kwargs)
    outside: list[str] = []

    def route(r):  # type: ignore[no-untyped-def]
        host = urlsplit(r.request.url).hostname
        if host in ("127.0.0.1", "localhost") or r.request.url.startswith("data:"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort("internetdisconnected")

    context.route("**/*", route)
    context.outside = outside
    return context


def poll(check, timeout: float = 20, interval: float = 0.25):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


class Authenticator:
    """An administrator's phone for the browser tests: it reads the key off the enrolment
    page (as a person types it into their app) and shows a fresh code for each use, since
    the hub accepts a code once (one 30-second step of drift either way)."""

    def __init__(self) -> None:
        self.totp = None
        self.last = -1
        self.recovery_codes: list[str] = []

    def code(self) -> str:
        import pyotp

        assert isinstance(self.totp, pyotp.TOTP), "enrol first"
        step = max(self.totp.timecode(_now()) - 1, self.last + 1)
        while step > self.totp.timecode(_now()) + 1:
            time.sleep(0.5)
        self.last = step
        return self.totp.generate_otp(step)

    def pass_step(self, page, shots=None) -> None:  # type: ignore[no-untyped-def]
        """On the second-factor step: enrol the first time, else type the current code."""
        import pyotp

        page.wait_for_url("**/admin/2fa**")
        secret = page.locator("#totp-secret")
        if secret.count():
            if shots:
                shots(page, "second-factor-enrol")
            self.totp = pyotp.TOTP(secret.inner_text().replace(" ", ""))
            page.get_by_label("6-digit code from the app").fill(self.code())
            page.get_by_role("button", name="Turn on the second factor").click()
            page.locator("#recovery-codes").wait_for()
            self.recovery_codes = page.locator("#recovery-codes code").all_inner_texts()
            if shots:
                shots(page, "second-factor-recovery-codes")
            page.get_by_role("link", name="Continue to administration").click()
        else:
            if shots:
                shots(page, "second-factor-verify")
            field = page.get_by_label("Code from your authenticator app, or a recovery code")
            field.fill(self.code())
            page.get_by_role("button", name="Verify").click()
        page.wait_for_url("**/admin**")


def _now():  # type: ignore[no-untyped-def]
    from datetime import UTC, datetime

    return datetime.now(UTC)
