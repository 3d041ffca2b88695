"""Administration commands: ``emix hub``, ``emix audit``, ``emix retention``, ``emix member``,
``emix keys``."""

from __future__ import annotations

import json
import sys
from datetime import datetime
from pathlib import Path

import click

from emix_core.cli.util import (
    emit_json,
    handle_errors,
    home_option,
    hub_option,
    json_option,
    token_option,
)
from emix_core.config import resolve_home
from emix_core.errors import InvalidInput


def _hub(home: str | None):  # type: ignore[no-untyped-def]
    from emix_core.hub.context import open_hub

    return open_hub(resolve_home(home))


# --------------------------------------------------------------------------- hub
@click.group()
def hub() -> None:
    """Run and administer a hub."""


@hub.command("init")
@home_option
@click.option(
    "--public-url", default=None, help="URL recipients reach the hub at (used in email links)."
)
@click.option("--port", type=int, default=8480, show_default=True)
@click.option(
    "--database",
    default=None,
    metavar="URL",
    help="Metadata database, e.g. postgresql://USER:PASS@HOST:PORT/DB (default: SQLite in "
    "the home; EMIX_DATABASE_URL overrides at run time).",
)
@click.option(
    "--blobs",
    default=None,
    metavar="URL",
    help="Blob store, e.g. s3://BUCKET/PREFIX (default: file:blobs in the home; "
    "EMIX_BLOB_URL overrides at run time).",
)
@json_option
@handle_errors
def hub_init(
    home: str | None,
    public_url: str | None,
    port: int,
    database: str | None,
    blobs: str | None,
    as_json: bool,
) -> None:
    """Create a hub's home: config, keys (mode 0600), database, audit log.

    Several instances share one PostgreSQL database and one S3 bucket: run init once,
    copy keys/ to every instance's home, and init each with the same --database/--blobs.
    """
    from emix_core.hub.context import init_hub_home
    from emix_core.store.db import redact_url

    config = init_hub_home(
        resolve_home(home), public_url=public_url, port=port, database_url=database, blob_url=blobs
    )
    if as_json:
        emit_json(
            {
                "home": str(config.home),
                "public_url": config.hub.public_url,
                "database": redact_url(config.database_url),
                "blobs": config.hub.blob_store,
            }
        )
    else:
        click.echo(
            f"hub home ready at {config.home}\n"
            f"next: emix hub facility add 'Facility Name' --email admin@example.org "
            f"--home {config.home}\n      emix hub serve --home {config.home}"
        )


@hub.command("serve")
@home_option
@click.option("--host", default=None, help="Address to listen on (default from config).")
@click.option("--port", type=int, default=None, help="Port (default from config).")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False), default=None)
@click.option(
    "--behind-proxy",
    is_flag=True,
    help="A TLS-terminating proxy is in front: allow plain HTTP on a non-loopback address.",
)
@click.option("--workers", type=int, default=None, help="gunicorn worker processes.")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Each log line: timestamp, level and message as text, or one JSON object.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
)
@handle_errors
def hub_serve(
    home: str | None,
    host: str | None,
    port: int | None,
    tls_cert: str | None,
    tls_key: str | None,
    behind_proxy: bool,
    workers: int | None,
    log_format: str,
    log_level: str,
) -> None:
    """Serve the hub (gunicorn; HTTPS with --tls-cert/--tls-key)."""
    from emix_core.hub.serve import serve

    hub_ = _hub(home)
    settings = hub_.config.hub
    serve(
        hub_.config.home,
        host=host or settings.host,
        port=port or settings.port,
        workers=workers or settings.workers,
        threads=settings.threads,
        tls_cert=tls_cert,
        tls_key=tls_key,
        behind_proxy=behind_proxy,
        purge_interval=settings.purge_interval_seconds,
        log_format=log_format,
        log_level=log_level,
    )


