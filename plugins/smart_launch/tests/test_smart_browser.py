"""The whole launch in a browser: the EHR simulator's chart, one click, the patient's
received study in OHIF; and the patient's page inside the EMR's iframe.

A real hub (gunicorn), Debian's Chromium driven by Playwright, the EHR simulator.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pydicom
import pytest
from conftest import CLIENT_ID, SECRET, configure
from ehr_simulator import Client

from emix_core import generate_study
from emix_core.testing import PATIENT_ID, PATIENT_NAME, emix_json

pytestmark = pytest.mark.e2e

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts" / "smart"

#: share of lit pixels of the largest cornerstone canvas (the image is drawn)
CANVAS = """() => {
  const c = [...document.querySelectorAll('canvas.cornerstone-canvas')]
    .sort((a, b) => b.width * b.height - a.width * a.height)[0];
  if (!c || c.width < 200) return 0;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0;
  for (let i = 0; i < d.length; i += 4) { if (d[i] + d[i + 1] + d[i + 2] > 30) lit++; }
  return lit / (d.length / 4);
}"""


@pytest.fixture
def browser() -> Iterator[object]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed")
    if not os.path.exists(CHROMIUM):
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (bash .ci/system-deps)")
        pytest.skip("chromium is not installed")
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (bash .ci/system-deps)")
    folder = tmp_path_factory.mktemp("ohif") / "viewer"
    emix_json("viewer", "install", "--dir", str(folder))
    return folder


@pytest.fixture
def launched_hub(hub, mercy, lakeside, ehr, viewer, tmp_path: Path):  # type: ignore[no-untyped-def]
    """The hub trusts the EHR, has the viewer, and lakeside received the patient's CT."""
    (hub.home / "viewer").symlink_to(viewer)
    ehr.register(Client(CLIENT_ID, f"{hub.url}/smart/callback", secret=SECRET))
    configure(hub.home, ehr)
    study = tmp_path / "ct"
    files = generate_study(
        study, slices=12, series=1, patient_name=PATIENT_NAME, patient_id=PATIENT_ID, seed=3
    )
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    ehr.resources["ImagingStudy"]["img-1"]["identifier"][0]["value"] = f"urn:oid:{uid}"
    package = emix_json("send", str(study), "--to", "lakeside", env=mercy.env)["package"]
    return hub, package, uid


def context_of(browser):  # type: ignore[no-untyped-def]
    """A browser context that refuses anything leaving the machine."""
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    outside: list[str] = []

    def route(r):  # type: ignore[no-untyped-def]
        if urlsplit(r.request.url).hostname in ("127.0.0.1", "localhost"):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort("internetdisconnected")

    context.route("**/*", route)
    context.outside = outside
    return context


def drawn(page, timeout: float = 60) -> float:  # type: ignore[no-untyped-def]
    """Wait until OHIF has drawn an image; the share of lit pixels of its canvas."""
    page.wait_for_function("() => window.services !== undefined", timeout=timeout * 1000)
    deadline = time.monotonic() + timeout
    lit = 0.0
    while time.monotonic() < deadline and lit < 0.02:
        lit = page.evaluate(CANVAS)
        time.sleep(0.25)
    return float(lit)


def shot(page, name: str) -> None:  # type: ignore[no-untyped-def]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def test_one_click_from_the_chart_to_the_received_study_in_ohif(launched_hub, ehr, browser):
    hub, package, uid = launched_hub
    context = context_of(browser)
    page = context.new_page()
    page.goto(f"{ehr.base}/chart/pat-1?{urlencode({'app': f'{hub.url}/smart/launch'})}")
    shot(page, "01-chart")
    started = time.monotonic()
    page.get_by_role("link", name="CT chest outside study (open in emix)").click()
    page.wait_for_url(f"{hub.url}/viewer/**", timeout=30000)
    assert uid in page.url
    lit = drawn(page)
    elapsed = time.monotonic() - started
    shot(page, "02-ohif")
    assert lit >= 0.02, "OHIF did not draw the received study"
    print(f"chart click to first image in OHIF: {elapsed:.1f} s")
    assert context.outside == []
    # the tokens never reached the browser
    assert all(t not in str(context.cookies()) for t in ehr.tokens)
    context.close()


def test_patient_page_in_the_emr_iframe_lists_the_study_and_its_emr_resources(
    launched_hub, ehr, browser
):
    hub, package, _ = launched_hub
    context = context_of(browser)
    page = context.new_page()
    # the EMR shows the chart, and emix launched from it, in an iframe of its own page
    page.goto(f"{ehr.base}/emr/pat-1?{urlencode({'app': f'{hub.url}/smart/launch'})}")
    frame = page.frame_locator("#chart")
    frame.get_by_role("link", name="emix", exact=True).click()
    received = frame.locator("#received")
    received.wait_for(timeout=30000)
    shot(page, "03-patient-in-iframe")
    text = frame.locator("main").inner_text()
    assert "Mustermann, Erika" in text and "CT chest report" in text
    assert "No acute findings." in text and "mercy" in text
    link = frame.get_by_role("link", name="Open in viewer")
    assert link.count() == 1 and link.get_attribute("target") == "_blank"
    with context.expect_page() as opened:
        link.click()
    viewer = opened.value
    viewer.wait_for_url(f"{hub.url}/viewer/**", timeout=30000)
    assert drawn(viewer) >= 0.02, "OHIF did not draw the study opened from the iframe"
    shot(viewer, "04-viewer-from-iframe")
    # the link worked once
    again = context.new_page()
    again.goto(hub.url + link.get_attribute("href"))
    assert "already used" in again.content()
    assert context.outside == []
    context.close()
