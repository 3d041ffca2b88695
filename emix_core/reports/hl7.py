"""HL7 v2.5.1 ORU^R01: the observation result message EMR interface engines import.

Layout written (and read back):

- ``MSH``: MSH-4 the facility (``name^OID^ISO``), MSH-10 a control id derived from the
  report's document id and version (the same report sent again has the same MSH-10).
- ``PID``: PID-3 patient ID with its issuer (CX.4), PID-5 name, PID-7 birth date, PID-8 sex.
- ``PV1`` (when the visit is known): PV1-2 patient class, PV1-19 visit number.
- ``ORC`` (when the order is known): ORC-1 ``RE``, ORC-3 accession number, ORC-5 ``CM``.
- ``OBR``: OBR-3 accession number (an EI under the facility's orders OID), OBR-4
  procedure, OBR-7 observation time, OBR-22 report time, OBR-25 status (P, F, C =
  amended), OBR-32 the reporting radiologist.
- ``OBX``: one per section, formatted text (``FT``, lines joined by ``\\.br\\``); OBX-3
  ``18782-3^Findings^LN`` or ``19005-8^Impression^LN``; the study instance UID as ``ST`` under
  ``113014^DICOM Study^DCM``; attachments as ``ED`` (Base64) under ``18748-4``;
  OBX-23 the performing facility (XON.10 its OID).

Every value is escaped (``| ^ & ~ \\`` and control characters), so no text, ours or
a sender's, can open a field or a segment. Reading accepts CR, CRLF or LF-only
segment ends (files saved on Unix), MLLP framing, the charsets of MSH-18, and the
``&GDT`` / ``&IMP`` codes common in RIS feeds; it refuses delimiters other than
``|^~\\&`` and more than :data:`MAX_SEGMENTS` segments. One OBX per line of text
(``TX``, as many RIS send) reads as well.

hl7apy checks the structure of every message written, and of the header segments
(MSH, PID, OBR) of every message read: it spends about a millisecond per segment,
so observation segments are read by emix alone, and reading stays linear.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime

from emix_core.errors import ReportFormatError
from emix_core.reports import identity
from emix_core.reports.codes import is_oid, system_from_hl7, system_to_hl7
from emix_core.reports.dtm import format_date, format_ts, parse_date, parse_ts
from emix_core.reports.model import (
    PATIENT_CLASSES,
    Attachment,
    Author,
    Code,
    Patient,
    PersonName,
    Report,
    is_valid_uid,
)

__all__ = ["MEDIA_TYPE", "MAX_SEGMENTS", "escape", "unescape", "parse", "render", "with_header"]

MEDIA_TYPE = "application/hl7-v2"
VERSION = "2.5.1"
ENCODING_CHARACTERS = "^~\\&"
#: HL7's explicit null, for required fields emix has no value for (PID-3, PID-5, OBR-4).
NULL = '""'
#: More segments than any report needs (one OBX per line of text).
MAX_SEGMENTS = 20_000

FINDINGS = ("18782-3", "Findings", "LN")
IMPRESSION = ("19005-8", "Impression", "LN")
STUDY_UID = ("113014", "DICOM Study", "DCM")
ATTACHMENT = "18748-4"
_FINDINGS_CODES = {"18782-3", "59776-5", "&GDT", "GDT"}
_IMPRESSION_CODES = {"19005-8", "&IMP", "IMP"}

_STATUS_TO_HL7 = {"preliminary": "P", "final": "F", "amended": "C"}
_STATUS_FROM_HL7 = {
    "F": "final",
    "C": "amended",
    "P": "preliminary",
    "R": "preliminary",
    "S": "preliminary",
    "I": "preliminary",
    "A": "preliminary",
}
_SEX_FROM_HL7 = {"A": "O", "N": "U"}
_CHARSETS = {
    "UNICODE UTF-8": "utf-8",
    "UNICODE": "utf-8",
    "UTF-8": "utf-8",
    "8859/1": "latin-1",
    "8859/15": "iso8859-15",
    "ASCII": "ascii",
}

_ESCAPES = (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\"))
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_ESCAPE_SEQ_RE = re.compile(
    r"\\(F|S|T|R|E|H|N|\.br|\.sp(?: ?\d+)?|\.(?:in|ti|sk)(?: ?[+-]?\d+)?|\.(?:fi|nf|ce)"
    r"|X[0-9A-Fa-f]*|C[0-9A-Fa-f]{4}|M[0-9A-Fa-f]{4,6}|Z[^\\|^&~]*)\\"
)


# --------------------------------------------------------------------------- escaping


def escape(value: str) -> str:
    """Escape a value for an HL7 v2 field: delimiters and every control character."""
    for raw, escaped in _ESCAPES:
        value = value.replace(raw, escaped)
    return _CONTROL_RE.sub(lambda m: f"\\X{ord(m.group()):02X}\\", value)


def unescape(value: str, charset: str = "utf-8") -> str:
    """Undo HL7 v2 escapes; formatting commands become line breaks or nothing.

    A decoded ``\\X0D\\`` is text, never a segment end: segments were split before.
    """
    if "\\" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        seq = match.group(1)
        simple = {"F": "|", "S": "^", "T": "&", "R": "~", "E": "\\"}
        if seq in simple:
            return simple[seq]
        if seq == ".br" or seq.startswith(".sp"):
            return "\n"
        if seq.startswith("X"):
            hex_digits = seq[1:]
            if len(hex_digits) % 2:
                return ""
            return bytes.fromhex(hex_digits).decode(charset, errors="replace")
        return ""  # highlighting, character-set switches, local escapes

    return _ESCAPE_SEQ_RE.sub(replace, value)


# --------------------------------------------------------------------------- render


def _name(name: PersonName, sep: str = "^") -> str:
    parts = [name.family, name.given, name.middle, name.suffix, name.prefix]
    return sep.join(escape(p) for p in parts).rstrip(sep)


def _code(code: Code) -> str:
    if not code:
        return ""
    system = system_to_hl7(code.system)
    return f"{escape(code.code)}^{escape(code.display)}^{escape(system)}"


def _segment(name: str, fields: dict[int, str]) -> str:
    last = max((i for i, v in fields.items() if v), default=0)
    return "|".join([name] + [fields.get(i, "") for i in range(1, last + 1)])


def _ei(value: str, root: str) -> str:
    """An entity identifier (EI): ``value^^root^ISO``."""
    return f"{escape(value)}^^{root}^ISO" if value else ""


def render(report: Report) -> bytes:
    """Render an ORU^R01 message (segments end with CR, UTF-8).

    MSH-10 is derived from the report's document id and version
    (:func:`~emix_core.reports.identity.message_control_id`): the same report sent
    again carries the same control id, so an interface engine can drop the copy.
    """
    status = _STATUS_TO_HL7[report.status]
    now = datetime.now(UTC).astimezone().replace(microsecond=0)
    oid = identity.facility_root(report)
    # HD.1 is an IS of 20 characters: the full name travels in OBX-23
    sending_facility = f"{escape(report.facility[:20].strip())}^{oid}^ISO"
    msh = (
        f"MSH|{ENCODING_CHARACTERS}|EMIX|{sending_facility}|||{format_ts(now)}||"
        f"ORU^R01^ORU_R01|{identity.message_control_id(report)}|P|{VERSION}||||||UNICODE UTF-8"
    )
    patient = report.patient
    if is_oid(patient.issuer):
        issuer = f"&{patient.issuer}&ISO"
    else:
        issuer = f"{escape(patient.issuer)}&{identity.arc(report, identity.PATIENTS)}&ISO"
    cx = f"{escape(patient.id)}^^^{issuer}^MR" if patient.id else NULL
    pid = _segment(
        "PID",
        {
            1: "1",
            3: cx,
            5: _name(patient.name) or NULL,
            7: format_date(patient.birth_date),
            8: patient.sex,
        },
    )
    segments = [msh, pid]
    if report.visit_number:
        visits = identity.arc(report, identity.VISITS)
        visit = f"{escape(report.visit_number)}^^^&{visits}&ISO^VN"
        segments.append(_segment("PV1", {1: "1", 2: report.patient_class, 19: visit}))
    order = _ei(report.accession_number, identity.arc(report, identity.ORDERS))
    if order:
        # ORC-1 RE: observations to follow; ORC-5 CM: the order is complete
        segments.append(_segment("ORC", {1: "RE", 3: order, 5: "CM"}))
    author = ""
    if report.author:
        author = escape(report.author.id) + "&" + _name(report.author.name, "&")
        author = author.rstrip("&")
    obr = _segment(
        "OBR",
        {
            1: "1",
            3: order,
            4: _code(report.procedure) or NULL,
            7: format_ts(report.observation_time),
            22: format_ts(report.report_time),
            25: status,
            32: author,
        },
    )
    segments.append(obr)
    header_count = len(segments)
    facility = f"{escape(report.facility)}^^^^^^^^^{oid}"  # XON.10: the facility's OID

    def obx(value_type: str, code: tuple[str, str, str], sub_id: str, value: str) -> None:
        number = str(len(segments) - header_count + 1)
        identifier = "^".join(escape(part) for part in code)
        segments.append(
            _segment(
                "OBX",
                {
                    1: number,
                    2: value_type,
                    3: identifier,
                    4: sub_id,
                    5: value,
                    11: status,
                    14: format_ts(report.observation_time),
                    23: facility,
                },
            )
        )

    if report.study_instance_uid:
        obx("ST", STUDY_UID, "1", report.study_instance_uid)
    sections = ((report.findings, FINDINGS, "2"), (report.impression, IMPRESSION, "3"))
    for text, code, sub_id in sections:
        if text:
            obx("FT", code, sub_id, "\\.br\\".join(escape(line) for line in text.split("\n")))
    for number, attachment in enumerate(report.attachments, start=4):
        kind, _, subtype = attachment.media_type.partition("/")
        data = base64.b64encode(attachment.data).decode("ascii")
        value = f"^{escape(kind)}^{escape(subtype)}^Base64^{data}"
        obx("ED", (ATTACHMENT, attachment.title, "LN"), str(number), value)
    if len(segments) == header_count and report.facility:
        obx("FT", FINDINGS, "2", "")  # an empty text, to carry the facility (OBX-23)
    message = "\r".join(segments) + "\r"
    _check_structure(message)
    return message.encode("utf-8")


def _check_structure(message: str) -> None:
    """Have hl7apy read what we wrote: a bug must not reach an EMR."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    try:
        parsed = parse_message(message, validation_level=VALIDATION_LEVEL.TOLERANT)
    except Exception as exc:  # hl7apy raises many types; their text may hold PHI
        raise ReportFormatError(
            f"the HL7 message emix built does not parse ({type(exc).__name__})"
        ) from None
    if parsed.name != "ORU_R01":
        raise ReportFormatError("the HL7 message emix built is not an ORU^R01")