@hub.command("migrate")
@home_option
@click.option(
    "--to",
    "revision",
    default="head",
    show_default=True,
    help="Schema revision to reach; an older one than the current downgrades.",
)
@click.option("--status", is_flag=True, help="Only print the current and newest revision.")
@json_option
@handle_errors
def hub_migrate(home: str | None, revision: str, status: bool, as_json: bool) -> None:
    """Upgrade (or downgrade) the metadata database schema, SQLite and PostgreSQL alike.

    Safe to run on a live hub and from several instances at once (one migrates, the
    others wait). Back the database up before a downgrade.
    """
    from emix_core.config import CONFIG_NAME, load_config
    from emix_core.store import migrate
    from emix_core.store.db import Database, redact_url

    config = load_config(resolve_home(home))
    if not (config.home / CONFIG_NAME).exists():
        raise InvalidInput(f"{config.home} is not a hub home; run `emix hub init` first")
    db = Database(config.database_url, pool_size=1)
    try:
        before = migrate.current(db.engine)
        if status:
            after = before
        elif revision == "head" or _is_newer(revision, before):
            after = migrate.upgrade(db.engine, revision)
        else:
            after = migrate.downgrade(db.engine, revision)
    finally:
        db.engine.dispose()
    data = {
        "database": redact_url(config.database_url),
        "before": before,
        "current": after,
        "head": migrate.head(),
    }
    if as_json:
        emit_json(data)
    else:
        click.echo(
            f"{data['database']}: schema {before or 'none'} -> {after or 'none'} "
            f"(newest: {data['head']})"
        )


def _is_newer(revision: str, current: str | None) -> bool:
    """Revisions are numbered ``0001``, ``0002``, ...; ``base`` is older than all."""
    if revision == "base":
        return False
    return current is None or revision > current


@hub.command("backup")
@home_option
@click.option(
    "--to",
    "target",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="A new folder for the backup (keep it encrypted: it holds the hub's keys).",
)
@json_option
@handle_errors
def hub_backup(home: str | None, target: Path, as_json: bool) -> None:
    """Back up a hub (also while it serves): databases, blobs, keys, config."""
    from emix_core.hub.backup import backup_hub

    manifest = backup_hub(resolve_home(home), target.resolve())
    if as_json:
        emit_json({**manifest, "to": str(target.resolve())})
    else:
        blobs = manifest["blobs"]
        click.echo(
            f"backup in {target.resolve()}: databases, keys, config and {blobs['files']} "
            f"blobs ({blobs['bytes'] / 1e6:.1f} MB) in {manifest['seconds']:.1f} s"
        )


@hub.command("restore")
@click.option(
    "--from",
    "source",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="A folder made by `emix hub backup`.",
)
@home_option
@json_option
@handle_errors
def hub_restore(source: Path, home: str | None, as_json: bool) -> None:
    """Restore a backup into a new, empty hub home, then check its audit chain."""
    from emix_core.hub.backup import restore_hub

    result = restore_hub(source.resolve(), resolve_home(home))
    if as_json:
        emit_json(result)
    else:
        state = "verified" if result["audit_ok"] else f"NOT verified: {result['audit']}"
        click.echo(
            f"hub restored into {result['home']} from the backup of {result['created']}; "
            f"audit chain {state}\nnext: emix hub serve --home {result['home']}"
        )
    if not result["audit_ok"]:
        sys.exit(1)


@hub.group("facility")
def facility() -> None:
    """Add and list member facilities."""


