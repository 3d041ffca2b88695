"""The DICOMweb envelope and answers, read the way any PACS may send them."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from emix_dicomweb.multipart import (
    MultipartBody,
    PartEnd,
    PartHeaders,
    boundary_of,
    iter_multipart,
)
from emix_dicomweb.store import describe_reason, is_transient_reason, parse_stow_response

from emix_core import InvalidInput


def _parts(data: bytes, boundary: bytes, chunk: int) -> list[tuple[dict, bytes]]:
    parts, body, headers = [], bytearray(), {}
    pieces = (data[i : i + chunk] for i in range(0, len(data), chunk))
    for event in iter_multipart(pieces, boundary):
        if isinstance(event, PartHeaders):
            headers, body = event.headers, bytearray()
        elif isinstance(event, PartEnd):
            parts.append((headers, bytes(body)))
        else:
            body += event
    return parts


def test_multipart_round_trip_keeps_every_byte_whatever_the_chunking(tmp_path: Path):
    rng = random.Random(7)
    files = []
    for index, size in enumerate([0, 1, 131, 70_000, 1_500_000]):
        path = tmp_path / f"{index}.dcm"
        # bytes that look like the boundary's start must not confuse the reader
        path.write_bytes(os.urandom(size) + b"\r\n--emix" * (index % 2))
        files.append(path)
    body = MultipartBody(files)
    data = bytearray()
    while chunk := body.read(rng.randint(1, 100_000)):
        data += chunk
    assert len(data) == len(body)
    boundary = boundary_of(body.content_type)
    for chunk in (3, 4096, 1 << 20):
        parts = _parts(bytes(data), boundary, chunk)
        assert [p for _, p in parts] == [f.read_bytes() for f in files]
        assert all(h["content-type"] == "application/dicom" for h, _ in parts)


def test_a_cut_off_multipart_answer_is_an_error_not_a_short_instance(tmp_path: Path):
    path = tmp_path / "a.dcm"
    path.write_bytes(os.urandom(10_000))
    body = MultipartBody([path])
    data = body.read(len(body))
    with pytest.raises(InvalidInput, match="cut off|ends"):
        _parts(data[:5_000], boundary_of(body.content_type), 1024)
    with pytest.raises(InvalidInput):
        boundary_of("application/dicom+json")


def test_stow_answer_names_stored_warned_and_failed_instances():
    # shape of a DICOM JSON STOW-RS answer (PS3.18 10.5.3), as dcm4chee or Google send it
    answer = {
        "00081190": {"vr": "UR", "Value": ["https://pacs/dicom-web/studies/1.2.3"]},
        "00081199": {
            "vr": "SQ",
            "Value": [
                {
                    "00081150": {"vr": "UI", "Value": ["1.2.840.10008.5.1.4.1.1.2"]},
                    "00081155": {"vr": "UI", "Value": ["1.2.3.1"]},
                },
                {
                    "00081155": {"vr": "UI", "Value": ["1.2.3.2"]},
                    "00081196": {"vr": "US", "Value": [45056]},
                },
            ],
        },
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": ["1.2.3.3"]},
                    "00081197": {"vr": "US", "Value": [0xA700]},
                },
                {
                    "00081155": {"vr": "UI", "Value": ["1.2.3.4"]},
                    "00081197": {"vr": "US", "Value": [0xC000]},
                },
                {
                    "00081155": {"vr": "UI", "Value": ["1.2.3.5"]},
                    "00081197": {"vr": "US", "Value": [0x0111]},
                },
            ],
        },
    }
    parsed = parse_stow_response(json.dumps(answer).encode())
    assert parsed.readable
    assert parsed.stored == {"1.2.3.1": None, "1.2.3.2": 0xB000}
    assert parsed.failed == {"1.2.3.3": 0xA700, "1.2.3.4": 0xC000, "1.2.3.5": 0x0111}
    assert is_transient_reason(0xA7FF) and not is_transient_reason(0xC000)
    assert describe_reason(0xC000) == "the PACS cannot understand the instance (0xC000)"
    assert "coerced" in describe_reason(0xB000)
    assert not parse_stow_response(b"<NativeDicomModel/>").readable


def test_every_gateway_setting_is_documented_and_the_example_uses_only_real_ones():
    import tomllib

    from emix_dicomweb.gateway import DESTINATION_SETTINGS, SOURCE_SETTINGS

    root = Path(__file__).resolve().parents[3]
    docs = (root / "docs" / "dicomweb.md").read_text()
    for setting in {**SOURCE_SETTINGS, **DESTINATION_SETTINGS}:
        assert f"`{setting}`" in docs, setting
    example = tomllib.loads((root / "examples" / "gateway-dicomweb.toml").read_text())
    for source in example["sources"]:
        assert set(source) <= set(SOURCE_SETTINGS)
    for destination in example["destinations"]:
        assert set(destination) <= set(DESTINATION_SETTINGS)
