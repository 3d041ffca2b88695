"""A study goes from one facility to another through a real hub process, sealed."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import requests

from emix_core.testing import PATIENT_ID, PATIENT_NAME, emix, emix_json


def digest_tree(root: Path) -> dict[str, str]:
    return {
        hashlib.sha256(p.read_bytes()).hexdigest(): p.name
        for p in root.rglob("*")
        if p.is_file() and p.name not in ("emix-manifest.json", "DICOMDIR")
    }


def few_slices_and_the_report(study_200: Path, tmp_path: Path, n: int = 3) -> Path:
    """A few slices of ``study_200`` and its PDF report: what a test needs when the study's
    size is not the point (the PHI, the file names and the report are all there)."""
    folder = tmp_path / "few"
    folder.mkdir()
    for p in [*sorted(study_200.rglob("*.dcm"))[:n], study_200 / "report.pdf"]:
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def test_study_sent_listed_and_received_byte_identical(
    hub, mercy, lakeside, study_200, tmp_path, smtp_server
):
    sent = emix_json("send", str(study_200), "--to", "lakeside", env=mercy.env)
    assert sent["failed"] == []
    assert sent["items"] == 201  # 200 slices + the PDF report
    package = sent["package"]

    listed = emix_json("inbox", env=lakeside.env)["packages"]
    assert [p["id"] for p in listed] == [package]
    assert listed[0]["from"] == "mercy" and listed[0]["items"] == 201
    assert listed[0]["studies"][0]["instances"] == 200

    out = tmp_path / "received"
    got = emix_json("receive", package, "--out", str(out), env=lakeside.env)
    assert got["items"] == 201
    for copy in got["converted"]:  # lakeside prefers HL7: the PDF's copy sits beside it
        Path(copy).unlink()
    assert digest_tree(out / package).keys() == digest_tree(study_200).keys()
    assert (out / package / "DICOMDIR").is_file()  # a viewer opens the folder by it
    dicoms = list((out / package / "DICOM").rglob("*.dcm"))
    assert len(dicoms) == 200

    # the sender sees the signed receipt
    status = requests.get(
        f"{hub.url}/api/v1/packages/{package}", headers={"Authorization": f"Bearer {mercy.token}"}
    ).json()
    assert status["recipients"][0]["delivered"] is not None

    # receiving twice never overwrites
    again = emix("receive", package, "--out", str(out), env=lakeside.env, check=False)
    assert again.returncode == 1 and "never overwrites" in again.stderr


def test_zip_download_has_every_item_stored_not_deflated(hub, mercy, lakeside, study_200, tmp_path):
    package = emix_json("send", str(study_200), "--to", "lakeside", env=mercy.env)["package"]
    response = requests.get(
        f"{hub.url}/api/v1/packages/{package}/zip",
        headers={"Authorization": f"Bearer {lakeside.token}"},
        stream=True,
    )
    assert response.status_code == 200
    path = tmp_path / "p.zip"
    with open(path, "wb") as handle:
        for chunk in response.iter_content(1 << 20):
            handle.write(chunk)
    assert int(response.headers["Content-Length"]) == path.stat().st_size
    with zipfile.ZipFile(path) as archive:
        infos = archive.infolist()
        assert all(i.compress_type == zipfile.ZIP_STORED for i in infos)
        assert archive.testzip() is None
        names = archive.namelist()
        assert "emix-manifest.json" in names
        assert sum(n.endswith(".dcm") for n in names) == 200
        manifest = json.loads(archive.read("emix-manifest.json"))
        zipped = {
            hashlib.sha256(archive.read(i)).hexdigest()
            for i in infos
            if i.filename != "emix-manifest.json"
        }
    assert zipped == {i["sha256"] for i in manifest["document"]["items"]}


def test_bad_files_are_reported_by_name_and_the_rest_is_sent(
    hub, mercy, lakeside, study_200, tmp_path
):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = sorted(study_200.rglob("*.dcm"))[:5]
    for p in good:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "cut.dcm").write_bytes(good[0].read_bytes()[:20000])
    (folder / "junk.dcm").write_bytes(b"\x00\x17garbage" * 500)
    result = emix("send", str(folder), "--to", "lakeside", "--json", env=mercy.env, check=False)
    assert result.returncode == 1
    body = json.loads(result.stdout)
    assert body["package"] and body["items"] == 5
    failed = {Path(f["path"]).name: f["error"] for f in body["failed"]}
    assert set(failed) == {"cut.dcm", "junk.dcm"}
    assert "truncated" in failed["cut.dcm"].lower()
    assert "not dicom" in failed["junk.dcm"].lower()
    assert PATIENT_NAME not in result.stdout + result.stderr


def test_notification_mail_has_link_from_public_url_and_no_phi(
    hub, mercy, study_200, smtp_server, tmp_path
):
    study = few_slices_and_the_report(study_200, tmp_path)
    package = emix_json("send", str(study), "--to", "lakeside", env=mercy.env)["package"]
    messages = smtp_server.wait_for(1)
    assert len(messages) == 1
    mail = messages[0]
    assert mail["To"] == "it@lakeside.example.org"
    body = mail.get_payload(decode=True).decode()
    assert f"{hub.url}/signin/" in body  # a one-time sign-in link, built from the public URL
    text = body + str(mail["Subject"])
    for phi in (PATIENT_NAME, "MUSTERMANN", PATIENT_ID, "ACC-99120", "report.pdf", package):
        assert phi not in text
    page = requests.get(f"{hub.url}/packages/{package}")
    assert page.status_code == 401 and "Sign in" in page.text and "MUSTERMANN" not in page.text


def test_no_phi_in_plaintext_anywhere_under_the_hub_home(hub, mercy, lakeside, study_200, tmp_path):
    study = few_slices_and_the_report(study_200, tmp_path)
    package = emix_json("send", str(study), "--to", "lakeside", env=mercy.env)["package"]
    emix_json("receive", package, "--out", str(tmp_path / "r"), env=lakeside.env)
    emix_json("inbox", env=lakeside.env)
    import pydicom

    ds = pydicom.dcmread(next(study.rglob("*.dcm")), stop_before_pixels=True)
    needles = [
        PATIENT_NAME.encode(),
        PATIENT_ID.encode(),
        b"ACC-99120",
        ds.StudyInstanceUID.encode(),
        ds.SOPInstanceUID.encode(),
        b"report.pdf",
        b"MUSTERMANN",
    ]
    pixel_sample = pydicom.dcmread(next(study.rglob("*.dcm"))).PixelData[1000:1064]
    needles.append(pixel_sample)
    for path in hub.home.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for needle in needles:
                assert needle not in data, f"PHI found in {path.relative_to(hub.home)}"


def test_report_arrives_in_the_recipients_preferred_format_with_the_original_kept(
    hub, mercy, lakeside, study_200, tmp_path
):
    from emix_core.content.samples import write_sample_report_txt

    folder = tmp_path / "with-report"
    folder.mkdir()
    for p in sorted(study_200.rglob("*.dcm"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    write_sample_report_txt(
        folder / "report.txt",
        facility="Mercy General",
        accession_number="ACC-99120",
        patient_name="Müller^Hans",
        findings="Kein Nachweis einer Blutung.",
        impression="Unauffällig.",
    )
    package = emix_json("send", str(folder), "--to", "lakeside", env=mercy.env)["package"]
    lakeside_oid = "2.999.4711.7"  # lakeside's [identifiers] facility_oid
    env = {**lakeside.env, "EMIX_FACILITY_OID": lakeside_oid}
    got = emix_json("receive", package, "--out", str(tmp_path / "in"), env=env)
    # lakeside prefers HL7 v2: the copy sits beside the untouched original
    assert len(got["converted"]) == 1 and got["converted"][0].endswith(".hl7")
    docs = tmp_path / "in" / package / "documents"
    original = next(docs.glob("*report.txt"))
    assert original.read_bytes() == (folder / "report.txt").read_bytes()
    from hl7apy.parser import parse_message

    message = parse_message(
        (docs / got["converted"][0].rsplit("/", 1)[1])
        .read_bytes()
        .decode("utf-8")
        .replace("\n", "\r"),
        find_groups=False,
    )
    assert message.msh.msh_9.to_er7() == "ORU^R01^ORU_R01"
    assert "Unauffällig." in message.to_er7()
    # the copy is lakeside's document: its identifiers are issued under lakeside's OID
    assert message.msh.msh_4.to_er7().split("^")[1:] == [lakeside_oid, "ISO"]


def test_command_line_errors_say_what_to_do(hub, mercy, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    pdf = tmp_path / "note.pdf"
    pdf.write_bytes(b"%PDF-1.4 a note")
    cases = {
        ("send", str(empty), "--to", "lakeside"): "no files found",
        ("send", str(pdf), "--to", "nowhere"): "unknown recipient facility",
        ("receive", "../../etc/passwd", "--out", str(tmp_path / "o")): "32 lowercase hex",
        ("receive", "0" * 32, "--out", str(tmp_path / "o")): "not found",
    }
    for args, message in cases.items():
        result = emix(*args, env=mercy.env, check=False)
        assert result.returncode == 1, args
        assert message in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
    down = emix("inbox", env={**mercy.env, "EMIX_HUB_URL": "http://127.0.0.1:9"}, check=False)
    assert down.returncode == 1 and "cannot reach the hub" in down.stderr
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
