"""``emix demo``: a hub and two facilities on this machine, and a study sent between them.

Everything lives under one folder (default ``./emix-demo``): ``hub/`` is the hub's home,
and each facility has its own home ``<address>/`` with ``outbox/<recipient-address>/``,
``inbox/``, ``sent/``, ``failed/``, its ``gateway.toml`` and the gateway's state
(``gateway/``). One gateway per facility runs while the demo runs.
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

from emix_core.cli.util import handle_errors, transfer_progress
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
    from emix_core.hub.context import init_hub_home, open_hub
    from emix_core.hub.facilities import add_facility

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
    import requests

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
@click.option(
    "--viewer/--no-viewer",
    default=True,
    show_default=True,
    help="Install the OHIF viewer (npm pack, cached) so the study opens in the browser.",
)
@handle_errors
def demo(home: Path, port: int, slices: int, exit_after: bool, viewer: bool) -> None:
    """Run a hub and two facilities with their gateways, and send a sample study between them.

    Each facility gets a gateway watching its ``outbox/<recipient>/`` folders and writing
    arrivals into ``inbox/<sender>/``; the sample study is dropped into the first
    facility's outbox and shows up, verified, in the second facility's inbox.
    """
    root = home.resolve()
    root.mkdir(parents=True, exist_ok=True)
    click.secho(f"emix demo in {root}", bold=True)
    homes = setup_demo_home(root, port)
    (sender_addr, recipient_addr) = (FACILITIES[0][1], FACILITIES[1][1])
    with_gateways = folder_plugin_installed()
    if with_gateways:
        write_gateway_configs(homes)
    with_viewer = viewer and _install_viewer(root / "hub")
    processes = [start_hub(root / "hub", port, root / "hub" / "hub.log")]
    try:
        click.echo(f"hub running at http://127.0.0.1:{port} (log: {root / 'hub' / 'hub.log'})")
        if with_gateways:
            for address, facility_home in homes.items():
                processes.append(start_gateway(facility_home))
                click.echo(f"gateway of {address} running (log: {facility_home / 'gateway.log'})")
        study = _sample_study(root, slices)
        if with_gateways:
            _exchange_through_folders(study, homes, sender_addr, recipient_addr)
        else:
            click.secho(
                "the emix-folder-watch plugin is not installed (pip install -e "
                "plugins/folder_watch), so no gateway runs; sending directly instead",
                fg="yellow",
            )
            _direct_exchange(study, homes, sender_addr, recipient_addr)
        _browser_steps(root, port, with_viewer)
        if exit_after:
            click.echo(
                "\nThe demo hub and gateways stop now (--exit). Run the demo again without "
                "--exit to try commands against them."
            )
            return
        _next_steps(root, port, homes, recipient_addr, with_gateways)
        click.secho("\nThe hub and the gateways keep running; press Ctrl-C to stop.", bold=True)
        try:
            while all(p.poll() is None for p in processes):
                time.sleep(0.5)
            raise ConfigError(f"a demo process stopped unexpectedly; see the logs under {root}")
        except KeyboardInterrupt:
            click.echo("\nstopping")
    finally:
        for process in reversed(processes):
            stop(process)


def _sample_study(root: Path, slices: int) -> Path:
    """A freshly generated CT study (new UIDs every run) with its PDF report."""
    from emix_core.content.samples import generate_study, write_sample_report_pdf

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
    return study


# --------------------------------------------------------------------------- gateways

GATEWAY_CONFIG = """\
# Gateway of {name} (emix demo). Run it with: emix gateway run --config {path}
# Drop a study into outbox/<recipient-address>/; arrivals appear in inbox/<sender-address>/.
[gateway]
home = "."            # this folder: signing key, pinned keys, audit log, emix.toml
poll_seconds = 0.5    # how often the hub is asked for arrived packages

[[sources]]
kind = "folder"
name = "outbox"
path = "outbox"       # sent files move to sent/, refused ones to failed/ (+ .error.txt)
settle_seconds = 2    # a study is sealed when no new file arrived for 2 s
file_settle_seconds = 1

