"""``emix gateway run`` and ``emix gateway status``."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import click

from emix_core.cli.util import emit_json, handle_errors, json_option

config_option = click.option(
    "--config",
    "config",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="gateway.toml (default: $EMIX_GATEWAY_CONFIG, else ./gateway.toml, "
    "else $EMIX_HOME/gateway.toml).",
)


@click.group()
def gateway() -> None:
    """Run a facility's gateway: drop folders, PACS and EMR links, through the hub.

    \b
    Configure it in gateway.toml (see examples/gateway.toml), then:
      emix gateway run --config gateway.toml
      emix gateway status --config gateway.toml
    """


@gateway.command()
@config_option
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="One line per event: key=value text, or JSON objects.",
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"]),
    default="info",
    show_default=True,
    help="Polls and other routine events are logged at debug.",
)
@click.option("--verbose", "-v", is_flag=True, help="Also log debug events (--log-level debug).")
@handle_errors
def run(config: Path | None, log_format: str, log_level: str, verbose: bool) -> None:
    """Run sources and destinations until stopped (Ctrl-C or SIGTERM)."""
    from emix_core.gateway.runner import configure_logging, find_config, load_gateway

    level = logging.DEBUG if verbose else getattr(logging, log_level.upper())
    configure_logging(log_format, level)
    gw = load_gateway(find_config(config))
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        # not stop.set() here: the handler runs in the main thread, which may be inside
        # stop.wait() holding the event's lock; setting it from there deadlocks
        threading.Thread(target=stop.set, name="emix-stop", daemon=True).start()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gw.run(stop)


@gateway.command()
@config_option
@json_option
@handle_errors
def status(config: Path | None, as_json: bool) -> None:
    """Show what is pending, sent and failed.

    Read from the gateway's journals: works whether it runs or not, without the hub.
    """
    from emix_core.gateway.runner import find_config, load_gateway

    report = load_gateway(find_config(config)).status()
    if as_json:
        emit_json(report)
        return
    state = f"running (pid {report['pid']})" if report["running"] else "not running"
    click.echo(f"gateway {state}; hub {report['hub']}; state in {report['state']}")
    for source in report["sources"]:
        _echo_source(source)
    inbound = report["inbound"]
    if inbound is not None:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(inbound["packages"].items())) or "none"
        click.echo(f"inbound: packages {counts}")
        for item in inbound["failing"]:
            where = f" to {item['destination']}" if item["destination"] else ""
            click.secho(
                f"  retrying {item['package']}{where} (attempt {item['attempts']}): "
                f"{item['error']}",
                fg="yellow",
            )
        for item in inbound["failed"]:
            click.secho(f"  gave up {item['package']}: {item['error']}", fg="red")


def _echo_source(source: dict[str, Any]) -> None:
    if "error" in source:
        click.secho(f"source {source['name']}: {source['error']}", fg="red")
        return
    click.echo(
        f"source {source['name']} ({source.get('kind', '?')}"
        + (f" {source['path']}" if source.get("path") else "")
        + f"): {source.get('pending', 0)} pending, {source.get('sent', 0)} sent in "
        f"{source.get('packages', 0)} packages, {source.get('duplicates', 0)} duplicates, "
        f"{source.get('failed', 0)} failed"
    )
    for retry in source.get("retrying", []):
        click.secho(
            f"  retrying {retry['files']} files to {retry['recipients']} "
            f"(attempt {retry['attempts']}): {retry['error']}",
            fg="yellow",
        )
    for failure in source.get("recent_failures", [])[:5]:
        click.secho(f"  failed: {failure['file']}: {failure['error']}", fg="red")
