"""Real PACS for the DICOMweb tests: Orthanc with its DICOMweb plugin, on loopback; and
a sample study of compressed, multi-frame and generated instances.

Each :class:`Orthanc` runs from a generated JSON config on a free port with
``RemoteAccessAllowed: false`` and the DICOM (DIMSE) server off, so it never listens
on 4242/8042 and nothing outside this machine can reach it; it is stopped after use.
With ``dicom=True`` its DICOM server runs too, on a free port (Orthanc 1.10 binds it to
every address: the port is random and the modalities it knows are on 127.0.0.1 only).
"""

from __future__ import annotations

import glob
import io
import json
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from emix_core.testing import free_port

ORTHANC = shutil.which("Orthanc")
PLUGIN_CANDIDATES = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so*",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


def dicomweb_plugin() -> str | None:
    for pattern in PLUGIN_CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    try:
        listing = subprocess.run(
            ["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=False
        ).stdout
    except FileNotFoundError:
        return None
    return next((line for line in listing.split() if "DicomWeb.so" in line), None)


PLUGIN = dicomweb_plugin()
#: Skips where Orthanc is not installed, except in CI (which installs it): there a
#: missing PACS fails the run instead of hiding the adapter's tests.
needs_orthanc = pytest.mark.skipif(
    not (ORTHANC and PLUGIN) and not os.environ.get("CI"),
    reason="needs Orthanc and its DICOMweb plugin: apt-get install orthanc orthanc-dicomweb "
    "(bash .ci/system-deps does it)",
)

#: Lua rule for a PACS that refuses RT Dose objects (an administrator's storage rule).
REFUSE_RTDOSE = """
function ReceivedInstanceFilter(dicom, origin, info)
  return dicom.Modality ~= 'RTDOSE'
end
"""


@dataclass
class Orthanc:
    """One Orthanc process with the DICOMweb plugin, on ``127.0.0.1:port``."""

    root: Path
    port: int = field(default_factory=free_port)
    extra: dict[str, Any] = field(default_factory=dict)
    lua: str = ""
    auth: tuple[str, str] | None = None
    process: subprocess.Popen | None = None
    #: run Orthanc's DICOM server (C-ECHO, C-STORE, C-FIND, C-GET, C-MOVE SCP) too
    dicom: bool = False
    dicom_port: int = field(default_factory=free_port)
    aet: str = "ORTHANC"
    #: DICOM nodes Orthanc knows: name -> (AE title, host, port)
    modalities: dict[str, tuple[str, str, int]] = field(default_factory=dict)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """The DICOMweb base URL, as a PACS administrator would configure it."""
        return f"{self.base}/dicom-web"

    @property
    def dicom_address(self) -> str:
        """``AET@127.0.0.1:PORT`` of its DICOM server (with ``dicom=True``)."""
        return f"{self.aet}@127.0.0.1:{self.dicom_port}"

    def config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "Name": self.root.name,
            "StorageDirectory": str(self.root / "db"),
            "IndexDirectory": str(self.root / "db"),
            "HttpPort": self.port,
            "DicomServerEnabled": self.dicom,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "DicomModalities": {k: list(v) for k, v in self.modalities.items()},
            "DicomCheckModalityHost": True,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "HttpThreadsCount": 8,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "StorageCompression": False,
            "Plugins": [PLUGIN],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Host": f"127.0.0.1:{self.port}"},
        }
        if self.auth:
            config["AuthenticationEnabled"] = True
            config["RegisteredUsers"] = {self.auth[0]: self.auth[1]}
        if self.lua:
            script = self.root / "rules.lua"
            script.write_text(self.lua)
            config["LuaScripts"] = [str(script)]
        config.update(self.extra)
        return config

    def start(self) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "orthanc.json").write_text(json.dumps(self.config(), indent=1))
        log = open(self.root / "orthanc.log", "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [str(ORTHANC), str(self.root / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )
        log.close()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError((self.root / "orthanc.log").read_text()[-3000:])
            try:
                if self.get("/system").ok:
                    return self
            except requests.RequestException:
                time.sleep(0.1)
        raise AssertionError("Orthanc did not start")

    def stop(self, *, wait: bool = True) -> None:
        """Stop Orthanc (it takes a couple of seconds: stop several with ``wait=False``
        first, then ``stop()`` each)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
        if self.process and wait:
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            self.process = None

    # ------------------------------------------------------------------ REST helpers
    def get(self, path: str, **kw: Any) -> requests.Response:
        kw.setdefault("auth", self.auth)
        return requests.get(self.base + path, timeout=30, **kw)

    def upload(self, path: Path) -> None:
        """Store a file through Orthanc's own REST API (test setup, not STOW)."""
        answer = requests.post(
            f"{self.base}/instances", data=path.read_bytes(), timeout=30, auth=self.auth
        )
        answer.raise_for_status()
        assert answer.json()["Status"] in ("Success", "AlreadyStored"), answer.text

    def post(self, path: str, body: Any, **kw: Any) -> requests.Response:
        kw.setdefault("auth", self.auth)
        return requests.post(self.base + path, json=body, timeout=600, **kw)

    def sop_instance_uids(self) -> set[str]:
        uids = set()
        for instance in self.get("/instances?expand").json():
            uids.add(instance["MainDicomTags"]["SOPInstanceUID"])
        return uids

    def wado_instance(self, study: str, series: str, sop: str) -> bytes:
        """One instance as stored, through WADO-RS with ``transfer-syntax=*``."""
        from emix_dicomweb.multipart import PartEnd, PartHeaders, boundary_of, iter_multipart

        answer = self.get(
            f"/dicom-web/studies/{study}/series/{series}/instances/{sop}",
            headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
        )
        answer.raise_for_status()
        body = bytearray()
        for event in iter_multipart([answer.content], boundary_of(answer.headers["Content-Type"])):
            if not isinstance(event, PartHeaders | PartEnd):
                body += event
        return bytes(body)


# --------------------------------------------------------------------------- data

#: pydicom's bundled files, one per encoding the adapter must carry untouched.
BUNDLED = {
    "SC_rgb_jpeg_dcmtk.dcm": "1.2.840.10008.1.2.4.50",  # JPEG baseline
    "JPGExtended.dcm": "1.2.840.10008.1.2.4.51",  # JPEG extended
    "JPEG2000.dcm": "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "MR_small_jp2klossless.dcm": "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "MR_small_RLE.dcm": "1.2.840.10008.1.2.5",  # RLE
    "MR_small_jpeg_ls_lossless.dcm": "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "JPEGLSNearLossless_16.dcm": "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "SC_rgb_rle_2frame.dcm": "1.2.840.10008.1.2.5",  # multi-frame RLE
    "rtdose.dcm": "1.2.840.10008.1.2",  # multi-frame RT Dose, implicit VR
}


@dataclass
class SampleStudy:
    """One study of compressed, multi-frame and generated instances, as files."""

    folder: Path
    study_uid: str
    accession: str
    patient_id: str
    files: list[Path]

    def pixel_data(self) -> dict[str, tuple[str, bytes]]:
        """SOP instance UID -> (transfer syntax, PixelData element bytes)."""
        out: dict[str, tuple[str, bytes]] = {}
        for path in self.files:
            ds = pydicom.dcmread(path)
            out[str(ds.SOPInstanceUID)] = (str(ds.file_meta.TransferSyntaxUID), ds.PixelData)
        return out


def make_sample_study(
    folder: Path, *, accession: str, patient_id: str, slices: int = 16
) -> SampleStudy:
    """Rewrite the bundled files into one study (pixel data bytes untouched), plus a
    generated CT series of ``slices`` slices."""
    from emix_core import generate_study, new_uid

    study_uid = new_uid()
    today = time.strftime("%Y%m%d")
    folder.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for index, name in enumerate(BUNDLED, start=1):
        ds = pydicom.dcmread(cast(str, get_testdata_file(name)))
        assert ds.file_meta.TransferSyntaxUID == BUNDLED[name]
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = new_uid()
        ds.SOPInstanceUID = new_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientID = patient_id
        ds.PatientName = "TEST^DICOMWEB"
        ds.AccessionNumber = accession
        ds.StudyDate = today
        ds.Modality = ds.get("Modality") or "OT"
        ds.SeriesNumber = 100 + index
        path = folder / f"bundled-{index:02d}.dcm"
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        path.write_bytes(buffer.getvalue())
        files.append(path)
    files += generate_study(
        folder / "ct",
        slices=slices,
        series=1,
        rows=128,
        columns=128,
        patient_name="TEST^DICOMWEB",
        patient_id=patient_id,
        accession_number=accession,
        study_uid=study_uid,
    )
    return SampleStudy(folder, study_uid, accession, patient_id, files)


# --------------------------------------------------------------------------- TLS


@dataclass
class Certificates:
    """A private CA, a server certificate for 127.0.0.1 and a client certificate."""

    ca: Path
    server: Path  # certificate and key, as Orthanc wants them
    client_cert: Path
    client_key: Path


def make_certificates(folder: Path) -> Certificates:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("emix test CA"))
        .issuer_name(name("emix test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(common: str, usage: x509.ObjectIdentifier, san: list[x509.GeneralName]):  # type: ignore[no-untyped-def]
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(common))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return key, builder.sign(ca_key, hashes.SHA256())

    server_key, server = leaf(
        "127.0.0.1",
        ExtendedKeyUsageOID.SERVER_AUTH,
        [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key, client = leaf("emix gateway", ExtendedKeyUsageOID.CLIENT_AUTH, [])
    certs = Certificates(
        folder / "ca.pem", folder / "server.pem", folder / "client.pem", folder / "client.key"
    )
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    certs.server.write_bytes(server.public_bytes(serialization.Encoding.PEM) + pem_key(server_key))
    certs.client_cert.write_bytes(client.public_bytes(serialization.Encoding.PEM))
    certs.client_key.write_bytes(pem_key(client_key))
    return certs


# --------------------------------------------------------------------------- front door


class FrontDoor:
    """A reverse proxy in front of Orthanc, as nginx often is in front of a PACS.

    It can terminate TLS (and require a client certificate signed by the test CA),
    require a bearer token, answer 503 to the first ``busy`` STOW-RS requests, redirect
    every GET to ``redirect_to``, or let only STOW-RS through (``stow_only``, like a
    router or an AI node that receives but cannot be queried). What it forwards, Orthanc answers.
    """

    def __init__(
        self,
        target: Orthanc,
        *,
        certificates: Certificates | None = None,
        client_certificate: bool = False,
        token: str | None = None,
        busy: int = 0,
        redirect_to: str | None = None,
        stow_only: bool = False,
    ) -> None:
        import http.server
        import ssl

        self.target = target
        self.token = token
        self.busy = busy
        self.redirect_to = redirect_to
        self.stow_only = stow_only
        self.log: list[tuple[str, str, int]] = []
        door = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                self._handle()

            def do_POST(self) -> None:  # noqa: N802
                self._handle()

            def _answer(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
                door.log.append((self.command, self.path, status))
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                if door.token and self.headers.get("Authorization") != f"Bearer {door.token}":
                    self._answer(401, b"token required", {"WWW-Authenticate": "Bearer"})
                    return
                if door.stow_only and self.command != "POST":
                    self._answer(405, b"STOW-RS only", {"Allow": "POST"})
                    return
                if door.redirect_to and self.command == "GET":
                    self._answer(302, headers={"Location": door.redirect_to + self.path})
                    return
                if self.command == "POST" and door.busy > 0:
                    door.busy -= 1
                    self._answer(503, b"busy", {"Retry-After": "1"})
                    return
                headers = {
                    k: v
                    for k, v in self.headers.items()
                    if k.lower() not in ("host", "authorization", "content-length", "connection")
                }
                answer = requests.request(
                    self.command,
                    door.target.base + self.path,
                    data=body,
                    headers=headers,
                    timeout=60,
                )
                keep = ("content-type", "location")
                self._answer(
                    answer.status_code,
                    answer.content,
                    {k: v for k, v in answer.headers.items() if k.lower() in keep},
                )

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.scheme = "http"
        if certificates is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certificates.server)
            if client_certificate:
                context.verify_mode = ssl.CERT_REQUIRED
                context.load_verify_locations(certificates.ca)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/dicom-web"

    def __enter__(self) -> FrontDoor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
