"""PACS → hub → PACS with real Orthanc instances, the emix CLI, a real hub and gateways."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient

from emix_core import LocalHome
from emix_core.testing import (
    REFUSE_RTDOSE,
    FrontDoor,
    HubProcess,
    Orthanc,
    SampleStudy,
    Side,
    emix,
    make_hub,
    make_sample_study,
    needs_orthanc,
    side,
)

pytestmark = needs_orthanc

ACCESSION = "ACC-DW-0042"
PATIENT_ID = "PID-DW-0042"


@dataclass
class Exchange:
    hub: HubProcess
    mercy: Side
    lakeside: Side
    northside: Side


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Exchange]:
    """A hub with a sender (mercy), its recipient (lakeside) and a bystander (northside)."""
    root = tmp_path_factory.mktemp("exchange")
    hub = make_hub(root)
    try:
        hub.add_facility("Mercy General", "admin@mercy.example.org", "mercy")
        hub.add_facility("Lakeside Imaging", "it@lakeside.example.org", "lakeside", "hl7")
        hub.add_facility("Northside Clinic", "it@northside.example.org", "northside")
        yield Exchange(
            hub, side(root, hub, "mercy"), side(root, hub, "lakeside"), side(root, hub, "northside")
        )
    finally:
        hub.stop()


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SampleStudy:
    return make_sample_study(
        tmp_path_factory.mktemp("study"), accession=ACCESSION, patient_id=PATIENT_ID
    )


@pytest.fixture(scope="module")
def pacs1(orthanc_factory, study: SampleStudy) -> Orthanc:
    """The sending facility's PACS, holding the study."""
    pacs = orthanc_factory("pacs1")
    for path in study.files:
        pacs.upload(path)
    return pacs


@pytest.fixture(scope="module")
def moved(exchange: Exchange, pacs1: Orthanc) -> dict:
    """``emix dicomweb send`` of the study from PACS 1 to lakeside: its JSON answer."""
    result = emix(
        "dicomweb",
        "send",
        "--pacs",
        pacs1.url,
        "--accession",
        ACCESSION,
        "--to",
        "lakeside",
        "--json",
        env=exchange.mercy.env,
    )
    return json.loads(result.stdout)


def deliver(package: str, pacs: Orthanc, who: Side, *extra: str, check: bool = True) -> dict:
    result = emix(
        "dicomweb",
        "deliver",
        package,
        "--pacs",
        pacs.url,
        "--json",
        *extra,
        env=who.env,
        check=check,
    )
    answer = json.loads(result.stdout)
    answer["exit"] = result.returncode
    return answer


def audit_events(home: Path) -> list[dict]:
    return LocalHome(home).audit_log.events(limit=None, include_phi=True)


# --------------------------------------------------------------------------- PACS → PACS


def test_send_finds_retrieves_and_seals_the_whole_study(moved, study: SampleStudy, exchange):
    assert moved["package"], moved
    assert moved["failed"] == []
    assert moved["studies_found"] == 1
    assert moved["items"] == len(study.files) == moved["retrieved"]["instances"]
    assert moved["bytes"] == sum(p.stat().st_size for p in study.files)
    # the temporary copies are gone from the sender's home
    assert not any((exchange.mercy.home / "tmp").iterdir())
    events = audit_events(exchange.mercy.home)
    query = next(e for e in events if e["event_type"] == "query")
    assert query["phi"]["query"] == {"AccessionNumber": ACCESSION}
    assert query["phi"]["studies"] == [study.study_uid]
    assert ACCESSION not in query["detail"] and study.study_uid not in query["detail"]
    retrieved = [e for e in events if e["event_type"] == "instances-transferred"]
    assert retrieved[0]["action"] == "C" and str(len(study.files)) in retrieved[0]["detail"]
    assert any(e["package_id"] == moved["package"] for e in retrieved[1:])


def test_deliver_stores_every_instance_with_identical_pixel_data(
    moved, study: SampleStudy, exchange, orthanc_factory
):
    pacs2 = orthanc_factory("pacs2")
    answer = deliver(moved["package"], pacs2, exchange.lakeside)
    assert answer["exit"] == 0, answer
    assert (answer["stored"], answer["failed"]) == (len(study.files), 0)

    expected = study.pixel_data()
    assert pacs2.sop_instance_uids() == set(expected)
    for path in study.files:
        original = pydicom.dcmread(path)
        arrived = pacs2.wado_instance(
            study.study_uid, original.SeriesInstanceUID, original.SOPInstanceUID
        )
        ds = pydicom.dcmread(io.BytesIO(arrived))
        syntax, pixels = expected[ds.SOPInstanceUID]
        assert ds.file_meta.TransferSyntaxUID == syntax  # nothing was transcoded
        assert ds.PixelData == pixels, path.name
        assert arrived == path.read_bytes()  # byte for byte the file PACS 1 had
    frames = {int(pydicom.dcmread(p).get("NumberOfFrames", 1) or 1) for p in study.files}
    assert max(frames) > 1  # multi-frame objects were part of it

    events = audit_events(exchange.lakeside.home)
    stored = [
        e for e in events if e["event_type"] == "instances-transferred" and e["action"] == "R"
    ]
    assert (
        stored and stored[-1]["outcome"] == 0 and stored[-1]["phi"]["studies"] == [study.study_uid]
    )
    assert any(e["event_type"] == "begin-transferring" for e in events)

    # twice is harmless: nothing is sent again, everything is reported as already there
    again = emix(
        "dicomweb", "deliver", moved["package"], "--pacs", pacs2.url, env=exchange.lakeside.env
    )
    assert f"0 stored, {len(study.files)} already there, 0 failed" in again.stdout
    assert pacs2.sop_instance_uids() == set(expected)