@facility.command("add")
@click.argument("name")
@click.option("--email", required=True, help="The facility administrator's email.")
@click.option("--address", default=None, help="Address slug (default: made from NAME).")
@click.option(
    "--report-format",
    default="pdf",
    show_default=True,
    help="The format its EMR wants reports in: hl7, cda, fhir, pdf, rtf, txt, or one a "
    "plugin registers.",
)
@click.option("--max-retention-days", type=click.IntRange(1, 3650), default=None)
@home_option
@json_option
@handle_errors
def facility_add(
    name: str,
    email: str,
    address: str | None,
    report_format: str,
    max_retention_days: int | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Add a facility and its admin; prints the admin's API token once."""
    from emix_core.hub.facilities import add_facility

    result = add_facility(
        _hub(home),
        name,
        email,
        address=address,
        report_format=report_format,
        max_retention_days=max_retention_days,
    )
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"facility {result['address']} added (id {result['id']})\n"
            f"admin token (shown once, keep it secret): {result['token']}"
        )


@facility.command("list")
@home_option
@json_option
@handle_errors
def facility_list(home: str | None, as_json: bool) -> None:
    """List facilities."""
    from emix_core.hub.facilities import list_facilities

    rows = list_facilities(_hub(home))
    if as_json:
        emit_json({"facilities": rows})
        return
    for row in rows:
        key = "key registered" if row["key_registered"] else "no key yet"
        click.echo(f"{row['address']:<24} {row['name']:<32} {row['report_format']:<5} {key}")


@facility.command("reset-key")
@click.argument("address")
@home_option
@handle_errors
def facility_reset_key(address: str, home: str | None) -> None:
    """Forget a facility's signing key so it can register a new one."""
    from emix_core.hub.facilities import reset_key

    reset_key(_hub(home), address)
    click.echo(f"signing key of {address} reset; recipients must re-pin it")


@hub.command("usage")
@click.option("--month", required=True, help="The month to count, YYYY-MM (UTC).")
@home_option
@json_option
@handle_errors
def hub_usage(month: str, home: str | None, as_json: bool) -> None:
    """Packages and bytes sent and received per facility in a month (for billing)."""
    from emix_core.hub.usage import monthly_usage

    result = monthly_usage(_hub(home), month)
    if as_json:
        emit_json(result)
        return
    click.echo(f"usage in {result['month']} (packages / bytes)")
    for f in result["facilities"]:
        click.echo(
            f"  {f['address']:<24} sent {f['packages_sent']:>5} / {f['bytes_sent']:>14}"
            f"   received {f['packages_received']:>5} / {f['bytes_received']:>14}"
        )


@hub.command("signin-link")
@click.argument("email")
@home_option
@json_option
@handle_errors
def hub_signin_link(email: str, home: str | None, as_json: bool) -> None:
    """Make a one-click browser sign-in link for a verified member (works once, 72 h).

    For the operator who knows the person: no confirmation code is asked. Audited.
    """
    from emix_core.hub.sessions import operator_sign_in_link

    link = operator_sign_in_link(_hub(home), email)
    if as_json:
        emit_json({"email": email, "link": link})
    else:
        click.echo(link)


@hub.command("admin-reset-2fa")
@click.option("--email", required=True, help="The administrator's address.")
@home_option
@json_option
@handle_errors
def hub_admin_reset_2fa(email: str, home: str | None, as_json: bool) -> None:
    """Remove an administrator's second factor (a lost phone, no recovery code left).

    Their authenticator secret and recovery codes are deleted and their browser sessions
    end; they set up an authenticator app again at their next visit to the administration.
    Make sure of who asks first: a second factor guards against someone who reads their
    mail. Audited.
    """
    from emix_core.hub.second_factor import operator_reset

    result = operator_reset(_hub(home), email)
    if as_json:
        emit_json(result)
        return
    for row in result["reset"]:
        state = "was enrolled" if row["was_enrolled"] else "was not enrolled"
        click.echo(f"second factor of {result['email']} at {row['facility']} reset ({state})")


@hub.command("hold")
@click.argument("package")
@click.option("--release", is_flag=True, help="Release the hold.")
@home_option
@handle_errors
def hub_hold(package: str, release: bool, home: str | None) -> None:
    """Put a package under legal hold (retention skips it)."""
    from emix_core.hub.retention import set_legal_hold

    set_legal_hold(_hub(home), package, not release)
    click.echo(f"legal hold {'released' if release else 'set'} on {package}")


