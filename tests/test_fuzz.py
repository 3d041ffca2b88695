"""Fuzzing of every core parser that takes outside bytes (hypothesis; see docs/security.md).

Property for each target: it answers, or raises one of the project's own errors
(``EmixError``), within the per-example deadline and memory limit of
:mod:`emix_core.testing.fuzz`. Inputs are random bytes and mutations of valid documents.
Inputs that once broke a parser are kept below as plain regression tests.
"""

from __future__ import annotations

import io
import json
import struct
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from emix_core.content.dicom import inspect_instance
from emix_core.errors import EmixError
from emix_core.frames import END_MAGIC, FRAME_MAGIC, encode_header, read_header, receive_frames
from emix_core.gateway.runner import load_gateway
from emix_core.hub.packages import MANIFEST_FORMAT, check_manifest
from emix_core.model import Package
from emix_core.plugins import get_plugin_manager
from emix_core.reports.convert import parse_report, render_report
from emix_core.testing.fuzz import fuzz_settings, mutated, within_limits

pytestmark = pytest.mark.fuzz

PM = get_plugin_manager(load_entry_points=False)

# --------------------------------------------------------------------------- batch frames


def _frame(item_id: int, body: bytes, media_type: str = "application/dicom") -> bytes:
    import hashlib

    return encode_header(item_id, len(body), media_type) + body + hashlib.sha256(body).digest()


FRAME_SEEDS = [
    _frame(1, b"DICM" * 8) + _frame(2, b"", "text/plain") + END_MAGIC,
    _frame(7, bytes(range(256))) + END_MAGIC,
    FRAME_MAGIC + struct.pack(">I", 12) + b'{"id":1,"si' + END_MAGIC,
]


def _receive(data: bytes) -> dict[int, str]:
    return receive_frames(io.BytesIO(data), lambda header: io.BytesIO())


@fuzz_settings()
@given(st.one_of(st.binary(max_size=512), mutated(FRAME_SEEDS)))
def test_fuzz_batch_frames(data: bytes) -> None:
    within_limits(_receive, data)
    within_limits(read_header, io.BytesIO(data))


# --------------------------------------------------------------------------- manifest


def _stored(items: dict[int, tuple[str, int]]):
    rows = [SimpleNamespace(item_id=i, sha256=h, size=s) for i, (h, s) in items.items()]
    return SimpleNamespace(scalars=lambda query: rows)


_ROW = SimpleNamespace(id="a" * 32)
_PACKAGE = Package(id="a" * 32, sender="mercy.example")
_STORED = {1: ("0" * 64, 10), 2: ("1" * 64, 20)}
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
item_entries = (
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.sampled_from([1, 2]) | json_values,
            "name": json_values,
            "media_type": json_values,
            "size": st.sampled_from([10, 20]) | json_values,
            "sha256": st.sampled_from(["0" * 64, "1" * 64]) | json_values,
            "study_uid": json_values,
            "sop_instance_uid": json_values,
        },
    )
    | json_values
)
manifests = st.fixed_dictionaries(
    {
        "format": st.just(MANIFEST_FORMAT),
        "package": st.just(_ROW.id),
        "sender": st.just(_PACKAGE.sender),
        "items": st.lists(item_entries, max_size=4) | json_values,
    },
    optional={"studies": json_values},
)


@fuzz_settings()
@given(manifests)
def test_fuzz_manifest(document: dict) -> None:
    """The hub's seal check of a signed manifest, after the signature (the JSON is the
    sending facility's: hostile in the threat model)."""
    within_limits(check_manifest, _stored(_STORED), _ROW, _PACKAGE, document)


# --------------------------------------------------------------------------- DICOM


def _dicom_seeds() -> list[bytes]:
    from pydicom.data import get_testdata_file

    names = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "ExplVR_BigEnd.dcm", "no_meta.dcm"]
    return [Path(get_testdata_file(n)).read_bytes() for n in names]


DICOM_SEEDS = _dicom_seeds()


def _inspect(data: bytes):
    with tempfile.NamedTemporaryFile(suffix=".dcm") as fp:
        fp.write(data)
        fp.flush()
        return inspect_instance(Path(fp.name))


@fuzz_settings()
@given(st.one_of(st.binary(max_size=600), mutated(DICOM_SEEDS, max_edits=6)))
def test_fuzz_dicom_inspection(data: bytes) -> None:
    within_limits(_inspect, data)


# --------------------------------------------------------------------------- reports

ORU = (
    b"MSH|^~\\&|RIS|MERCY|||20250115110000||ORU^R01|MSG0001|P|2.5.1\r"
    b"PID|1||PID-7734^^^MERCY^MR||DOE^JANE||19600101|F\r"
    b"OBR|1||ACC-1|CTHEAD^CT Head^L|||20250115093000||||||||||||||20250115110000|||F\r"
    b"OBX|1|TX|IMP^Impression||No acute finding.||||||F\r"
)


def _report_seeds() -> list[tuple[bytes, str]]:
    report = parse_report(PM, ORU, "x-application/hl7-v2+er7")
    seeds = [(ORU, "x-application/hl7-v2+er7")]
    for fmt, media_type in (
        ("cda", "application/cda+xml"),
        ("fhir", "application/fhir+json"),
        ("txt", "text/plain"),
    ):
        seeds.append((render_report(PM, report, fmt), media_type))
    return seeds


