"""A connection to one PACS's DICOMweb service: URL checks, authentication, TLS, errors.

Only ``http`` and ``https`` URLs are accepted, without credentials in them. A redirect
is followed only to the same scheme, host and port (and never for uploads): a PACS
that points somewhere else is refused, so credentials and PHI never leave for a host
the administrator did not configure. TLS certificates are verified unless a setting
says otherwise.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
from dicomweb_client.api import DICOMwebClient

from emix_core import ConfigError, EmixError
from emix_dicomweb.auth import AUTH_KINDS

__all__ = [
    "AUTH_KINDS",
    "PacsConnection",
    "PacsError",
    "PacsSettings",
    "PacsUnavailable",
    "TRANSIENT_HTTP",
]

#: HTTP answers worth retrying: the PACS is busy, restarting or behind a failing proxy.
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "emix-dicomweb"

log = logging.getLogger("emix.dicomweb")


class PacsError(EmixError):
    """The PACS refused a request, or answered something emix cannot use."""

    http_status = 502
    code = "pacs"


class PacsUnavailable(PacsError):
    """The PACS cannot be reached or is overloaded; retrying later may work."""

    http_status = 503
    code = "pacs_unavailable"


@dataclass
class PacsSettings:
    """How to reach one PACS (a ``[[sources]]``/``[[destinations]]`` table or CLI flags).

    :param url: base URL of the DICOMweb service, e.g. ``https://pacs/dicom-web``.
    :param auth: ``none``, ``basic``, ``bearer`` or ``cert`` (inferred when empty).
    :param username: user for ``basic``.
    :param password: password for ``basic`` (prefer ``password_file``).
    :param token: token for ``bearer`` (prefer ``token_file``).
    :param cert: client certificate (PEM) for ``cert``; may hold the key too.
    :param key: the client certificate's private key (PEM), if separate.
    :param tls_verify: verify the PACS's certificate: ``True``, ``False`` or a CA bundle.
    :param timeout: seconds to wait for the PACS to answer (not for a whole transfer).
    """

    url: str
    auth: str = ""
    username: str = ""
    password: str = ""
    token: str = ""
    cert: str = ""
    key: str = ""
    tls_verify: bool | str = True
    timeout: float = 60.0

    @classmethod
    def from_table(cls, table: dict[str, Any], base_dir: Path | None = None) -> PacsSettings:
        """Read the PACS settings of a ``gateway.toml`` table.

        Secrets may be given as ``password_file``/``token_file`` (read here) or
        ``password_env``/``token_env`` (the name of an environment variable).
        """
        url = table.get("url") or table.get("pacs")
        if not isinstance(url, str) or not url:
            raise ConfigError('a dicomweb source or destination needs url = "https://..."')

        def path(value: str) -> str:
            p = Path(value).expanduser()
            return str(p if p.is_absolute() or base_dir is None else (base_dir / p).resolve())

        def secret(name: str) -> str:
            if table.get(name):
                return str(table[name])
            if table.get(f"{name}_file"):
                file = Path(path(str(table[f"{name}_file"])))
                try:
                    return file.read_text("utf-8").strip()
                except OSError as exc:
                    raise ConfigError(f"cannot read {name}_file {file}: {exc.strerror}") from exc
            if table.get(f"{name}_env"):
                value = os.environ.get(str(table[f"{name}_env"]), "")
                if not value:
                    raise ConfigError(f"environment variable {table[f'{name}_env']} is empty")
                return value
            return ""

        verify = table.get("tls_verify", True)
        if isinstance(verify, str) and verify:
            verify = path(verify)
        return cls(
            url=url,
            auth=str(table.get("auth", "")),
            username=str(table.get("username", "")),
            password=secret("password"),
            token=secret("token"),
            cert=path(table["cert"]) if table.get("cert") else "",
            key=path(table["key"]) if table.get("key") else "",
            tls_verify=verify,
            timeout=float(table.get("timeout", 60.0)),
        )

    def resolved_auth(self) -> str:
        """The authentication kind, inferred from what is set when ``auth`` is empty."""
        if self.auth:
            if self.auth not in AUTH_KINDS:
                raise ConfigError(
                    f"unknown PACS auth {self.auth!r}; use one of {', '.join(AUTH_KINDS)}"
                )
            return self.auth
        if self.token:
            return "bearer"
        if self.username:
            return "basic"
        if self.cert:
            return "cert"
        return "none"


def check_url(url: str) -> str:
    """The URL without a trailing slash; refuses other schemes and embedded credentials."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(
            "the PACS URL must start with http:// or https:// and name a host, "
            "e.g. https://pacs.example.org/dicom-web"
        )
    if parts.username or parts.password:
        raise ConfigError(
            "put PACS credentials in the auth settings (--pacs-user/--pacs-password), "
            "not in the URL"
        )
    if parts.query or parts.fragment:
        raise ConfigError("the PACS URL must not have a query (?...) or a fragment (#...)")
    return url.rstrip("/")


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