def test_pacs_refusing_an_instance_is_reported_per_instance(
    moved, study, exchange, orthanc_factory
):
    strict = orthanc_factory("strict", lua=REFUSE_RTDOSE)
    answer = deliver(moved["package"], strict, exchange.lakeside, check=False)
    assert answer["exit"] == 1
    assert (answer["stored"], answer["failed"]) == (len(study.files) - 1, 1)
    refused = [d for d in answer["details"] if d["status"] == "failed"]
    rtdose = next(p for p in study.files if pydicom.dcmread(p).Modality == "RTDOSE")
    assert refused[0]["sop_instance_uid"] == pydicom.dcmread(rtdose).SOPInstanceUID
    assert "does not list it" in refused[0]["reason"]
    kept = Path(answer["failed_folder"])
    copy = kept / f"item-{refused[0]['item']:06d}.dcm"
    assert copy.read_bytes() == rtdose.read_bytes()
    assert "not stored into the PACS" in copy.with_name(copy.name + ".error.txt").read_text()


def test_a_busy_pacs_behind_a_token_proxy_still_gets_every_instance(
    moved, study, exchange, orthanc_factory
):
    busy = orthanc_factory("busy")
    with FrontDoor(busy, token="tok-9", busy=2) as door:
        env = {**exchange.lakeside.env, "EMIX_PACS_TOKEN": "tok-9"}
        answer = json.loads(
            emix(
                "dicomweb", "deliver", moved["package"], "--pacs", door.url, "--json", env=env
            ).stdout
        )
    assert (answer["stored"], answer["failed"]) == (len(study.files), 0)
    stow = [status for method, _, status in door.log if method == "POST"]
    assert stow == [503, 503, 200]  # retried with backoff, not given up
    assert busy.sop_instance_uids() == set(study.pixel_data())


# --------------------------------------------------------------------------- hub endpoint


def test_recipient_opens_the_package_with_any_dicomweb_client(moved, study, exchange):
    base = f"{exchange.hub.url}/api/v1/packages/{moved['package']}/dicomweb"
    viewer = DICOMwebClient(base, headers={"Authorization": f"Bearer {exchange.lakeside.token}"})
    studies = viewer.search_for_studies(search_filters={"AccessionNumber": ACCESSION})
    assert [s["0020000D"]["Value"][0] for s in studies] == [study.study_uid]
    assert studies[0]["00201208"]["Value"] == [len(study.files)]
    assert studies[0]["00100020"]["Value"] == [PATIENT_ID]
    series = viewer.search_for_series(study.study_uid)
    assert len(series) == len({pydicom.dcmread(p).SeriesInstanceUID for p in study.files})
    modalities = {s.get("00080060", {}).get("Value", [None])[0] for s in series}
    assert {"CT", "MR", "RTDOSE"} <= modalities
    instances = viewer.search_for_instances(study.study_uid)
    assert len(instances) == len(study.files)

    original = pydicom.dcmread(study.files[0])
    ds = viewer.retrieve_instance(
        study.study_uid,
        original.SeriesInstanceUID,
        original.SOPInstanceUID,
        media_types=(("application/dicom", "*"),),
    )
    assert ds.PixelData == original.PixelData
    assert ds.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    whole = viewer.retrieve_study(study.study_uid, media_types=(("application/dicom", "*"),))
    assert {d.SOPInstanceUID for d in whole} == set(study.pixel_data())
    # a transfer syntax the hub cannot make is refused, not faked
    jpeg = next(
        p for p in study.files if "1.2.4.50" in pydicom.dcmread(p).file_meta.TransferSyntaxUID
    )
    ds = pydicom.dcmread(jpeg, stop_before_pixels=True)
    refused = requests.get(
        f"{base}/studies/{study.study_uid}/series/{ds.SeriesInstanceUID}/instances/"
        f"{ds.SOPInstanceUID}",
        headers={
            "Authorization": f"Bearer {exchange.lakeside.token}",
            "Accept": 'multipart/related; type="application/dicom"; '
            "transfer-syntax=1.2.840.10008.1.2.4.100",  # MPEG-2: not made from a JPEG
        },
        timeout=30,
    )
    assert refused.status_code == 406

    outsider = DICOMwebClient(base, headers={"Authorization": f"Bearer {exchange.northside.token}"})
    with pytest.raises(Exception) as refused:
        outsider.search_for_studies()
    assert refused.value.response.status_code == 404

    hub_events = LocalHome(exchange.hub.home).audit_log.events(
        package_id=moved["package"], limit=None
    )
    assert {"query", "instances-transferred"} <= {e["event_type"] for e in hub_events}


