"""``emix smart shares``: the facility's side of "Share with…" from the EMR."""

from __future__ import annotations

import os
import subprocess
import sys
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
    results: list[dict[str, Any]] = []
    for share in answer.json().get("shares", []):
        results.append(_send(share, pacs, client.base, client.token, str(local.path)))
    failed = [r for r in results if not r["sent"]]
    if as_json:
        emit_json({"shares": results})
    else:
        for r in results:
            click.echo(f"share {r['id']} to {r['to']}: " + ("sent" if r["sent"] else r["error"]))
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
