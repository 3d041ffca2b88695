"""A receiving gateway stores each verified batch into its PACS while the sender uploads.

Real peers: a hub, the receiving facility's gateway process with a dicomweb destination,
and Orthanc as its PACS; the sender is ``send_paths`` with signed manifest parts.
"""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from emix_core import LocalHome, generate_study, send_paths
from emix_core.testing import GatewayProcess, emix, gateway_config, wait_for

pytestmark = pytest.mark.e2e

SLICES = 40  # 512x512: about 21 MB, three manifest parts


class SenderDies(Exception):
    """The sending process stops here (as kill -9 would: nothing more leaves)."""


class Sender:
    """The mercy side's hub client, which can hold its seal or die after some batches."""

    def __init__(self, client: Any, *, die_after_batches: int | None = None) -> None:
        self._client = client
        self.die_after = die_after_batches
        self.batches = 0
        self.may_seal = threading.Event()
        self.opened: list[str] = []

    def upload_batch(self, *args: Any, **kw: Any) -> Any:
        if self.die_after is not None and self.batches >= self.die_after:
            raise SenderDies
        self.batches += 1
        return self._client.upload_batch(*args, **kw)

    def seal(self, package_id: str, signed: dict[str, Any]) -> Any:
        assert self.may_seal.wait(120), "the test never let the seal go"
        return self._client.seal(package_id, signed)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)


def start_sending(hub, mercy, study: Path, sender: Sender) -> threading.Thread:  # type: ignore[no-untyped-def]
    home = LocalHome(mercy.home)

    def run() -> None:
        with contextlib.suppress(SenderDies):
            send_paths(
                [study],
                ["lakeside"],
                client=sender,
                home=home,
                parallel=1,
                progressive=True,
                on_package=lambda p, _r: sender.opened.append(p),
            )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def study(tmp_path: Path) -> tuple[Path, list[Path]]:
    folder = tmp_path / "study"
    return folder, sorted(generate_study(folder, slices=SLICES, series=2, seed=11))


@pytest.fixture
def receiving(hub, lakeside, orthanc_factory, tmp_path: Path):  # type: ignore[no-untyped-def]
    pacs = orthanc_factory(f"progressive-{tmp_path.name}")
    table = f'[[destinations]]\nkind = "dicomweb"\nname = "pacs"\nurl = "{pacs.url}"\n'
    gateway = GatewayProcess(tmp_path / "site-b", gateway_config(hub, "lakeside", table))
    gateway.start().wait_logged("gateway.started")
    yield gateway, pacs
    gateway.stop()


def sop_uids(files: list[Path]) -> set[str]:
    import pydicom

    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in files}


def delivered(gateway: GatewayProcess) -> int:
    return gateway.status()["inbound"]["packages"].get("delivered", 0)


def test_verified_batches_are_in_the_pacs_before_the_seal_and_the_package_once_after(
    hub, mercy, lakeside, study, receiving
):
    folder, files = study
    gateway, pacs = receiving
    sender = Sender(LocalHome(mercy.home).client(hub.url, mercy.token))
    thread = start_sending(hub, mercy, folder, sender)
    # the seal is held: every instance still reaches the PACS, batch by batch
    wait_for(lambda: len(pacs.sop_instance_uids()) == SLICES, 120, "every instance in the PACS")
    wait_for(lambda: gateway.log_text().count('"batch.delivered"') >= 3, 30, "three batches")
    package_id = sender.opened[0]
    # meanwhile the package is invisible to a person's inbox and to `emix receive`
    assert package_id not in emix("inbox", "--json", env=lakeside.env).stdout
    assert delivered(gateway) == 0
    sender.may_seal.set()
    thread.join(60)
    wait_for(lambda: delivered(gateway) == 1, 60, "the package delivered")
    assert pacs.sop_instance_uids() == sop_uids(files)
    assert pacs.get("/statistics").json()["CountInstances"] == SLICES
    assert gateway.log_text().count('"package.delivered"') == 1
    report = [
        e for e in LocalHome(gateway.root / "home").audit_log.events(package_id=package_id,
                                                                      limit=None)
        if e["event_type"] == "instances-transferred" and "STOW-RS" in (e["detail"] or "")
    ]  # fmt: skip
    assert len(report) >= 3, "each early batch and the final check are audited"


def test_a_sender_that_dies_leaves_its_verified_batches_and_the_expiry_on_record(
    hub, mercy, study, receiving
):
    folder, files = study
    gateway, pacs = receiving
    sender = Sender(LocalHome(mercy.home).client(hub.url, mercy.token), die_after_batches=2)
    start_sending(hub, mercy, folder, sender).join(60)
    package_id = sender.opened[0]
    wait_for(lambda: gateway.log_text().count('"batch.delivered"') == 2, 60, "two batches")
    stored = pacs.sop_instance_uids()
    assert 0 < len(stored) < SLICES and stored <= sop_uids(files)

    # the package never seals: the hub's retention purge drops it at its expiry
    emix("retention", "purge", "--home", str(hub.home), "--now", "2100-01-01T00:00:00+00:00")
    wait_for(lambda: gateway.status()["inbound"]["packages"].get("failed") == 1, 60, "given up")
    assert '"package.partially_delivered"' in gateway.log_text()
    events = LocalHome(gateway.root / "home").audit_log.events(package_id=package_id, limit=None)
    partial = [e for e in events if "never completed" in (e["detail"] or "")]
    assert len(partial) == 1 and f"{len(stored)} verified items" in partial[0]["detail"]
    assert pacs.sop_instance_uids() == stored  # what was verified and stored stays


def test_receiving_gateway_killed_mid_way_stores_each_instance_once(hub, mercy, study, receiving):
    folder, files = study
    gateway, pacs = receiving
    sender = Sender(LocalHome(mercy.home).client(hub.url, mercy.token))
    thread = start_sending(hub, mercy, folder, sender)
    gateway.wait_logged('"batch.delivered"', 60)
    gateway.kill()  # kill -9 mid-way
    sender.may_seal.set()
    thread.join(60)
    gateway.start()
    wait_for(lambda: delivered(gateway) == 1, 120, "the package delivered after the restart")
    assert pacs.sop_instance_uids() == sop_uids(files)
    assert pacs.get("/statistics").json()["CountInstances"] == SLICES
    assert gateway.log_text().count('"package.delivered"') == 1
    status = LocalHome(mercy.home).client(hub.url, mercy.token).status(sender.opened[0])
    assert [r["delivered"] is not None for r in status["recipients"]] == [True]