# --------------------------------------------------------------------------- gateways


def test_gateways_route_a_study_and_deliver_it_once_the_pacs_is_back(
    exchange, orthanc_factory, tmp_path: Path
):
    from emix_core import load_gateway

    routed = make_sample_study(
        tmp_path / "ed", accession="ACC-ED-7", patient_id="PID-ED-7", slices=6
    )
    late = routed.files[-2:]  # two slices reach the PACS after the study was routed
    ed_pacs = orthanc_factory("ed")
    for path in routed.files[:-2]:
        ed_pacs.upload(path)
    reading_room = orthanc_factory("reading", start=False)  # down when the study arrives

    def gateway(name: str, who: Side, table: str):  # type: ignore[no-untyped-def]
        config = tmp_path / f"{name}.toml"
        config.write_text(
            f'[gateway]\nhome = "{who.home}"\nhub_url = "{exchange.hub.url}"\n'
            f'token = "{who.token}"\nstate = "gateway-{name}"\npoll_seconds = 0.2\n'
            f"retry_max_seconds = 1\n\n{table}"
        )
        return load_gateway(config)

    sender = gateway(
        "ed",
        exchange.mercy,
        f'[[sources]]\nkind = "dicomweb"\nurl = "{ed_pacs.url}"\nto = "lakeside"\n'
        'query = { AccessionNumber = "ACC-ED-7" }\npoll_seconds = 0.3\nsettle_seconds = 0.5\n',
    )
    receiver = gateway(
        "reading",
        exchange.lakeside,
        f'[[destinations]]\nkind = "dicomweb"\nurl = "{reading_room.url}"\nattempts = 1\n',
    )
    stop = threading.Event()
    threads = [
        threading.Thread(target=g.run, args=(stop,), daemon=True) for g in (sender, receiver)
    ]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 60
        failing = []
        while time.monotonic() < deadline and not failing:
            failing = receiver.status()["inbound"]["failing"]
            time.sleep(0.2)
        assert failing and "cannot reach the PACS" in failing[0]["error"], receiver.status()
        waiting = receiver.queue_depths()["inbound"]  # what the metrics endpoint shows
        assert waiting["pending"] + waiting["in_flight"] == 1 and waiting["retrying"] == 1
        reading_room.start()

        def delivered(count: int) -> None:
            while time.monotonic() < deadline:
                if receiver.status()["inbound"]["packages"].get("delivered") == count:
                    return
                time.sleep(0.2)
            raise AssertionError(receiver.status())

        delivered(1)
        assert len(reading_room.sop_instance_uids()) == len(routed.files) - 2
        for path in late:
            ed_pacs.upload(path)
        delivered(2)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
    assert reading_room.sop_instance_uids() == set(routed.pixel_data())
    source = sender.status()["sources"][0]
    assert source["studies"] == {"sent": 1}, source
    assert sender.queue_depths()["source:dicomweb"] == {
        "pending": 0, "in_flight": 0, "failed": 0, "retrying": 0
    }  # fmt: skip
    # the study went out once, the late slices once more, although the source kept polling
    inbox = LocalHome(exchange.lakeside.home).client(exchange.hub.url, exchange.lakeside.token)
    routed_packages = [
        p for p in inbox.inbox() if any(s["study_uid"] == routed.study_uid for s in p["studies"])
    ]
    assert sorted(p["items"] for p in routed_packages) == [2, len(routed.files) - 2]


# --------------------------------------------------------------------------- PACS access


def test_basic_auth_to_the_pacs_and_a_clear_error_for_wrong_credentials(
    exchange, orthanc_factory, study
):
    locked = orthanc_factory("locked", auth=("emix", "s3cret-pw"))
    locked.upload(study.files[0])
    env = {**exchange.mercy.env, "EMIX_PACS_USER": "emix", "EMIX_PACS_PASSWORD": "wrong"}
    refused = emix(
        "dicomweb",
        "send",
        "--pacs",
        locked.url,
        "--study",
        study.study_uid,
        "--to",
        "lakeside",
        env=env,
        check=False,
    )
    assert refused.returncode == 1
    assert "HTTP 401" in refused.stderr and "credentials" in refused.stderr
    assert study.study_uid not in refused.stderr
    env["EMIX_PACS_PASSWORD"] = "s3cret-pw"
    sent = emix(
        "dicomweb",
        "send",
        "--pacs",
        locked.url,
        "--study",
        study.study_uid,
        "--to",
        "lakeside",
        "--json",
        env=env,
    )
    assert json.loads(sent.stdout)["items"] == 1
