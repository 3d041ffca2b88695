"""Helpers of the drop-folder tests: a facility site with its gateway process and folders."""

from __future__ import annotations

import hashlib
from pathlib import Path

from emix_core.testing import GatewayProcess, HubProcess, wait_for

__all__ = ["Site", "files_under", "sha256", "wait_for"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_under(folder: Path) -> list[Path]:
    """Regular files under a folder, hidden ones included, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink())


class Site(GatewayProcess):
    """One facility's gateway: its folders, its gateway.toml and its process."""

    def __init__(self, address: str, root: Path, hub: HubProcess, source: dict | None = None):
        super().__init__(root)
        self.address = address
        self.hub = hub
        self.source = dict(source or {})

    @property
    def config(self) -> Path:
        return self.config_file

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

    def start(self) -> Site:
        self.write_config()
        super().start()
        return self

    def wait_cycles(self, count: int = 3, timeout: float = 30) -> None:
        """Wait until the drop-folder source completed ``count`` more work cycles: after
        that, what did not happen in reaction to an earlier change will not happen."""
        start = self.status()["sources"][0]["cycles_since_start"]
        wait_for(
            lambda: self.status()["sources"][0]["cycles_since_start"] >= start + count,
            timeout,
            f"{count} more cycles of the {self.address} gateway",
        )

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
