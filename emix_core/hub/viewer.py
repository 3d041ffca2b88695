"""OHIF Viewer 3 served by the hub at ``/viewer/``, on the same origin as its DICOMweb data.

``emix viewer install`` fetches the prebuilt ``@ohif/app`` with ``npm pack`` and re-roots
its ``dist/`` from ``/`` to ``/viewer/`` (a handful of fixed text edits, see
:func:`prepare_dist`). The hub then serves those files to signed-in members, with an
``app-config.js`` of its own whose only data source is the hub's DICOMweb service:
``/dicomweb`` when the hub has it, else the package's own endpoint. The browser's
session cookie authenticates those reads, so a member sees exactly what they may read.
"""

from __future__ import annotations

import base64
import hashlib
import json
import mimetypes
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, send_file, url_for

from emix_core.errors import ConfigError, NotFoundError

bp = Blueprint("viewer", __name__, url_prefix="/viewer")

PREFIX = "/viewer/"
OHIF_PACKAGE = "@ohif/app"
OHIF_VERSION = "3.13.2"
#: Scripts (the decode workers among them) take the policy of their own response: the
#: wasm codecs' glue code needs eval.
WORKER_CSP = (
    "default-src 'self'; script-src 'self' 'wasm-unsafe-eval' 'unsafe-eval'; "
    "connect-src 'self'; object-src 'none'"
)
#: A content hash in a bundle file's name (``1602.bundle.94f12cceab7c2762.js``,
#: ``0ddf166f7a343eda.wasm``): the name changes whenever the bytes do.
HASHED_NAME = re.compile(r"(?:^|\.)[0-9a-f]{16,}\.")
#: Hashed bundle files never change under their name: browsers keep them for a year.
IMMUTABLE = "public, max-age=31536000, immutable"
#: The page, its config and unhashed files: kept, but checked with the hub before each use.
REVALIDATE = "no-cache"


def viewer_dir(home: Path | None = None) -> Path:
    """Where the prepared viewer lives: ``EMIX_VIEWER_DIR``, else ``<hub home>/viewer``."""
    if os.environ.get("EMIX_VIEWER_DIR"):
        return Path(os.environ["EMIX_VIEWER_DIR"]).expanduser().resolve()
    if home is None:
        home = current_app.extensions["emix"].config.home
    return Path(home) / "viewer"


def installed(home: Path | None = None) -> bool:
    return (viewer_dir(home) / "dist" / "index.html").is_file()


# --------------------------------------------------------------------------- install


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emix"


def fetch_package(version: str = OHIF_VERSION, cache: Path | None = None) -> Path:
    """The ``npm pack`` tarball of ``@ohif/app`` (downloaded once into the cache)."""
    cache = cache or cache_dir()
    cache.mkdir(parents=True, exist_ok=True)
    tarball = cache / f"ohif-app-{version}.tgz"
    if tarball.is_file() and tarball.stat().st_size > 0:
        return tarball
    if shutil.which("npm") is None:
        raise ConfigError("npm is not installed; install Node.js and npm (Debian: apt install npm)")
    result = subprocess.run(
        ["npm", "pack", f"{OHIF_PACKAGE}@{version}", "--silent"],
        cwd=cache,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if result.returncode != 0 or not tarball.is_file():
        raise ConfigError(
            f"npm pack {OHIF_PACKAGE}@{version} failed: {result.stderr.strip()[-300:]}"
        )
    return tarball


def _rewrite(path: Path, pairs: list[tuple[str, str]], regex: bool = False) -> None:
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    for old, new in pairs:
        text = re.sub(old, new, text) if regex else text.replace(old, new)
    path.write_text(text, encoding="utf-8")


def prepare_dist(dist: Path, prefix: str = PREFIX) -> None:
    """Re-root a prebuilt OHIF ``dist/`` from ``/`` to ``prefix`` (edits in place)."""
    _rewrite(
        dist / "index.html",
        [
            (r'window\.PUBLIC_URL="/"', f'window.PUBLIC_URL="{prefix}"'),
            (r'(href|src|content)="/', rf'\1="{prefix}'),
        ],
        regex=True,
    )
    for script in dist.glob("*.js"):
        text = script.read_text(encoding="utf-8", errors="surrogateescape")
        if '__webpack_require__.p = "/";' in text:
            script.write_text(
                text.replace(
                    '__webpack_require__.p = "/";', f'__webpack_require__.p = "{prefix}";'
                ),
                encoding="utf-8",
                errors="surrogateescape",
            )
    _rewrite(dist / "app.bundle.css", [("url(/", f"url({prefix}")])
    for bundle in dist.glob("app.bundle.*.js"):
        _rewrite(
            bundle,
            [
                ("'/dicom-microscopy-viewer/", f"'{prefix}dicom-microscopy-viewer/"),
                ("'/silent-refresh.html'", f"'{prefix}silent-refresh.html'"),
            ],
        )
    for name in (
        "manifest.json",
        "assets/browserconfig.xml",
        "assets/yandex-browser-manifest.json",
    ):
        _rewrite(dist / name, [('"/assets/', f'"{prefix}assets/')])
    # the shipped config points at a public demo server: never serve it
    (dist / "app-config.js").unlink(missing_ok=True)


def install(target: Path, version: str = OHIF_VERSION, cache: Path | None = None) -> dict[str, Any]:
    """Fetch and prepare the viewer into ``target/dist`` (replacing an older one)."""
    tarball = fetch_package(version, cache)
    target.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target) as tmp:
        with tarfile.open(tarball) as archive:
            members = [m for m in archive.getmembers() if m.name.startswith("package/dist/")]
            archive.extractall(tmp, members=members, filter="data")
        dist = Path(tmp) / "package" / "dist"
        if not (dist / "index.html").is_file():
            raise ConfigError(f"{tarball.name} has no dist/index.html; is it @ohif/app?")
        prepare_dist(dist)
        final = target / "dist"
        old = target / "dist.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            final.rename(old)
        dist.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    (target / "VERSION").write_text(f"{OHIF_PACKAGE}@{version}\n")
    files = sum(1 for p in (target / "dist").rglob("*") if p.is_file())
    return {"viewer": f"{OHIF_PACKAGE}@{version}", "path": str(target / "dist"), "files": files}


