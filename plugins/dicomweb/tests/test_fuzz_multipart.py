"""Fuzzing of the DICOMweb multipart reader (WADO-RS answers come from outside).

Property: :func:`iter_multipart` and :func:`boundary_of` yield or raise ``EmixError``,
whatever the bytes and however the stream is chunked, within the limits of
:mod:`emix_core.testing.fuzz`.
"""

from __future__ import annotations

import pytest
from emix_dicomweb.multipart import PartEnd, PartHeaders, boundary_of, iter_multipart
from hypothesis import given
from hypothesis import strategies as st

from emix_core.testing import fuzz_settings, mutated, within_limits

pytestmark = pytest.mark.fuzz

BOUNDARY = b"emix-7f3a"
SEEDS = [
    b"--emix-7f3a\r\nContent-Type: application/dicom\r\n\r\n"
    + b"\x00" * 128
    + b"DICM\x02\x00"
    + b"\r\n--emix-7f3a\r\nContent-Type: application/dicom\r\nContent-Length: 3\r\n\r\nabc"
    + b"\r\n--emix-7f3a--\r\n",
    b"preamble\r\n--emix-7f3a\r\n\r\n\r\n--emix-7f3a--",
    b"--emix-7f3a\r\nContent-Type: application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    b"\r\n\r\n--emix-7f3\r\n--emix-7f3a--\r\n",
]


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, start = [], 0
    for point in points:
        pieces.append(data[start:point])
        start = point
    pieces.append(data[start:])
    return pieces


def _read_all(chunks: list[bytes], boundary: bytes) -> int:
    events = 0
    for event in iter_multipart(chunks, boundary):
        assert isinstance(event, PartHeaders | PartEnd | bytes)
        events += 1
    return events


@fuzz_settings()
@given(
    st.one_of(st.binary(max_size=400), mutated(SEEDS)),
    st.lists(st.integers(min_value=0, max_value=4096), max_size=8),
    st.sampled_from([BOUNDARY, b"x", b"emix-7f3a--"]),
)
def test_fuzz_multipart_body(data: bytes, cuts: list[int], boundary: bytes) -> None:
    within_limits(_read_all, _split(data, cuts), boundary)


@fuzz_settings()
@given(
    st.one_of(
        st.text(max_size=120),
        st.builds(
            lambda a, b: f'multipart/related; type="application/dicom"; boundary={a}{b}',
            st.text(max_size=20),
            st.text(max_size=220),
        ),
    )
)
def test_fuzz_multipart_content_type(value: str) -> None:
    result = within_limits(boundary_of, value)
    if isinstance(result, bytes):
        assert 0 < len(result) <= 200


def test_the_parts_of_a_valid_body_come_back_whatever_the_chunking() -> None:
    """The harness's seed is read correctly, so the fuzzer explores from a valid document."""
    for cuts in ([], [1, 2, 3], list(range(0, 400, 7))):
        events = list(iter_multipart(_split(SEEDS[0], cuts), BOUNDARY))
        body = b"".join(e for e in events if isinstance(e, bytes))
        assert sum(isinstance(e, PartEnd) for e in events) == 2
        assert body.endswith(b"abc") and b"DICM" in body


@pytest.mark.parametrize(
    "content_type",
    [
        "MULTIPART/;BOUNDARY=\u0100",
        "multipart/related; boundary*=UTF-8''%C4%80%C4%80",
        'multipart/related; boundary="ends with space "',
        'multipart/related; boundary="a\\r\\nX-Injected: 1"',
    ],
)
def test_a_boundary_outside_rfc_2046_is_a_typed_error(content_type: str) -> None:
    """Found by fuzzing: a non-Latin-1 boundary (RFC 2231 encoded) raised UnicodeEncodeError."""
    from emix_core import InvalidInput

    with pytest.raises(InvalidInput, match="boundary"):
        boundary_of(content_type)
