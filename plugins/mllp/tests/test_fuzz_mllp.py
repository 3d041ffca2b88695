"""Fuzzing of what an interface engine sends back over MLLP: framing and acknowledgements.

Property: reading frames from the connection and parsing the ACK in them answer or raise
``MllpError`` (an ``EmixError``); ``TimeoutError`` is the documented answer of a
connection that stays silent past the deadline. Limits: :mod:`emix_core.testing.fuzz`.
"""

from __future__ import annotations

import socket
import time

import pytest
from emix_mllp.client import END_BLOCK, START_BLOCK, _Reader, control_id, parse_ack
from hypothesis import given
from hypothesis import strategies as st

from emix_core.testing import fuzz_settings, mutated, within_limits

pytestmark = pytest.mark.fuzz

ACK = (
    b"MSH|^~\\&|EMR|LAKESIDE|EMIX||20250115110001||ACK^R01^ACK|ACK0001|P|2.5.1||||AL\r"
    b"MSA|AA|MSG0001|accepted\r"
)
SEEDS = [
    START_BLOCK + ACK + END_BLOCK,
    START_BLOCK + ACK.replace(b"AA", b"CA") + END_BLOCK + START_BLOCK + ACK + END_BLOCK,
    START_BLOCK + b"MSH|^~\\&\rMSA|AR|X|\xff\xfe bad" + END_BLOCK,
]


def _frames(data: bytes) -> list[bytes]:
    """Every frame the reader takes from a connection that sends ``data`` and closes."""
    ours, theirs = socket.socketpair()
    try:
        theirs.sendall(data)
        theirs.close()
        reader = _Reader(ours)
        frames = []
        deadline = time.monotonic() + 1
        while True:
            frames.append(reader.frame(deadline))
            for payload in frames[-1:]:
                parse_ack(payload)
                control_id(payload)
    finally:
        ours.close()


@fuzz_settings()
@given(st.one_of(st.binary(max_size=300), mutated(SEEDS)))
def test_fuzz_mllp_framing_and_acks(data: bytes) -> None:
    within_limits(_frames, data, allowed=(TimeoutError,))


@fuzz_settings()
@given(st.one_of(st.binary(max_size=300), mutated([ACK])))
def test_fuzz_ack_parsing(payload: bytes) -> None:
    within_limits(parse_ack, payload)
    within_limits(control_id, payload)


def test_the_seed_acks_parse() -> None:
    assert parse_ack(ACK).code == "AA" and control_id(ACK) == "ACK0001"
