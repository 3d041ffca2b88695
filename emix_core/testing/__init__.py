"""Test fixtures for emix and its plugins: a pytest plugin (entry point ``pytest11``).

Installed with ``emix-core``, these fixtures are available to every test suite in the
environment, the way pytest-django's are: a vendor's adapter tests use them without a
conftest of their own. They start **real** peers on 127.0.0.1 only and stop them:

* ``hub``: a hub served by gunicorn in a child process, with two facilities, ``mercy``
  (prefers PDF reports) and ``lakeside`` (prefers HL7 v2); ``mercy`` and ``lakeside``
  give each facility's home and CLI environment (:class:`Side`).
* ``smtp_server``: an SMTP server (aiosmtpd) keeping every message it receives.
* ``study_200``: a generated 200-slice CT study (512x512, 16-bit, 3 series) with a PDF
  report, once per session.
* ``orthanc_factory``: real Orthanc PACS instances with the DICOMweb plugin
  (:mod:`emix_core.testing.pacs`).
* ``postgres`` and ``ceph_rgw``: a PostgreSQL server and a one-node Ceph cluster with
  its S3 gateway, once per session (:mod:`emix_core.testing.engines`).

Helpers: :func:`emix` and :func:`emix_json` run the real command line,
:func:`make_hub` starts another hub, :func:`free_port` finds a loopback port.
:class:`GatewayProcess` runs ``emix gateway run`` in a child process, :func:`gateway_config`
writes its configuration for a facility of a test hub, :func:`wait_for` polls
(:mod:`emix_core.testing.gateway`).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

__all__ = [
    "PATIENT_ID",
    "PATIENT_NAME",
    "HubProcess",
    "wait_for_http",
    "Side",
    "SmtpServer",
    "emix",
    "emix_json",
    "free_port",
    "make_hub",
    "side",
    "write_study_with_report",
    # gateway and listener processes, from emix_core.testing.gateway
    "EmixProcess",
    "GatewayProcess",
    "gateway_config",
    "wait_for",
    # fuzzing helpers, from emix_core.testing.fuzz (needs hypothesis; imported on first use)
    "fuzz_settings",
    "mutated",
    "within_limits",
    # real PACS and TLS peers, from emix_core.testing.pacs (imported on first use)
    "ORTHANC",
    "PLUGIN",
    "BUNDLED",
    "REFUSE_RTDOSE",
    "Certificates",
    "FrontDoor",
    "Orthanc",
    "SampleStudy",
    "dicomweb_plugin",
    "make_certificates",
    "make_sample_study",
    "needs_orthanc",
    # database and object-store engines, from emix_core.testing.engines
    "CephRgw",
    "Postgres",
]

_PACS_NAMES = frozenset(__all__[__all__.index("ORTHANC") : __all__.index("CephRgw")])
_ENGINE_NAMES = frozenset(__all__[__all__.index("CephRgw") :])


def __getattr__(name: str) -> Any:
    if name in ("EmixProcess", "GatewayProcess", "gateway_config", "wait_for"):
        from emix_core.testing import gateway

        return getattr(gateway, name)
    if name in ("fuzz_settings", "mutated", "within_limits"):
        from emix_core.testing import fuzz

        return getattr(fuzz, name)
    if name in _PACS_NAMES:
        from emix_core.testing import pacs

        return getattr(pacs, name)
    if name in _ENGINE_NAMES:
        from emix_core.testing import engines

        return getattr(engines, name)
    raise AttributeError(f"module 'emix_core.testing' has no attribute {name!r}")


#: Fixtures that start real processes or peers: a test using one is marked ``e2e``.
E2E_FIXTURES = frozenset(
    {
        "hub",
        "mercy",
        "lakeside",
        "orthanc_factory",
        "hub_process",
        "sites",
        "study_200",
        "postgres",
        "ceph_rgw",
    }
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "e2e: starts real processes and peers (gunicorn hub, Orthanc, browsers, databases); "
        "`pytest -m 'not e2e'` is the fast in-process loop",
    )
    config.addinivalue_line(
        "markers",
        "fuzz: property-based fuzzing of a parser of outside bytes (emix_core.testing.fuzz); "
        "EMIX_FUZZ_EXAMPLES sets the examples per target",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a process-level fixture as ``e2e``."""
    for item in items:
        if E2E_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def emix(
    *args: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run the real ``emix`` command line in a child process."""
    result = subprocess.run(
        [sys.executable, "-m", "emix_core", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"emix {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def emix_json(*args: str, env: dict[str, str] | None = None) -> dict:
    return json.loads(emix(*args, "--json", env=env).stdout)


@dataclass
class SmtpServer:
    """A real SMTP server on loopback that keeps every message it receives."""

    port: int
    messages: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    def wait_for(self, count: int, timeout: float = 10) -> list:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.messages


@pytest.fixture
def smtp_server() -> Iterator[SmtpServer]:
    from email import message_from_bytes

    from aiosmtpd.controller import Controller

    server = SmtpServer(port=free_port())

    class Handler:
        async def handle_DATA(self, _server, _session, envelope):  # noqa: N802
            server.messages.append(message_from_bytes(envelope.content))
            return "250 OK"

    controller = Controller(Handler(), hostname="127.0.0.1", port=server.port)
    controller.start()
    try:
        yield server
    finally:
        controller.stop()


def wait_for_http(
    url: str,
    process: subprocess.Popen | None = None,
    *,
    timeout: float = 60,
    verify: bool | str = True,
    log: Path | None = None,
) -> requests.Response:
    """Wait until ``url`` answers (any status below 500) and return the answer.

    Fails at once, with the process's log, when ``process`` has exited. The timeout is
    generous because a loaded CI machine can take many seconds to start a server.
    """
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            output = log.read_text(errors="replace") if log and log.exists() else ""
            raise AssertionError(f"the server exited with {process.returncode}\n{output}")
        try:
            answer = requests.get(url, timeout=2, verify=verify)
            if answer.status_code < 500:
                return answer
        except requests.RequestException:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing answered at {url} within {timeout:.0f} s")
        time.sleep(0.1)


@dataclass
class HubProcess:
    """A hub served by gunicorn in a child process, as `emix hub serve` runs it."""

    home: Path
    port: int
    process: subprocess.Popen | None = None
    facilities: dict[str, dict] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env: dict[str, str] | None = None) -> None:
        self.log = open(self.home / "hub-test.log", "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "emix_core",
                "hub",
                "serve",
                "--home",
                str(self.home),
                "--port",
                str(self.port),
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
        )
        wait_for_http(f"{self.url}/healthz", self.process, log=self.home / "hub-test.log")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def add_facility(self, name: str, email: str, address: str, fmt: str = "pdf") -> dict:
        """Add a facility as ``emix hub facility add`` does, in this process (the command
        itself is tested on its own: a child process here would only cost start-up time)."""
        from emix_core.hub.context import open_hub
        from emix_core.hub.facilities import add_facility

        hub = open_hub(self.home)
        try:
            info = add_facility(hub, name, email, address=address, report_format=fmt)
        finally:
            hub.audit_log.close()
            hub.db.engine.dispose()
        self.facilities[address] = info
        return info

    def worker_pids(self) -> list[int]:
        assert self.process is not None, "the hub was not started"
        out = subprocess.run(
            ["pgrep", "-g", str(self.process.pid)], capture_output=True, text=True
        ).stdout
        return [int(p) for p in out.split()]


def make_hub(tmp_path: Path, hub_settings: str = "", env: dict[str, str] | None = None):
    """Initialise a hub home (``hub_settings``: extra TOML lines for ``[hub]``) and start it."""
    from emix_core.hub.context import init_hub_home

    home = tmp_path / "hub"
    port = free_port()
    # as `emix hub init --home HOME --port PORT`, in this process
    init_hub_home(home, port=port)
    if hub_settings:
        config = home / "emix.toml"
        config.write_text(config.read_text().replace("[hub]\n", f"[hub]\n{hub_settings}\n", 1))
    hub = HubProcess(home=home, port=port)
    hub.start(env)
    return hub


@pytest.fixture
def hub(tmp_path: Path, smtp_server: SmtpServer) -> Iterator[HubProcess]:
    """A running hub with two facilities, ``mercy`` (sender) and ``lakeside`` (recipient).

    Its "Send to my PACS" may reach loopback (``[hub] pacs_networks``), where the tests'
    PACS listen; a hub's default refuses loopback.
    """
    env = {"EMIX_SMTP_URL": smtp_server.url, "EMIX_PACS_NETWORKS": "127.0.0.0/8,::1/128"}
    hub = make_hub(tmp_path, env=env)
    try:
        hub.add_facility("Mercy General", "admin@mercy.example.org", "mercy", "pdf")
        hub.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside", "hl7")
        yield hub
    finally:
        hub.stop()


@dataclass
class Side:
    """A facility's own home and the environment its CLI runs with."""

    home: Path
    env: dict[str, str]
    token: str


def side(tmp_path: Path, hub: HubProcess, address: str) -> Side:
    home = tmp_path / f"home-{address}"
    token = hub.facilities[address]["token"]
    return Side(home, {"EMIX_HOME": str(home), "EMIX_HUB_URL": hub.url, "EMIX_TOKEN": token}, token)


@pytest.fixture
def mercy(tmp_path: Path, hub: HubProcess) -> Side:
    return side(tmp_path, hub, "mercy")


@pytest.fixture
def lakeside(tmp_path: Path, hub: HubProcess) -> Side:
    return side(tmp_path, hub, "lakeside")


PATIENT_NAME = "MUSTERMANN^ERIKA"
PATIENT_ID = "PID-7734-XQ"


def write_study_with_report(folder: Path, *, slices: int, series: int) -> Path:
    """A generated CT study (512x512, 16-bit) of the test patient, plus a PDF report."""
    from emix_core.content.samples import generate_study, write_sample_report_pdf

    generate_study(
        folder,
        slices=slices,
        series=series,
        patient_name=PATIENT_NAME,
        patient_id=PATIENT_ID,
        accession_number="ACC-99120",
    )
    write_sample_report_pdf(
        folder / "report.pdf",
        facility="Mercy General",
        accession_number="ACC-99120",
        patient_name=PATIENT_NAME,
        findings="No acute abnormality.",
        impression="Normal study.",
    )
    return folder


@pytest.fixture(scope="session")
def study_200(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated multi-series CT study: 200 slices of 512x512 16-bit, plus a PDF report."""
    return write_study_with_report(tmp_path_factory.mktemp("study200"), slices=200, series=3)


@pytest.fixture(scope="module")
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Any]]:
    """Start Orthanc instances (``factory(name, lua=..., extra=...)``; ``dicom=True`` and
    ``modalities={name: (aet, host, port)}`` for its DICOM server); all stopped after.

    Skips when Orthanc or its DICOMweb plugin is missing, except under ``CI`` where a
    missing PACS is a failure (``bash .ci/system-deps`` installs it).
    """
    from emix_core.testing.pacs import ORTHANC, PLUGIN, Orthanc

    if not (ORTHANC and PLUGIN):
        message = "Orthanc with the DICOMweb plugin is not installed (bash .ci/system-deps)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    started: list[Orthanc] = []

    def factory(
        name: str,
        *,
        lua: str = "",
        auth: tuple[str, str] | None = None,
        start: bool = True,
        dicom: bool = False,
        modalities: dict[str, tuple[str, str, int]] | None = None,
        **extra: Any,
    ) -> Orthanc:
        pacs = Orthanc(
            tmp_path_factory.mktemp(name),
            lua=lua,
            auth=auth,
            extra=extra,
            dicom=dicom,
            modalities=dict(modalities or {}),
        )
        started.append(pacs)
        return pacs.start() if start else pacs

    try:
        yield factory
    finally:
        for pacs in started:
            pacs.stop(wait=False)
        for pacs in started:
            pacs.stop()


def _missing_engine(message: str) -> None:
    """Skip, except under ``CI`` where a missing engine is a failure."""
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres() -> Iterator[Any]:
    """A PostgreSQL server on a free loopback port (:class:`~.engines.Postgres`); use
    ``postgres.new_database()`` for an empty database of a test's own."""
    from emix_core.testing.engines import Postgres, postgres_bin

    if postgres_bin() is None:
        _missing_engine("PostgreSQL is not installed (bash .ci/system-deps)")
    server = Postgres().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ceph_rgw() -> Iterator[Any]:
    """A one-node Ceph cluster with the RADOS Gateway on a free loopback port
    (:class:`~.engines.CephRgw`); ``ceph_rgw.new_bucket()`` for a bucket of a test's own."""
    from emix_core.testing.engines import CephRgw, ceph_installed

    if not ceph_installed():
        _missing_engine(
            "Ceph (ceph-mon, ceph-osd, radosgw) is not installed (bash .ci/system-deps)"
        )
    if os.geteuid() != 0:
        pytest.skip("a Ceph cluster of its own needs root (its daemons and OSD file)")
    cluster = CephRgw().start()
    try:
        yield cluster
    finally:
        cluster.stop()


# In-process hubs (the fast loop): fixtures hub_app and hub_server.
from emix_core.testing.inprocess import HubApp, HubServer, hub_app, hub_server  # noqa: E402, F401