REPORT_SEEDS = _report_seeds()
MEDIA_TYPES = sorted({m for _, m in REPORT_SEEDS} | {"", "application/octet-stream", "text/xml"})


@fuzz_settings()
@given(
    st.one_of(st.binary(max_size=400), mutated([d for d, _ in REPORT_SEEDS])),
    st.sampled_from(MEDIA_TYPES),
)
def test_fuzz_report_parsing(data: bytes, media_type: str) -> None:
    within_limits(parse_report, PM, data, media_type or None)


# --------------------------------------------------------------------------- gateway TOML

GATEWAY_SEED = b"""[gateway]
home = "."
poll_seconds = 5

[[sources]]
kind = "folder"
path = "outbox"
to = ["dr.lee@lakeside.example"]

[[destinations]]
kind = "folder"
path = "inbox"
"""

toml_scalars = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.booleans(),
    st.floats(allow_nan=False, allow_infinity=False),
    # relative only: a path setting must not make the fuzzer touch folders outside its own
    st.text(max_size=12).map(lambda t: t.lstrip("/~")),
    st.sampled_from(["folder", "dicomweb", "mllp", "outbox", "http://127.0.0.1:9/dicom-web"]),
)
toml_tables = st.dictionaries(
    st.sampled_from(
        [
            "kind",
            "path",
            "to",
            "home",
            "poll_seconds",
            "name",
            "url",
            "x",
            "parallel",
            "tls_verify",
            "state",
            "host",
            "port",
            "timeout_seconds",
            "stable_seconds",
        ]
    ),
    toml_scalars | st.lists(toml_scalars, max_size=3),
    max_size=5,
)


def _toml(document: dict) -> str:
    def value(v) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return json.dumps(v) if not isinstance(v, bool) else str(v).lower()

    lines = []
    for table, body in document.items():
        blocks = body if isinstance(body, list) else [body]
        for block in blocks:
            lines.append(f"[[{table}]]" if isinstance(body, list) else f"[{table}]")
            lines += [f"{k} = {value(v)}" for k, v in block.items()]
    return "\n".join(lines) + "\n"


gateway_documents = st.fixed_dictionaries(
    {},
    optional={
        "gateway": toml_tables,
        "sources": st.lists(toml_tables, max_size=2),
        "destinations": st.lists(toml_tables, max_size=2),
    },
)


#: With entry points: the installed plugins' source and destination factories read their
#: tables too.
GATEWAY_PM = get_plugin_manager()


def _load_gateway(text: bytes):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "gateway.toml"
        path.write_bytes(text)
        return load_gateway(path, GATEWAY_PM)


@fuzz_settings()
@given(
    st.one_of(
        st.binary(max_size=300),
        mutated([GATEWAY_SEED]),
        gateway_documents.map(lambda d: _toml(d).encode()),
    )
)
def test_fuzz_gateway_toml(text: bytes) -> None:
    within_limits(_load_gateway, text)


def test_the_harness_fails_on_a_foreign_exception() -> None:
    """The property is checked, not assumed: a parser raising ValueError fails it."""

    def broken(data: bytes) -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError):
        within_limits(broken, b"")
    assert isinstance(within_limits(lambda: (_ for _ in ()).throw(EmixError("x"))), EmixError)


# --------------------------------------------------------------------------- found by fuzzing


@pytest.mark.parametrize("data", [b"EMXI", b"EMXI\x00", b"EMXI\x00\x00\x01"])
def test_a_batch_stream_cut_inside_a_frame_header_is_a_typed_error(data: bytes) -> None:
    """Found by fuzzing: a stream cut after the frame marker raised struct.error."""
    from emix_core.errors import IntegrityError, InvalidInput

    with pytest.raises(InvalidInput, match="ends inside a frame header"):
        read_header(io.BytesIO(data))
    with pytest.raises(IntegrityError, match="cut off or garbled"):
        _receive(data)


@pytest.mark.parametrize(
    "items",
    [[{}, {}], [{"id": [1]}, {"id": 2}], [{"id": None}, {"id": 1}]],
    ids=["empty-items", "list-id", "null-id"],
)
def test_a_manifest_with_untyped_item_ids_is_refused(items: list) -> None:
    """Found by fuzzing: item ids that do not sort (None, lists) raised TypeError at seal."""
    document = {"format": MANIFEST_FORMAT, "package": _ROW.id, "sender": _PACKAGE.sender}
    with pytest.raises(EmixError):
        check_manifest(_stored(_STORED), _ROW, _PACKAGE, {**document, "items": items})


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("home = 0", "home must be a str"),
        ("state = 1", "state must be a str"),
        ('parallel = "abc"', "parallel must be an integer from 1 to 64"),
        ("parallel = true", "parallel must be an integer from 1 to 64"),
        ("tls_verify = 3", "tls_verify must be a boolean or a str"),
        ('deliver_received = "yes"', "deliver_received must be a boolean"),
    ],
)
def test_a_gateway_setting_of_the_wrong_type_is_a_config_error(table: str, message: str) -> None:
    """Found by fuzzing: ``home = 0`` raised TypeError from pathlib."""
    from emix_core.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        _load_gateway(f"[gateway]\n{table}\n".encode())
