"""The ``cd`` gateway source: a CD import station folder, watched by a real gateway."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest
from discs import pycdlib_iso

from emix_core import ConfigError, HubClient, load_gateway
from emix_core.testing import wait_for

pytestmark = pytest.mark.e2e


def write_config(root: Path, hub, source: str) -> Path:  # noqa: ANN001
    config = root / "gateway.toml"
    config.write_text(
        "[gateway]\n"
        'home = "home"\n'
        f'hub_url = "{hub.url}"\n'
        f'token = "{hub.facilities["mercy"]["token"]}"\n'
        "poll_seconds = 0.2\n\n"
        "[[sources]]\n"
        'kind = "cd"\n'
        'name = "cd-station"\n' + source,
        "utf-8",
    )
    return config


def test_discs_dropped_at_the_station_are_shared_and_sorted(cd_folder, tmp_path, hub):
    station = tmp_path / "station"
    station.mkdir()
    config = write_config(
        tmp_path,
        hub,
        'path = "station"\nto = "lakeside"\nsettle_seconds = 0.5\npoll_seconds = 0.2\n',
    )
    gateway = load_gateway(config)
    stop = threading.Event()
    runner = threading.Thread(target=gateway.run, args=(stop,), daemon=True)
    runner.start()
    try:
        iso = pycdlib_iso(cd_folder, tmp_path / "patient.iso")
        os.replace(iso, station / "patient.iso")
        (station / "holiday.iso").write_bytes(os.urandom(100_000))
        shutil.copytree(cd_folder, station / "mounted-cdrom")  # a medium that appears mounted
        lakeside = HubClient(hub.url, hub.facilities["lakeside"]["token"])
        packages = wait_for(
            lambda: len(lakeside.inbox()) == 2 and lakeside.inbox(), 90, "2 packages"
        )
        assert len(packages) == 2
        wait_for(lambda: (station / "done" / "patient.iso").exists(), 30, "the ISO in done/")
        wait_for(lambda: (station / "failed" / "holiday.iso").exists(), 30, "the fake in failed/")
        reason = (station / "failed" / "holiday.iso.error.txt").read_text()
        assert "not a disc image" in reason
        assert (station / "mounted-cdrom").is_dir()  # a mounted medium is left where it is
        time.sleep(2)  # and imported once, not on every round
        assert len(lakeside.inbox()) == 2
        status = gateway.status()["sources"][0]
        assert (status["done"], status["failed"]) == (2, 1)
        depths = gateway.queue_depths()["source:cd-station"]  # what the metrics endpoint shows
        assert depths == {"pending": 0, "in_flight": 0, "failed": 1, "retrying": 0}
    finally:
        stop.set()
        runner.join(timeout=60)


def test_a_station_storing_into_the_pacs(cd_folder, tmp_path, hub, orthanc_factory):
    pacs = orthanc_factory("station-pacs")
    station = tmp_path / "station"
    station.mkdir()
    config = write_config(
        tmp_path, hub, f'path = "station"\npacs = "{pacs.url}"\nsettle_seconds = 0.5\n'
    )
    gateway = load_gateway(config)
    stop = threading.Event()
    runner = threading.Thread(target=gateway.run, args=(stop,), daemon=True)
    runner.start()
    try:
        os.replace(pycdlib_iso(cd_folder, tmp_path / "patient.iso"), station / "patient.iso")
        wait_for(lambda: (station / "done" / "patient.iso").exists(), 90, "the ISO in done/")
        assert len(pacs.sop_instance_uids()) == 31
    finally:
        stop.set()
        runner.join(timeout=60)


def test_a_cd_source_needs_a_path_and_one_target(tmp_path, hub):
    with pytest.raises(ConfigError, match="either to"):
        load_gateway(write_config(tmp_path, hub, 'path = "station"\n'))
    with pytest.raises(ConfigError, match="unknown setting"):
        load_gateway(write_config(tmp_path, hub, 'path = "s"\nto = "lakeside"\nbogus = 1\n'))
