"""DICOM over TLS (PS3.15 Annex B.1) with real peers: DCMTK echoscu/storescu/storescp and
pynetdicom, certificates from a throwaway CA made per test."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_ai_node.config import ConfigError, DestinationSettings
from dicom_ai_node.dispatch.deliveries import peer, send
from dicom_ai_node.node import Node
from tests.support.certs import (
    Certificates,
    make_certificates,
    tls_destination,
    tls_storescp,
    with_cert,
)
from tests.support.helpers import (
    free_port,
    instance,
    make_settings,
    run_tool,
    wait_for,
    write,
)

pytestmark = pytest.mark.peers


@pytest.fixture
def certs(tmp_path: Path) -> Certificates:
    return make_certificates(tmp_path / "pki")


def tls_node(
    node_factory: Callable[..., Node],
    certs: Certificates,
    *,
    require_client: bool = True,
    **dicom: Any,
) -> Node:
    return node_factory(
        dicom={
            "tls": {
                "enabled": True,
                "certificate": certs.server.certificate,
                "private_key": certs.server.private_key,
                "ca_certificates": certs.ca,
                "require_client_certificate": require_client,
            },
            **dicom,
        }
    )


def echoscu(node: Node, *tls: str) -> subprocess.CompletedProcess[str]:
    return run_tool(
        "echoscu", *tls, "-aec", "AINODE", "127.0.0.1", str(node.scp.port), check=False, timeout=20
    )


def tls_client(certs: Certificates) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(certs.client.certificate, certs.client.private_key)
    return context


def test_dcmtk_echo_and_store_over_tls_with_a_client_certificate(
    node_factory: Callable[..., Node], certs: Certificates, tmp_path: Path
) -> None:
    node = tls_node(node_factory, certs)
    assert echoscu(node, *with_cert(certs.client, certs.ca)).returncode == 0
    ds = instance()
    path = write(ds, tmp_path / "send")
    run_tool(
        "storescu",
        *with_cert(certs.client, certs.ca),
        "-aec",
        "AINODE",
        "127.0.0.1",
        str(node.scp.port),
        str(path),
    )
    stored = node.spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert dcmread(stored).SOPInstanceUID == ds.SOPInstanceUID


def test_plaintext_and_untrusted_clients_are_refused(
    node_factory: Callable[..., Node], certs: Certificates
) -> None:
    node = tls_node(node_factory, certs)
    assert echoscu(node).returncode != 0  # plain DICOM on the TLS port
    assert echoscu(node, *with_cert(certs.untrusted_client, certs.ca)).returncode != 0
    assert echoscu(node, "+tla", "+cf", str(certs.ca)).returncode != 0  # no certificate
    assert echoscu(node, *with_cert(certs.client, certs.ca)).returncode == 0  # still serving


def test_client_without_certificate_is_accepted_when_not_required(
    node_factory: Callable[..., Node], certs: Certificates
) -> None:
    node = tls_node(node_factory, certs, require_client=False)
    assert echoscu(node, "+tla", "+cf", str(certs.ca)).returncode == 0
    # a certificate that is presented is still checked
    assert echoscu(node, *with_cert(certs.untrusted_client, certs.ca)).returncode != 0


def test_stalled_handshake_does_not_block_other_associations(
    node_factory: Callable[..., Node], certs: Certificates
) -> None:
    node = tls_node(node_factory, certs, acse_timeout=2)
    with socket.create_connection(("127.0.0.1", node.scp.port)) as stalled:
        wait_for(lambda: node.scp.guard.pending == 1)  # accepted, waiting for a ClientHello
        started = time.monotonic()
        ae = AE(ae_title="PACS")
        ae.connection_timeout = ae.acse_timeout = 5  # TCP connect and TLS handshake
        ae.add_requested_context(Verification)
        assoc = ae.associate(
            "127.0.0.1",
            node.scp.port,
            ae_title="AINODE",
            tls_args=(tls_client(certs), "localhost"),
        )
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert time.monotonic() - started < 3
        # the silent connection is closed once the ACSE timeout has passed
        stalled.settimeout(10)
        assert stalled.recv(1) == b""
        assert time.monotonic() - started < 6


def test_stop_does_not_wait_for_a_stalled_handshake(
    node_factory: Callable[..., Node], certs: Certificates
) -> None:
    node = tls_node(node_factory, certs)  # ACSE timeout 30 s
    with socket.create_connection(("127.0.0.1", node.scp.port)):
        wait_for(lambda: node.scp.guard.pending == 1)
        started = time.monotonic()
        node.scp.stop()  # (the silent connection is closed at its timeout or at exit)
        assert time.monotonic() - started < 3


def test_missing_certificate_file_is_a_configuration_error(
    tmp_path: Path, certs: Certificates
) -> None:
    settings = make_settings(
        tmp_path,
        dicom={
            "tls": {
                "enabled": True,
                "certificate": tmp_path / "absent.crt",
                "private_key": certs.server.private_key,
            }
        },
    )
    with pytest.raises(ConfigError, match=r"dicom\.tls\.certificate"):
        Node(settings, models={})


def test_dispatch_over_tls_to_dcmtk_storescp(certs: Certificates, tmp_path: Path) -> None:
    port = free_port()
    files = [write(instance(), tmp_path / "results") for _ in range(2)]
    destination = tls_destination(port, certs)
    with tls_storescp(port, tmp_path / "pacs", certs) as folder:
        outcomes = send(files, peer(DestinationSettings(**destination), "AINODE"), 30.0)
        assert [o.status for o in outcomes] == [0x0000, 0x0000]
        assert len(list(folder.iterdir())) == 2
        # a peer whose certificate does not chain to the CAs we trust gets nothing
        untrusting = {**destination, "ca_certificates": certs.untrusted_client.certificate}
        refused = send(files, peer(DestinationSettings(**untrusting), "AINODE"), 30.0)
        assert all(o.status is None and "association" in o.error for o in refused)
        # and storescp refuses a client without a certificate
        anonymous = {**destination, "certificate": None, "private_key": None}
        refused = send(files, peer(DestinationSettings(**anonymous), "AINODE"), 30.0)
        assert all(o.status is None for o in refused)
        assert len(list(folder.iterdir())) == 2