def with_header(
    message: bytes,
    *,
    sending_application: str | None = None,
    sending_facility: str | None = None,
    receiving_application: str | None = None,
    receiving_facility: str | None = None,
) -> bytes:
    """Set MSH-3 to MSH-6 (routing fields an interface engine expects) on a message."""
    text = message.decode("utf-8")
    msh, sep, rest = text.partition("\r")
    fields = msh.split("|")
    fields += [""] * max(0, 7 - len(fields))
    for index, value in (
        (2, sending_application),
        (3, sending_facility),
        (4, receiving_application),
        (5, receiving_facility),
    ):
        if value is not None:
            fields[index] = escape(value)
    return ("|".join(fields) + sep + rest).encode("utf-8")


# --------------------------------------------------------------------------- parse


def _decode(data: bytes) -> tuple[str, str]:
    if data.startswith(b"\x0b"):
        data = data[1:]
    data = data.removeprefix(b"\xef\xbb\xbf")
    if data.endswith(b"\x1c\r"):
        data = data[:-2]
    data = data.lstrip(b"\r\n\t ")
    if not data.startswith(b"MSH"):
        raise ReportFormatError("not an HL7 v2 message: it must start with an MSH segment")
    if data[3:9] != b"|^~\\&|":
        raise ReportFormatError(
            "the HL7 message's delimiters (MSH-1, MSH-2) are not the standard |^~\\&: "
            "emix reads only standard delimiters; fix the sending interface"
        )
    head = data[: data.find(b"\r") if b"\r" in data else 2048].split(b"\n")[0]
    fields = head.decode("latin-1").split("|")
    declared = fields[17].split("~")[0].strip().upper() if len(fields) > 17 else ""
    charset = _CHARSETS.get(declared, "utf-8" if not declared else "")
    if not charset:
        raise ReportFormatError(
            f"the HL7 character set (MSH-18) {declared[:20]!r} is not supported"
        )
    try:
        return data.decode(charset), charset
    except UnicodeDecodeError:
        if declared:
            raise ReportFormatError(
                f"the HL7 message is not valid {charset} although MSH-18 says so"
            ) from None
        return data.decode("latin-1"), "latin-1"


