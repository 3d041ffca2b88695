"""Tests of the example adapter, written only against emix_core and emix_core.testing."""

from __future__ import annotations

import json
from pathlib import Path

import emix_acme_pacs
import pydicom
import pytest
from click.testing import CliRunner

from emix_core import (
    ConfigError,
    generate_study,
    get_plugin_manager,
    package_from_folder,
    registered_kinds,
)
from emix_core.testing import emix, emix_json


def test_the_plugin_registers_its_destination_kind() -> None:
    pm = get_plugin_manager(load_entry_points=False)
    pm.register(emix_acme_pacs, name="acme_pacs")
    _sources, destinations = registered_kinds(pm)
    assert destinations["acme-pacs"] is emix_acme_pacs.AcmeImportFolder


def test_a_missing_import_folder_is_a_clear_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="is the PACS share mounted"):
        emix_acme_pacs.AcmeImportFolder({"import_folder": str(tmp_path / "not-mounted")})


def test_an_arrived_study_lands_in_the_import_folder_exactly_once(
    tmp_path: Path, mercy, lakeside
) -> None:
    study = tmp_path / "study"
    generate_study(study, slices=12, series=2, rows=64, columns=64)
    package = emix_json("send", str(study), "--to", "lakeside", env=mercy.env)["package"]
    received = tmp_path / "received"
    emix("receive", package, "--out", str(received), env=lakeside.env)

    folder = received / package
    import_dir = tmp_path / "acme-import"
    import_dir.mkdir()
    destination = emix_acme_pacs.AcmeImportFolder({"import_folder": str(import_dir)})
    first = destination.deliver(package_from_folder(folder), folder)
    again = destination.deliver(package_from_folder(folder), folder)  # after a crash

    assert first == {"copied": 12, "already_there": 0}
    assert again == {"copied": 0, "already_there": 12}
    sent = {pydicom.dcmread(p).SOPInstanceUID for p in study.rglob("*.dcm")}
    imported = {pydicom.dcmread(p).SOPInstanceUID for p in import_dir.glob("*.dcm")}
    assert imported == sent
    assert not any(p.name.startswith(".") for p in import_dir.iterdir())

    runner = CliRunner()
    result = runner.invoke(emix_acme_pacs.acme_pacs, ["pending", str(import_dir), "--json"])
    assert json.loads(result.output) == {"folder": str(import_dir), "pending": 12}
