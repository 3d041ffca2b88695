"""Fixtures of the DIMSE tests: a real hub, emix listeners as processes, dcmtk, Orthanc."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from emix_core.testing import HubProcess
from plugins.dimse.tests.helpers import ListenerProcess


@pytest.fixture
def listeners(tmp_path: Path, hub: HubProcess) -> Iterator[Callable[..., ListenerProcess]]:
    """Start ``emix dimse listen`` processes for a facility of the ``hub``; stopped after."""
    made: list[ListenerProcess] = []

    def make(address: str = "mercy", *args: str, start: bool = True) -> ListenerProcess:
        listener = ListenerProcess(tmp_path / f"listener-{len(made)}", hub, address, list(args))
        made.append(listener)
        if start:
            listener.start()
        return listener

    try:
        yield make
    finally:
        for listener in made:
            listener.stop()


@pytest.fixture
def offline_listener(tmp_path: Path) -> Iterator[ListenerProcess]:
    """A listener whose hub is unreachable: what it acknowledges stays in its spool."""
    listener = ListenerProcess(tmp_path / "offline", None, "mercy", ["--to", "lakeside"])
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()
