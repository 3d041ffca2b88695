"""Account commands for a facility: ``emix members list|add|remove``, ``emix token``."""

from __future__ import annotations

import os
import re

import click

from emix_core.cli.util import (
    client_for,
    emit_json,
    handle_errors,
    home_option,
    hub_option,
    json_option,
    token_option,
)
from emix_core.config import CONFIG_NAME
from emix_core.errors import NotFoundError


@click.group()
def members() -> None:
    """Members of your facility (facility admins): list, add, remove."""


@members.command("list")
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def members_list(hub_url: str | None, token: str | None, home: str | None, as_json: bool) -> None:
    """List your facility's members, their roles and whether they confirmed."""
    rows = client_for(hub_url, token, home)[1].members()
    if as_json:
        emit_json({"members": rows})
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("email", "role", "confirmed", "active", box=None)
    for row in rows:
        table.add_row(
            row["email"],
            row["role"],
            "yes" if row["confirmed"] else "no",
            "yes" if row["active"] else "removed",
        )
    Console(width=max(100, Console().width)).print(table)


@members.command("add")
@click.argument("email")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member")
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def members_add(
    email: str, role: str, hub_url: str | None, token: str | None, home: str | None, as_json: bool
) -> None:
    """Add (and verify) a member; they get a confirmation code by mail."""
    result = client_for(hub_url, token, home)[1].add_member(email, role)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"member {result['email']} added; a confirmation code was mailed")


@members.command("remove")
@click.argument("email")
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def members_remove(
    email: str, hub_url: str | None, token: str | None, home: str | None, as_json: bool
) -> None:
    """Remove a member of your facility; every token of theirs stops working."""
    client = client_for(hub_url, token, home)[1]
    match = [m for m in client.members() if m["email"] == email.strip().lower()]
    if not match:
        raise NotFoundError("no member with that email in your facility; `emix members list`")
    result = client.remove_member(match[0]["id"])
    if as_json:
        emit_json({**result, "email": match[0]["email"]})
    else:
        click.echo(f"member {match[0]['email']} removed; their tokens are revoked")


@click.group()
def token() -> None:
    """Your API token: rotate it, or revoke it."""


def _replace_in_config(home_path: os.PathLike[str], old: str, new: str) -> bool:
    file = os.path.join(home_path, CONFIG_NAME)
    if not os.path.exists(file):
        return False
    text = open(file, encoding="utf-8").read()  # noqa: SIM115
    if old not in text:
        return False
    updated = re.sub(rf'(token\s*=\s*")({re.escape(old)})(")', rf"\g<1>{new}\g<3>", text)
    temp = file + ".tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(updated)
    os.replace(temp, file)
    return True


@token.command("rotate")
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def token_rotate(hub_url: str | None, token: str | None, home: str | None, as_json: bool) -> None:
    """Get a new API token; the current one stops working at once.

    When the current token is in the home's emix.toml, it is replaced there (mode 0600).
    """
    local, client = client_for(hub_url, token, home)
    old = client.token
    result = client.rotate_token()
    saved = _replace_in_config(local.path, old, result["token"])
    if as_json:
        emit_json({**result, "saved_in_config": saved})
    elif saved:
        click.echo(f"token rotated for {result['email']}; the new one is saved in "
                   f"{local.path / CONFIG_NAME}")  # fmt: skip
    else:
        click.echo(
            f"token rotated for {result['email']}; the old one no longer works.\n"
            f"new API token (shown once, keep it secret): {result['token']}"
        )


@token.command("revoke")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def token_revoke(
    yes: bool, hub_url: str | None, token: str | None, home: str | None, as_json: bool
) -> None:
    """Revoke your API token (for a leaked one); an admin can then issue a new member token."""
    if not yes and not as_json:
        click.confirm("revoke this API token? it stops working at once", abort=True)
    result = client_for(hub_url, token, home)[1].revoke_token()
    if as_json:
        emit_json(result)
    else:
        click.echo("token revoked")