def _split_segments(text: str) -> list[str]:
    # CRLF and LF-only line ends are accepted: a raw LF is never valid inside an HL7
    # value (it must be escaped), so it can only be a segment end written on Unix.
    text = text.replace("\r\n", "\r").replace("\n", "\r")
    if text.count("\r") > MAX_SEGMENTS:
        raise ReportFormatError(f"the HL7 message has more than {MAX_SEGMENTS} segments")
    return [s for s in text.split("\r") if s.strip()]


class _Segment:
    """Field access on one segment: ``seg[5]`` is field 5 (MSH counts MSH-1 too)."""

    def __init__(self, text: str, charset: str) -> None:
        self.name = text[:3]
        self.fields = text.split("|")
        if self.name == "MSH":
            self.fields.insert(1, "|")
        self.charset = charset

    def raw(self, index: int) -> str:
        value = self.fields[index] if index < len(self.fields) else ""
        return value.split("~")[0]

    def component(self, index: int, comp: int = 1, sub: int = 1) -> str:
        components = self.raw(index).split("^")
        value = components[comp - 1] if comp <= len(components) else ""
        subs = value.split("&")
        value = subs[sub - 1] if sub <= len(subs) else ""
        return "" if value == NULL else unescape(value, self.charset)

    def components(self, index: int) -> list[str]:
        return self.raw(index).split("^")

    def repetitions(self, index: int) -> list[str]:
        value = self.fields[index] if index < len(self.fields) else ""
        return [unescape(v, self.charset) for v in value.split("~")]


