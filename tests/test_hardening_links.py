"""Files swapped for a link or a pipe between the check and the read are refused.

A drop folder is writable by others: between ``lstat`` and ``open`` a file can become a
symbolic link to ``/etc`` or to another facility's folder. Every read of an outside file
(classification, hashing, upload) opens with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from emix_core import UnsafePathError, classify, generate_study, open_regular, sha256_file


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    (secret,) = generate_study(tmp_path / "secret", slices=1, series=1, rows=16, columns=16)
    link = tmp_path / "SMITH_JOHN.dcm"
    link.symlink_to(secret)
    return link


def test_a_link_is_neither_classified_hashed_nor_read(planted: Path) -> None:
    for read in (classify, sha256_file, open_regular):
        with pytest.raises(UnsafePathError) as refused:
            read(planted)
        assert "SMITH" not in refused.value.message  # names can carry PHI


def test_a_planted_pipe_is_refused_without_hanging(tmp_path: Path) -> None:
    pipe = tmp_path / "pipe.dcm"
    os.mkfifo(pipe)
    with pytest.raises(UnsafePathError):
        open_regular(pipe)


def test_the_upload_stream_refuses_a_file_swapped_for_a_link(planted: Path) -> None:
    from emix_core.frames import BatchReader, OutgoingItem

    body = BatchReader([OutgoingItem(1, planted, 10, "application/dicom")])
    with pytest.raises(UnsafePathError):
        b"".join(body._generate())
