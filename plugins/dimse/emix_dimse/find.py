"""The C-FIND SCP of ``emix dimse listen``: a PACS or workstation queries emix.

What is searched is what the listener's facility may read on the hub: the studies that
other facilities sent to it and the ones it sent (the hub's ``/dicomweb`` for its token).
That is what an integration engineer expects from a node named "emix" in the PACS's
list: "which studies from outside are waiting for us?". The identifier is turned into a
QIDO-RS query and the hub matches it exactly as its DICOMweb service does (PS3.4
C.2.2.2: wildcards, date and time ranges, UID lists, case-insensitive person names);
each match is answered with the keys the identifier asked for.

Study Root and Patient Root information models; levels PATIENT (Patient Root), STUDY,
SERIES and IMAGE. Sequence matching is not supported (sequence keys come back empty).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataset import Dataset
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelFind,
)

from emix_core import (
    AuditAction,
    AuditEvent,
    AuditOutcome,
    EmixError,
    HubClient,
    InvalidInput,
    LocalHome,
    log_event,
)

__all__ = ["FindService", "query_of", "answer_of", "FIND_CONTEXTS"]

log = logging.getLogger("emix.dimse")

#: The information models the listener answers C-FIND in.
FIND_CONTEXTS = (
    StudyRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelFind,
)
#: Query/Retrieve Level -> the hub's QIDO-RS resource.
RESOURCES = {"PATIENT": "studies", "STUDY": "studies", "SERIES": "series", "IMAGE": "instances"}
#: Keys of the patient level (Patient Root, PS3.4 C.6.1.1.2): a PATIENT query asks the
#: studies for these and answers each patient once.
PATIENT_KEYS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex")

# C-FIND statuses (PS3.4 C.4.1.1.4)
SUCCESS = 0x0000
PENDING = 0xFF00
CANCELLED = 0xFE00
IDENTIFIER_MISMATCH = 0xA900
UNABLE_TO_PROCESS = 0xC000
OUT_OF_RESOURCES = 0xA700
#: Answers are stopped after this many matches (the SCU should narrow its query).
MAX_MATCHES = 10_000


@dataclass
class FindQuery:
    """A C-FIND identifier read as a QIDO-RS query."""

    level: str
    keys: list[str]
    params: list[tuple[str, str]]


def _text(value: Any) -> str:
    if isinstance(value, list | tuple):  # a MultiValue: UID lists and the like
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def query_of(identifier: Dataset) -> FindQuery:
    """The QIDO-RS parameters of a C-FIND identifier.

    An empty (or ``*``) key asks for the attribute to be returned (``includefield``);
    any other value is matched by the hub. Private and unknown elements are ignored.

    :raises InvalidInput: no or an unknown Query/Retrieve Level.
    """
    level = _text(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in RESOURCES:
        raise InvalidInput("the C-FIND identifier has no valid Query/Retrieve Level")
    keys: list[str] = []
    params: list[tuple[str, str]] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or element.tag.is_private or element.tag.group < 0x0008:
            continue
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        keys.append(keyword)
        if element.VR == "SQ":
            continue  # sequence matching is not supported: returned empty
        text = _text(element.value).strip()
        if text in ("", "*"):
            params.append(("includefield", keyword))
        else:
            params.append((keyword, text))
    if level == "PATIENT":
        params += [("includefield", k) for k in PATIENT_KEYS]
    return FindQuery(level, keys, params)


def answer_of(query: FindQuery, match: dict[str, Any]) -> Dataset:
    """One C-FIND response identifier: the keys asked for, from one QIDO-RS match."""
    found = Dataset.from_json(match)
    answer = Dataset()
    answer.QueryRetrieveLevel = query.level
    for keyword in query.keys:
        if keyword in found:
            answer[keyword] = found[keyword]
            continue
        number = tag_for_keyword(keyword)
        if number is None:
            continue
        vr = dictionary_VR(number).split(" ")[0]
        answer.add_new(number, vr, [] if vr == "SQ" else None)
    if any(_non_ascii(e.value) for e in answer if e.VR != "SQ"):
        answer.SpecificCharacterSet = "ISO_IR 192"  # the hub's DICOM JSON is UTF-8
    return answer


def _non_ascii(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return any(_non_ascii(v) for v in value)
    return value is not None and not str(value).isascii()


def _patients(query: FindQuery, matches: list[dict[str, Any]]) -> list[Dataset]:
    seen: set[tuple[str, str]] = set()
    out = []
    for match in matches:
        answer = answer_of(query, match)
        key = (_text(answer.get("PatientID", "")), _text(answer.get("PatientName", "")))
        if key not in seen:
            seen.add(key)
            out.append(answer)
    return out


class FindService:
    """Answers C-FIND requests from what the listener's facility may read on the hub.

    :param client: the facility's hub client.
    :param home: the facility home (for the audit trail).
    :param ae_title: the listener's AE title (for audit and logs).
    :param name: the listener's name in logs.
    """

    def __init__(self, client: HubClient, home: LocalHome, ae_title: str, name: str) -> None:
        self.client = client
        self.home = home
        self.ae_title = ae_title
        self.name = name

    def handle(self, event: Any) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """pynetdicom's ``EVT_C_FIND`` handler: pending matches, then the final status."""
        requestor = event.assoc.requestor
        calling_ae = str(requestor.ae_title or "").strip()
        address = str(requestor.address)
        try:
            query = query_of(event.identifier)
        except InvalidInput as exc:
            yield _failure(IDENTIFIER_MISMATCH, exc.message), None
            return
        except Exception:  # an identifier pydicom cannot decode
            yield _failure(UNABLE_TO_PROCESS, "the identifier cannot be decoded"), None
            return
        try:
            matches = self.client.search_dicom(RESOURCES[query.level], query.params)
        except EmixError as exc:
            self._audit(calling_ae, address, query, 0, AuditOutcome.SERIOUS_FAILURE)
            log_event(
                log, "dimse.find.failed", logging.WARNING, listener=self.name, reason=exc.code
            )
            yield _failure(OUT_OF_RESOURCES, "emix cannot search its hub now"), None
            return
        answers = (
            _patients(query, matches)
            if query.level == "PATIENT"
            else [answer_of(query, m) for m in matches]
        )
        sent = 0
        for answer in answers[:MAX_MATCHES]:
            if event.is_cancelled:
                self._audit(calling_ae, address, query, sent, AuditOutcome.SUCCESS)
                yield CANCELLED, None
                return
            sent += 1
            yield PENDING, answer
        self._audit(calling_ae, address, query, sent, AuditOutcome.SUCCESS)
        log_event(
            log,
            "dimse.find.answered",
            listener=self.name,
            calling_ae=calling_ae,
            query_level=query.level,
            matches=sent,
        )
        yield SUCCESS, None

    def _audit(
        self, calling_ae: str, address: str, query: FindQuery, matches: int, outcome: Any
    ) -> None:
        try:
            self.home.audit(
                AuditEvent(
                    event_type="query",
                    action=AuditAction.EXECUTE,
                    outcome=outcome,
                    actor=f"dicom:{calling_ae or 'unknown'}",
                    source=address,
                    phi={"query": {k: v for k, v in query.params if k != "includefield"}},
                    detail=f"C-FIND {query.level} to {self.ae_title}: {matches} matches",
                )
            )
        except Exception:  # never fail a query for the audit trail's sake
            log.exception("dimse.audit_failed")


def _failure(status: int, comment: str) -> Dataset:
    answer = Dataset()
    answer.Status = status
    answer.ErrorComment = comment[:64]
    return answer
