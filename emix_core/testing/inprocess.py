"""In-process hub fixtures: the fast loop.

``hub_app`` is a hub as a Flask app with a test client (no socket at all);
``hub_server`` serves the same app from a thread on a loopback port, so the real
facility-side code (:class:`~emix_core.HubClient`, ``send_paths``, ``receive_package``)
runs against it over real HTTP without starting a process. Both create facilities
``mercy`` (prefers PDF) and ``lakeside`` (prefers HL7 v2) and mail through the
``smtp_server`` fixture. Tests that need gunicorn, kills or several processes use the
``hub`` fixture instead (marked ``e2e``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

__all__ = ["HubApp", "HubServer", "hub_app", "hub_server"]


@dataclass
class HubApp:
    """A hub home and its Flask app, with facility tokens."""

    home: Path
    app: Any
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def client(self) -> Any:
        """A Flask test client (cookies kept per client)."""
        return self.app.test_client()

    @property
    def hub(self) -> Any:
        """The live hub state (config, database, audit log)."""
        return self.app.extensions["emix"]

    def headers(self, address: str) -> dict[str, str]:
        """The ``Authorization`` header of a facility's admin token."""
        return {"Authorization": f"Bearer {self.tokens[address]}"}

    def add_facility(self, name: str, email: str, address: str, fmt: str = "pdf") -> dict:
        from emix_core.hub.facilities import add_facility

        info = add_facility(self.hub, name, email, address=address, report_format=fmt)
        self.tokens[address] = info["token"]
        return info


@dataclass
class HubServer(HubApp):
    """A :class:`HubApp` served over HTTP on 127.0.0.1 from a thread of the test process."""

    port: int = 0
    _server: Any = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from werkzeug.serving import make_server

        self._server = make_server("127.0.0.1", 0, self.app, threaded=True)
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def facility_home(self, tmp_path: Path, address: str) -> tuple[Any, Any]:
        """A facility's own home and a hub client for it: ``(LocalHome, HubClient)``."""
        from emix_core.client.home import LocalHome
        from emix_core.plugins import get_plugin_manager

        home = LocalHome(tmp_path / f"home-{address}", pm=get_plugin_manager())
        return home, home.client(self.url, self.tokens[address])


def _make(cls: type[HubApp], tmp_path: Path, smtp_url: str, **extra: Any) -> HubApp:
    from emix_core.hub.app import create_app
    from emix_core.hub.context import init_hub_home
    from emix_core.plugins import get_plugin_manager

    home = tmp_path / "hub"
    init_hub_home(home, public_url="http://127.0.0.1:8480")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("EMIX_SMTP_URL", smtp_url)
        app = create_app(home, pm=get_plugin_manager())
    made = cls(home=home, app=app, **extra)
    made.add_facility("Mercy General", "admin@mercy.example.org", "mercy", "pdf")
    made.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside", "hl7")
    return made


@pytest.fixture
def hub_app(tmp_path: Path, smtp_server: Any) -> HubApp:
    """A hub as a Flask app (test client, no socket), facilities ``mercy`` and ``lakeside``."""
    return _make(HubApp, tmp_path, smtp_server.url)


@pytest.fixture
def hub_server(tmp_path: Path, smtp_server: Any) -> Iterator[HubServer]:
    """The same hub served over loopback HTTP from a thread of the test process."""
    server = _make(HubServer, tmp_path, smtp_server.url)
    assert isinstance(server, HubServer)
    server.start()
    try:
        yield server
    finally:
        server.stop()
