"""HTTP client of the hub's API, used by the CLI, gateways and adapters.

Bodies stream both ways; nothing holds a whole item in memory. Server errors come back
as the same typed errors the hub raised, with its message.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, BinaryIO, cast

import requests
import urllib3

from emix_core import errors, frames
from emix_core.client.diagnose import connection_cause
from emix_core.errors import ConfigError, EmixError, HubUnavailable

log = logging.getLogger("emix.client")

CHUNK = 1024 * 1024
PACKAGE_ID_RE = re.compile(r"[0-9a-f]{32}")
_BY_CODE = {
    cls.code: cls
    for cls in (
        errors.InvalidInput,
        errors.IntegrityError,
        errors.AuthenticationError,
        errors.NotFoundError,
        errors.ConflictError,
        errors.PayloadTooLarge,
        errors.PolicyRejected,
        errors.UnsafePathError,
        errors.NotDicomError,
    )
}


def _is_json(response: requests.Response) -> bool:
    return response.headers.get("Content-Type", "").split(";")[0].strip() == "application/json"


class _BulkAdapter(requests.adapters.HTTPAdapter):
    """Sends request bodies in 1 MiB blocks instead of urllib3's 16 KiB."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["blocksize"] = CHUNK
        super().init_poolmanager(*args, **kwargs)


