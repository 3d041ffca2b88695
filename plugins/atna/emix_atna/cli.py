"""``emix atna``: what waits for the audit record repository, and sending it now."""

from __future__ import annotations

import click

from emix_core import ConfigError, emit_json, handle_errors, home_option, resolve_home


@click.group()
def atna() -> None:
    """Audit messages for the ATNA audit record repository ([atna] in emix.toml)."""


def _forwarder(home: str | None):  # type: ignore[no-untyped-def]
    from emix_atna import forwarder_for

    forwarder = forwarder_for(home)
    if forwarder is None:
        raise ConfigError("no audit record repository configured: set [atna] url in emix.toml")
    return forwarder


@atna.command("status")
@home_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def status(home: str | None, as_json: bool) -> None:
    """How many messages wait in the home's queue (read only: sends nothing)."""
    from emix_atna.forwarder import DiskQueue
    from emix_atna.settings import load_settings

    settings = load_settings(resolve_home(home))
    if settings is None:
        raise ConfigError("no audit record repository configured: set [atna] url in emix.toml")
    info = {
        "repository": settings.url,
        "audit_source_id": settings.audit_source_id,
        "queued": len(DiskQueue(settings.queue_path)),
    }
    if as_json:
        emit_json(info)
        return
    click.echo(f"repository: {info['repository']} (AuditSourceID {info['audit_source_id']})")
    click.echo(f"queued: {info['queued']}")


@atna.command("flush")
@home_option
@click.option("--timeout", type=float, default=30.0, show_default=True, help="Seconds.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@handle_errors
def flush(home: str | None, timeout: float, as_json: bool) -> None:
    """Send every queued message now; exit 1 if some are still queued after TIMEOUT."""
    forwarder = _forwarder(home)
    done = forwarder.flush(timeout)
    forwarder.settings.flush_seconds = 0  # tried already: no second wait at exit
    info = forwarder.status()
    if as_json:
        emit_json({**info, "flushed": done})
    else:
        click.echo(f"queued: {info['queued']}" + ("" if done else f" ({info['last_error']})"))
    if not done:
        raise SystemExit(1)
