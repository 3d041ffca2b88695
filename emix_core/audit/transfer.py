"""One helper for the sending side: every transfer is audited the same way.

A transfer (sending a package to the hub, retrieving from a PACS, storing into one)
records *begin-transferring* when it starts and exactly one *instances-transferred*
event when it ends: success, a minor failure when some items failed, or a serious
failure with the error's message when it stopped. Adapters use it as::

    with audited_transfer(home, action=AuditAction.READ, actor=actor, peer=pacs.host,
                          what=f"STOW-RS into PACS {pacs.host}", package_id=package.id,
                          phi={"studies": studies}, begin="storing 200 instances") as audit:
        report = store(...)
        audit.done("200 stored", succeeded=200, failed=0)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, Protocol

from emix_core.errors import EmixError
from emix_core.model import AuditAction, AuditEvent, AuditOutcome


class Audited(Protocol):
    """Anything with an ``audit(event)`` method: a local home, a hub."""

    def audit(self, event: AuditEvent) -> None: ...


def transfer_outcome(succeeded: int, failed: int) -> AuditOutcome:
    """PS3.15's outcome for a transfer: all went, some failed, or none went."""
    if not failed:
        return AuditOutcome.SUCCESS
    return AuditOutcome.MINOR_FAILURE if succeeded else AuditOutcome.SERIOUS_FAILURE


class TransferAudit:
    """The audit record of one transfer; see :func:`audited_transfer`."""

    def __init__(
        self,
        home: Audited,
        *,
        action: AuditAction,
        actor: str,
        what: str,
        peer: str = "",
        package_id: str | None = None,
        phi: Mapping[str, Any] | None = None,
    ) -> None:
        self.home = home
        self.action = action
        self.actor = actor
        self.what = what
        self.peer = peer
        self.package_id = package_id
        self.phi: dict[str, Any] = dict(phi or {})
        self.finished = False

    def _record(
        self, event_type: str, action: AuditAction, outcome: AuditOutcome, detail: str
    ) -> None:
        self.home.audit(
            AuditEvent(
                event_type=event_type,
                action=action,
                outcome=outcome,
                actor=self.actor,
                source=self.peer,
                package_id=self.package_id,
                phi=dict(self.phi),
                detail=detail,
            )
        )

    def begin(self, detail: str) -> None:
        """Record that the transfer starts (PS3.15 *Begin Transferring DICOM Instances*)."""
        self._record("begin-transferring", AuditAction.EXECUTE, AuditOutcome.SUCCESS, detail)

    def done(
        self,
        detail: str,
        *,
        succeeded: int = 1,
        failed: int = 0,
        package_id: str | None = None,
        phi: Mapping[str, Any] | None = None,
    ) -> None:
        """Record how the transfer ended; the outcome follows from the counts."""
        if package_id is not None:
            self.package_id = package_id
        if phi is not None:
            self.phi = dict(phi)
        self._finish(transfer_outcome(succeeded, failed), detail)

    def fail(self, detail: str) -> None:
        """Record that the transfer stopped (a serious failure)."""
        self._finish(AuditOutcome.SERIOUS_FAILURE, detail)

    def _finish(self, outcome: AuditOutcome, detail: str) -> None:
        if self.finished:
            raise RuntimeError("this transfer's outcome is already recorded")
        self.finished = True
        self._record("instances-transferred", self.action, outcome, detail)


@contextmanager
def audited_transfer(
    home: Audited,
    *,
    action: AuditAction,
    actor: str,
    what: str,
    peer: str = "",
    package_id: str | None = None,
    phi: Mapping[str, Any] | None = None,
    begin: str | None = None,
) -> Iterator[TransferAudit]:
    """Audit one transfer: *begin* first (when given), then exactly one outcome.

    :param action: ``READ`` when instances leave (sent, stored elsewhere), ``CREATE``
        when they arrive (received, retrieved).
    :param what: names the transfer without PHI, e.g. ``"C-STORE into PACS"``; the
        failure record reads ``"<what> failed: <error message>"``.
    :param begin: the begin-transferring detail; no begin record when ``None``.

    The block calls :meth:`TransferAudit.done`; when it does not, the transfer is
    recorded as done. An exception records a serious failure and is re-raised:
    an :class:`~emix_core.errors.EmixError` with its message (written without PHI),
    anything else with its type only.
    """
    audit = TransferAudit(
        home, action=action, actor=actor, what=what, peer=peer, package_id=package_id, phi=phi
    )
    if begin is not None:
        audit.begin(begin)
    try:
        yield audit
    except EmixError as exc:
        if not audit.finished:
            audit.fail(f"{what} failed: {exc.message}")
        raise
    except BaseException as exc:
        if not audit.finished:
            audit.fail(f"{what} stopped: {type(exc).__name__}")
        raise
    if not audit.finished:
        audit.done(what)


class QueryAudit:
    """The audit record of one query; see :func:`audited_query`."""

    def __init__(self) -> None:
        self.studies: list[str] = []

    def found(self, studies: list[str]) -> None:
        """The study UIDs the query matched (PHI, encrypted at rest in the log)."""
        self.studies = list(studies)


@contextmanager
def audited_query(
    home: Audited, *, actor: str, what: str, query: Mapping[str, Any], peer: str = ""
) -> Iterator[QueryAudit]:
    """Audit one query of a PACS (PS3.15 *Query*): the keys and what matched are PHI.

    :param what: names the query without PHI, e.g. ``"C-FIND on ORTHANC"``.

    One event is written when the block ends: a success with the number of matched
    studies, or a serious failure with the error's message (re-raised).
    """
    audit = QueryAudit()
    outcome, detail = AuditOutcome.SUCCESS, ""
    try:
        yield audit
        detail = f"{what}: {len(audit.studies)} studies"
    except EmixError as exc:
        outcome, detail = AuditOutcome.SERIOUS_FAILURE, f"{what} failed: {exc.message}"
        raise
    except BaseException as exc:
        outcome, detail = AuditOutcome.SERIOUS_FAILURE, f"{what} stopped: {type(exc).__name__}"
        raise
    finally:
        home.audit(
            AuditEvent(
                event_type="query",
                action=AuditAction.EXECUTE,
                outcome=outcome,
                actor=actor,
                source=peer,
                phi={"query": dict(query), "studies": audit.studies},
                detail=detail,
            )
        )
