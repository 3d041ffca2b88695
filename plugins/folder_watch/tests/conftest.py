"""Fixtures for the drop-folder tests: real hub, real gateway processes, real folders."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emix_core.testing import HubProcess
from plugins.folder_watch.tests.sites import Site


@pytest.fixture
def sites(tmp_path: Path, hub: HubProcess) -> Iterator[Callable[..., Site]]:
    """Factory of gateway sites on the ``hub`` fixture; every gateway is stopped at the end."""
    made: list[Site] = []

    def make(address: str, **source: object) -> Site:
        root = tmp_path / "sites" / address
        for name in ("outbox", "inbox", "sent", "failed"):
            (root / name).mkdir(parents=True, exist_ok=True)
        site = Site(address, root, hub, dict(source))
        made.append(site)
        return site

    try:
        yield make
    finally:
        for site in made:
            site.stop()
