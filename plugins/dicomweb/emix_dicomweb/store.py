"""STOW-RS: store instance files into a PACS in batches, and say what happened to each.

The bytes sent are the files' own bytes (never a re-encoded data set). Each answer is
read per instance: ReferencedSOPSequence (stored, maybe with a WarningReason),
FailedSOPSequence (with its FailureReason). Transient trouble (PACS down, busy, out of
resources) is retried with backoff. Storing is idempotent: instances the PACS already
lists are not sent again, and after storing emix asks the PACS (QIDO-RS) whether every
instance it acknowledged is really there, because some PACS accept an upload and then
drop it by a rule without saying so.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emix_dicomweb.connection import PacsConnection, PacsError, PacsUnavailable
from emix_dicomweb.multipart import MultipartBody
from emix_dicomweb.query import find_studies, list_instances, value

__all__ = [
    "FAILURE_REASONS",
    "InstanceOutcome",
    "InstanceToStore",
    "StoreReport",
    "StoreSettings",
    "parse_stow_response",
    "store_instances",
]

log = logging.getLogger("emix.dicomweb")

REFERENCED_SOP_SEQUENCE = "00081199"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_INSTANCE = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"

#: FailureReason (0008,1197) and WarningReason (0008,1196) values, PS3.18 and PS3.4.
FAILURE_REASONS: dict[int, str] = {
    0x0110: "processing failure on the PACS",
    0x0111: "duplicate SOP instance",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported by the PACS",
    0x0124: "not authorized to store this instance",
    0x0210: "duplicate invocation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation on the PACS",
    0xA700: "PACS out of resources",
    0xA900: "data set does not match its SOP class",
    0xB000: "the PACS coerced some data elements",
    0xB006: "the PACS discarded some data elements",
    0xB007: "data set does not match its SOP class (stored anyway)",
    0xC000: "the PACS cannot understand the instance",
    0xC122: "transfer syntax not supported by the PACS",
}
DUPLICATE = 0x0111


def describe_reason(code: int) -> str:
    """Human text for a FailureReason or WarningReason code."""
    text = FAILURE_REASONS.get(code)
    if text is None and 0xA700 <= code <= 0xA7FF:
        text = FAILURE_REASONS[0xA700]
    elif text is None and 0xA900 <= code <= 0xA9FF:
        text = FAILURE_REASONS[0xA900]
    elif text is None and 0xC000 <= code <= 0xCFFF:
        text = FAILURE_REASONS[0xC000]
    return f"{text or 'failure'} (0x{code:04X})"


def is_transient_reason(code: int) -> bool:
    """A failure that may go away by itself: out of resources, resource limitation."""
    return 0xA700 <= code <= 0xA7FF or code == 0x0213


@dataclass
class InstanceToStore:
    """One instance file to store, with the UIDs the signed manifest gives for it."""

    path: Path
    sop_instance_uid: str
    study_uid: str
    item_id: int | None = None

    @property
    def size(self) -> int:
        return self.path.stat().st_size


@dataclass
class InstanceOutcome:
    """What happened to one instance.

    :param status: ``stored``, ``already-there`` or ``failed``.
    :param reason: why it failed (or the PACS's warning), without PHI.
    :param code: the FailureReason / WarningReason code, when the PACS gave one.
    :param transient: the failure may go away when tried again later.
    """

    instance: InstanceToStore
    status: str = "pending"
    reason: str = ""
    code: int | None = None
    transient: bool = False
    #: the PACS named this instance in its answer (else success was only implied)
    acknowledged: bool = False

    def to_dict(self, *, with_uids: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"status": self.status}
        if self.instance.item_id is not None:
            out["item"] = self.instance.item_id
        if with_uids:
            out["sop_instance_uid"] = self.instance.sop_instance_uid
        if self.reason:
            out["reason"] = self.reason
        if self.code is not None:
            out["code"] = f"0x{self.code:04X}"
        return out


@dataclass
class StoreSettings:
    """How to store into a PACS.

    :param batch_mb: largest STOW-RS request body, MB (a single bigger instance goes alone).
    :param batch_count: most instances per STOW-RS request.
    :param parallel: STOW-RS requests in flight at once.
    :param attempts: tries of a batch (and rounds for transient per-instance failures).
    :param retry_seconds: first wait between tries; doubles each time.
    :param skip_existing: do not send instances the PACS already lists.
    :param verify: after storing, check with QIDO-RS that every stored instance is listed.
    """

    batch_mb: float = 32.0
    batch_count: int = 100
    parallel: int = 2
    attempts: int = 4
    retry_seconds: float = 1.0
    skip_existing: bool = True
    verify: bool = True

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> StoreSettings:
        defaults = cls()
        return cls(
            batch_mb=float(table.get("batch_mb", defaults.batch_mb)),
            batch_count=int(table.get("batch_count", defaults.batch_count)),
            parallel=int(table.get("parallel", defaults.parallel)),
            attempts=int(table.get("attempts", defaults.attempts)),
            retry_seconds=float(table.get("retry_seconds", defaults.retry_seconds)),
            skip_existing=bool(table.get("skip_existing", defaults.skip_existing)),
            verify=bool(table.get("verify", defaults.verify)),
        )


@dataclass
class StoreReport:
    """Per-instance outcomes of one delivery into a PACS."""

    outcomes: list[InstanceOutcome] = field(default_factory=list)
    bytes_sent: int = 0
    requests: int = 0
    seconds: float = 0.0
    #: the PACS listed the stored instances afterwards (QIDO-RS), not only acknowledged them
    verified: bool = False

    def count(self, status: str) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def failed(self) -> list[InstanceOutcome]:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def transient_failures(self) -> list[InstanceOutcome]:
        return [o for o in self.failed if o.transient]

    @property
    def complete(self) -> bool:
        """Every instance is in the PACS (stored now or already there)."""
        return not self.failed

    def summary(self) -> dict[str, Any]:
        return {
            "instances": len(self.outcomes),
            "stored": self.count("stored"),
            "already_there": self.count("already-there"),
            "failed": self.count("failed"),
            "bytes_sent": self.bytes_sent,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "verified": self.verified,
        }

    def to_dict(self, *, with_uids: bool = False) -> dict[str, Any]:
        """Summary plus each instance that was not simply stored (failures, warnings)."""
        notable = [o for o in self.outcomes if o.status == "failed" or o.reason]
        return {
            **self.summary(),
            "details": [o.to_dict(with_uids=with_uids) for o in notable],
        }


# --------------------------------------------------------------------------- answers


@dataclass
class StowAnswer:
    """A parsed STOW-RS answer: outcome per SOP instance UID the PACS named."""

    stored: dict[str, int | None] = field(default_factory=dict)  # uid -> warning code
    failed: dict[str, int | None] = field(default_factory=dict)  # uid -> failure code
    warning: int | None = None
    readable: bool = False


def _code(raw: Any) -> int | None:
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str):
        try:
            return int(raw, 16) if not raw.isdigit() or len(raw) == 4 else int(raw)
        except ValueError:
            return None
    return None


def parse_stow_response(body: bytes) -> StowAnswer:
    """Read a DICOM JSON STOW-RS answer; anything unreadable gives ``readable=False``."""
    answer = StowAnswer()
    try:
        document = json.loads(body) if body.strip() else {}
    except ValueError:
        return answer
    if isinstance(document, list) and document:
        document = document[0]
    if not isinstance(document, dict):
        return answer
    answer.readable = bool(document)
    answer.warning = _code(value(document, WARNING_REASON))
    for tag, into, reason_tag in (
        (REFERENCED_SOP_SEQUENCE, answer.stored, WARNING_REASON),
        (FAILED_SOP_SEQUENCE, answer.failed, FAILURE_REASON),
    ):
        for entry in (document.get(tag) or {}).get("Value") or []:
            if isinstance(entry, dict):
                uid = value(entry, REFERENCED_SOP_INSTANCE)
                if isinstance(uid, str):
                    into[uid] = _code(value(entry, reason_tag))
    return answer


# --------------------------------------------------------------------------- storing


def _batches(
    outcomes: Sequence[InstanceOutcome], settings: StoreSettings
) -> list[list[InstanceOutcome]]:
    limit = int(settings.batch_mb * 1024 * 1024)
    batches: list[list[InstanceOutcome]] = []
    current: list[InstanceOutcome] = []
    size = 0
    for outcome in sorted(outcomes, key=lambda o: o.instance.study_uid):
        instance_size = outcome.instance.size
        if current and (size + instance_size > limit or len(current) >= settings.batch_count):
            batches.append(current)
            current, size = [], 0
        current.append(outcome)
        size += instance_size
    if current:
        batches.append(current)
    return batches


class _Storer:
    def __init__(self, conn: PacsConnection, settings: StoreSettings, report: StoreReport):
        self.conn = conn
        self.settings = settings
        self.report = report
        self.lock = threading.Lock()

    def post(self, batch: list[InstanceOutcome]) -> None:
        """Send one batch (retrying transient trouble) and record each instance's outcome."""
        for attempt in range(self.settings.attempts):
            try:
                self._post_once(batch)
                return
            except PacsUnavailable:
                if attempt == self.settings.attempts - 1:
                    raise
                time.sleep(self.settings.retry_seconds * 2**attempt)

    def _post_once(self, batch: list[InstanceOutcome]) -> None:
        body = MultipartBody([o.instance.path for o in batch])
        try:
            response = self.conn.request(
                "POST",
                "/studies",
                data=body,
                headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"},
            )
        finally:
            body.close()
        with self.lock:
            self.report.requests += 1
        status = response.status_code
        if status == 413 and len(batch) > 1:
            half = len(batch) // 2
            self._post_once(batch[:half])
            self._post_once(batch[half:])
            return
        if status == 413:
            self._settle(batch, StowAnswer(), "the PACS refused the instance as too large")
            return
        if status in (401, 403, 404, 415) or (status >= 400 and status not in (400, 409)):
            raise self.conn.error_for(response, "STOW-RS")
        answer = parse_stow_response(response.content)
        with self.lock:
            self.report.bytes_sent += len(body)
        if status >= 300 and not answer.readable:
            raise self.conn.error_for(response, "STOW-RS")
        self._settle(
            batch,
            answer,
            f"the PACS did not acknowledge the instance (HTTP {status}; it may not be "
            "able to read it)",
            trust_silence=(status == 200 and not answer.stored and not answer.failed),
        )

    def _settle(
        self,
        batch: list[InstanceOutcome],
        answer: StowAnswer,
        silence: str,
        *,
        trust_silence: bool = False,
    ) -> None:
        for outcome in batch:
            uid = outcome.instance.sop_instance_uid
            outcome.code, outcome.reason, outcome.transient = None, "", False
            outcome.acknowledged = uid in answer.failed or uid in answer.stored
            if uid in answer.failed:
                code = answer.failed[uid]
                if code == DUPLICATE:
                    outcome.status = "already-there"
                    continue
                outcome.status = "failed"
                outcome.code = code
                outcome.reason = describe_reason(code) if code is not None else "refused"
                outcome.transient = code is not None and is_transient_reason(code)
            elif uid in answer.stored or trust_silence:
                outcome.status = "stored"
                warning = answer.stored.get(uid)
                if warning is not None:
                    outcome.code, outcome.reason = warning, describe_reason(warning)
            else:
                outcome.status = "failed"
                outcome.reason = silence


def _listed(conn: PacsConnection, study: str) -> set[str]:
    """SOP instance UIDs the PACS lists for a study; a cheap study query first."""
    if not find_studies(conn, {"StudyInstanceUID": study}):
        return set()
    return {sop for _, sop in list_instances(conn, study)}


def store_instances(
    conn: PacsConnection,
    instances: Sequence[InstanceToStore],
    settings: StoreSettings | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> StoreReport:
    """Store instance files into the PACS with STOW-RS; the report says per instance.

    :raises PacsUnavailable: the PACS stayed unreachable or busy through every retry
        (instances stored before that are in the PACS; trying again is harmless).
    :raises PacsError: the PACS refuses STOW-RS itself (credentials, URL, media type).
    """
    settings = settings or StoreSettings()
    started = time.monotonic()
    report = StoreReport(outcomes=[InstanceOutcome(i) for i in instances])
    studies = sorted({i.study_uid for i in instances})
    can_list = settings.skip_existing or settings.verify
    before: dict[str, set[str]] | None = None
    if can_list:
        try:
            before = {study: _listed(conn, study) for study in studies}
        except PacsUnavailable:
            raise
        except PacsError as exc:  # a STOW-only endpoint: store everything, unverified
            log.warning("stow.no_qido", extra={"emix": {"pacs": conn.host, "reason": exc.message}})
            can_list = False
    if settings.skip_existing and before:
        for outcome in report.outcomes:
            if outcome.instance.sop_instance_uid in before[outcome.instance.study_uid]:
                outcome.status = "already-there"
    storer = _Storer(conn, settings, report)
    total = sum(o.instance.size for o in report.outcomes if o.status == "pending")
    done = 0
    for round_number in range(settings.attempts):
        todo = [o for o in report.outcomes if o.status == "pending" or o.transient]
        if not todo:
            break
        if round_number:
            time.sleep(settings.retry_seconds * 2 ** (round_number - 1))
        with ThreadPoolExecutor(max_workers=max(1, settings.parallel)) as pool:
            futures = [(b, pool.submit(storer.post, b)) for b in _batches(todo, settings)]
            for batch, future in futures:
                future.result()
                done += sum(o.instance.size for o in batch)
                if progress:
                    progress(min(done, total), total)
        if not any(o.transient for o in report.outcomes):
            break
    if settings.verify and can_list:
        _verify(conn, report, before or {})
        report.verified = True
    report.seconds = time.monotonic() - started
    return report


def _verify(conn: PacsConnection, report: StoreReport, before: dict[str, set[str]]) -> None:
    """Ask the PACS whether every instance it acknowledged is really there.

    Per study, the instance count of a study query (cheap) settles it when it is exactly
    what was there before plus what was stored; otherwise the instances are listed.
    """
    stored: dict[str, list[InstanceOutcome]] = {}
    for outcome in report.outcomes:
        if outcome.status == "stored":
            stored.setdefault(outcome.instance.study_uid, []).append(outcome)
    missing: list[InstanceOutcome] = []
    for study, outcomes in stored.items():
        expected = before.get(study, set()) | {o.instance.sop_instance_uid for o in outcomes}
        found = find_studies(conn, {"StudyInstanceUID": study})
        if found and found[0].instances == len(expected):
            continue
        absent = outcomes
        for attempt in range(2):
            if attempt:
                time.sleep(1.0)  # some PACS index asynchronously
            listed = _listed(conn, study)
            absent = [o for o in absent if o.instance.sop_instance_uid not in listed]
            if not absent:
                break
        missing += absent
    for outcome in missing:
        outcome.status = "failed"
        outcome.reason = (
            "the PACS acknowledged the instance but does not list it afterwards "
            "(dropped by a filter or rule on the PACS?)"
            if outcome.acknowledged
            else "the PACS answered without a result for the instance and does not list it "
            "afterwards (refused it? see the PACS's log)"
        )
    if missing:
        log.warning("stow.dropped", extra={"emix": {"pacs": conn.host, "instances": len(missing)}})