class _SameOriginSession(requests.Session):
    """A session that follows a redirect only within the PACS's own scheme, host and port."""

    def __init__(self, origin: tuple[str, str, int | None]) -> None:
        super().__init__()
        self.origin = origin

    def get_redirect_target(self, resp: requests.Response) -> str | None:
        target = super().get_redirect_target(resp)
        if target is not None and _origin(urljoin(resp.url, target)) != self.origin:
            raise PacsError(
                "the PACS answered with a redirect to another host or scheme; emix does "
                "not follow it. Configure the final DICOMweb URL of the PACS instead."
            )
        return target


class PacsConnection:
    """An authenticated HTTP session with one PACS's DICOMweb service.

    :param settings: URL, authentication and TLS settings.
    """

    def __init__(self, settings: PacsSettings) -> None:
        self.settings = settings
        self.url = check_url(settings.url)
        self.host = urlsplit(self.url).hostname or ""
        self.timeout = settings.timeout
        self._local = threading.local()
        self.auth = settings.resolved_auth()
        if self.auth == "basic" and not (settings.username and settings.password):
            raise ConfigError("basic authentication needs a username and a password")
        if self.auth == "bearer" and not settings.token:
            raise ConfigError("bearer authentication needs a token")
        if self.auth == "cert":
            if not settings.cert:
                raise ConfigError("certificate authentication needs a client certificate (cert)")
            for file in filter(None, (settings.cert, settings.key)):
                if not Path(file).is_file():
                    raise ConfigError(f"client certificate file {file} does not exist")
        if settings.tls_verify is False and self.url.startswith("https://"):
            # allowed, but never silently: the administrator asked for it explicitly
            log.warning("TLS verification of the PACS at %s is off", self.host)

    # ------------------------------------------------------------------ sessions
    @property
    def session(self) -> requests.Session:
        """This thread's session (requests sessions are not thread-safe)."""
        session = getattr(self._local, "session", None)
        if session is None:
            session = self._new_session()
            self._local.session = session
        return session

    def _new_session(self) -> requests.Session:
        session = _SameOriginSession(_origin(self.url))
        session.headers["User-Agent"] = USER_AGENT
        session.verify = self.settings.tls_verify
        session.trust_env = False  # no proxy or .netrc credentials picked up by surprise
        if self.auth == "basic":
            session.auth = (self.settings.username, self.settings.password)
        elif self.auth == "bearer":
            session.headers["Authorization"] = f"Bearer {self.settings.token}"
        elif self.auth == "cert":
            cert = self.settings.cert
            session.cert = (cert, self.settings.key) if self.settings.key else cert
        return session

    def qido(self) -> DICOMwebClient:
        """A dicomweb-client for queries, sharing this thread's session and its rules."""
        client = getattr(self._local, "qido", None)
        if client is None:
            client = DICOMwebClient(self.url, session=self.session, timeout=self.timeout)
            client.set_http_retry_params(retry=False)
            self._local.qido = client
        return client

    # ------------------------------------------------------------------ requests
    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send a request to ``<url><path>``; errors become :class:`PacsError`.

        :raises PacsUnavailable: connection refused, timeout, or a transient HTTP status.
        :raises PacsError: any other HTTP error (the status is in the message).
        """
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("allow_redirects", method == "GET")
        try:
            response = self.session.request(method, self.url + path, **kwargs)
        except requests.RequestException as exc:
            raise self.transport_error(exc) from exc
        if response.is_redirect and not kwargs["allow_redirects"]:
            response.close()
            raise PacsError(
                f"the PACS at {self.host} answered {method} with a redirect; configure the "
                "final DICOMweb URL instead"
            )
        return response

    def transport_error(self, exc: requests.RequestException) -> PacsError:
        """The error to raise when a request did not get an answer at all."""
        if isinstance(exc, requests.exceptions.SSLError):
            return PacsError(
                f"TLS handshake with the PACS at {self.host} failed (certificate not trusted, "
                "expired or for another name, or a client certificate is required); set "
                "tls_verify to the CA bundle of the PACS, or the client certificate"
            )
        if isinstance(exc, requests.ConnectionError | requests.Timeout):
            return PacsUnavailable(
                f"cannot reach the PACS at {self.host} ({type(exc).__name__}); is it running?"
            )
        return PacsError(f"request to the PACS at {self.host} failed ({type(exc).__name__})")

    def error_for(self, response: requests.Response, what: str) -> PacsError:
        """The error to raise for an unsuccessful answer to ``what`` (e.g. "STOW-RS")."""
        status = response.status_code
        hint = {
            401: "the PACS wants credentials (check auth, username/password or token)",
            403: "the PACS refused access for these credentials",
            404: "not found on the PACS (check the DICOMweb base URL)",
            406: "the PACS cannot send the requested format",
            413: "the PACS refused the request size; lower batch_mb",
            415: "the PACS does not accept this media type",
        }.get(status, response.reason or "error")
        message = f"{what} on the PACS at {self.host} answered HTTP {status}: {hint}"
        if status in TRANSIENT_HTTP:
            return PacsUnavailable(message)
        return PacsError(message)

    def close(self) -> None:
        session = getattr(self._local, "session", None)
        if session is not None:
            session.close()
