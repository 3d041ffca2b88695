"""``emix smart shares``: the facility's side of "Share with…" from the EMR.

Requests taken from the hub are kept in the facility's home (``smart-shares/``) until
their study is sent: one that fails (the PACS is down, its URL wrong) is tried again on
the next run, up to :data:`MAX_ATTEMPTS` times or :data:`GIVE_UP_AFTER`, then put aside in
``smart-shares/failed/`` and reported. Nothing taken is lost to a crash or a failure.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import click

from emix_core import (
    HubUnavailable,
    client_for,
    emit_json,
    handle_errors,
    home_option,
    hub_option,
    is_valid_address,
    is_valid_uid,
    json_option,
    token_option,
)

#: A request whose study could not be sent this many times is put aside.
MAX_ATTEMPTS = 10
#: ... as is one first taken longer ago than this.
GIVE_UP_AFTER = timedelta(days=7)
#: What a request's id must look like before it names a file (the hub makes 16 hex digits).
SHARE_ID = re.compile(r"^[0-9a-f]{1,32}$")


@click.group("smart")
def smart() -> None:
    """emix launched from the EMR (SMART on FHIR): the facility's side."""


@smart.command("shares")
@click.option("--pacs", required=True, help="DICOMweb base URL of the facility's PACS.")
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def shares_command(
    pacs: str, hub_url: str | None, token: str | None, home: str | None, as_json: bool
) -> None:
    """Take the share requests clinicians made from the EMR and send each study from the
    PACS to the facility they named (``emix dicomweb send``). Run it from a timer next to
    the gateway, with the facility admin's token. Exit 1 when a study could not be sent."""
    local, client = client_for(hub_url, token, home)
    try:
        answer = client.session.get(f"{client.base}/api/v1/smart/shares", timeout=client.timeout)
    except Exception as exc:  # requests' connection errors
        raise HubUnavailable(f"the hub did not answer ({type(exc).__name__})") from exc
    if answer.status_code != 200:
        raise HubUnavailable(
            f"the hub answered HTTP {answer.status_code} for share requests; is the "
            "emix-smart-launch plugin installed there, and is the token a facility admin's?"
        )
    queue = ShareQueue(Path(local.path) / "smart-shares")
    malformed = [queue.keep(share) for share in answer.json().get("shares", [])]
    results: list[dict[str, Any]] = [r for r in malformed if r is not None]
    for record in queue.pending():
        outcome = _send(record["share"], pacs, client.base, client.token, str(local.path))
        results.append(queue.settle(record, outcome))
    failed = [r for r in results if not r["sent"]]
    if as_json:
        emit_json({"shares": results})
    else:
        for r in results:
            state = "sent" if r["sent"] else r["error"] + (" (will retry)" if r["retry"] else "")
            click.echo(f"share {r['id']} to {r['to']}: {state}")
        if not results:
            click.echo("no share request is waiting")
    if failed:
        sys.exit(1)


def _send(share: dict[str, Any], pacs: str, hub: str, token: str, home: str) -> dict[str, Any]:
    result = {"id": str(share.get("id", ""))[:32], "to": str(share.get("to", ""))[:64]}
    uid = str(share.get("study_uid", ""))
    if not is_valid_address(result["to"]) or not is_valid_uid(uid):
        return {**result, "sent": False, "error": "the request is malformed; skipped"}
    command = [sys.executable, "-m", "emix_core", "dicomweb", "send", "--pacs", pacs]
    command += ["--study", uid, "--to", result["to"], "--json"]
    env = {**os.environ, "EMIX_HUB_URL": hub, "EMIX_TOKEN": token, "EMIX_HOME": home}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["emix dicomweb send failed"])[-1]
        return {**result, "sent": False, "error": reason[:300]}
    return {**result, "sent": True}


class ShareQueue:
    """Taken share requests, one JSON file each, kept until sent or given up."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.failed = folder / "failed"

    def keep(self, share: Any) -> dict[str, Any] | None:
        """Write a request taken from the hub (durably) before anything is tried; a
        malformed one is answered at once and never names a file."""
        share_id = str(share.get("id", "")) if isinstance(share, dict) else ""
        if not SHARE_ID.fullmatch(share_id):
            return {"id": share_id[:32], "to": "", "sent": False, "retry": False,
                    "error": "the request is malformed; skipped"}  # fmt: skip
        now = datetime.now(UTC).isoformat(timespec="seconds")
        self._write(self.folder / f"{share_id}.json", {"share": share, "taken": now})
        return None

    def pending(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.folder.glob("*.json")) if self.folder.is_dir() else []:
            try:
                record = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            records.append({**record, "path": path})
        return sorted(records, key=lambda r: str(r.get("taken", "")))

    def settle(self, record: dict[str, Any], outcome: dict[str, Any]) -> dict[str, Any]:
        """Remove a sent request; count a failure and put the request aside after the
        last attempt. Returns the outcome with ``retry`` (whether it is tried again)."""
        path: Path = record["path"]
        if outcome["sent"]:
            path.unlink(missing_ok=True)
            return {**outcome, "retry": False}
        attempts = int(record.get("attempts", 0)) + 1
        taken = _parse_time(record.get("taken"))
        kept = {k: v for k, v in record.items() if k != "path"}
        kept.update(attempts=attempts, error=outcome["error"])
        if attempts >= MAX_ATTEMPTS or datetime.now(UTC) - taken > GIVE_UP_AFTER:
            self._write(self.failed / path.name, kept)
            path.unlink(missing_ok=True)
            return {**outcome, "retry": False, "error": f"{outcome['error']}; given up"}
        self._write(path, kept)
        return {**outcome, "retry": True}

    @staticmethod
    def _write(path: Path, record: dict[str, Any]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = path.with_suffix(".part")
        with open(partial, "w", encoding="utf-8") as out:
            json.dump(record, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(partial, path)


def _parse_time(value: Any) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.now(UTC)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
