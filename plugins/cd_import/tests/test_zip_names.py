"""Zip entry names are chosen by whoever made the archive and often carry the patient's
name. No problem, warning or error emix reports about a zip repeats one: entries are
named by their number in the archive and a digest of the name."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pydicom.data
import pytest
from emix_cd_import.catalog import build_catalog
from emix_cd_import.importer import stage
from emix_cd_import.media import Limits, open_medium

from emix_core import InvalidInput

NAME = "SMITH_JOHN"


def hostile_zip(tmp_path: Path) -> Path:
    ct = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    archive = tmp_path / "usb.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"../{NAME}.dcm", ct)  # zip slip
        zf.writestr("/".join([NAME] * 12) + ".dcm", ct)  # nested too deeply
        zf.writestr(f"{NAME}/AUTORUN.INF", b"[autorun]\r\nopen=viewer.exe\r\n")
        zf.writestr(f"{NAME}/viewer.exe", b"MZ")
        zf.writestr(f"{NAME}/CT.dcm", ct, compress_type=zipfile.ZIP_STORED)  # damaged below
        with zf.open(f"{NAME}/BOMB.bin", "w", force_zip64=True) as bomb:
            block = bytes(1024 * 1024)
            for _ in range(8):
                bomb.write(block)
    data = bytearray(archive.read_bytes())
    at = data.find(ct[-100:-40])  # pixel bytes of the stored entry: its CRC no longer matches
    data[at + 10] ^= 0xFF
    archive.write_bytes(bytes(data))
    return archive


def test_zip_problems_and_errors_name_entries_by_number_not_by_name(tmp_path: Path) -> None:
    archive = hostile_zip(tmp_path)
    (tmp_path / "staging").mkdir()
    with open_medium(archive, Limits(max_depth=8, max_ratio=100)) as medium:
        catalog = build_catalog(medium, Limits(max_depth=8, max_ratio=100))
        report = json.dumps(catalog.to_dict())
        codes = {p.code for p in catalog.problems}
        assert {"unsafe-path", "too-deep", "zip-bomb", "programs"} <= codes
        assert NAME not in report, report
        assert "zip entry #1 (name sha256" in report
        with pytest.raises(InvalidInput) as damaged:
            stage(medium, catalog.instances, tmp_path / "staging", None)
    assert NAME not in damaged.value.message and "is damaged" in damaged.value.message
