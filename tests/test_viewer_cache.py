"""Browser caching of the OHIF viewer's files: hashed bundles for a year, the page and its
config checked on every use, nothing with PHI kept (in-process, no browser)."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from emix_core.testing import HubApp

IMMUTABLE = "public, max-age=31536000, immutable"
BUNDLE = "1602.bundle.94f12cceab7c2762.js"
CODEC = "0ddf166f7a343eda.wasm"


@pytest.fixture
def signed_in(hub_app: HubApp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A test client signed in as mercy's admin, and a small viewer ``dist/`` that has
    the kinds of files OHIF's has."""
    from emix_core.hub import sessions
    from emix_core.store.db import Member

    dist = tmp_path / "viewer" / "dist"
    (dist / "assets").mkdir(parents=True)
    (dist / "index.html").write_text('<html><script>window.PUBLIC_URL="/viewer/"</script></html>')
    (dist / BUNDLE).write_text("console.log('bundle');")
    (dist / CODEC).write_bytes(b"\0asm\1\0\0\0")
    (dist / "1602.css").write_text("body{}")
    (dist / "assets" / "manifest.json").write_text("{}")
    monkeypatch.setenv("EMIX_VIEWER_DIR", str(tmp_path / "viewer"))
    hub = hub_app.hub
    with hub.db.session() as session:
        member = session.scalars(
            select(Member).where(Member.email == "admin@mercy.example.org")
        ).one()
        cookie = sessions.open_session(session, member_id=member.id)
        session.commit()
    client = hub_app.client
    client.set_cookie(sessions.COOKIE, cookie)
    return client


def test_hashed_bundle_files_are_cached_for_a_year(signed_in) -> None:
    for name, mimetype in ((BUNDLE, "text/javascript"), (CODEC, "application/wasm")):
        answer = signed_in.get(f"/viewer/{name}")
        assert answer.status_code == 200, name
        assert answer.headers["Cache-Control"] == IMMUTABLE, name
        assert answer.mimetype == mimetype


def test_the_page_its_config_and_unhashed_files_are_revalidated(signed_in) -> None:
    for path in ("/viewer/", "/viewer/viewer", "/viewer/app-config.js", "/viewer/1602.css",
                 "/viewer/assets/manifest.json"):  # fmt: skip
        answer = signed_in.get(path)
        assert answer.status_code == 200, path
        assert answer.headers["Cache-Control"] == "no-cache", path
    page = signed_in.get("/viewer/viewer?StudyInstanceUIDs=1.2.3")
    assert "Content-Security-Policy" in page.headers
    # an unchanged file is answered 304 on revalidation: cheap for the browser
    first = signed_in.get("/viewer/1602.css")
    again = signed_in.get("/viewer/1602.css", headers={"If-None-Match": first.headers["ETag"]})
    assert again.status_code == 304


def test_nothing_else_is_cacheable(hub_app: HubApp, signed_in) -> None:
    # not signed in: the sign-in page, never a cached bundle
    anonymous = hub_app.client.get(f"/viewer/{BUNDLE}")
    assert anonymous.status_code == 401
    assert anonymous.headers["Cache-Control"] == "no-store"
    missing = signed_in.get("/viewer/0123456789abcdef0123.bundle.js")
    assert missing.status_code == 404 and missing.headers["Cache-Control"] == "no-store"
    inbox = hub_app.client.get("/api/v1/inbox", headers=hub_app.headers("mercy"))
    assert inbox.status_code == 200 and inbox.headers["Cache-Control"] == "no-store"
    studies = signed_in.get("/dicomweb/studies")
    assert "immutable" not in studies.headers.get("Cache-Control", "")
    assert "public" not in studies.headers.get("Cache-Control", "")