# --------------------------------------------------------------------------- audit
@click.group()
def audit() -> None:
    """Check and export the hash-chained audit trail."""


def _audit_log(home: str | None):  # type: ignore[no-untyped-def]
    path = resolve_home(home)
    if (path / "keys" / "kek.key").exists():
        return _hub(home).audit_log
    from emix_core.client.home import LocalHome

    if not (path / "audit.db").exists():
        raise InvalidInput(f"no audit log under {path}")
    return LocalHome(path).audit_log


@audit.command("verify")
@home_option
@click.option(
    "--checkpoints",
    type=click.Path(exists=True, dir_okay=False),
    multiple=True,
    help="JSON file of signed checkpoints kept by a facility (`emix audit checkpoints` "
    "on its side); repeat for several. Detects a cut of the log up to their last contact.",
)
@json_option
@handle_errors
def audit_verify(home: str | None, checkpoints: tuple[str, ...], as_json: bool) -> None:
    """Verify the chain; exit 1 and name the first bad row when it was tampered with.

    On its own this cannot see rows cut from the end after the last kept checkpoint;
    give the facilities' checkpoints with --checkpoints for that.
    """
    log = _audit_log(home)
    external: list = []
    for file in checkpoints:
        try:
            data = json.loads(Path(file).read_text("utf-8"))
        except (OSError, ValueError) as exc:
            raise InvalidInput(f"{file} is not a checkpoints JSON file") from exc
        external += data.get("checkpoints", []) if isinstance(data, dict) else list(data)
    result = log.verify(
        external_checkpoints=external,
        public_key_b64=log.signing_key.public_key_b64 if log.signing_key else None,
    )
    data = {
        "ok": result.ok,
        "rows": result.rows,
        "first_bad_row": result.first_bad_seq,
        "reason": result.reason,
    }
    if as_json:
        emit_json(data)
    elif result.ok:
        click.echo(f"audit log intact: {result.rows} rows verified")
    else:
        click.secho(
            f"AUDIT LOG TAMPERED: first bad row {result.first_bad_seq}: {result.reason}",
            fg="red",
            err=True,
        )
    sys.exit(0 if result.ok else 1)


@audit.command("checkpoints")
@home_option
@json_option
@handle_errors
def audit_checkpoints(home: str | None, as_json: bool) -> None:
    """Print the signed checkpoints kept in this home's log (always JSON)."""
    emit_json({"checkpoints": _audit_log(home).checkpoints()})


@audit.command("export")
@home_option
@click.option(
    "--format", "fmt", type=click.Choice(["dicom", "fhir"]), default="fhir", show_default=True
)
@click.option("--package", default=None, help="Only events about this package.")
@click.option("--limit", type=int, default=1000, show_default=True)
@click.option(
    "--audit-source-id",
    default=None,
    help="AuditSourceID naming this node (default: the host name).",
)
@handle_errors
def audit_export(
    home: str | None, fmt: str, package: str | None, limit: int, audit_source_id: str | None
) -> None:
    """Export events as DICOM PS3.15 audit messages or FHIR AuditEvents, one per line.

    A DICOM event about several patients becomes one message per patient (PS3.15 A.5.3).
    """
    import socket

    from lxml import etree

    from emix_core.audit import chain as audit_mod

    node = audit_source_id or socket.gethostname()
    log = _audit_log(home)
    for row in log.events(package_id=package, limit=limit, include_phi=True):
        if fmt == "dicom":  # one message a line, as syslog (RFC 5425) carries them
            for text in audit_mod.to_dicom_audit_messages(row, audit_source_id=node):
                xml = etree.fromstring(text.encode("utf-8"))
                click.echo(etree.tostring(xml, encoding="unicode"))
        else:
            event = audit_mod.to_fhir_audit_event(row, audit_source_id=node)
            click.echo(json.dumps(event, ensure_ascii=False))


