"""``emix demo``: a hub and two facilities on this machine, and a study sent between them.

Everything lives under one folder (default ``./emix-demo``): ``hub/`` is the hub's home,
and each facility has its own home with ``outbox/``, ``inbox/``, ``sent/`` and ``failed/``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import click
import requests

from emix_core.cli_util import handle_errors, transfer_progress
from emix_core.config import CONFIG_NAME
from emix_core.errors import ConfigError

FACILITIES = (
    ("Mercy General Hospital", "mercy-general", "pacs-admin@mercy.example.org", "pdf"),
    ("Lakeside Imaging Center", "lakeside-imaging", "it@lakeside.example.org", "hl7"),
)
FACILITY_FOLDERS = ("outbox", "inbox", "sent", "failed")


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def setup_demo_home(root: Path, port: int) -> dict[str, Path]:
    """Create (or reuse) the hub home and one home per facility; return address → home."""
    from emix_core.facilities import add_facility
    from emix_core.hub.context import init_hub_home, open_hub

    hub_home = root / "hub"
    fresh = not (hub_home / CONFIG_NAME).exists()
    init_hub_home(hub_home, public_url=f"http://127.0.0.1:{port}", port=port)
    homes: dict[str, Path] = {}
    hub = open_hub(hub_home)
    for name, address, email, fmt in FACILITIES:
        home = root / address
        for folder in FACILITY_FOLDERS:
            (home / folder).mkdir(parents=True, exist_ok=True)
        config = home / CONFIG_NAME
        if fresh or not config.exists():
            result = add_facility(hub, name, email, address=address, report_format=fmt)
            config.write_text(
                "# Facility-side configuration (CLI and gateway).\n[client]\n"
                f'hub_url = "http://127.0.0.1:{port}"\n'
                f'token = "{result["token"]}"\n',
                "utf-8",
            )
            config.chmod(0o600)
        homes[address] = home
    return homes


def start_hub(hub_home: Path, port: int, log_file: Path) -> subprocess.Popen[bytes]:
    """Start ``emix hub serve`` in the background and wait until it answers."""
    if not port_is_free(port):
        raise ConfigError(f"port {port} is in use; pass --port with a free one")
    log = open(log_file, "ab")  # noqa: SIM115 - handed to the child process
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emix_core",
            "hub",
            "serve",
            "--home",
            str(hub_home),
            "--port",
            str(port),
            "--host",
            "127.0.0.1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ConfigError(f"the hub did not start; see {log_file}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1).ok:
                return process
        except requests.RequestException:
            time.sleep(0.2)
    process.terminate()
    raise ConfigError(f"the hub did not answer within 30 s; see {log_file}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)


@click.command()
@click.option(
    "--home",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("emix-demo"),
    show_default=True,
    help="Folder for the whole demo.",
)
@click.option("--port", type=int, default=8480, show_default=True, help="Hub port (127.0.0.1).")
@click.option(
    "--slices",
    type=click.IntRange(1, 5000),
    default=200,
    show_default=True,
    help="Slices in the generated sample study (512x512, 16-bit).",
)
@click.option(
    "--exit",
    "exit_after",
    is_flag=True,
    help="Stop after the sample exchange instead of running until Ctrl-C.",
)
@handle_errors
def demo(home: Path, port: int, slices: int, exit_after: bool) -> None:
    """Run a hub and two facilities on this machine and send a sample study between them."""
    from emix_core.home import LocalHome
    from emix_core.receiver import receive_package
    from emix_core.samples import generate_study, write_sample_report_pdf
    from emix_core.sender import send_paths

    root = home.resolve()
    root.mkdir(parents=True, exist_ok=True)
    click.secho(f"emix demo in {root}", bold=True)
    homes = setup_demo_home(root, port)
    (sender_addr, recipient_addr) = (FACILITIES[0][1], FACILITIES[1][1])
    hub_process = start_hub(root / "hub", port, root / "hub" / "hub.log")
    try:
        click.echo(f"hub running at http://127.0.0.1:{port} (log: {root / 'hub' / 'hub.log'})")
        study = root / "sample-study"
        if study.exists():
            shutil.rmtree(study)
        click.echo(f"generating a sample CT study: {slices} slices of 512x512 in 2 series...")
        generate_study(study, slices=slices, series=2)
        write_sample_report_pdf(
            study / "report.pdf",
            facility=FACILITIES[0][0],
            accession_number="A0001",
            patient_name="DEMO^PATIENT",
            findings="No acute intracranial abnormality.",
            impression="Normal CT of the head.",
        )
        sender = LocalHome(homes[sender_addr])
        with transfer_progress("sending", True) as progress:
            sent = send_paths(
                [study], [recipient_addr], client=sender.client(), home=sender, progress=progress
            )
        click.echo(
            f"{sender_addr} sent package {sent.package_id}: {sent.items} items, "
            f"{sent.bytes / 1e6:.1f} MB in {sent.seconds:.1f} s"
        )
        recipient = LocalHome(homes[recipient_addr])
        inbox_dir = homes[recipient_addr] / "inbox" / sender_addr
        with transfer_progress("receiving", True) as progress:
            got = receive_package(
                sent.package_id,
                inbox_dir,
                client=recipient.client(),
                home=recipient,
                progress=progress,
            )
        click.echo(
            f"{recipient_addr} received it into {got.path}\n"
            "  signature verified, every SHA-256 checked, signed receipt sent"
        )
        _next_steps(root, port, homes, recipient_addr)
        if exit_after:
            return
        click.secho("\nThe hub keeps running; press Ctrl-C to stop.", bold=True)
        try:
            hub_process.wait()
        except KeyboardInterrupt:
            click.echo("\nstopping")
    finally:
        stop(hub_process)


def _next_steps(root: Path, port: int, homes: dict[str, Path], recipient: str) -> None:
    r = homes[recipient]
    click.secho("\nTry it yourself:", bold=True)
    click.echo(
        f"  emix inbox --home {r}\n"
        f"  emix send PATH... --to {recipient} --home {homes[FACILITIES[0][1]]}\n"
        f"  emix receive PACKAGE --out ./received --home {r}\n"
        f"  emix audit verify --home {root / 'hub'}\n"
        f"  emix plugins"
    )
