"""The hub's human-facing pages (the landing page and the link in notification mails)."""

from __future__ import annotations

import logging

from flask import Blueprint, Response, current_app, jsonify, render_template_string

from emix_core import __version__
from emix_core.hub.packages import check_package_id

bp = Blueprint("web", __name__)
log = logging.getLogger("emix.hub")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>emix</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;margin:0;background:#f4f6f8;color:#1d2733}
header{background:#12355b;color:#fff;padding:1rem 2rem;font-size:1.4rem}
main{max-width:44rem;margin:2rem auto;background:#fff;padding:2rem;border-radius:8px;
box-shadow:0 1px 4px #0002}
code{background:#eef1f4;padding:.1rem .3rem;border-radius:4px}
footer{text-align:center;color:#6b7785;font-size:.85rem;margin:2rem}
</style></head><body><header>emix &mdash; medical image exchange</header><main>
{% if package_id %}
<h1>A package is waiting for you</h1>
<p>Package <code>{{ package_id }}</code> was shared with you. Its contents are only shown
to verified, confirmed members of the receiving facility.</p>
<p>Receive it with the emix command line:</p>
<pre><code>emix receive {{ package_id }} --out ./received</code></pre>
<p>or let your facility's gateway deliver it to your PACS or inbox folder.</p>
{% else %}
<h1>emix hub</h1>
<p>This hub exchanges DICOM studies and reports between member facilities. The API lives
under <code>/api/v1</code>.</p>
{% endif %}
</main><footer>emix {{ version }}</footer></body></html>"""


@bp.get("/")
def index() -> str:
    return render_template_string(PAGE, package_id=None, version=__version__)


@bp.get("/packages/<package_id>")
def package_page(package_id: str) -> str:
    return render_template_string(
        PAGE, package_id=check_package_id(package_id), version=__version__
    )


@bp.get("/healthz")
def health() -> Response:
    """Liveness: the process answers (a proxy restarts an instance that does not)."""
    return Response("ok\n", mimetype="text/plain")


@bp.get("/readyz")
def ready() -> tuple[Response, int]:
    """Readiness: the database and the blob store answer; 503 naming which does not.

    A load balancer sends requests only to instances that answer 200 here.
    """
    hub = current_app.extensions["emix"]
    checks: dict[str, str] = {}
    for name, probe in (("database", hub.db.ping), ("blobs", _blob_check(hub))):
        try:
            probe()
            checks[name] = "ok"
        except Exception as exc:  # reported, never raised: this is the health check
            log.warning("readiness: %s failed: %s", name, type(exc).__name__)
            checks[name] = "unavailable"
    ok = all(v == "ok" for v in checks.values())
    return jsonify({"ready": ok, "instance": hub.instance, **checks}), 200 if ok else 503


def _blob_check(hub):  # type: ignore[no-untyped-def]
    return getattr(hub.blobs, "check", lambda: hub.blobs.exists("readyz"))
