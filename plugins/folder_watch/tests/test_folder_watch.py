"""Drop a study in one facility's outbox, find it in the other's inbox: real watchdog on
real folders, a real hub process, real gateway processes (killed with SIGKILL, too)."""

from __future__ import annotations

import os
import random
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from emix_core import ConfigError, generate_study, load_gateway, write_sample_report_pdf
from plugins.folder_watch.tests.sites import files_under, sha256, wait_for


def drop(study: Path, into: Path) -> None:
    """Copy a study into a folder the way an export does (cp -r)."""
    shutil.copytree(study, into, dirs_exist_ok=True)


def hashes(files: list[Path]) -> Counter[str]:
    return Counter(sha256(f) for f in files)


def dicom_files(package: Path) -> list[Path]:
    return sorted((package / "DICOM").rglob("*.dcm"))


@pytest.fixture(scope="module")
def big_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """300 slices of 512x512 16-bit in 3 series (about 157 MB) and its PDF report."""
    folder = tmp_path_factory.mktemp("big") / "ct-head"
    generate_study(folder, slices=300, series=3, accession_number="ACC-300")
    write_sample_report_pdf(
        folder / "report.pdf",
        facility="Mercy General",
        accession_number="ACC-300",
        patient_name="DOE^JANE",
        findings="No acute abnormality.",
        impression="Normal study.",
    )
    return folder


