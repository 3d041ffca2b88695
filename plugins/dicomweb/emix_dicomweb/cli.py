"""``emix dicomweb send`` and ``emix dicomweb deliver``."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from emix_core import (
    echo_instance_outcomes,
    emit_json,
    handle_errors,
    home_option,
    hub_option,
    json_option,
    token_option,
    transfer_progress,
)
from emix_dicomweb.auth import AUTH_KINDS

if TYPE_CHECKING:
    from emix_dicomweb.connection import PacsSettings

__all__ = ["dicomweb"]


def pacs_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """The PACS URL, authentication and TLS options, folded into one ``pacs`` argument."""

    @click.option(
        "--pacs",
        "pacs_url",
        envvar="EMIX_PACS_URL",
        required=True,
        help="DICOMweb base URL of the PACS, e.g. https://pacs/dicom-web (env EMIX_PACS_URL).",
    )
    @click.option(
        "--pacs-auth",
        type=click.Choice(AUTH_KINDS),
        default=None,
        help="PACS authentication (default: inferred from the options given).",
    )
    @click.option("--pacs-user", envvar="EMIX_PACS_USER", default="", help="Basic auth user.")
    @click.option(
        "--pacs-password",
        envvar="EMIX_PACS_PASSWORD",
        default="",
        help="Basic auth password (prefer env EMIX_PACS_PASSWORD).",
    )
    @click.option(
        "--pacs-token",
        envvar="EMIX_PACS_TOKEN",
        default="",
        help="Bearer token (prefer env EMIX_PACS_TOKEN).",
    )
    @click.option(
        "--pacs-cert", type=click.Path(dir_okay=False), default="", help="Client certificate (PEM)."
    )
    @click.option(
        "--pacs-key", type=click.Path(dir_okay=False), default="", help="Its private key (PEM)."
    )
    @click.option(
        "--pacs-ca",
        type=click.Path(dir_okay=False, exists=True),
        default=None,
        help="CA bundle to verify the PACS's certificate with.",
    )
    @click.option(
        "--pacs-no-verify",
        is_flag=True,
        help="Do not verify the PACS's TLS certificate (testing only).",
    )
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from emix_dicomweb.connection import PacsSettings

        settings = PacsSettings(
            url=kwargs.pop("pacs_url"),
            auth=kwargs.pop("pacs_auth") or "",
            username=kwargs.pop("pacs_user"),
            password=kwargs.pop("pacs_password"),
            token=kwargs.pop("pacs_token"),
            cert=kwargs.pop("pacs_cert"),
            key=kwargs.pop("pacs_key"),
        )
        ca, no_verify = kwargs.pop("pacs_ca"), kwargs.pop("pacs_no_verify")
        settings.tls_verify = False if no_verify else (ca or True)
        kwargs["pacs"] = settings
        return func(*args, **kwargs)

    return wrapper


@click.group()
def dicomweb() -> None:
    """Move studies between PACS through the hub, with DICOMweb (QIDO, WADO, STOW).

    \b
    From your PACS to another facility:
      emix dicomweb send --pacs https://pacs/dicom-web --accession A123 --to lakeside
    A received package into your PACS:
      emix dicomweb deliver PACKAGE --pacs https://pacs/dicom-web
    """


def _home(home: str | None):  # type: ignore[no-untyped-def]
    from emix_core import LocalHome, resolve_home

    return LocalHome(resolve_home(home))


@dicomweb.command("send")
@pacs_options
@click.option("--study", default=None, help="Study Instance UID.")
@click.option("--accession", default=None, help="Accession Number.")
@click.option("--patient-id", default=None, help="Patient ID (every study of the patient).")
@click.option(
    "--to", "to", multiple=True, required=True, help="Recipient address (repeat for several)."
)
@click.option("--expires-days", type=click.IntRange(1, 3650), default=None)
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def send_command(
    pacs: PacsSettings,
    study: str | None,
    accession: str | None,
    patient_id: str | None,
    to: tuple[str, ...],
    expires_days: int | None,
    hub_url: str | None,
    token: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Find studies on the PACS (QIDO-RS), retrieve them untouched (WADO-RS) and send
    them as one package. Exit 0 when every instance was sent, 1 otherwise."""
    from emix_dicomweb.connection import PacsConnection
    from emix_dicomweb.query import study_filters
    from emix_dicomweb.transfer import pull_and_send

    if not (study or accession or patient_id):
        raise click.UsageError("give --study, --accession or --patient-id")
    filters = study_filters(study=study, accession=accession, patient_id=patient_id)
    local = _home(home)
    client = local.client(hub_url, token)
    conn = PacsConnection(pacs)
    with transfer_progress("sending", not as_json) as progress:
        result = pull_and_send(
            conn,
            filters,
            list(to),
            client=client,
            home=local,
            expires_days=expires_days,
            parallel=local.config.client.parallel,
            progress=progress,
        )
    ok = bool(result.sent.package_id) and not result.sent.failed
    if as_json:
        emit_json(result.to_dict())
    else:
        for failure in result.sent.failed:
            click.secho(f"not sent: {failure.path.name}: {failure.error}", fg="yellow", err=True)
        sent = result.sent
        click.echo(
            f"package {sent.package_id}: {sent.items} instances of {result.studies} studies "
            f"from {conn.host}, {sent.bytes / 1e6:.1f} MB, to {', '.join(to)}"
            if sent.package_id
            else "nothing was sent"
        )
    sys.exit(0 if ok else 1)


@dicomweb.command("deliver")
@click.argument("package")
@pacs_options
@click.option("--batch-mb", type=click.FloatRange(0.1, 4096), default=32.0, show_default=True)
@click.option("--parallel", type=click.IntRange(1, 16), default=2, show_default=True)
@hub_option
@token_option
@home_option
@json_option
@handle_errors
def deliver_command(
    package: str,
    pacs: PacsSettings,
    batch_mb: float,
    parallel: int,
    hub_url: str | None,
    token: str | None,
    home: str | None,
    as_json: bool,
) -> None:
    """Store a received package into the PACS (STOW-RS) and report each instance:
    stored, already there, or failed and why. Running it twice is harmless.
    Exit 0 when every instance is in the PACS, 1 otherwise."""
    from emix_dicomweb.connection import PacsConnection
    from emix_dicomweb.store import StoreSettings
    from emix_dicomweb.transfer import deliver_package

    local = _home(home)
    client = local.client(hub_url, token)
    conn = PacsConnection(pacs)
    with transfer_progress("storing", not as_json) as progress:
        result = deliver_package(
            package,
            conn,
            client=client,
            home=local,
            settings=StoreSettings(batch_mb=batch_mb, parallel=parallel),
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
            f"package {package} into {conn.host}: {summary['stored']} stored, "
            f"{summary['already_there']} already there, {summary['failed']} failed"
            + (f"; {result.documents} documents not stored" if result.documents else "")
            + (f"; refused instances kept in {result.kept}" if result.kept else "")
        )
    sys.exit(0 if report.complete else 1)
