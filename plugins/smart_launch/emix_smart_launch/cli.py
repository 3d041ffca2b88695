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
#: Requests one answer of the hub may hand over (it hands over 100 at most); an answer
#: with more, or larger than :data:`MAX_ANSWER_BYTES`, is refused whole.
MAX_SHARES = 1000
MAX_ANSWER_BYTES = 4 * 1024 * 1024
#: The fields of a request that are kept, each cut to its length.
FIELDS = {"id": 32, "study_uid": 64, "to": 64, "requested_by": 254, "requested_at": 40}


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
        answer = client.session.get(
            f"{client.base}/api/v1/smart/shares", timeout=client.timeout, stream=True
        )
    except Exception as exc:  # requests' connection errors
        raise HubUnavailable(f"the hub did not answer ({type(exc).__name__})") from exc
    if answer.status_code != 200:
        raise HubUnavailable(
            f"the hub answered HTTP {answer.status_code} for share requests; is the "
            "emix-smart-launch plugin installed there, and is the token a facility admin's?"
        )
    taken = _shares_of(answer)
    queue = ShareQueue(Path(local.path) / "smart-shares")
    malformed = [queue.keep(share) for share in taken]
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


def _shares_of(answer: Any) -> list[Any]:
    """The list of requests in the hub's answer; :class:`HubUnavailable` for an answer of
    another shape or size (nothing of it is kept)."""
    wrong = HubUnavailable(
        "the hub's answer to the request for share requests is not a list of them (or "
        f"holds more than {MAX_SHARES}); check that the hub URL is the emix hub's"
    )
    body = answer.raw.read(MAX_ANSWER_BYTES + 1, decode_content=True)
    if len(body) > MAX_ANSWER_BYTES:
        raise wrong
    try:
        shares = json.loads(body).get("shares")
    except (ValueError, AttributeError, RecursionError):
        raise wrong from None
    if not isinstance(shares, list) or len(shares) > MAX_SHARES:
        raise wrong
    return shares


def _shown(value: Any, valid: Any) -> str:
    """A value of the hub's for the report: itself when valid, else a placeholder (a
    hostile value never reaches the terminal)."""
    text = str(value or "")
    return text if valid(text) else "(malformed)"


def send_command(share: dict[str, Any], pacs: str) -> list[str] | None:
    """The ``emix dicomweb send`` command for a request, each value glued to its option
    (``--to=mercy``: a value is never read as an option); ``None`` when the request's
    facility or Study Instance UID is not one."""
    to, uid = str(share.get("to", "")), str(share.get("study_uid", ""))
    if not is_valid_address(to) or not is_valid_uid(uid):
        return None
    command = [sys.executable, "-m", "emix_core", "dicomweb", "send", f"--pacs={pacs}"]
    return command + [f"--study={uid}", f"--to={to}", "--json"]


def _send(share: dict[str, Any], pacs: str, hub: str, token: str, home: str) -> dict[str, Any]:
    result = {
        "id": _shown(share.get("id"), SHARE_ID.fullmatch),
        "to": _shown(share.get("to"), is_valid_address),
    }
    command = send_command(share, pacs)
    if command is None:
        return {**result, "sent": False, "error": "the request is malformed; skipped"}
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
            return {"id": "(malformed)", "to": "", "sent": False, "retry": False,
                    "error": "the request is malformed; skipped"}  # fmt: skip
        now = datetime.now(UTC).isoformat(timespec="seconds")
        kept = {k: str(share.get(k, ""))[:n] for k, n in FIELDS.items() if k in share}
        self._write(self.folder / f"{share_id}.json", {"share": kept, "taken": now})
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
