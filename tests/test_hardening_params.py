"""Hostile query parameters on the hub's DICOMweb service: a typed 400, never a 500.

Each case played the attacker before its fix; docs/security.md cites this file.
"""

from __future__ import annotations

import time
from pathlib import Path
from urllib.parse import urlencode

import pytest
import requests

from emix_core import generate_study, send_paths
from emix_core.testing import HubServer

HOSTILE: list[dict[str, str] | str] = [
    {"limit": "abc"},
    {"limit": "-1"},
    {"offset": "-5"},
    {"limit": "1e3"},
    {"limit": "9" * 5000},
    {"offset": "9" * 5000},
    {"offset": "99999999999999999999999999"},
    {"limit": ""},
    {"offset": " "},
    {"limit": "\u0661\u0662"},
    {"limit": "5", "offset": "1.5"},
    {"includefield": "NotAnAttribute"},
    {"includefield": "ZZZZZZZZ"},
    "includefield=%ED%B3%BF",
    "PatientID=%FF%FE",
    "limit=%00",
    {"fuzzymatching": "maybe"},
    {"StudyDate": "abc"},
    {"StudyDate": "2020-2021-2022"},
    {"StudyDate": "20200101", "StudyTime": "xx"},
    {"StudyTime": "25:61"},
    {"SeriesNumber": "one"},
    {"NumberOfStudyRelatedInstances": "x"},
    {"StudyInstanceUID": "1." * 5000},
    {"StudyInstanceUID": "not a uid"},
    {"PatientName": "\x00"},
    {"PatientName": "(" * 2000},
    {"PatientName": "*" * 5000 + "x"},
    {"00100010": "X", "0010,0020": "Y"},
    {"ffffffff": "1"},
    {"orderby": "PatientName"},
    {"Modality": "CT\\MR\\" * 1000},
]


@pytest.fixture
def shared(hub_server: HubServer, tmp_path: Path) -> tuple[HubServer, str, str]:
    study = tmp_path / "study"
    generate_study(study, slices=2, series=1, rows=32, columns=32)
    mercy, mercy_client = hub_server.facility_home(tmp_path, "mercy")
    sent = send_paths([study], ["lakeside"], client=mercy_client, home=mercy)
    assert sent.package_id and not sent.failed
    import pydicom

    first = next(study.rglob("*.dcm"))
    study_uid = str(pydicom.dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    return hub_server, sent.package_id, study_uid


def test_hostile_qido_parameters_answer_400_or_200_never_500(shared) -> None:
    """Each answer within seconds too: ``*?*?…x`` once kept a worker busy for minutes."""
    hub, _package, study_uid = shared
    wrong = []
    for params in HOSTILE:
        for path in (
            "/dicomweb/studies",
            f"/dicomweb/studies/{study_uid}/series",
            f"/dicomweb/studies/{study_uid}/instances",
            "/dicomweb/series",
            "/dicomweb/instances",
        ):
            query = params if isinstance(params, str) else urlencode(params)
            started = time.monotonic()
            answer = requests.get(
                f"{hub.url}{path}?{query}", headers=hub.headers("lakeside"), timeout=20
            )
            text = answer.text
            if time.monotonic() - started > 5:
                wrong.append((path.split("/")[-1], str(params)[:60], "slow"))
            if answer.status_code not in (200, 204, 400) or "Traceback" in text:
                wrong.append((path.split("/")[-1], str(params)[:60], answer.status_code))
            elif answer.status_code == 400:
                body = answer.json()
                if not (body and body.get("error") and body.get("message")):
                    wrong.append((path.split("/")[-1], str(params)[:60], "untyped 400"))
    assert not wrong, wrong