# --------------------------------------------------------------------------- serving


def dicomweb_root() -> str | None:
    """``/dicomweb`` when the hub serves DICOMweb at its root, else ``None`` (per package)."""
    for rule in current_app.url_map.iter_rules():
        if rule.rule.startswith("/dicomweb/studies"):
            return "/dicomweb"
    return None


def viewer_url(package_id: str, study_uid: str) -> str | None:
    """The link that opens a study of a package in the viewer (``None``: not installed)."""
    if not installed():
        return None
    url = f"{PREFIX}viewer?StudyInstanceUIDs={study_uid}"
    return url if dicomweb_root() else f"{url}&package={package_id}"


def app_config() -> str:
    """The viewer's ``app-config.js``: one same-origin DICOMweb data source."""
    root = dicomweb_root()
    source = {
        "friendlyName": "emix hub",
        "name": "emix",
        "qidoRoot": root,
        "wadoRoot": root,
        "wadoUriRoot": root,
        "qidoSupportsIncludeField": False,
        "imageRendering": "wadors",
        "thumbnailRendering": "wadors",
        "enableStudyLazyLoad": True,
        "supportsFuzzyMatching": False,
        "supportsWildcard": True,
        "staticWado": False,
        "singlepart": "bulkdata,video",
        "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
        "omitQuotationForMultipartRequest": True,
    }
    config = {
        "name": "emix",
        "routerBasename": PREFIX.rstrip("/"),
        "extensions": [],
        "modes": [],
        "customizationService": {"ohif.tours": {"$set": []}},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "useCPURendering": False,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "showErrorDetails": "always",
        "defaultDataSourceName": "emix",
        "dataSources": [
            {
                "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
                "sourceName": "emix",
                "configuration": source,
            }
        ],
    }
    script = f"window.config = {json.dumps(config, indent=1)};\n"
    if root is None:  # per-package DICOMweb: the package comes from the page's own URL
        script += (
            "(function () {\n"
            "  var id = new URLSearchParams(window.location.search).get('package') ||\n"
            "    window.sessionStorage.getItem('emixPackage') || '';\n"
            "  if (!/^[0-9a-f]{32}$/.test(id)) { id = ''; }\n"
            "  window.sessionStorage.setItem('emixPackage', id);\n"
            "  var root = '/api/v1/packages/' + id + '/dicomweb';\n"
            "  var c = window.config.dataSources[0].configuration;\n"
            "  c.qidoRoot = root; c.wadoRoot = root; c.wadoUriRoot = root;\n"
            "})();\n"
        )
    return script


def html_csp(html: str) -> str:
    """The policy of the viewer's page: its two inline scripts by hash, nothing remote."""
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(m.encode()).digest()).decode()}'"
        for m in re.findall(r"<script>(.*?)</script>", html, re.S)
    )
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; font-src 'self'; connect-src 'self'; worker-src 'self'; "
        "object-src 'none'; base-uri 'self'; form-action 'self'; frame-ancestors 'none'"
    )


def cache_control(name: str) -> str:
    """How long a browser may keep a viewer file: a year when its name carries a content
    hash, else only with a check (``ETag``) on each use. No viewer file holds PHI: the
    images come from DICOMweb, which is never cached."""
    return IMMUTABLE if HASHED_NAME.search(name) else REVALIDATE


def _signed_in() -> bool:
    from emix_core.hub.web import web_principal

    return web_principal() is not None


@bp.get("/", defaults={"path": ""})
@bp.get("/<path:path>")
def serve(path: str) -> Response:
    if not _signed_in():
        from emix_core.hub.web import render_page

        return render_page("signin.html", status=401)
    if not installed():
        from emix_core.hub.web import message

        return message(
            "The viewer is not installed",
            "Ask the hub's operator to run: emix viewer install --home HUB_HOME",
            status=404,
        )
    if path == "app-config.js":
        response = Response(app_config(), mimetype="application/javascript")
        response.headers["Cache-Control"] = REVALIDATE
        return response
    dist = viewer_dir() / "dist"
    name = Path(path).name
    is_asset = "." in name
    target = (dist / path).resolve() if path else dist / "index.html"
    if not target.is_relative_to(dist.resolve()):
        raise NotFoundError("not found")
    if not target.is_file():
        if is_asset:
            raise NotFoundError("not found")
        target = dist / "index.html"  # the viewer's own routes (/viewer/viewer?...)
    if target.name == "index.html":
        html = target.read_text(encoding="utf-8")
        response = Response(html, mimetype="text/html")
        response.headers["Content-Security-Policy"] = html_csp(html)
        response.headers["Cache-Control"] = REVALIDATE
        return response
    mimetype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
    if target.suffix == ".wasm":
        mimetype = "application/wasm"
    response = send_file(target, mimetype=mimetype, conditional=True)
    response.headers["Cache-Control"] = cache_control(target.name)
    if target.suffix in (".js", ".mjs"):
        response.headers["Content-Security-Policy"] = WORKER_CSP
    return response


def install_hint() -> str:
    return url_for("viewer.serve")
