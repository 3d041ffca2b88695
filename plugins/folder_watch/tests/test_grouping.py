"""Which complete files form a package, and when (pure planning, no folders needed)."""

from __future__ import annotations

from itertools import count

from emix_folder_watch.grouping import Unsettled, plan_batches
from emix_folder_watch.journal import FileRow

_ids = count(1)
SETTLE = 5.0


def row(path: str, kind: str = "dicom", arrived: float = 0.0, **keys: str) -> FileRow:
    return FileRow(
        id=next(_ids),
        path=path,
        recipients="lakeside",
        kind=kind,
        study=keys.get("study"),
        accession=keys.get("accession"),
        identity=None,
        document=keys.get("document"),
        state="pending",
        arrived=arrived,
        ino=1,
        size=1,
        mtime_ns=1,
    )


def paths(batches: list[list[FileRow]]) -> list[set[str]]:
    return sorted(({r.path for r in b} for b in batches), key=sorted)


def test_a_study_waits_until_no_new_file_arrived_for_the_settle_time() -> None:
    files = [row(f"lakeside/ct/{n}.dcm", arrived=n, study="s1") for n in range(3)]
    assert plan_batches(files, [], now=2 + SETTLE - 0.1, settle=SETTLE, max_wait=60).batches == []
    plan = plan_batches(files, [], now=2 + SETTLE, settle=SETTLE, max_wait=60)
    assert paths(plan.batches) == [{f.path for f in files}]


def test_a_file_still_being_written_holds_back_the_studies_it_may_belong_to() -> None:
    files = [row("lakeside/ct/1.dcm", arrived=0, study="s1")]
    copying = [Unsettled("lakeside", "lakeside/ct/2.dcm", arrived=1.0)]
    assert plan_batches(files, copying, now=30, settle=SETTLE, max_wait=60).batches == []
    # a file that arrived long after the study went quiet is not waited for
    late = [Unsettled("lakeside", "lakeside/other/1.dcm", arrived=SETTLE + 1)]
    assert len(plan_batches(files, late, now=30, settle=SETTLE, max_wait=60).batches) == 1
    # nor is a file for another recipient
    elsewhere = [Unsettled("riverside", "riverside/1.dcm", arrived=1.0)]
    assert len(plan_batches(files, elsewhere, now=30, settle=SETTLE, max_wait=60).batches) == 1


def test_studies_become_separate_packages_with_the_reports_that_name_them() -> None:
    files = [
        row("lakeside/a/1.dcm", study="s1", accession="acc1"),
        row("lakeside/b/1.dcm", study="s2", accession="acc2"),
        row("lakeside/report-b.hl7", kind="document", accession="acc2"),
        row("lakeside/report-a.pdf", kind="document"),
        row("lakeside/report-a.pdf.emix.toml", kind="sidecar", accession="acc1",
            document="lakeside/report-a.pdf"),
    ]  # fmt: skip
    plan = plan_batches(files, [], now=60, settle=SETTLE, max_wait=60)
    assert paths(plan.batches) == [
        {"lakeside/a/1.dcm", "lakeside/report-a.pdf", "lakeside/report-a.pdf.emix.toml"},
        {"lakeside/b/1.dcm", "lakeside/report-b.hl7"},
    ]


def test_a_report_goes_with_the_only_study_in_its_folder() -> None:
    files = [
        row("lakeside/a/series/1.dcm", study="s1"),
        row("lakeside/a/report.pdf", kind="document"),
        row("lakeside/b/series/1.dcm", study="s2"),
    ]
    plan = plan_batches(files, [], now=60, settle=SETTLE, max_wait=60)
    assert paths(plan.batches) == [
        {"lakeside/a/series/1.dcm", "lakeside/a/report.pdf"},
        {"lakeside/b/series/1.dcm"},
    ]


def test_a_report_that_names_no_study_among_several_sends_the_batch_as_one_package() -> None:
    files = [
        row("lakeside/1.dcm", study="s1"),
        row("lakeside/2.dcm", study="s2"),
        row("lakeside/report.pdf", kind="document"),
    ]
    plan = plan_batches(files, [], now=60, settle=SETTLE, max_wait=600)
    assert paths(plan.batches) == [{f.path for f in files}]


def test_a_sidecar_without_its_document_is_refused_once_quiet() -> None:
    sidecar = row("lakeside/x.pdf.emix.toml", kind="sidecar", accession="a",
                  document="lakeside/x.pdf")  # fmt: skip
    plan = plan_batches([sidecar], [], now=60, settle=SETTLE, max_wait=60)
    assert plan.orphans == [sidecar] and plan.batches == []
    waiting = [Unsettled("lakeside", "lakeside/x.pdf", arrived=59)]
    assert plan_batches([sidecar], waiting, now=60, settle=SETTLE, max_wait=60).orphans == []
