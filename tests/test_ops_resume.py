"""Resumable sending: an interrupted `emix send` run again uploads only what is missing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from emix_core import generate_study
from emix_core.testing import emix, emix_json


class InterruptedClient:
    """The real hub client, but Ctrl-C strikes after half of the first batch is stored."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def upload_batch(self, package_id: str, items: list, progress: Any = None) -> Any:
        self._client.upload_batch(package_id, items[: len(items) // 2], progress)
        raise KeyboardInterrupt

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def check_metrics(url: str, package_id: str) -> None:
    """/metrics sums every gunicorn worker; labels hold route templates, never ids."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(20):  # spread over both workers
        requests.get(f"{url}/healthz", timeout=5)
    text = requests.get(f"{url}/metrics", timeout=5).text
    assert package_id not in text and "DEMO" not in text
    values: dict[str, float] = {}
    health = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0) + sample.value
            if sample.labels.get("route") == "/healthz" and sample.name.endswith("_total"):
                health += sample.value
    assert values["emix_hub_packages_sealed_total"] == 1
    assert values["emix_hub_packages_received_total"] == 1
    assert values["emix_hub_bytes_in_total"] > 12 * 64 * 64 * 2
    assert values["emix_hub_bytes_out_total"] > 12 * 64 * 64 * 2
    assert values["emix_hub_failures_total"] >= 2  # the refused aborts
    assert health >= 20
    assert "/api/v1/packages/<package_id>/seal" in text


@pytest.mark.e2e
def test_interrupted_send_resumes_and_abort_deletes(hub, mercy, lakeside, tmp_path: Path) -> None:
    from emix_core.client.home import LocalHome
    from emix_core.client.sender import send_paths

    study = tmp_path / "study"
    generate_study(study, slices=12, series=1, rows=64, columns=64, seed=7)
    home = LocalHome(mercy.home)
    client = InterruptedClient(home.client(hub.url, mercy.token))
    announced: list[tuple[str, bool]] = []
    with pytest.raises(KeyboardInterrupt):
        send_paths([study], ["lakeside"], client=client, home=home, parallel=1,
                   on_package=lambda p, r: announced.append((p, r)), resume=True)  # fmt: skip
    package_id = announced[0][0]
    assert announced == [(package_id, False)]
    held = home.client(hub.url, mercy.token).uploaded(package_id)
    assert len(held) == 6

    # the same command again: resumes the same package, uploads the other six
    run = emix("send", str(study), "--to", "lakeside", env=mercy.env)
    assert f"resuming package {package_id}" in run.stderr
    again = emix_json("inbox", env=lakeside.env)["packages"]
    assert [p["id"] for p in again] == [package_id] and again[0]["items"] == 12
    # the inbox tells packages apart: patient, accession, date, modality, description
    assert again[0]["patient"] == "DEMO PATIENT (DEMO-0001)"
    assert again[0]["accession"] == "A0001" and again[0]["modality"] == "CT"
    assert again[0]["study_date"][:2] in ("19", "20") and again[0]["description"]
    table = emix("inbox", env={**lakeside.env, "COLUMNS": "200"}).stdout
    for text in ("patient", "accession", "DEMO PATIENT (DEMO-0001)", "A0001", "CT",
                 again[0]["study_date"], again[0]["description"]):  # fmt: skip
        assert text in table, table
    received = emix_json("receive", package_id, "--out", str(tmp_path / "in"), env=lakeside.env)
    assert received["items"] == 12

    # a second, interrupted send is aborted: blobs gone, then 404 for it
    with pytest.raises(KeyboardInterrupt):
        send_paths([study], ["lakeside"], client=client, home=home, parallel=1,
                   on_package=lambda p, r: announced.append((p, r)), resume=True)  # fmt: skip
    second = announced[-1][0]
    assert second != package_id
    blobs = list((hub.home / "blobs").rglob(f"*{second}*"))
    assert blobs, "the partial upload is on the hub"
    assert emix_json("send", "--abort", second, env=mercy.env)["aborted"] is True
    assert not any(p.is_file() for p in (hub.home / "blobs").rglob(f"*{second}*"))
    assert not list((mercy.home / "sending").glob("*.json"))
    refused = emix("send", "--abort", second, env=mercy.env, check=False)
    assert refused.returncode == 1 and "no open package" in refused.stderr
    # only the sender may abort: lakeside gets 404 for mercy's sealed package
    assert emix("send", "--abort", package_id, env=lakeside.env, check=False).returncode == 1
    check_metrics(hub.url, package_id)
