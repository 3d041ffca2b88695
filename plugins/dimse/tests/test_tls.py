"""DICOM TLS on the listener: callers without a certificate from the CA get no
association; with one, C-ECHO and C-STORE work."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydicom.data import get_testdata_file
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from emix_core.testing import make_certificates
from plugins.dimse.tests.helpers import ListenerProcess

pytestmark = pytest.mark.e2e


def client_context(certs, *, with_certificate: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certs.ca))
    if with_certificate:
        context.load_cert_chain(certs.client_cert, certs.client_key)
    return context


def test_tls_listener_requires_a_client_certificate(tmp_path):
    certs = make_certificates(tmp_path / "certs")
    listener = ListenerProcess(
        tmp_path / "tls",
        None,
        "mercy",
        ["--to", "lakeside", "--tls-cert", str(certs.server), "--tls-ca", str(certs.ca)],
    )
    listener.start()
    try:
        ae = AE(ae_title="MODALITY")
        ae.add_requested_context(Verification)
        ae.add_requested_context(CTImageStorage)
        ae.acse_timeout = ae.network_timeout = 10
        plain = ae.associate("127.0.0.1", listener.port, ae_title="EMIX")
        assert not plain.is_established
        anonymous = ae.associate(
            "127.0.0.1",
            listener.port,
            ae_title="EMIX",
            tls_args=(client_context(certs, with_certificate=False), "127.0.0.1"),
        )
        assert not anonymous.is_established
        assoc = ae.associate(
            "127.0.0.1",
            listener.port,
            ae_title="EMIX",
            tls_args=(client_context(certs, with_certificate=True), "127.0.0.1"),
        )
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        status = assoc.send_c_store(Path(get_testdata_file("CT_small.dcm")))
        assert status.Status == 0x0000
        assoc.release()
        assert listener.spooled() == 1
        assert listener.alive()
    finally:
        listener.stop()
    assert '"tls": true' in listener.log_text() or "'tls': True" in listener.log_text()
