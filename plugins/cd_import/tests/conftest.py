"""Media the cd_import tests share: pydicom's DICOMDIR test set, a generated series."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from discs import FOREIGN_ID, dicomdir_set  # noqa: E402

from emix_core import generate_study  # noqa: E402


@pytest.fixture
def cd_folder(tmp_path: Path) -> Path:
    """A patient CD's content: pydicom's DICOMDIR test set (2 patients, 31 instances)."""
    return dicomdir_set(tmp_path / "cd")


@pytest.fixture(scope="session")
def series_300(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A generated 300-slice CT series of one foreign patient, without a DICOMDIR."""
    folder = tmp_path_factory.mktemp("series300")
    generate_study(
        folder,
        slices=300,
        series=1,
        patient_name="FOREIGN^PATIENT",
        patient_id=FOREIGN_ID,
        accession_number="EXT-ACC-1",
        seed=300,
    )
    return folder