def _check_header(segments: list[str]) -> None:
    """hl7apy reads the segments that say whose report it is (MSH, PID, OBR)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_segment

    try:
        for segment in segments:
            if segment[:3] in ("MSH", "PID", "OBR"):
                parse_segment(segment, version=VERSION, validation_level=VALIDATION_LEVEL.TOLERANT)
    except Exception as exc:  # hl7apy raises many types; their text may hold PHI
        raise ReportFormatError(f"the HL7 message is malformed ({type(exc).__name__})") from None


def parse(data: bytes) -> Report:
    """Read an ORU^R01 message (the first order observation) into a report.

    :raises ReportFormatError: not an ORU^R01, non-standard delimiters, malformed.
    """
    text, charset = _decode(data)
    raw_segments = _split_segments(text)
    msh = _Segment(raw_segments[0], charset)
    message_type = (msh.component(9, 1), msh.component(9, 2))
    if message_type != ("ORU", "R01"):
        shown = "^".join(part[:8] for part in message_type)
        raise ReportFormatError(f"the HL7 message is {shown}, not a report (ORU^R01)")
    _check_header(raw_segments)
    segments = [_Segment(s, charset) for s in raw_segments]

    pid = next((s for s in segments if s.name == "PID"), None)
    obr_index = next((i for i, s in enumerate(segments) if s.name == "OBR"), None)
    if obr_index is None:
        raise ReportFormatError("the HL7 report has no OBR segment")
    obr = segments[obr_index]
    observations: list[_Segment] = []
    notes: list[_Segment] = []
    for seg in segments[obr_index + 1 :]:
        if seg.name == "OBR":
            break  # a second order: emix reads one report per message
        if seg.name == "OBX":
            observations.append(seg)
        elif seg.name == "NTE":
            notes.append(seg)

    findings: list[str] = []
    impression: list[str] = []
    attachments: list[Attachment] = []
    study_uid = ""
    facility = ""
    for obx in observations:
        code = obx.component(3, 1).upper()
        label = obx.component(3, 2)
        value_type = obx.component(2).upper()
        facility = facility or obx.component(23)
        if value_type == "ED":
            attachments.append(_attachment(obx, label))
        elif code == STUDY_UID[0] or label.lower() in ("study instance uid", "dicom study"):
            study_uid = study_uid or obx.component(5).strip()
        elif code in _IMPRESSION_CODES or label.lower() == "impression":
            impression.extend(_text_lines(obx))
        elif value_type in ("TX", "FT", "ST", ""):
            findings.extend(_text_lines(obx))
    if not findings:
        for note in notes:
            findings.extend(note.repetitions(3))
    zds = next((s for s in segments if s.name == "ZDS"), None)
    if not study_uid and zds is not None:
        study_uid = zds.component(1)
    if study_uid and not is_valid_uid(study_uid):
        raise ReportFormatError("the HL7 report's study instance UID is not a valid DICOM UID")

    status_code = obr.component(25) or (observations[0].component(11) if observations else "")
    status = _STATUS_FROM_HL7.get(status_code.upper(), "preliminary")
    if status_code.upper() in ("X", "D", "W"):
        raise ReportFormatError("the HL7 report is cancelled or deleted (result status X/D/W)")

    facility_oid = next(
        (o.component(23, 10) for o in observations if is_oid(o.component(23, 10))), ""
    ) or (msh.component(4, 2) if is_oid(msh.component(4, 2)) else "")
    pv1 = next((s for s in segments if s.name == "PV1"), None)
    patient_class = pv1.component(2).upper()[:1] if pv1 else ""
    return Report(
        patient=_patient(pid, facility_oid) if pid else Patient(),
        accession_number=obr.component(3) or obr.component(2) or obr.component(18),
        study_instance_uid=study_uid,
        procedure=Code(
            obr.component(4, 1), obr.component(4, 2), system_from_hl7(obr.component(4, 3))
        ),
        author=_author(obr),
        status=status,
        findings="\n".join(findings),
        impression="\n".join(impression),
        observation_time=parse_ts(obr.component(7)),
        report_time=parse_ts(obr.component(22)),
        attachments=attachments,
        facility=facility or msh.component(4),
        visit_number=pv1.component(19) if pv1 else "",
        patient_class=patient_class if patient_class in PATIENT_CLASSES else "",
        facility_oid=facility_oid if len(facility_oid) <= 64 else "",
    )


def _text_lines(obx: _Segment) -> list[str]:
    return "\n".join(obx.repetitions(5)).split("\n")


def _attachment(obx: _Segment, title: str) -> Attachment:
    parts = obx.components(5)
    parts += [""] * (5 - len(parts))
    kind, subtype, encoding, payload = (unescape(p, obx.charset) for p in parts[1:5])
    kind = {"AP": "application", "IM": "image", "TEXT": "text"}.get(kind.upper(), kind.lower())
    media_type = f"{kind}/{subtype.lower()}"
    if encoding.upper() == "A":
        return Attachment(media_type=media_type, data=payload.encode(), title=title)
    if encoding.upper() != "BASE64":
        raise ReportFormatError("an HL7 ED attachment is neither Base64 nor ASCII encoded")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ReportFormatError("an HL7 ED attachment holds invalid Base64") from None
    return Attachment(media_type=media_type, data=data, title=title)


def _patient(pid: _Segment, facility_oid: str) -> Patient:
    universal = pid.component(3, 4, 2)
    if facility_oid and universal == f"{facility_oid}.{identity.PATIENTS}":
        universal = ""  # the facility's own patient ids: no issuer was named
    issuer = pid.component(3, 4, 1) or universal
    sex = pid.component(8).upper()[:1]
    return Patient(
        name=PersonName(
            family=pid.component(5, 1),
            given=pid.component(5, 2),
            middle=pid.component(5, 3),
            suffix=pid.component(5, 4),
            prefix=pid.component(5, 5),
        ),
        id=pid.component(3, 1),
        issuer=issuer,
        birth_date=parse_date(pid.component(7)),
        sex=_SEX_FROM_HL7.get(sex, sex if sex in ("M", "F", "O", "U") else ""),
    )


def _author(obr: _Segment) -> Author | None:
    author = Author(
        id=obr.component(32, 1, 1),
        name=PersonName(
            family=obr.component(32, 1, 2),
            given=obr.component(32, 1, 3),
            middle=obr.component(32, 1, 4),
            suffix=obr.component(32, 1, 5),
            prefix=obr.component(32, 1, 6),
        ),
    )
    return author if (author.id or author.name) else None
