"""An emix plugin a vendor can copy: forward every audit event to a JSON-lines file.

Set ``EMIX_AUDIT_JSONL=/var/log/emix/audit.jsonl``; a SIEM can tail it. PHI
(``event.phi``) is deliberately not forwarded: only who, what, when, outcome.
"""

from __future__ import annotations

import json
import os
import threading

from emix_core import AuditEvent, hookimpl

__version__ = "0.1.0"
_lock = threading.Lock()


@hookimpl
def emix_audit_event(event: AuditEvent) -> None:
    path = os.environ.get("EMIX_AUDIT_JSONL")
    if not path:
        return
    line = json.dumps(
        {
            "time": event.time.isoformat(),
            "type": event.event_type,
            "action": event.action,
            "outcome": event.outcome,
            "actor": event.actor,
            "source": event.source,
            "package": event.package_id,
            "detail": event.detail,
        }
    )
    with _lock, open(path, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")
