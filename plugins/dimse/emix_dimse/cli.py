"""``emix dimse listen | echo | send | deliver``."""

from __future__ import annotations

import functools
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from emix_core import (
    ConfigError,
    echo_instance_outcomes,
    emit_json,
    handle_errors,
    home_option,
    hub_option,
    json_option,
    token_option,
    transfer_progress,
)

__all__ = ["dimse"]


def peer_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--pacs AET@HOST:PORT`` and how emix calls it, folded into one ``call`` argument."""

    @click.option(
        "--pacs",
        "pacs",
        envvar="EMIX_DIMSE_PACS",
        required=True,
        help="The DICOM node, AET@HOST:PORT, e.g. ORTHANC@pacs.local:4242 (env EMIX_DIMSE_PACS).",
    )
    @click.option(
        "--calling-ae",
        default="EMIX",
        show_default=True,
        help="emix's AE title; the PACS must know it.",
    )
    @click.option("--timeout", type=click.FloatRange(1, 3600), default=60.0, show_default=True)
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from emix_dimse.peers import check_ae_title, parse_peer
        from emix_dimse.scu import CallSettings

        try:
            call = CallSettings(
                parse_peer(kwargs.pop("pacs")),
                calling_ae=check_ae_title(kwargs.pop("calling_ae"), "--calling-ae"),
                timeout=kwargs.pop("timeout"),
            )
        except ConfigError as exc:
            raise click.UsageError(exc.message) from None
        kwargs["call"] = call
        return func(*args, **kwargs)

    return wrapper


@click.group()
def dimse() -> None:
    """Classic DICOM networking: be a DICOM node, query, retrieve and store.

    \b
    Receive studies from a PACS or modality and send each on, once settled:
      emix dimse listen --ae-title EMIX --port 11112 --to lakeside --allow PACS@10.0.0.5
    Check a DICOM node answers:
      emix dimse echo --pacs ORTHANC@pacs.local:4242
    From your PACS to another facility (C-FIND, then C-GET or C-MOVE):
      emix dimse send --pacs ORTHANC@pacs.local:4242 --accession A123 --to lakeside
    A received package into your PACS (C-STORE):
      emix dimse deliver PACKAGE --pacs ORTHANC@pacs.local:4242
    """


@dimse.command("listen")
@click.option("--ae-title", required=True, help="The listener's AE title, e.g. EMIX.")
@click.option("--port", type=click.IntRange(1, 65535), required=True, help="TCP port, e.g. 11112.")
@click.option(
    "--host",
    default="0.0.0.0",
    show_default=True,
    help="Address to listen on (127.0.0.1: this machine only).",
)
@click.option("--to", "to", multiple=True, required=True, help="Recipient address (repeatable).")
@click.option(
    "--allow",
    multiple=True,
    help="Accepted caller, AET or AET@HOST (repeatable); without it any caller is accepted.",
)
@click.option(
    "--send-on",
    type=click.Choice(["settled", "association-end"]),
    default="settled",
    show_default=True,
    help="Send a study once quiet for --settle seconds, or once the association ends.",
)
@click.option("--settle", type=click.FloatRange(0, 86400), default=5.0, show_default=True)
@click.option("--max-pdu", type=click.IntRange(4096, 2**31), default=262144, show_default=True)
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    default=60.0,
    show_default=True,
    help="Seconds of silence before a DIMSE exchange or connection is dropped.",
)
@click.option("--max-associations", type=click.IntRange(1, 1000), default=10, show_default=True)
@click.option("--expires-days", type=click.IntRange(1, 3650), default=None)
@click.option(
    "--tls-cert", type=click.Path(dir_okay=False, exists=True), default=None, help="DICOM TLS."
)
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True), default=None)
@click.option(
    "--tls-ca",
    type=click.Path(dir_okay=False, exists=True),
    default=None,
    help="Require client certificates signed by this CA.",
)
@hub_option
@token_option
@home_option
@handle_errors
def listen_command(
    ae_title: str,
    port: int,
    host: str,
    to: tuple[str, ...],
    allow: tuple[str, ...],
    send_on: str,
    settle: float,
    max_pdu: int,
    timeout: float,
    max_associations: int,
    expires_days: int | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    hub_url: str | None,
    token: str | None,
    home: str | None,
) -> None:
    """Be a DICOM node (C-ECHO and C-STORE SCP): every study that arrives is kept on
    disk before it is acknowledged, then sent to the recipients as one package.
    Runs until Ctrl-C or SIGTERM."""
    from emix_core import Gateway, resolve_home

    home_path = Path(resolve_home(home)).resolve()
    settings: dict[str, Any] = {"home": str(home_path), "state": "dimse-listen"}
    if hub_url:
        settings["hub_url"] = hub_url
    if token:
        settings["token"] = token
    source: dict[str, Any] = {
        "kind": "dimse",
        "name": "listen",
        "ae_title": ae_title,
        "port": port,
        "host": host,
        "to": list(to),
        "allow": list(allow),
        "send_on": send_on,
        "settle_seconds": settle,
        "max_pdu": max_pdu,
        "dimse_timeout": timeout,
        "network_timeout": timeout,
        "max_associations": max_associations,
    }
    if expires_days:
        source["expires_days"] = expires_days
    for key, value in (("tls_cert", tls_cert), ("tls_key", tls_key), ("tls_ca", tls_ca)):
        if value:
            source[key] = str(Path(value).resolve())
    _logging()
    gateway = Gateway(home_path / "dimse-listen.toml", settings, sources=[source])
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    click.echo(f"listening as {ae_title} on {host}:{port}, sending to {', '.join(to)}", err=True)
    gateway.run(stop)


def _with_fields(record: Any) -> bool:
    if not hasattr(record, "emix"):
        record.emix = ""
    return True


def _logging() -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s %(emix)s"))
    handler.addFilter(_with_fields)
    root = logging.getLogger("emix")
    root.addHandler(handler)
    root.setLevel(logging.INFO)


@dimse.command("echo")
@peer_options
@json_option
@handle_errors
def echo_command(call: Any, as_json: bool) -> None:
    """C-ECHO a DICOM node: is it there, and does it accept emix's AE title?"""
    from emix_dimse.scu import echo

    answer = echo(call)
    if as_json:
        emit_json(answer)
    else:
        click.echo(f"{answer['peer']} answered C-ECHO in {answer['seconds'] * 1000:.0f} ms")