# --------------------------------------------------------------------------- retention
@click.group()
def retention() -> None:
    """Purge expired packages (crypto-shredding)."""


@retention.command("purge")
@home_option
@click.option(
    "--now",
    "now",
    default=None,
    help="Run as of this ISO-8601 time (for drills), e.g. 2030-01-01T00:00:00Z.",
)
@json_option
@handle_errors
def retention_purge(home: str | None, now: str | None, as_json: bool) -> None:
    """Delete expired packages' blobs and destroy their keys; keep the audit trail."""
    from emix_core.hub.retention import purge_expired

    when = None
    if now:
        try:
            when = datetime.fromisoformat(now.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidInput("--now must be an ISO-8601 time") from exc
        if when.tzinfo is None:
            from datetime import UTC

            when = when.replace(tzinfo=UTC)
    result = purge_expired(_hub(home), when)
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"purged {len(result['purged'])} packages; {len(result['held'])} under legal hold kept"
        )


# --------------------------------------------------------------------------- member
@click.group()
def member() -> None:
    """Facility admins add members; new members confirm their identity."""


@member.command("add")
@click.argument("email")
@click.option("--role", type=click.Choice(["member", "admin"]), default="member")
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def member_add(
    email: str, role: str, hub_url: str | None, token: str | None, home: str | None, as_json: bool
) -> None:
    """Add (and verify) a member of your facility; they get a confirmation code by mail."""
    from emix_core.client.home import LocalHome

    result = LocalHome(resolve_home(home)).client(hub_url, token).add_member(email, role)
    if as_json:
        emit_json(result)
    else:
        click.echo(f"member {result['email']} added; a confirmation code was mailed")


@member.command("confirm")
@click.argument("code", required=False)
@hub_option
@home_option
@json_option
@handle_errors
def member_confirm(code: str | None, hub_url: str | None, home: str | None, as_json: bool) -> None:
    """Confirm your identity with the mailed code; prints your API token once.

    The code is read from a prompt (or from standard input when piped), so that it
    never shows in the process list or the shell history.
    """
    from emix_core.client.home import LocalHome

    if code:
        click.secho(
            "warning: a code on the command line is visible to other users of this machine; "
            "leave it out and enter it when asked",
            fg="yellow",
            err=True,
        )
    elif sys.stdin.isatty():
        code = click.prompt("confirmation code from the mail", hide_input=True, err=True)
    else:
        code = sys.stdin.readline().strip()
    if not code:
        raise InvalidInput("give the confirmation code from the mail")

    result = LocalHome(resolve_home(home)).client(hub_url, "").confirm_member(code)
    if as_json:
        emit_json(result)
    else:
        click.echo(
            f"confirmed {result['email']}; your API token (keep it secret): {result['token']}"
        )


# --------------------------------------------------------------------------- keys
@click.group()
def keys() -> None:
    """This facility's signing key and the keys it pinned."""


@keys.command("show")
@home_option
@json_option
@handle_errors
def keys_show(home: str | None, as_json: bool) -> None:
    """Show this home's signing-key fingerprint (read it to partners to compare)."""
    from emix_core.client.home import LocalHome

    key = LocalHome(resolve_home(home)).signing_key
    if as_json:
        emit_json({"fingerprint": key.fingerprint, "public_key": key.public_key_b64})
    else:
        click.echo(f"fingerprint: {key.fingerprint}")


@keys.command("forget")
@click.argument("facility")
@home_option
@handle_errors
def keys_forget(facility: str, home: str | None) -> None:
    """Forget the pinned key of a facility after confirming its key change out of band."""
    from emix_core.client.home import LocalHome

    found = LocalHome(resolve_home(home)).forget_pin(f"facility:{facility}")
    click.echo(f"pin for {facility} {'removed' if found else 'was not set'}")
