"""OHIF Viewer 3 served by the hub at /viewer/: installed with `emix viewer install`, read
through the hub's DICOMweb with the browser's session, under a strict CSP."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import requests

from emix_core.testing import PATIENT_ID, PATIENT_NAME, emix, emix_json
from tests.test_web import browser, sign_in_with_mail  # noqa: F401  (fixture)
from tests.web_browser import Shots, link_in, new_context, poll, wait_for_mail

pytestmark = pytest.mark.e2e

#: share of lit pixels and a cheap checksum of the largest cornerstone canvas
CANVAS = """() => {
  const c = [...document.querySelectorAll('canvas.cornerstone-canvas')]
    .sort((a, b) => b.width * b.height - a.width * a.height)[0];
  if (!c || c.width < 200) return null;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let lit = 0, sum = 0;
  for (let i = 0; i < d.length; i += 4) {
    const v = d[i] + d[i + 1] + d[i + 2];
    if (v > 30) lit++;
    sum = (sum * 31 + v) % 1000000007;
  }
  return {lit: lit / (d.length / 4), sum: sum, width: c.width};
}"""


@pytest.fixture(scope="session")
def installed_viewer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The viewer, installed once per session by the project's own command (npm pack cached)."""
    import shutil

    if shutil.which("npm") is None:
        pytest.skip("npm is not installed (bash .ci/system-deps)")
    folder = tmp_path_factory.mktemp("ohif") / "viewer"
    result = emix_json("viewer", "install", "--dir", str(folder))
    assert result["viewer"].startswith("@ohif/app@") and result["files"] > 100
    index = (folder / "dist" / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in index and 'src="/app' not in index
    assert not (folder / "dist" / "app-config.js").exists()  # the public demo config is gone
    return folder


@pytest.fixture(scope="module")
def ct_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from emix_core.content.samples import generate_study

    slices = int(os.environ.get("EMIX_TEST_VIEWER_SLICES", "60"))  # 500 to time a large CT
    folder = tmp_path_factory.mktemp("ct")
    generate_study(
        folder, slices=slices, series=1, patient_name=PATIENT_NAME, patient_id=PATIENT_ID, seed=7
    )
    return folder


def test_viewer_install_status(installed_viewer, tmp_path):
    home = tmp_path / "hubhome"
    status = emix_json("viewer", "status", "--home", str(home))
    assert status["installed"] is False
    (home / "viewer").parent.mkdir(parents=True, exist_ok=True)
    (home / "viewer").symlink_to(installed_viewer)
    assert emix_json("viewer", "status", "--home", str(home))["installed"] is True
    assert "not installed" in emix("viewer", "status", "--home", str(tmp_path / "x")).stdout


def test_package_opens_in_ohif_same_origin_under_csp(
    hub,
    mercy,
    lakeside,
    ct_study,
    smtp_server,
    browser,  # noqa: F811
    installed_viewer,
):
    (hub.home / "viewer").symlink_to(installed_viewer)
    shots = Shots("viewer")
    package = emix_json("send", str(ct_study), "--to", "lakeside", env=mercy.env)["package"]
    link = link_in(wait_for_mail(smtp_server, 1))

    # logged out, the viewer and its configuration are not served
    assert requests.get(f"{hub.url}/viewer/").status_code == 401
    assert requests.get(f"{hub.url}/viewer/app-config.js").status_code == 401

    context = new_context(browser)
    page = context.new_page()
    violations: list[str] = []
    errors: list[str] = []
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    page.on("pageerror", lambda e: errors.append(str(e)))
    sign_in_with_mail(page, smtp_server, link, 1)
    page.wait_for_url(f"**/packages/{package}")
    shots(page, "package-with-viewer")
    dicomweb: list[str] = []
    page.on("request", lambda r: dicomweb.append(r.url) if "dicomweb" in r.url else None)

    started = time.monotonic()
    with page.expect_response(lambda r: r.url.endswith("/viewer/viewer") or "viewer?" in r.url):
        page.get_by_role("link", name="Open in viewer").click()
    html = requests.get(
        f"{hub.url}/viewer/viewer",
        cookies={c["name"]: c["value"] for c in context.cookies()},
    )
    csp = html.headers["Content-Security-Policy"]
    assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp
    assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]

    page.wait_for_function("() => window.services !== undefined", timeout=60000)
    first = poll(lambda: (v := page.evaluate(CANVAS)) and v["lit"] > 0.02 and v, timeout=60)
    elapsed = time.monotonic() - started
    shots(page, "viewer")
    assert dicomweb, "the viewer made no DICOMweb request"
    assert all(u.startswith(hub.url) for u in dicomweb)  # same origin only
    assert context.outside == [] and violations == [], violations
    metadata = [u for u in dicomweb if u.endswith("/metadata")]
    assert first, f"OHIF drew nothing on its canvas within 60 s ({len(metadata)} metadata requests)"
    print(f"time from 'Open in viewer' to first image: {elapsed:.1f} s")

    # scrolling through the series changes the image
    box = page.locator("canvas.cornerstone-canvas").first.bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    for _ in range(10):
        page.mouse.wheel(0, 120)
        time.sleep(0.1)
    scrolled = poll(lambda: (v := page.evaluate(CANVAS)) and v["sum"] != first["sum"] and v)
    assert scrolled, "scrolling did not change the image"
    shots(page, "viewer-scrolled")
    # a window/level preset (hotkey 2) changes the image too
    page.keyboard.press("2")
    preset = poll(lambda: (v := page.evaluate(CANVAS)) and v["sum"] != scrolled["sum"] and v)
    assert preset, "the window/level preset did not change the image"
    shots(page, "viewer-preset")
    assert errors == [], errors
    context.close()
