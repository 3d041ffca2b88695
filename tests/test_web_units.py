"""Fast checks of the browser side's building blocks (no processes)."""

from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import pytest

from emix_core.errors import InvalidInput
from emix_core.hub import viewer
from emix_core.hub.pacs_push import check_url
from emix_core.hub.thumbnails import NoPreview, png, thumbnail
from emix_core.hub.usage import month_bounds
from emix_core.hub.web_patient import new_access_code


def test_prepare_dist_reroots_the_prebuilt_viewer_to_its_sub_path(tmp_path):
    dist = tmp_path / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text(
        '<script>window.PUBLIC_URL="/";</script><link href="/app.bundle.css">'
        '<script src="/app-config.js"></script><meta content="/assets/x.png">'
    )
    (dist / "app.bundle.abc.js").write_text(
        "__webpack_require__.p = \"/\";x('/silent-refresh.html')"
    )
    (dist / "8097.bundle.js").write_text('__webpack_require__.p = "/";')
    (dist / "other.js").write_text("var p = '/';")
    (dist / "app.bundle.css").write_text("@font-face{src:url(/a.woff2)}")
    (dist / "manifest.json").write_text('{"src": "/assets/icon.png"}')
    (dist / "app-config.js").write_text("window.config={dataSources:'https://public.example'}")
    viewer.prepare_dist(dist)
    index = (dist / "index.html").read_text()
    assert 'window.PUBLIC_URL="/viewer/"' in index
    assert 'href="/viewer/app.bundle.css"' in index and 'src="/viewer/app-config.js"' in index
    assert 'content="/viewer/assets/x.png"' in index
    assert '__webpack_require__.p = "/viewer/"' in (dist / "8097.bundle.js").read_text()
    assert "'/viewer/silent-refresh.html'" in (dist / "app.bundle.abc.js").read_text()
    assert (dist / "other.js").read_text() == "var p = '/';"
    assert "url(/viewer/a.woff2)" in (dist / "app.bundle.css").read_text()
    assert '"/viewer/assets/icon.png"' in (dist / "manifest.json").read_text()
    assert not (dist / "app-config.js").exists()


def test_viewer_page_policy_allows_its_inline_scripts_by_hash_only():
    csp = viewer.html_csp("<script>a()</script><p>x</p><script>b()</script>")
    script_src = csp.split("script-src")[1].split(";")[0]
    assert script_src.count("'sha256-") == 2 and "unsafe-inline" not in script_src
    assert "frame-ancestors 'none'" in csp and "connect-src 'self'" in csp


def test_previews_are_valid_pngs_of_the_image():
    from pydicom.data import get_testdata_file

    data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    image = thumbnail(data, size=64)
    assert image.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack(">II", image[16:24])
    assert (width, height) == (64, 64)
    with pytest.raises(NoPreview):
        thumbnail(b"not dicom at all")


def test_png_encoder_round_trips_pixels():
    import numpy as np

    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4)
    data = png(pixels)
    idat = data[data.index(b"IDAT") + 4 :]
    raw = zlib.decompressobj().decompress(idat)
    assert raw == b"".join(b"\x00" + bytes(pixels[r]) for r in range(3))


def test_month_bounds_and_bad_months():
    start, end = month_bounds("2026-12")
    assert (start.year, start.month, end.year, end.month) == (2026, 12, 2027, 1)
    for bad in ("2026-13", "26-01", "2026/01", ""):
        with pytest.raises(InvalidInput):
            month_bounds(bad)


def test_access_codes_and_pacs_urls():
    codes = {new_access_code() for _ in range(200)}
    assert len(codes) == 200
    assert all(re.fullmatch(r"[A-HJ-NP-Z2-9]{4}(-[A-HJ-NP-Z2-9]{4}){2}", c) for c in codes)
    assert check_url("https://pacs.example.org/dicom-web/") == "https://pacs.example.org/dicom-web"
    assert check_url(" ORTHANC@pacs.example.org:104 ") == "ORTHANC@pacs.example.org:104"
    assert check_url("LAKE_PACS@10.1.2.3:11112") == "LAKE_PACS@10.1.2.3:11112"
    for node in ("@pacs:104", "A" * 17 + "@pacs:104", "PACS@pacs:0", "PACS@pacs:99999"):
        with pytest.raises(InvalidInput):
            check_url(node)
    for bad in ("ftp://pacs/x", "https://user:pw@pacs/x", "https://pacs/x?y=1", "pacs"):
        with pytest.raises(InvalidInput):
            check_url(bad)


def test_member_confirmation_codes_can_be_typed_after_the_command():
    """A code starting with ``-`` was read by ``emix member confirm CODE`` as an option
    (about one code in 64)."""
    from emix_core.hub.api_facilities import confirmation_code

    codes = {confirmation_code() for _ in range(3000)}
    assert len(codes) == 3000
    assert all(len(c) == 22 and c.isascii() and c.isalnum() for c in codes)