[[destinations]]
kind = "folder"
name = "inbox"
path = "inbox"
"""


def folder_plugin_installed() -> bool:
    """True when a plugin provides the ``folder`` source and destination kinds."""
    from emix_core.gateway.runner import registered_kinds
    from emix_core.plugins import default_plugin_manager

    sources, destinations = registered_kinds(default_plugin_manager())
    return "folder" in sources and "folder" in destinations


def write_gateway_configs(homes: dict[str, Path]) -> None:
    """``gateway.toml`` and ``outbox/<other facility>/`` for every demo facility."""
    names = {address: name for name, address, _, _ in FACILITIES}
    for address, home in homes.items():
        for other in homes:
            if other != address:
                (home / "outbox" / other).mkdir(parents=True, exist_ok=True)
        config = home / "gateway.toml"
        if not config.exists():
            config.write_text(GATEWAY_CONFIG.format(name=names[address], path=config), "utf-8")


def start_gateway(home: Path) -> subprocess.Popen[bytes]:
    """Start ``emix gateway run`` for one facility in the background."""
    log = open(home / "gateway.log", "ab")  # noqa: SIM115 - handed to the child process
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emix_core",
            "gateway",
            "run",
            "--config",
            str(home / "gateway.toml"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    time.sleep(0.2)
    if process.poll() is not None:
        raise ConfigError(f"the gateway did not start; see {home / 'gateway.log'}")
    return process


def _exchange_through_folders(
    study: Path, homes: dict[str, Path], sender: str, recipient: str
) -> None:
    """Drop the study into the sender's outbox and wait until it is in the recipient's inbox."""
    inbox = homes[recipient] / "inbox" / sender
    before = set(inbox.iterdir()) if inbox.exists() else set()
    drop = homes[sender] / "outbox" / recipient / f"{study.name}-{time.strftime('%H%M%S')}"
    files = sorted(p for p in study.rglob("*") if p.is_file())
    click.echo(f"copying {len(files)} files into {drop} ...")
    shutil.copytree(study, drop)
    landed = time.monotonic()
    click.echo(
        f"waiting for {sender}'s gateway to send it and {recipient}'s gateway to deliver it "
        "(a study is sent once no new file arrived for 2 s)..."
    )
    deadline = landed + 120 + sum(p.stat().st_size for p in files) / 20e6
    while time.monotonic() < deadline:
        arrived = [p for p in inbox.glob("*") if p not in before and not p.name.startswith(".")]
        if arrived:
            count = _received_items(arrived[0])
            index = " and a DICOMDIR" if (arrived[0] / "DICOMDIR").exists() else ""
            click.echo(
                f"{recipient} has it in {arrived[0]} ({count} items{index}) "
                f"{time.monotonic() - landed:.1f} s after the copy ended:\n"
                "  signature verified, every SHA-256 checked, signed receipt sent; "
                f"the originals go to {homes[sender] / 'sent'}"
            )
            return
        time.sleep(0.1)
    raise ConfigError(
        f"the study did not reach {inbox} in time; see {homes[sender] / 'gateway.log'} and "
        f"{homes[recipient] / 'gateway.log'}, and run emix gateway status --config "
        f"{homes[sender] / 'gateway.toml'}"
    )


def _direct_exchange(
    study: Path, homes: dict[str, Path], sender_addr: str, recipient_addr: str
) -> None:
    """Send and receive with the CLI's building blocks (when no gateway can run)."""
    from emix_core.client.home import LocalHome
    from emix_core.client.receiver import receive_package
    from emix_core.client.sender import send_paths

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
        assert sent.package_id is not None
        got = receive_package(
            sent.package_id, inbox_dir, client=recipient.client(), home=recipient, progress=progress
        )
    click.echo(
        f"{recipient_addr} received it into {got.path}\n"
        "  signature verified, every SHA-256 checked, signed receipt sent"
    )


def emix_command() -> str:
    """How to run this very ``emix`` from any shell: ``emix`` when it is first on PATH,
    else the absolute path of the one next to this Python (a venv's ``bin/emix``)."""
    here = Path(sys.executable).parent / "emix"
    on_path = shutil.which("emix")
    if on_path and here.exists() and Path(on_path).resolve() == here.resolve():
        return "emix"
    if here.exists():
        return str(here)
    return f"{sys.executable} -m emix_core"


def _install_viewer(hub_home: Path) -> bool:
    """Install the OHIF viewer into the demo hub (once); a failure only skips the viewer."""
    from emix_core.errors import EmixError
    from emix_core.hub import viewer as ohif

    if ohif.installed(hub_home):
        return True
    click.echo("installing the OHIF viewer (npm pack @ohif/app, cached after the first time)")
    try:
        ohif.install(ohif.viewer_dir(hub_home))
    except EmixError as exc:
        click.secho(f"viewer not installed: {exc.message}; previews are shown instead", fg="yellow")
        return False
    return True


def _browser_steps(root: Path, port: int, with_viewer: bool) -> None:
    """Print a one-click sign-in link for the recipient's administrator."""
    from emix_core.hub.context import open_hub
    from emix_core.hub.sessions import operator_sign_in_link

    email = FACILITIES[1][2]
    link = operator_sign_in_link(open_hub(root / "hub"), email)
    click.secho("\nSee it in your browser:", bold=True)
    click.echo(f"  {link}")
    click.echo(
        f"  (works once, signed in as {email}, the recipient; for another link: "
        f"emix hub signin-link {email} --home {root / 'hub'})"
    )
    if with_viewer:
        click.echo("  open the package, then 'Open in viewer' shows the study in OHIF")
    click.echo(
        "  (they administer their facility too: 'Administration' asks them to set up an "
        "authenticator app, TOTP, the first time)"
    )


def _next_steps(
    root: Path, port: int, homes: dict[str, Path], recipient: str, with_gateways: bool
) -> None:
    r = homes[recipient]
    sender = homes[FACILITIES[0][1]]
    emix = emix_command()
    click.secho("\nTry it yourself (in another terminal, while this one runs):", bold=True)
    if with_gateways:
        click.echo(
            f"  cp -r YOUR-STUDY {sender / 'outbox' / recipient}/   "
            f"# then look in {r / 'inbox'}\n"
            f"  {emix} gateway status --config {sender / 'gateway.toml'}"
        )
    click.echo(
        f"  {emix} inbox --home {r}\n"
        f"  {emix} send PATH... --to {recipient} --home {sender}\n"
        f"  {emix} receive PACKAGE --out ./received --home {r}\n"
        f"  {emix} audit verify --home {root / 'hub'}\n"
        f"  {emix} plugins"
    )


def _received_items(folder: Path) -> int:
    """How many items the received package holds, from its signed manifest."""
    import json

    try:
        manifest = json.loads((folder / "emix-manifest.json").read_text("utf-8"))
        return len(manifest["document"]["items"])
    except (OSError, ValueError, KeyError, TypeError):
        return sum(1 for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
