"""Reports and attachments that travel next to the images, recognised by content.

emix sends DICOM and a few document formats a receiving facility can act on: PDF, RTF,
HL7 v2 messages, CDA documents, FHIR JSON resources and plain text. Each is recognised by
its first bytes, never by its file name; anything else is refused. File names given by a
sender are only ever shown or used after :func:`safe_name`.
"""

from __future__ import annotations

import codecs
import os
import re
import threading
import unicodedata
from collections import OrderedDict
from pathlib import Path

from emix_core.content.dicom import DicomInstance, inspect_instance, is_dicom
from emix_core.content.safe_open import open_regular
from emix_core.errors import NotDicomError

__all__ = ["DICOM", "REPORT_MEDIA_TYPES", "classify", "safe_name", "sniff_document"]

DICOM = "application/dicom"
PDF = "application/pdf"
RTF = "application/rtf"
HL7V2 = "application/hl7-v2"
CDA = "application/cda+xml"
FHIR_JSON = "application/fhir+json"
TEXT = "text/plain"
#: The media types emix keeps reports in (what a report page renders or a chart receives).
REPORT_MEDIA_TYPES = (PDF, HL7V2, CDA, FHIR_JSON, RTF, TEXT)

TEXT_WINDOW = 64 * 1024
XML_WINDOW = 8 * 1024
JSON_WINDOW = 1024
MAX_NAME_CHARS = 120
#: Most file systems limit a name to 255 bytes; leave room for a numbering prefix.
MAX_NAME_BYTES = 240

BOMS = (
    (codecs.BOM_UTF8, "utf-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le"),
    (codecs.BOM_UTF16_BE, "utf-16-be"),
)
#: Control characters that ordinary text files contain (tab, line ends, form feed, escape).
TEXT_CONTROLS = frozenset("\t\n\r\f\v\x1b")

# prolog: XML declaration, processing instructions, comments, a document type declaration
XML_PROLOG = re.compile(
    r"\s*(?:<\?.*?\?>|<!--.*?-->|<!DOCTYPE[^\[>]*(?:\[.*?\])?\s*>)", re.DOTALL | re.IGNORECASE
)
XML_ROOT = re.compile(r"<(?:([A-Za-z_][\w.-]*):)?ClinicalDocument(\s[^<>]*)?/?>")
XML_NAMESPACE = "urn:hl7-org:v3"
FHIR_RESOURCE = re.compile(r'\A\s*\{.*?"resourceType"\s*:\s*"[A-Z][A-Za-z]+"', re.DOTALL)

WINDOWS_FORBIDDEN = re.compile(r'[<>:"|?*]')
WINDOWS_DEVICES = frozenset(
    ["CON", "PRN", "AUX", "NUL"] + [f"{d}{i}" for d in ("COM", "LPT") for i in range(1, 10)]
)


def sniff_document(path: Path) -> str | None:
    """The media type of a supported document, judged by its content; ``None`` otherwise.

    Only the first 64 KiB are read. XML is inspected as text (no parser, so no entity is
    ever expanded here).
    """
    with open_regular(path) as fp:
        head = fp.read(TEXT_WINDOW)
    if not head:
        return None
    if head.startswith(b"%PDF-"):
        return PDF
    if head.startswith(b"{\\rtf"):
        return RTF
    if _is_hl7v2(head):
        return HL7V2
    text = _decode(head)
    if text is None:
        return None
    if _is_cda(text[:XML_WINDOW]):
        return CDA
    if FHIR_RESOURCE.match(text[:JSON_WINDOW]):
        return FHIR_JSON
    if any(ch < " " and ch not in TEXT_CONTROLS for ch in text):
        return None
    return TEXT


#: Files classified lately, by identity and change time: a gateway inspects a dropped file
#: when it lands and again when it sends it; the second look is free if nothing changed.
_CLASSIFIED: OrderedDict[tuple[int, ...], tuple[str, DicomInstance | None]] = OrderedDict()
_CLASSIFIED_MAX = 4096
_CLASSIFIED_LOCK = threading.Lock()


def _identity(path: Path) -> tuple[int, ...] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    # ctime changes with any write or rename and cannot be set back by a user
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def classify(path: Path) -> tuple[str, DicomInstance | None]:
    """``("application/dicom", instance)`` for DICOM, ``(media type, None)`` for a document.

    A file classified before and not changed since (same inode, size, modification and
    change times) is not read again.

    :raises NotDicomError: neither DICOM nor a supported document.
    :raises TruncatedDicomError: a DICOM file ends before its declared content.
    :raises InvalidInput: a DICOMDIR, a malformed DICOM file or a hostile UID.
    :raises OSError: the file cannot be read.
    """
    before = _identity(path)
    with _CLASSIFIED_LOCK:
        known = _CLASSIFIED.get(before) if before else None
    if known is not None:
        return known
    found = _classify(path)
    if before is not None and before == _identity(path):  # unchanged while it was read
        with _CLASSIFIED_LOCK:
            _CLASSIFIED[before] = found
            while len(_CLASSIFIED) > _CLASSIFIED_MAX:
                _CLASSIFIED.popitem(last=False)
    return found


