"""The attributes a search answers with, per level, in the DICOM JSON model (PS3.18 F.2).

A *record* maps keywords to lists of values; :func:`to_json` turns the chosen keywords of
a record into DICOM JSON. The required return keys are those of PS3.18 Tables
10.6.3-3 (study), 10.6.3-4 (series) and 10.6.3-5 (instance).
"""

from __future__ import annotations

from typing import Any

from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword

from emix_core import InvalidInput

__all__ = [
    "INSTANCE_KEYS",
    "SERIES_KEYS",
    "STUDY_KEYS",
    "Record",
    "keyword_of",
    "tag_of",
    "to_json",
    "vr_of",
]

Record = dict[str, list[Any]]

STUDY_KEYS = (
    "SpecificCharacterSet",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "InstanceAvailability",
    "ModalitiesInStudy",
    "ReferringPhysicianName",
    "RetrieveURL",
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
)
SERIES_KEYS = (
    "SpecificCharacterSet",
    "Modality",
    "SeriesDescription",
    "RetrieveURL",
    "SeriesInstanceUID",
    "SeriesNumber",
    "NumberOfSeriesRelatedInstances",
    "StudyInstanceUID",
)
INSTANCE_KEYS = (
    "SpecificCharacterSet",
    "SOPClassUID",
    "SOPInstanceUID",
    "InstanceAvailability",
    "RetrieveURL",
    "InstanceNumber",
    "Rows",
    "Columns",
    "BitsAllocated",
    "NumberOfFrames",
    "StudyInstanceUID",
    "SeriesInstanceUID",
)


def keyword_of(name: str) -> str:
    """A query or includefield name (keyword or 8 hex digits) as a keyword.

    :raises InvalidInput: neither a known keyword nor a known tag.
    """
    text = name.strip()
    if len(text) == 8 and all(c in "0123456789abcdefABCDEF" for c in text):
        keyword = keyword_for_tag(int(text, 16))
        if keyword:
            return keyword
    elif tag_for_keyword(text) is not None:
        return text
    raise InvalidInput("a search names an attribute that is not a DICOM keyword or tag")


def tag_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return f"{tag:08X}"


def vr_of(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return dictionary_VR(tag).split(" ")[0]


def to_json(record: Record, keys: set[str] | None) -> dict[str, Any]:
    """The record's attributes named in ``keys`` (all when ``None``), sorted by tag; a key
    the record lacks is given with no value, as PS3.18 asks for required keys."""
    names = set(record) if keys is None else keys
    out: dict[str, Any] = {}
    for keyword in sorted(names, key=tag_of):
        vr = vr_of(keyword)
        values = [v for v in record.get(keyword, []) if v not in (None, "")]
        if vr == "PN":
            values = [{"Alphabetic": str(v)} for v in values]
        elif vr in ("IS", "US", "UL", "SS", "SL"):
            values = [int(v) for v in values]
        elif vr == "DS":
            values = [float(v) for v in values]
        out[tag_of(keyword)] = {"vr": vr, "Value": values} if values else {"vr": vr}
    return out
