"""Fixtures of the DICOMweb adapter's tests: real Orthanc PACS (see ``pacs.py``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from plugins.dicomweb.tests.pacs import ORTHANC, PLUGIN, Orthanc


@pytest.fixture(scope="module")
def orthanc_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., Orthanc]]:
    """Start Orthanc instances (``factory(name, lua=..., extra=...)``); all stopped after."""
    if not (ORTHANC and PLUGIN):
        message = "Orthanc with the DICOMweb plugin is not installed (bash .ci/system-deps)"
        if os.environ.get("CI"):  # CI installs it: a missing PACS is a failure there
            pytest.fail(message)
        pytest.skip(message)
    started: list[Orthanc] = []

    def factory(
        name: str,
        *,
        lua: str = "",
        auth: tuple[str, str] | None = None,
        start: bool = True,
        **extra: Any,
    ) -> Orthanc:
        pacs = Orthanc(tmp_path_factory.mktemp(name), lua=lua, auth=auth, extra=extra)
        started.append(pacs)
        return pacs.start() if start else pacs

    try:
        yield factory
    finally:
        for pacs in started:
            pacs.stop(wait=False)
        for pacs in started:
            pacs.stop()
