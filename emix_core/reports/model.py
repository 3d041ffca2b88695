"""The report model: one diagnostic imaging report, whatever format it came in.

Every format plugin reads into and renders from :class:`Report`. Construction
normalises what formats cannot all carry the same way (line endings, control
characters, sub-second times, naive times) so that ``parse(render(report)) == report``
holds for the formats that round-trip, and bounds the size of every text so that no
format can be made to hang on a hostile report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Literal

from emix_core.errors import ReportFormatError

__all__ = [
    "Attachment",
    "Author",
    "Code",
    "Identifier",
    "MAX_LINE_CHARS",
    "MAX_TEXT_CHARS",
    "Patient",
    "PersonName",
    "Report",
    "ReportStatus",
    "SEXES",
    "STATUSES",
    "is_valid_uid",
]

ReportStatus = Literal["preliminary", "final", "amended"]
#: Report statuses, in the order of a report's life.
STATUSES: tuple[str, ...] = ("preliminary", "final", "amended")
#: Administrative sex, as DICOM and HL7 v2 table 0001 write it; ``""`` when unknown.
SEXES: tuple[str, ...] = ("M", "F", "O", "U", "")

#: Longest findings or impression text (characters). A long radiology report is a few
#: thousand; the bound keeps every renderer (PDF above all) to a few seconds.
MAX_TEXT_CHARS = 100_000
#: Longest single-line value (a name, an identifier, a title).
MAX_LINE_CHARS = 1_000

_MEDIA_TYPE_RE = re.compile(r"^[a-z0-9][a-z0-9!#$&^_.+-]*/[a-z0-9][a-z0-9!#$&^_.+-]*$")
_CJK_RE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af]")
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LANGUAGE_RE = re.compile(r"^[A-Za-z]{2,3}(-[A-Za-z0-9]{2,8})*$")
_UUID_RE = re.compile(r"^[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$")
#: HL7 v2 PV1-2 patient classes (table 0004) a report may carry.
PATIENT_CLASSES: tuple[str, ...] = ("E", "I", "O", "P", "R", "B", "C", "N", "U", "")
_LINE_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TEXT_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def is_valid_uid(value: str) -> bool:
    """True for a well-formed DICOM UID (digits and dots, at most 64 characters)."""
    return len(value) <= 64 and bool(_UID_RE.match(value))


def clean_line(value: str | None, what: str) -> str:
    """A single-line value: control characters become spaces, ends are trimmed."""
    text = _LINE_CONTROL_RE.sub(" ", value or "").strip()
    if len(text) > MAX_LINE_CHARS:
        raise ReportFormatError(f"the report's {what} is longer than {MAX_LINE_CHARS} characters")
    return text


def clean_text(value: str | None, what: str) -> str:
    """A multi-line text: LF line ends, no control characters but tab, no trailing blanks."""
    text = (value or "").replace("\r\n", "\n").replace("\r", "\n")
    text = _TEXT_CONTROL_RE.sub(" ", text)
    text = "\n".join(line.rstrip() for line in text.split("\n")).strip("\n")
    if len(text) > MAX_TEXT_CHARS:
        raise ReportFormatError(
            f"the report's {what} is longer than {MAX_TEXT_CHARS} characters; a radiology "
            "report is far shorter: send large content as an attachment"
        )
    return text


def clean_time(value: datetime | None) -> datetime | None:
    """Whole seconds, timezone-aware (a naive time is taken as this host's local time)."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.astimezone()
    return value.replace(microsecond=0)


@dataclass(frozen=True)
class PersonName:
    """A person's name in components, as HL7 XPN, CDA PN and FHIR HumanName carry it.

    ``middle`` holds second and further given names (HL7 XPN.3; FHIR ``given[1:]``).
    """

    family: str = ""
    given: str = ""
    middle: str = ""
    prefix: str = ""
    suffix: str = ""

    def __post_init__(self) -> None:
        for name in ("family", "given", "middle", "prefix", "suffix"):
            object.__setattr__(self, name, clean_line(getattr(self, name), "person name"))

    def __bool__(self) -> bool:
        return any((self.family, self.given, self.middle, self.prefix, self.suffix))

    @classmethod
    def from_dicom(cls, value: str) -> PersonName:
        """From a DICOM PN value ``family^given^middle^prefix^suffix`` (first group)."""
        parts = (value.split("=")[0].split("^") + [""] * 5)[:5]
        return cls(parts[0], parts[1], parts[2], parts[3], parts[4])

    def to_dicom(self) -> str:
        """As a DICOM PN value, trailing empty components dropped."""
        parts = [self.family, self.given, self.middle, self.prefix, self.suffix]
        return "^".join(parts).rstrip("^")

    def display(self) -> str:
        """For people: ``Dr. Hans Peter Müller Jr.``; CJK names family first (``山田 太郎``)."""
        if _CJK_RE.search(self.family):
            parts = [self.prefix, self.family, self.given, self.middle, self.suffix]
        else:
            parts = [self.prefix, self.given, self.middle, self.family, self.suffix]
        return " ".join(p for p in parts if p)


@dataclass
class Patient:
    """The patient a report is about.

    :param issuer: the assigning authority of ``id`` (a name or an OID).
    :param sex: one of :data:`SEXES`.
    """

    name: PersonName = field(default_factory=PersonName)
    id: str = ""
    issuer: str = ""
    birth_date: date | None = None
    sex: str = ""

    def __post_init__(self) -> None:
        self.id = clean_line(self.id, "patient ID")
        self.issuer = clean_line(self.issuer, "patient ID issuer")
        self.sex = (self.sex or "").strip().upper()[:1]
        if self.sex not in SEXES:
            raise ReportFormatError("the patient's sex must be M, F, O, U or empty")
        if isinstance(self.birth_date, datetime):
            self.birth_date = self.birth_date.date()


@dataclass
class Author:
    """Who wrote (and, for a final report, signed) the report."""

    name: PersonName = field(default_factory=PersonName)
    id: str = ""

    def __post_init__(self) -> None:
        self.id = clean_line(self.id, "author ID")


@dataclass(frozen=True)
class Code:
    """A coded concept (the procedure).

    :param system: the code system as a FHIR URI (``http://loinc.org``); see
        :mod:`emix_core.reports.codes` for how each format spells it. Empty for a
        local code.
    """

    code: str = ""
    display: str = ""
    system: str = ""

    def __post_init__(self) -> None:
        for name in ("code", "display", "system"):
            object.__setattr__(self, name, clean_line(getattr(self, name), "procedure code"))

    def __bool__(self) -> bool:
        return bool(self.code or self.display)


@dataclass(frozen=True)
class Identifier:
    """An instance identifier: HL7's II (CDA), EI (HL7 v2), a FHIR ``Identifier``.

    :param root: who issued it, an OID (``1.2.276.0.7230010.3.1``) or a UUID; alone,
        the root is the whole identifier.
    :param extension: the value within the root (``RPT-2025-0001``); may be empty.
    """

    root: str = ""
    extension: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", clean_line(self.root, "identifier root"))
        object.__setattr__(self, "extension", clean_line(self.extension, "identifier"))
        if self.root and not (is_valid_uid(self.root) or _UUID_RE.match(self.root)):
            raise ReportFormatError("an identifier's root must be an OID or a UUID")
        if self.extension and not self.root:
            raise ReportFormatError("an identifier with a value needs the OID that issued it")

    def __bool__(self) -> bool:
        return bool(self.root)

    def __str__(self) -> str:
        return f"{self.root}^{self.extension}" if self.extension else self.root


@dataclass
class Attachment:
    """A document that travels inside the report (a PDF, a key image)."""

    media_type: str
    data: bytes
    title: str = ""

    def __post_init__(self) -> None:
        self.media_type = clean_line(self.media_type, "attachment type").lower()
        if not _MEDIA_TYPE_RE.match(self.media_type):
            raise ReportFormatError("an attachment's media type is not of the form type/subtype")
        self.title = clean_line(self.title, "attachment title")


@dataclass
class Report:
    """A diagnostic imaging report.

    :param patient: who it is about.
    :param accession_number: the order's accession number (links report and study).
    :param study_instance_uid: the DICOM study it reads, if known. A report that
        matches no study is still a report: both links may be empty.
    :param procedure: what was done (``CT HEAD WO CONTRAST``).
    :param author: the reporting radiologist.
    :param status: ``preliminary``, ``final`` or ``amended``.
    :param findings: the findings section, plain text with ``\\n`` line ends.
    :param impression: the impression (conclusion) section.
    :param observation_time: when the study was performed.
    :param report_time: when the report was written or signed.
    :param attachments: documents carried with the report.
    :param facility: name of the performing facility.
    :param visit_number: the patient's visit (encounter) number, HL7 PV1-19.
    :param patient_class: PV1-2 (``I`` inpatient, ``O`` outpatient, ``E`` emergency...);
        ``U`` when a visit number is known without its class.

    Identifiers (see :mod:`emix_core.reports.identity`; they do not take part in
    ``==``, which compares what two reports *say*: a renderer invents stable ids for a
    report that has none, and a reader gives them back):

    :param document_id: this document (this version of the report).
    :param set_id: what every version of the report shares.
    :param version: 1 for the first version, then 2, 3... with each amendment.
    :param replaces: the document this one replaces (an amended report's predecessor).
    :param facility_oid: the OID of the issuing facility: identifiers it issues
        (documents, orders, authors) are made under it.
    :param language: the report's language as an IETF tag (``de-DE``); ``""`` is
        written as ``en-US``.
    """

    patient: Patient = field(default_factory=Patient)
    accession_number: str = ""
    study_instance_uid: str = ""
    procedure: Code = field(default_factory=Code)
    author: Author | None = None
    status: str = "final"
    findings: str = ""
    impression: str = ""
    observation_time: datetime | None = None
    report_time: datetime | None = None
    attachments: list[Attachment] = field(default_factory=list)
    facility: str = ""
    visit_number: str = ""
    patient_class: str = ""
    document_id: Identifier = field(default_factory=Identifier, compare=False)
    set_id: Identifier = field(default_factory=Identifier, compare=False)
    version: int = field(default=1, compare=False)
    replaces: Identifier = field(default_factory=Identifier, compare=False)
    facility_oid: str = field(default="", compare=False)
    language: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        self.accession_number = clean_line(self.accession_number, "accession number")
        self.study_instance_uid = clean_line(self.study_instance_uid, "study instance UID")
        if self.study_instance_uid and not is_valid_uid(self.study_instance_uid):
            raise ReportFormatError("the report's study instance UID is not a valid DICOM UID")
        self.status = (self.status or "").strip().lower()
        if self.status not in STATUSES:
            raise ReportFormatError("a report's status must be preliminary, final or amended")
        self.findings = clean_text(self.findings, "findings")
        self.impression = clean_text(self.impression, "impression")
        self.observation_time = clean_time(self.observation_time)
        self.report_time = clean_time(self.report_time)
        self.facility = clean_line(self.facility, "facility name")
        if self.author is not None and not (self.author.name or self.author.id):
            self.author = None
        self.visit_number = clean_line(self.visit_number, "visit number")
        self.patient_class = (self.patient_class or "").strip().upper()[:1]
        if self.patient_class not in PATIENT_CLASSES:
            raise ReportFormatError("the patient class must be an HL7 table 0004 code (I, O, E...)")
        if self.visit_number and not self.patient_class:
            self.patient_class = "U"
        if not isinstance(self.version, int) or not 1 <= self.version <= 999_999:
            raise ReportFormatError("a report's version number must be 1 to 999999")
        self.facility_oid = clean_line(self.facility_oid, "facility OID")
        if self.facility_oid and not is_valid_uid(self.facility_oid):
            raise ReportFormatError("the facility OID is not a valid OID (digits and dots)")
        self.language = clean_line(self.language, "language")
        if self.language and not _LANGUAGE_RE.match(self.language):
            raise ReportFormatError("the report's language is not a language tag like en-US")
