"""A 300-slice series through the hub's DICOMweb service: answer times and flat memory."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
import requests

from emix_core import generate_study
from emix_core.testing import HubProcess, emix_json, make_hub, side

pytestmark = pytest.mark.e2e

SLICES = 300


def peak_rss_mib(hub: HubProcess) -> float:
    """The highest peak resident size (VmHWM) of the hub's processes, MiB."""
    peaks = []
    for pid in hub.worker_pids():
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            continue
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peaks.append(int(line.split()[1]) / 1024)
    return max(peaks)


def test_series_metadata_and_first_frame_of_300_slices_stream(tmp_path: Path):
    files = generate_study(
        tmp_path / "study", slices=SLICES, series=1, patient_id="PID-SCALE-1", seed=7
    )
    hub = make_hub(tmp_path)
    try:
        hub.add_facility("Mercy General", "admin@mercy.example.org", "mercy")
        hub.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside")
        mercy, lakeside = side(tmp_path, hub, "mercy"), side(tmp_path, hub, "lakeside")
        sent = emix_json("send", str(tmp_path / "study"), "--to", "lakeside", env=mercy.env)
        assert sent["items"] == SLICES
        first = pydicom.dcmread(files[0])
        series = (
            f"{hub.url}/dicomweb/studies/{first.StudyInstanceUID}/series/{first.SeriesInstanceUID}"
        )
        auth = {"Authorization": f"Bearer {lakeside.token}"}
        requests.get(f"{hub.url}/dicomweb/studies", headers=auth, timeout=60).raise_for_status()
        before = peak_rss_mib(hub)

        started = time.perf_counter()
        metadata = requests.get(f"{series}/metadata", headers=auth, timeout=120)
        metadata_seconds = time.perf_counter() - started
        assert metadata.status_code == 200
        instances = metadata.json()
        assert len(instances) == SLICES
        assert {i["00080018"]["Value"][0] for i in instances} == {
            pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files
        }

        warm = []  # two more: at least one is answered by a worker that has it cached
        for _ in range(2):
            started = time.perf_counter()
            again = requests.get(f"{series}/metadata", headers=auth, timeout=120)
            warm.append(time.perf_counter() - started)
            assert again.content == metadata.content
        assert min(warm) < metadata_seconds

        started = time.perf_counter()
        frame = requests.get(
            f"{series}/instances/{first.SOPInstanceUID}/frames/1",
            headers={
                **auth,
                "Accept": "multipart/related; type=application/octet-stream; transfer-syntax=*",
            },
            timeout=60,
        )
        frame_seconds = time.perf_counter() - started
        assert frame.status_code == 200 and first.PixelData in frame.content

        # the whole series as instances, decrypted and streamed: memory must not follow it
        with requests.get(
            series,
            headers={**auth, "Accept": 'multipart/related; type="application/dicom"'},
            stream=True,
            timeout=300,
        ) as whole:
            received = sum(len(c) for c in whole.iter_content(1024 * 1024))
        assert received > SLICES * 512 * 512 * 2
        after = peak_rss_mib(hub)
        print(
            f"\n300-slice series: metadata {metadata_seconds:.2f} s (again {min(warm):.2f} s) "
            f"({len(metadata.content) / 1e6:.1f} MB), first frame {frame_seconds * 1000:.0f} ms, "
            f"series retrieve {received / 1e6:.0f} MB; hub peak RSS {before:.0f} -> {after:.0f} MiB"
        )
        assert metadata_seconds < 30
        assert frame_seconds < 5
        assert after - before < 40, (before, after)  # flat: far below the 157 MB series
        assert after < 150
    finally:
        hub.stop()