class HubClient:
    """A session with one hub, authenticated by a bearer token.

    :param hub_url: base URL, e.g. ``https://hub.example.org``.
    :param token: the member's API token.
    :param verify: TLS verification (``True``, ``False`` or a CA bundle path).
    :param timeout: seconds to wait for the hub to answer (not for a whole transfer).
    """

    def __init__(
        self, hub_url: str, token: str, *, verify: bool | str = True, timeout: float = 120
    ) -> None:
        if not hub_url:
            raise ConfigError("no hub URL: pass --hub or set EMIX_HUB_URL")
        if not hub_url.startswith(("http://", "https://")):
            raise ConfigError("the hub URL must start with http:// or https://")
        self.base = hub_url.rstrip("/")
        if self.base.endswith("/api/v1"):
            raise ConfigError(
                f"the hub URL is the hub's base address, without /api/v1: use "
                f"{self.base[: -len('/api/v1')]}"
            )
        self.token = token
        self.session = requests.Session()
        self.session.verify = verify
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.session.headers["User-Agent"] = "emix"
        adapter = _BulkAdapter(pool_connections=4, pool_maxsize=16)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        self.timeout = timeout
        #: called with the hub's signed audit head from each answer (see LocalHome)
        self.checkpoint_sink: Callable[[dict[str, Any]], None] | None = None

    # ------------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        if path.startswith("/packages/") and not PACKAGE_ID_RE.fullmatch(path.split("/")[2]):
            raise errors.InvalidInput(
                "a package id is 32 lowercase hex characters, as `emix inbox` lists them"
            )
        kwargs.setdefault("timeout", self.timeout)
        kwargs.setdefault("allow_redirects", False)
        # explicit: requests lets REQUESTS_CA_BUNDLE override a session's own verify
        kwargs.setdefault("verify", self.session.verify)
        started = time.monotonic()
        try:
            response = self.session.request(method, f"{self.base}/api/v1{path}", **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:
            kind, message = connection_cause(self.base, exc)
            log.debug("%s %s failed (%s): %r", method, path.split("?")[0][:60], kind, exc)
            raise HubUnavailable(message) from exc
        log.debug(
            "%s %s -> %s in %.3f s",
            method,
            path[:60],
            response.status_code,
            time.monotonic() - started,
        )
        if response.status_code >= 400:
            raise self._error(response)
        header = response.headers.get("X-Emix-Audit-Checkpoint")
        if header and self.checkpoint_sink is not None:
            try:
                self.checkpoint_sink(json.loads(header))
            except Exception:  # keeping evidence never stops the work
                log.warning("the hub's audit checkpoint could not be kept", exc_info=True)
        if 300 <= response.status_code < 400:
            target = response.headers.get("Location", "")[:200]
            raise ConfigError(
                f"the hub at {self.base} redirects (HTTP {response.status_code}) to {target}; "
                "use that address (usually https://...) as the hub URL"
            )
        if not kwargs.get("stream") and not _is_json(response):
            raise self._not_a_hub(response)
        return response

    def _not_a_hub(self, response: requests.Response) -> EmixError:
        """The error for an answer that is not the hub's JSON: probe whether it is a hub."""
        if self.is_emix_hub():
            return HubUnavailable(
                f"the hub at {self.base} answered HTTP {response.status_code} without JSON "
                "(a proxy in front of it?)"
            )
        return HubUnavailable(
            f"the server at {self.base} is not an emix hub (it answered HTTP "
            f"{response.status_code} {response.reason!s:.60}, and has no emix /healthz); "
            "check the hub URL"
        )

    def is_emix_hub(self) -> bool:
        """Whether the server answers ``/healthz`` and ``/api/v1/hub`` as an emix hub does."""
        try:
            options: dict[str, Any] = {
                "timeout": 10,
                "allow_redirects": False,
                "verify": self.session.verify,
            }
            health = self.session.get(f"{self.base}/healthz", **options)
            info = self.session.get(f"{self.base}/api/v1/hub", **options)
            return (
                health.status_code == 200
                and health.text.strip() == "ok"
                and _is_json(info)
                and "audit_public_key" in info.json()
            )
        except (requests.RequestException, ValueError):
            return False

    def _error(self, response: requests.Response) -> EmixError:
        if not _is_json(response) and response.status_code not in (502, 503, 504):
            return self._not_a_hub(response)
        try:
            body = response.json()
            code, message = body.get("error", ""), body.get("message", "")
        except ValueError:
            code, message = "", response.reason
        if response.status_code >= 500 or response.status_code == 429:
            return HubUnavailable(f"hub answered {response.status_code}: {message}")
        if response.status_code == 401:
            return errors.AuthenticationError(
                "the hub refused the token (missing, wrong, expired or revoked)"
            )
        if response.status_code == 413:
            return errors.PayloadTooLarge(message or "too large for the hub")
        cls = _BY_CODE.get(code, EmixError)
        if cls is errors.IntegrityError:
            message = f"integrity check failed: {message}"
        return cls(message or f"hub answered {response.status_code}")

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError as exc:
            raise HubUnavailable(
                f"{self.base} did not answer like an emix hub (no JSON); check the hub URL"
            ) from exc

    def search_dicom(
        self, level: str, params: Sequence[tuple[str, str]] = ()
    ) -> list[dict[str, Any]]:
        """QIDO-RS at the hub's root DICOMweb service: what this member may read.

        :param level: ``studies``, ``series`` or ``instances``.
        :param params: query parameters: attribute matching (PS3.4 C.2.2.2 as the hub's
            QIDO-RS does it), ``includefield``, ``limit``, ``offset``.
        :returns: the matches in the DICOM JSON model.
        :raises HubUnavailable: the hub cannot be reached or did not answer DICOM JSON.
        """
        if level not in ("studies", "series", "instances"):
            raise errors.InvalidInput("a search is for studies, series or instances")
        try:
            response = self.session.get(
                f"{self.base}/dicomweb/{level}",
                params=list(params),
                headers={"Accept": "application/dicom+json"},
                timeout=self.timeout,
                allow_redirects=False,
                verify=self.session.verify,
            )
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise HubUnavailable(connection_cause(self.base, exc)[1]) from exc
        if response.status_code >= 400:
            raise self._error(response)
        if response.status_code == 204 or not response.content:
            return []
        try:
            rows = response.json()
        except ValueError as exc:
            raise HubUnavailable(f"{self.base} did not answer a search with DICOM JSON") from exc
        return [row for row in rows if isinstance(row, dict)] if isinstance(rows, list) else []

    # ------------------------------------------------------------------ facilities
    def me(self) -> dict[str, Any]:
        return self._json("GET", "/me")

    def hub_info(self) -> dict[str, Any]:
        return self._json("GET", "/hub")

    def register_key(self, public_key_b64: str) -> dict[str, Any]:
        return self._json("PUT", "/facilities/me/key", json={"public_key": public_key_b64})

    def facility_key(self, address: str) -> dict[str, Any]:
        return self._json("GET", f"/facilities/{address}/key")

    def facilities(self) -> list[dict[str, Any]]:
        return self._json("GET", "/facilities")["facilities"]

    def add_member(self, email: str, role: str = "member") -> dict[str, Any]:
        return self._json("POST", "/members", json={"email": email, "role": role})

    def members(self) -> list[dict[str, Any]]:
        """The members of the caller's facility (facility admins only)."""
        return self._json("GET", "/members")["members"]

    def remove_member(self, member_id: int) -> dict[str, Any]:
        return self._json("DELETE", f"/members/{int(member_id)}")

    def rotate_token(self) -> dict[str, Any]:
        """A new token for the caller; the current one stops working at once."""
        return self._json("POST", "/tokens/current/rotate")

    def revoke_token(self) -> dict[str, Any]:
        """Revoke the token this client uses."""
        return self._json("DELETE", "/tokens/current")

    def confirm_member(self, code: str) -> dict[str, Any]:
        return self._json("POST", "/members/confirm", json={"code": code})

    # ------------------------------------------------------------------ packages
    def create_package(self, to: list[str], *, expires_days: int | None = None) -> str:
        return self.open_package(to, expires_days=expires_days)["id"]

    def open_package(self, to: list[str], *, expires_days: int | None = None) -> dict[str, Any]:
        """Open a package; the answer's ``recipients`` says where each address resolved."""
        body: dict[str, Any] = {"to": list(to)}
        if expires_days:
            body["expires_days"] = expires_days
        return self._json("POST", "/packages", json=body)

    def upload_item(
        self,
        package_id: str,
        item_id: int,
        stream: BinaryIO,
        *,
        size: int,
        sha256: str,
        media_type: str,
    ) -> None:
        """Stream one item (``stream`` is read to its end, ``size`` bytes)."""
        self._request(
            "PUT",
            f"/packages/{package_id}/items/{item_id}",
            data=stream,
            headers={
                "Content-Type": media_type,
                "Content-Length": str(size),
                "X-Emix-SHA256": sha256,
            },
        )

    def upload_batch(
        self,
        package_id: str,
        items: Sequence[frames.OutgoingItem],
        progress: Callable[[int], None] | None = None,
    ) -> tuple[dict[int, str], dict[int, str]]:
        """Stream many files in one request, each file read once.

        :return: ``({id: sha256}, {id: error})`` for the stored and the refused items.
        """
        # views: each block goes from the file's buffer to the socket without a copy
        body = frames.BatchReader(items, progress, views=True)
        answer = self._json(
            "POST",
            f"/packages/{package_id}/items",
            data=body,
            headers={"Content-Type": frames.MEDIA_TYPE},
        )
        stored, failed = frames.results(answer)
        return {i: body.digests[i] for i in stored}, failed

    def seal(self, package_id: str, signed_manifest: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", f"/packages/{package_id}/seal", json=signed_manifest)

    def uploaded(self, package_id: str) -> dict[int, dict[str, Any]]:
        """Items the hub holds for an open package of ours: ``{id: {"sha256", "size"}}``."""
        items = self._json("GET", f"/packages/{package_id}/uploaded")["items"]
        return {int(k): v for k, v in items.items()}

    def abort_package(self, package_id: str) -> dict[str, Any]:
        """Abort an open package of ours; the hub deletes what was uploaded."""
        return self._json("DELETE", f"/packages/{package_id}")

    def status(self, package_id: str) -> dict[str, Any]:
        return self._json("GET", f"/packages/{package_id}")

    def inbox(self, *, progressive: bool = False) -> list[dict[str, Any]]:
        """Sealed packages for us; with ``progressive``, open ones too (``state`` says)."""
        params = {"progressive": "1"} if progressive else None
        return self._json("GET", "/inbox", params=params)["packages"]

    def inbox_cursor(
        self, *, progressive: bool = False, since: str | None = None, wait: float = 0
    ) -> str:
        """A fingerprint of the inbox that changes when a package arrives (cheap to poll).

        With ``since`` and ``wait``, the hub answers as soon as the fingerprint differs
        from ``since``, or after ``wait`` seconds.
        """
        params: dict[str, str] = {}
        if progressive:
            params["progressive"] = "1"
        if since is not None and wait > 0:
            params.update(since=since, wait=str(wait))
        return str(self._json("GET", "/inbox/cursor", params=params or None)["cursor"])

    def post_part(self, package_id: str, signed_part: dict[str, Any]) -> dict[str, Any]:
        """Append a signed manifest part (its items uploaded already) to an open package."""
        return self._json("POST", f"/packages/{package_id}/parts", json=signed_part)

    def parts(self, package_id: str, *, after: int = 0, wait: float = 0) -> dict[str, Any]:
        """``{"state", "parts", "count"}``: the signed parts after the ``after``-th, waiting
        up to ``wait`` seconds for one more part or the seal."""
        return self._json(
            "GET", f"/packages/{package_id}/parts", params={"after": after, "wait": wait}
        )

    def manifest(self, package_id: str) -> dict[str, Any]:
        return json.loads(self._request("GET", f"/packages/{package_id}/manifest").content)

    def download_item(self, package_id: str, item_id: int) -> Iterator[bytes]:
        response = self._request("GET", f"/packages/{package_id}/items/{item_id}", stream=True)
        try:
            yield from response.iter_content(CHUNK)
        except requests.RequestException as exc:
            raise errors.IntegrityError(
                "the download was cut off by the hub (integrity check failed or connection "
                "lost); nothing was written"
            ) from exc
        finally:
            response.close()

    def download_batch(
        self,
        package_id: str,
        first: int,
        last: int,
        open_target: Callable[[frames.FrameHeader], BinaryIO],
        progress: Callable[[int], None] | None = None,
        *,
        part: int | None = None,
    ) -> dict[int, str]:
        """Fetch items ``first``..``last`` in one stream, each written where ``open_target`` says.

        :param part: the manifest part listing them, for a package not sealed yet.
        :return: ``{id: sha256}`` of what arrived.
        """
        params: dict[str, int] = {"first": first, "last": last}
        if part is not None:
            params["part"] = part
        response = self._request(
            "GET", f"/packages/{package_id}/stream", params=params, stream=True
        )
        try:
            return frames.receive_frames(cast(BinaryIO, response.raw), open_target, progress)
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise errors.IntegrityError(
                "the download was cut off by the hub (integrity check failed or connection "
                "lost); nothing was written"
            ) from exc
        finally:
            response.close()

    def download_zip(self, package_id: str) -> requests.Response:
        return self._request("GET", f"/packages/{package_id}/zip", stream=True)

    def post_receipt(self, package_id: str, signed_receipt: dict[str, Any]) -> dict[str, Any]:
        return self._json("POST", f"/packages/{package_id}/receipt", json=signed_receipt)

    def audit_checkpoint(self) -> dict[str, Any]:
        return self._json("GET", "/audit/checkpoint")