def test_big_study_and_report_arrive_complete_and_identical_while_bad_files_are_quarantined(
    sites, big_study: Path, tmp_path: Path
) -> None:
    mercy, lakeside = sites("mercy"), sites("lakeside")
    mercy.start()
    lakeside.start()
    bad = tmp_path / "bad"
    bad.mkdir()
    slice_bytes = next(big_study.rglob("*.dcm")).read_bytes()
    (bad / "cut-off.dcm").write_bytes(slice_bytes[: len(slice_bytes) * 2 // 3])
    (bad / "junk.bin").write_bytes(os.urandom(5000))

    outbox = mercy.outbox_for("lakeside")
    drop(big_study, outbox / "ct-head")
    drop(bad, outbox / "ct-head")

    packages = wait_for(lambda: lakeside.inbox_packages("mercy"), 120, "the study in the inbox")
    assert len(packages) == 1
    package = packages[0]
    sources = sorted(big_study.rglob("*.dcm"))
    assert len(dicom_files(package)) == 300
    assert hashes(dicom_files(package)) == hashes(sources)
    report = (big_study / "report.pdf").read_bytes()
    assert report in [d.read_bytes() for d in (package / "documents").iterdir()]
    assert (package / "emix-manifest.json").exists()
    # the inbox folder opens in a viewer by its DICOMDIR; its links lead to the files
    from pydicom import dcmread
    from pydicom.fileset import FileSet

    indexed = {Path(i.path).resolve() for i in FileSet(dcmread(package / "DICOMDIR"))}
    assert indexed == {p.resolve() for p in dicom_files(package)}

    wait_for(lambda: not files_under(mercy.folder("outbox")), 30, "an empty outbox")
    assert len(files_under(mercy.folder("sent"))) == 301
    failed = mercy.folder("failed") / "lakeside" / "ct-head"
    truncated_note = (failed / "cut-off.dcm.error.txt").read_text()
    junk_note = (failed / "junk.bin.error.txt").read_text()
    assert "ends before" in truncated_note or "truncated" in truncated_note.lower()
    assert "not DICOM" in junk_note
    assert (failed / "cut-off.dcm").read_bytes() == slice_bytes[: len(slice_bytes) * 2 // 3]

    status = mercy.status()["sources"][0]
    assert (status["sent"], status["failed"], status["packages"]) == (301, 2, 1)
    assert lakeside.status()["inbound"]["packages"] == {"delivered": 1}
    for line in mercy.log_text().splitlines():  # the logs name no patient, study or file
        assert "DOE" not in line and "ACC-300" not in line and "slice-" not in line


def test_hub_down_for_a_while_then_up_delivers_and_files_wait_in_the_outbox(
    sites, hub, tmp_path: Path
) -> None:
    mercy, lakeside = sites("mercy"), sites("lakeside")
    mercy.start()
    lakeside.start()
    study = tmp_path / "study"
    generate_study(study, slices=10, series=1)
    hub.stop()
    drop(study, mercy.outbox_for("lakeside") / "study")

    retrying = wait_for(
        lambda: mercy.status()["sources"][0]["retrying"],
        20,
        "the gateway to notice the hub is down",
    )
    assert "cannot reach the hub" in retrying[0]["error"]
    attempts = retrying[0]["attempts"]
    wait_for(
        lambda: mercy.status()["sources"][0]["retrying"][0]["attempts"] > attempts,
        30,
        "another failed attempt while the hub is down",
    )
    assert len(files_under(mercy.folder("outbox"))) == 10
    assert not files_under(mercy.folder("failed"))

    hub.start()
    (package,) = wait_for(lambda: lakeside.inbox_packages("mercy"), 60, "delivery after the outage")
    assert hashes(dicom_files(package)) == hashes(sorted(study.rglob("*.dcm")))
    wait_for(lambda: not files_under(mercy.folder("outbox")), 20, "an empty outbox")


def test_gateways_killed_at_random_moments_deliver_every_study_exactly_once(
    sites, big_study: Path, tmp_path: Path
) -> None:
    seed = int(os.environ.get("EMIX_TEST_SEED") or random.randrange(1_000_000))
    print(f"crash schedule seed {seed} (replay it with EMIX_TEST_SEED={seed})")
    rng = random.Random(seed)
    mercy, lakeside = sites("mercy"), sites("lakeside")
    studies = [big_study]
    for n in range(2):
        studies.append(tmp_path / f"small-{n}")
        generate_study(studies[-1], slices=20, series=2, accession_number=f"ACC-{n}")
    outbox = mercy.outbox_for("lakeside")
    for n, study in enumerate(studies):
        drop(study, outbox / f"study-{n}")
    lakeside.start()
    stop_killing = threading.Event()

    def kill_the_receiver_now_and_then() -> None:
        while not stop_killing.wait(rng.uniform(0.5, 3.0)):
            lakeside.kill()
            lakeside.start()

    receiver_killer = threading.Thread(target=kill_the_receiver_now_and_then)
    receiver_killer.start()
    try:
        for round_ in range(9):
            sends = mercy.log_text().count("batch.sending")
            mercy.start()
            if round_ % 3 == 2:  # anywhere: starting up, recovering, settling
                time.sleep(rng.uniform(0.2, 2.5))
            else:  # while a package is being sent or sealed, or files moved out
                deadline = time.monotonic() + 8  # (unless everything went out already)
                while mercy.log_text().count("batch.sending") == sends:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.02)
                time.sleep(rng.uniform(0.0, 1.5))
            mercy.kill()
    finally:
        stop_killing.set()
        receiver_killer.join()
    mercy.start()

    def delivered() -> bool:
        return len(lakeside.inbox_packages("mercy")) >= 3 and not files_under(outbox)

    wait_for(delivered, 180, f"every study delivered (seed {seed})")
    time.sleep(2)  # anything sent twice would show up now
    packages = lakeside.inbox_packages("mercy")
    assert len(packages) == 3, f"seed {seed}"
    received = [f for p in packages for f in dicom_files(p)]
    expected = [f for s in studies for f in s.rglob("*.dcm")]
    assert hashes(received) == hashes(expected), f"seed {seed}"
    names = Counter(f.name for f in received)  # one file per SOP instance, none twice
    assert max(names.values()) == 1
    assert not [p for p in (lakeside.folder("inbox") / "mercy").iterdir() if p.name[0] == "."]
    spool = lakeside.root / "home" / "gateway" / "spool"
    wait_for(lambda: not list(spool.iterdir()), 10, "an empty spool on the receiving side")
    assert len(files_under(mercy.folder("sent"))) == len(expected) + 1  # + the PDF report
    assert not files_under(mercy.folder("failed"))


def _classified_batch(sites, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A 4-slice study classified in Mercy's outbox and journaled as one batch, its
    gateway loaded but not running (the test plays the gateway's steps)."""
    mercy = sites("mercy", settle_seconds=3600)  # classify, but never send on its own
    slices = generate_study(tmp_path / "study", slices=4, series=1)
    drop(tmp_path / "study", mercy.outbox_for("lakeside") / "study")
    mercy.write_config()
    gateway = load_gateway(mercy.config)
    source = gateway.sources[0]
    source._active = source.journal.active_paths()
    wait_for(lambda: (source._cycle(), len(source.journal.pending()) == 4)[1], 10, "4 files")
    rows = source.journal.pending()
    batch = source.journal.create_batch("lakeside", [r.id for r in rows])
    return mercy, slices, gateway, source, rows, batch


def test_a_crash_right_after_the_hub_sealed_the_package_does_not_send_it_again(
    sites, hub, tmp_path: Path
) -> None:
    mercy, slices, gateway, source, rows, batch = _classified_batch(sites, tmp_path)
    sent = gateway.send(  # the hub seals it; the gateway "dies" before journaling that
        [source.root / r.path for r in rows],
        ["lakeside"],
        on_package_created=lambda package: source.journal.set_package(batch, package),
        on_seal_requested=lambda _package: source.journal.set_sealing(batch),
    )
    assert sent.package_id and len(sent.sent) == 4

    mercy.source["settle_seconds"] = 0.5
    mercy.start()
    outbox = mercy.folder("outbox")
    wait_for(lambda: not files_under(outbox), 20, "the files moved to sent/")
    assert hashes(files_under(mercy.folder("sent"))) == hashes(slices)
    lakeside = gateway.client.__class__(hub.url, hub.facilities["lakeside"]["token"])
    assert [p["id"] for p in lakeside.inbox()] == [sent.package_id]
    assert '"recovered": true' in mercy.log_text()


class _Crash(Exception):
    """The gateway dies here."""


def test_a_package_left_open_by_a_crash_is_aborted_and_its_files_sent_in_a_new_one(
    sites, hub, tmp_path: Path
) -> None:
    from emix_core import NotFoundError

    mercy, slices, gateway, source, rows, batch = _classified_batch(sites, tmp_path)
    opened: list[str] = []

    def crash(_package: str) -> None:
        raise _Crash

    with pytest.raises(_Crash):  # uploaded, never sealed
        gateway.send(
            [source.root / r.path for r in rows],
            ["lakeside"],
            on_package_created=lambda package: (
                opened.append(package),
                source.journal.set_package(batch, package),
            ),
            on_seal_requested=crash,
        )
    assert gateway.client.status(opened[0])["state"] == "open"

    mercy.source["settle_seconds"] = 0.5
    mercy.start()
    wait_for(lambda: not files_under(mercy.folder("outbox")), 30, "the files moved to sent/")
    assert hashes(files_under(mercy.folder("sent"))) == hashes(slices)
    # the abandoned package is aborted (a receiving gateway stops waiting for it) ...
    with pytest.raises(NotFoundError):
        gateway.client.status(opened[0])
    assert '"batch.abandoned_open_package"' in mercy.log_text()
    # ... and the files went in a new, sealed package
    lakeside = gateway.client.__class__(hub.url, hub.facilities["lakeside"]["token"])
    listed = lakeside.inbox(progressive=True)
    assert len(listed) == 1 and listed[0]["id"] != opened[0] and listed[0]["state"] == "sealed"


def test_the_same_files_dropped_twice_are_sent_once_even_without_filesystem_events(
    sites, tmp_path: Path
) -> None:
    mercy, lakeside = sites("mercy", events=False), sites("lakeside")
    mercy.start()
    lakeside.start()
    study = tmp_path / "study"
    generate_study(study, slices=5, series=1)
    outbox = mercy.outbox_for("lakeside")
    drop(study, outbox / "study")
    wait_for(lambda: lakeside.inbox_packages("mercy"), 30, "the first copy delivered")
    wait_for(lambda: not files_under(outbox), 10, "an empty outbox")

    drop(study, outbox / "study")
    wait_for(lambda: not files_under(outbox), 30, "the second copy handled")
    mercy.wait_cycles()
    lakeside.wait_cycles()
    assert len(lakeside.inbox_packages("mercy")) == 1
    sent = files_under(mercy.folder("sent"))
    assert len(sent) == 10 and sum(" (2)" in p.name for p in sent) == 5
    assert mercy.status()["sources"][0]["duplicates"] == 5


def test_links_devices_and_oversize_files_are_refused_with_a_reason(sites, tmp_path: Path) -> None:
    mercy, lakeside = sites("mercy", max_file_bytes=600_000), sites("lakeside")
    study = tmp_path / "study"
    slices = generate_study(study, slices=3, series=1)
    outside = tmp_path / "outside.dcm"
    shutil.copyfile(slices[0], tmp_path / "secret.dcm")
    shutil.copyfile(slices[1], outside)
    outbox = mercy.outbox_for("lakeside")
    drop(study, outbox / "study")
    (outbox / "study" / "link.dcm").symlink_to(tmp_path / "secret.dcm")
    os.link(outside, outbox / "study" / "hard.dcm")
    os.mkfifo(outbox / "study" / "pipe.dcm")
    (outbox / "study" / "huge.txt").write_text("x" * 700_000)
    (mercy.outbox_for("nowhere") / "lost.dcm").write_bytes(slices[2].read_bytes())
    mercy.start()
    lakeside.start()

    (package,) = wait_for(lambda: lakeside.inbox_packages("mercy"), 30, "the good files")
    assert hashes(dicom_files(package)) == hashes(slices)
    wait_for(lambda: not files_under(outbox), 20, "an empty outbox")
    failed = mercy.folder("failed") / "lakeside" / "study"
    reasons = {
        name: (failed / f"{name}.error.txt").read_text()
        for name in ("link.dcm", "hard.dcm", "pipe.dcm", "huge.txt")
    }
    assert "symbolic link to a file outside" in reasons["link.dcm"]
    assert "hard links" in reasons["hard.dcm"]
    assert "pipe" in reasons["pipe.dcm"]
    assert "larger than the limit" in reasons["huge.txt"]
    assert (failed / "link.dcm").is_symlink()  # the link itself, never its target
    note = mercy.folder("failed") / "nowhere" / "lost.dcm.error.txt"
    unknown = wait_for(lambda: note.exists() and note.read_text(), 10, "the unknown recipient")
    assert "unknown recipient facility address" in unknown
    assert (tmp_path / "secret.dcm").read_bytes() == slices[0].read_bytes()


def test_reports_travel_with_the_study_they_name(sites, tmp_path: Path) -> None:
    """Two studies in one folder: a PDF named by its sidecar, an HL7 report by its accession."""
    from emix_core import Patient, PersonName, Report

    mercy, lakeside = sites("mercy"), sites("lakeside")
    drop_folder = mercy.outbox_for("lakeside") / "two-studies"
    images = {}
    for accession in ("ACC-1", "ACC-2"):
        slices = generate_study(
            drop_folder / accession.lower(), slices=3, series=1, accession_number=accession
        )
        images[accession] = hashes(slices)
    write_sample_report_pdf(
        drop_folder / "report-1.pdf",
        facility="Mercy General",
        accession_number="ACC-1",
        patient_name="ROE^RICHARD",
        findings="Findings.",
        impression="Normal.",
    )
    (drop_folder / "report-1.pdf.emix.toml").write_text('accession_number = "ACC-1"\n')
    report = Report(
        patient=Patient(name=PersonName(family="ROE", given="RICHARD"), id="P-1"),
        accession_number="ACC-2",
        findings="No change.",
        impression="Stable.",
    )
    hl7 = mercy_pm().hook.emix_render_report(report=report, format="hl7")
    (drop_folder / "report-2.hl7").write_bytes(hl7)
    documents = {
        "ACC-1": (drop_folder / "report-1.pdf").read_bytes(),
        "ACC-2": hl7,
    }
    mercy.start()
    lakeside.start()

    packages = wait_for(
        lambda: len(lakeside.inbox_packages("mercy")) == 2 and lakeside.inbox_packages("mercy"),
        40,
        "two packages",
    )
    for package in packages:
        # the recipient may also get a copy converted to its preferred report format
        arrived = [d.read_bytes() for d in (package / "documents").iterdir()]
        (accession,) = [a for a, original in documents.items() if original in arrived]
        assert hashes(dicom_files(package)) == images[accession]
    wait_for(
        lambda: len(files_under(mercy.folder("sent"))) == 9,
        10,
        "6 slices, 2 reports and a sidecar in sent/",
    )


def mercy_pm():  # type: ignore[no-untyped-def]
    from emix_core import get_plugin_manager

    return get_plugin_manager()


def test_a_part_file_is_taken_only_once_renamed(sites, tmp_path: Path) -> None:
    mercy, lakeside = sites("mercy", to="lakeside"), sites("lakeside")  # no subfolders
    mercy.start()
    lakeside.start()
    (slice_,) = generate_study(tmp_path / "one", slices=1, series=1)
    outbox = mercy.folder("outbox")
    partial = outbox / "image.dcm.part"
    partial.write_bytes(slice_.read_bytes()[:1000])
    mercy.wait_cycles(5)
    assert partial.exists() and not lakeside.inbox_packages("mercy")
    partial.write_bytes(slice_.read_bytes())
    partial.rename(outbox / "image.dcm")
    (package,) = wait_for(lambda: lakeside.inbox_packages("mercy"), 20, "the renamed file")
    assert hashes(dicom_files(package)) == hashes([slice_])


def test_gateway_config_errors_say_what_to_fix(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text(
        '[gateway]\nhub_url = "http://127.0.0.1:9"\n[[sources]]\nkind = "carrier-pigeon"\n'
    )
    with pytest.raises(ConfigError, match="no installed plugin provides source kind"):
        load_gateway(config)
    config.write_text(
        '[gateway]\nhub_url = "http://127.0.0.1:9"\n'
        '[[sources]]\nkind = "folder"\npath = "out"\nsettle = 3\n'
    )
    with pytest.raises(ConfigError, match="unknown setting 'settle'"):
        load_gateway(config)
    config.write_text(
        '[gateway]\nhub_url = "http://127.0.0.1:9"\n'
        '[[sources]]\nkind = "folder"\npath = "out"\nsent = "out/sent"\n'
    )
    with pytest.raises(ConfigError, match="must be outside the drop folder"):
        load_gateway(config)


@pytest.mark.e2e  # a real process
def test_demo_runs_a_gateway_per_facility_and_the_study_crosses_by_folders(tmp_path: Path) -> None:
    from emix_core.testing import emix, free_port

    root = tmp_path / "demo"
    result = emix(
        "demo", "--home", str(root), "--port", str(free_port()), "--slices", "6", "--exit"
    )
    assert "lakeside-imaging has it in" in result.stdout
    mercy, lakeside = root / "mercy-general", root / "lakeside-imaging"
    for facility, other in ((mercy, "lakeside-imaging"), (lakeside, "mercy-general")):
        assert (facility / "outbox" / other).is_dir()
        for name in ("inbox", "sent", "failed", "gateway.toml", "gateway"):
            assert (facility / name).exists(), name
    (package,) = (lakeside / "inbox" / "mercy-general").iterdir()
    assert len(dicom_files(package)) == 6
    assert hashes(dicom_files(package)) == hashes(sorted((root / "sample-study").rglob("*.dcm")))
    assert (root / "hub" / "emix.toml").exists()
