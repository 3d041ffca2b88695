"""A gateway (``emix gateway run``) in a child process, for tests of sources and destinations.

:class:`EmixProcess` runs any long-lived ``emix`` command (a gateway, a DICOM listener)
in its own process group with its output in a log file; :class:`GatewayProcess` adds the
gateway's ``gateway.toml``, its status and its work cycles; :func:`gateway_config` writes
the ``[gateway]`` table for a facility of a test hub; :func:`wait_for` polls.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["EmixProcess", "GatewayProcess", "gateway_config", "wait_for"]


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> object:
    """Poll ``predicate`` until it returns something truthy (returned); fail after
    ``timeout`` seconds with a message naming ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class EmixProcess:
    """A long-lived ``emix ARGS...`` in a child process (its own process group), its
    output appended to ``log`` so that a restart keeps what the last run said."""

    def __init__(self, log: Path) -> None:
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> None:
        """Start ``emix ARGS...`` with ``env`` added to this process's environment."""
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "emix_core", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )

    def log_text(self) -> str:
        return self.log.read_text("utf-8", errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_logged(self, marker: str, timeout: float = 30, *, after: int = 0) -> None:
        """Wait until ``marker`` is in the log more than ``after`` times; fail with the log
        at once if the process exits first."""
        wait_for(
            lambda: self.log_text().count(marker) > after or not self.alive(),
            timeout,
            f"{marker!r} in {self.log.name}",
        )
        assert self.alive(), self.log_text()

    def kill(self) -> None:
        """SIGKILL to the whole process group: no cleanup of any kind."""
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM (a clean shutdown), SIGKILL after ``timeout`` seconds."""
        if self.alive():
            assert self.process is not None
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()


class GatewayProcess(EmixProcess):
    """``emix gateway run --config ROOT/gateway.toml --log-format json`` in a child process.

    :param root: the gateway's folder (its ``gateway.toml`` and ``gateway.log``; relative
        paths in the config are relative to it).
    :param config: the text of ``gateway.toml``, written by :meth:`start` when given.
    """

    def __init__(self, root: Path, config: str | None = None) -> None:
        super().__init__(root / "gateway.log")
        self.root = root
        self.config_text = config

    @property
    def config_file(self) -> Path:
        return self.root / "gateway.toml"

    def start(self) -> GatewayProcess:
        self.root.mkdir(parents=True, exist_ok=True)
        if self.config_text is not None:
            self.config_file.write_text(self.config_text, "utf-8")
        self.spawn("gateway", "run", "--config", str(self.config_file), "--log-format", "json")
        return self

    def status(self) -> dict[str, Any]:
        """``emix gateway status --json`` of this gateway."""
        from emix_core.testing import emix_json

        return emix_json("gateway", "status", "--config", str(self.config_file))


def gateway_config(hub: Any, address: str, *tables: str) -> str:
    """A ``gateway.toml``: the ``[gateway]`` table of facility ``address`` of a test hub
    (home ``home``, quick polls and retries), then ``tables`` (sources, destinations)."""
    token = hub.facilities[address]["token"]
    head = (
        f'[gateway]\nhome = "home"\nhub_url = "{hub.url}"\ntoken = "{token}"\n'
        "poll_seconds = 0.2\nretry_max_seconds = 2\n"
    )
    return head + "\n" + "\n".join(tables)