def _classify(path: Path) -> tuple[str, DicomInstance | None]:
    if is_dicom(path):
        return DICOM, inspect_instance(path)
    media_type = sniff_document(path)
    if media_type is None:
        name = safe_name(path.name, fallback="(unnamed file)")
        if path.stat().st_size == 0:
            raise NotDicomError(f"{name}: the file is empty; nothing to send")
        raise NotDicomError(
            f"{name}: not DICOM and not a recognised document (PDF, RTF, HL7 v2, CDA, "
            "FHIR JSON, text)"
        )
    return media_type, None


def safe_name(name: str, fallback: str) -> str:
    """A file name safe to create anywhere: the base name of ``name`` without path
    separators, control characters, ``..``, leading dots or characters Windows refuses,
    at most 120 characters (the extension kept). Unicode letters stay.

    :param name: a name from outside (a sender, a zip entry, a DICOMDIR).
    :param fallback: returned when nothing usable is left; must itself be safe.
    """
    name = unicodedata.normalize("NFC", str(name))
    # controls (NUL included), format characters (bidi overrides), line separators
    name = "".join(ch for ch in name if unicodedata.category(ch) not in {"Cc", "Cf", "Zl", "Zp"})
    name = re.split(r"[/\\]", name)[-1]
    name = WINDOWS_FORBIDDEN.sub("_", name)
    name = re.sub(r"\.{2,}", ".", name)
    name = re.sub(r"^[\s.]+|[\s.]+$", "", name)
    if name.split(".")[0].upper() in WINDOWS_DEVICES:
        name = "_" + name
    name = _shorten(name)
    return name or fallback


def _shorten(name: str) -> str:
    stem, dot, extension = name.rpartition(".")
    if not dot or not stem or len(extension) > 16:
        stem, dot, extension = name, "", ""
    suffix = dot + extension
    while stem and (
        len(stem) + len(suffix) > MAX_NAME_CHARS
        or len((stem + suffix).encode("utf-8")) > MAX_NAME_BYTES
    ):
        stem = stem[: min(len(stem) - 1, MAX_NAME_CHARS - len(suffix))]
    return (re.sub(r"[\s.]+$", "", stem) + suffix) if stem else ""


def _decode(head: bytes) -> str | None:
    """``head`` as text (UTF-8, or UTF-16 with a byte order mark), ``None`` if binary."""
    encoding = "utf-8"
    for bom, candidate in BOMS:
        if head.startswith(bom):
            head, encoding = head[len(bom) :], candidate
            break
    if encoding == "utf-8" and b"\0" in head:
        return None
    try:
        # the window may end inside a multi-byte character: do not count that as binary
        text = codecs.getincrementaldecoder(encoding)().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    return None if "\0" in text else text


def _is_hl7v2(head: bytes) -> bool:
    """``MSH`` (or a batch header) followed by a field separator and encoding characters,
    e.g. ``MSH|^~\\&|``. An MLLP start byte or a UTF-8 BOM in front is tolerated."""
    head = head.removeprefix(b"\x0b").removeprefix(codecs.BOM_UTF8)
    if head[:3] not in (b"MSH", b"FHS", b"BHS") or len(head) < 8:
        return False
    separator = head[3:4]
    if not _is_delimiter(separator):
        return False
    encoding_characters, found, _ = head[4:10].partition(separator)
    return (
        bool(found)
        and 2 <= len(encoding_characters) <= 5
        and all(_is_delimiter(bytes([c])) for c in encoding_characters)
        and len(set(encoding_characters)) == len(encoding_characters)
    )


def _is_delimiter(char: bytes) -> bool:
    return len(char) == 1 and 0x21 <= char[0] <= 0x7E and not char.isalnum()


def _is_cda(text: str) -> bool:
    """True when the root element is ``ClinicalDocument`` in the HL7 v3 namespace."""
    position = 0
    while match := XML_PROLOG.match(text, position):
        position = match.end()
    text = text[position:].lstrip()
    root = XML_ROOT.match(text)
    if root is None:
        return False
    prefix, attributes = root.group(1), root.group(2) or ""
    declaration = r"xmlns:" + re.escape(prefix) if prefix else r"xmlns"
    namespace = re.search(declaration + r"\s*=\s*([\"'])(.*?)\1", attributes)
    return namespace is not None and namespace.group(2) == XML_NAMESPACE
