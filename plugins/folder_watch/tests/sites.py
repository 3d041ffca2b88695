"""Helpers of the drop-folder tests: a facility site with its gateway process and folders."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from emix_core.testing import HubProcess, emix_json


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[Path]:
    """Regular files under a folder, hidden ones included, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


@dataclass
class Site:
    """One facility's gateway: its folders, its gateway.toml and its process."""

    address: str
    root: Path
    hub: HubProcess
    source: dict = field(default_factory=dict)
    process: subprocess.Popen | None = None

    @property
    def config(self) -> Path:
        return self.root / "gateway.toml"

    def folder(self, name: str) -> Path:
        return self.root / name

    def outbox_for(self, recipient: str) -> Path:
        path = self.root / "outbox" / recipient
        path.mkdir(parents=True, exist_ok=True)
        return path

    def write_config(self) -> None:
        token = self.hub.facilities[self.address]["token"]
        settings = {
            "path": "outbox",
            "settle_seconds": 1.0,
            "file_settle_seconds": 0.5,
            **self.source,
        }
        lines = [
            "[gateway]",
            'home = "home"',
            f'hub_url = "{self.hub.url}"',
            f'token = "{token}"',
            "poll_seconds = 0.2",
            "retry_max_seconds = 2",
            "",
            "[[sources]]",
            'kind = "folder"',
            'name = "outbox"',
            *(f"{k} = {_toml(v)}" for k, v in settings.items()),
            "",
            "[[destinations]]",
            'kind = "folder"',
            'name = "inbox"',
            'path = "inbox"',
        ]
        self.config.write_text("\n".join(lines) + "\n", "utf-8")

    def start(self) -> None:
        self.write_config()
        log = open(self.root / "gateway.log", "ab")  # noqa: SIM115 - owned by the child
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "emix_core",
                "gateway",
                "run",
                "--config",
                str(self.config),
                "--log-format",
                "json",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def status(self) -> dict:
        return emix_json("gateway", "status", "--config", str(self.config))

    def wait_cycles(self, count: int = 3, timeout: float = 30) -> None:
        """Wait until the drop-folder source completed ``count`` more work cycles: after
        that, what did not happen in reaction to an earlier change will not happen."""
        start = self.status()["sources"][0]["cycles_since_start"]
        wait_for(
            lambda: self.status()["sources"][0]["cycles_since_start"] >= start + count,
            timeout,
            f"{count} more cycles of the {self.address} gateway",
        )

    def log_text(self) -> str:
        path = self.root / "gateway.log"
        return path.read_text("utf-8", errors="replace") if path.exists() else ""

    def inbox_packages(self, sender: str) -> list[Path]:
        folder = self.root / "inbox" / sender
        if not folder.exists():
            return []
        return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)