@dimse.command("deliver")
@click.argument("package")
@peer_options
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def deliver_command(
    package: str,
    call: Any,
    hub_url: str | None,
    token: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Store a received package into the PACS with C-STORE, each instance in its own
    transfer syntax (decompressed only if the PACS refuses it, and said so).
    Exit 0 when every instance is stored, 1 otherwise."""
    from emix_core import client_for
    from emix_dimse.delivery import deliver_package

    local, client = client_for(hub_url, token, home)
    with transfer_progress("storing", not as_json) as progress:
        result = deliver_package(
            package,
            call,
            client=client,
            home=local,
            parallel=local.config.client.parallel,
            progress=progress,
        )
    report = result.report
    if as_json:
        emit_json(result.to_dict(with_uids=True))
    else:
        echo_instance_outcomes(report.outcomes)
        summary = report.summary()
        click.echo(
            f"package {package} into {call.peer.ae_title}: {summary['stored']} stored, "
            f"{summary['failed']} failed, {summary['decompressed']} decompressed"
            + (f"; {result.documents} documents not stored" if result.documents else "")
        )
    sys.exit(0 if report.complete else 1)


@dimse.command("send")
@peer_options
@click.option("--study", default=None, help="Study Instance UID.")
@click.option("--accession", default=None, help="Accession Number.")
@click.option("--patient-id", default=None, help="Patient ID (every study of the patient).")
@click.option("--to", "to", multiple=True, required=True, help="Recipient address (repeatable).")
@click.option(
    "--move-dest",
    default=None,
    help="Retrieve with C-MOVE to this AE title (the PACS must know it) instead of C-GET.",
)
@click.option(
    "--move-port",
    type=click.IntRange(1, 65535),
    default=None,
    help="Port emix listens on for the C-MOVE (where the PACS sends --move-dest).",
)
@click.option("--expires-days", type=click.IntRange(1, 3650), default=None)
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def send_command(
    call: Any,
    study: str | None,
    accession: str | None,
    patient_id: str | None,
    to: tuple[str, ...],
    move_dest: str | None,
    move_port: int | None,
    expires_days: int | None,
    hub_url: str | None,
    token: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Find studies on the PACS (C-FIND), retrieve them untouched (C-GET, or C-MOVE with
    --move-dest) and send them as one package. Exit 0 when every instance was sent."""
    from emix_core import client_for
    from emix_dimse.peers import check_ae_title
    from emix_dimse.retrieve import pull_and_send

    if sum(1 for key in (study, accession, patient_id) if key) != 1:
        raise click.UsageError("give one of --study, --accession or --patient-id")
    if move_dest:
        try:
            move_dest = check_ae_title(move_dest, "--move-dest")
        except ConfigError as exc:
            raise click.UsageError(exc.message) from None
        if not move_port:
            raise click.UsageError("--move-dest needs --move-port (where the PACS sends it)")
    local, client = client_for(hub_url, token, home)
    with transfer_progress("sending", not as_json) as progress:
        result = pull_and_send(
            call,
            list(to),
            study=study,
            accession=accession,
            patient_id=patient_id,
            client=client,
            home=local,
            move_dest=move_dest,
            move_port=move_port or 0,
            expires_days=expires_days,
            parallel=local.config.client.parallel,
            progress=progress,
        )
    sent = result.sent
    ok = bool(sent.package_id) and not sent.failed and not result.retrieved.failed
    if as_json:
        emit_json(result.to_dict())
    else:
        for failure in sent.failed:
            click.secho(f"not sent: {failure.error}", fg="yellow", err=True)
        if result.retrieved.failed:
            click.secho(
                f"{result.retrieved.failed} instances were not retrieved", fg="yellow", err=True
            )
        click.echo(
            f"package {sent.package_id}: {sent.items} instances of {result.studies} studies "
            f"from {call.peer.ae_title} ({result.retrieved.method}), "
            f"{sent.bytes / 1e6:.1f} MB, to {', '.join(to)}"
            if sent.package_id
            else "nothing was sent"
        )
    sys.exit(0 if ok else 1)
