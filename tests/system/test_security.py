"""Security of a running node: calling AE titles bound to source addresses, no patient
identifiers in the logs, data at rest readable by the service user only.

Loopback has a whole /8, so a client bound to 127.0.0.2 is "another host" to the node.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_ai_node.config import ConfigError, load_settings
from dicom_ai_node.jobs.models import Job
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.certs import make_certificates, tls_destination, tls_storescp
from tests.support.helpers import free_port, run_tool, wait_for

pytestmark = pytest.mark.peers

SECRETS = ("Secret^Person", "Secret", "PID-SECRET-42", "19450317")


def associate(node: Node, calling: str, source: str) -> Association:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE", bind_address=(source, 0))


def rejected_total(node: Node) -> float:
    value = node.metrics.registry.get_sample_value("dicom_ai_node_associations_rejected_total")
    return value or 0.0


def test_ae_title_is_bound_to_its_source_addresses(
    node_factory: Callable[..., Node], caplog: pytest.LogCaptureFixture
) -> None:
    node = node_factory(dicom={"allowed_addresses": {"PACS": ["127.0.0.1", "10.0.0.0/24"]}})
    allowed = associate(node, "PACS", "127.0.0.1")
    assert allowed.is_established
    assert allowed.send_c_echo().Status == 0x0000
    allowed.release()

    before = rejected_total(node)
    refused = associate(node, "PACS", "127.0.0.2")
    assert refused.is_rejected
    answer = refused.acceptor.primitive
    assert answer is not None
    # PS3.8 9.3.4: rejected-permanent, DICOM UL service-user, calling-AE-title-not-recognized
    assert (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, 0x03)
    assert rejected_total(node) == before + 1
    assert "127.0.0.2" in caplog.text and "rejected" in caplog.text

    other = associate(node, "MODALITY", "127.0.0.2")  # no entry: any address
    assert other.is_established
    other.release()


def test_wildcard_binds_the_ae_titles_not_listed(node_factory: Callable[..., Node]) -> None:
    node = node_factory(dicom={"allowed_addresses": {"PACS": ["127.0.0.1"], "*": ["127.0.0.2/32"]}})
    assert associate(node, "MODALITY", "127.0.0.1").is_rejected
    assoc = associate(node, "MODALITY", "127.0.0.2")
    assert assoc.is_established
    assoc.release()
    # DCMTK connects from 127.0.0.1: fine as PACS, refused under any other title
    port = str(node.scp.port)
    assert run_tool("echoscu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", port).returncode == 0
    refused = run_tool("echoscu", "-aet", "CT1", "-aec", "AINODE", "127.0.0.1", port, check=False)
    assert refused.returncode != 0 and "reject" in refused.stderr.lower()


def test_security_settings_from_a_file(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(
        """
[dicom]
allowed_calling_aets = ["PACS", "CT1"]

[dicom.allowed_addresses]
PACS = ["10.1.2.3"]
CT1 = ["10.1.5.0/24", "fd00::/8"]

[dicom.tls]
enabled = true
certificate = "/etc/dicom-ai-node/node.crt"
private_key = "/etc/dicom-ai-node/node.key"
ca_certificates = "/etc/dicom-ai-node/ca.crt"
require_client_certificate = true

[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "pacs.example.org"
port = 2762
tls = true
ca_certificates = "/etc/dicom-ai-node/ca.crt"
"""
    )
    settings = load_settings(config)
    assert settings.dicom.allowed_addresses["CT1"] == ["10.1.5.0/24", "fd00::/8"]
    assert settings.dicom.tls.require_client_certificate
    assert settings.destinations[0].tls

    def error(text: str) -> str:
        config.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_settings(config)
        return str(caught.value)

    assert "not an IP address" in error('[dicom.allowed_addresses]\nPACS = ["pacs.local"]\n')
    assert "not in allowed_calling_aets" in error(
        '[dicom]\nallowed_calling_aets = ["PACS"]\n[dicom.allowed_addresses]\nCT9 = ["10.0.0.1"]\n'
    )
    assert "private_key" in error('[dicom.tls]\nenabled = true\ncertificate = "/x.crt"\n')
    assert "tls = false" in error(
        '[[destinations]]\nname = "p"\nae_title = "P"\nhost = "h"\nport = 1\n'
        'ca_certificates = "/ca.crt"\n'
    )


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The usual umask, which lets everyone read new files unless the node says otherwise."""
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_patient_identifiers_stay_out_of_logs_and_files_stay_private(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    umask_022: None,
) -> None:
    caplog.set_level(logging.WARNING, logger="pynetdicom")  # as `serve` sets it
    caplog.set_level(logging.INFO)  # (last: it sets the capturing handler's level too)
    certs = make_certificates(tmp_path / "pki")
    port = free_port()
    study = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "synth", 7)[0]
    for path in study.rglob("*.dcm"):
        ds = dcmread(path)
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = SECRETS[0], SECRETS[2], SECRETS[3]
        ds.save_as(path)
    routes = [{**route, "destinations": ["pacs"]} for route in shipped_routes]
    destination = tls_destination(port, certs)
    with tls_storescp(port, tmp_path / "pacs", certs) as received:
        node = node_factory(models=demo_models, routes=routes, destinations=[destination])
        run_tool(
            "storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(study)
        )

        def done() -> bool:
            with node.read_sessions() as session:
                return session.scalars(select(Job.state)).first() == "done"

        wait_for(done, timeout=60)
        results = sorted(received.iterdir())
        assert len(results) == 2  # SR and SC, over TLS
        assert str(dcmread(results[0]).PatientID) == SECRETS[2]  # the data carried them

        assert "job 1 queued" in caplog.text and "dispatch to pacs" in caplog.text
        for secret in SECRETS:
            assert secret not in caplog.text

        data = node.settings.storage.data_dir
        database = data / "jobs.sqlite"
        for name in ("jobs.sqlite", "jobs.sqlite-wal", "jobs.sqlite-shm"):
            assert (data / name).exists(), name
        files = [p for p in data.rglob("*") if p.is_file()]
        folders = [data, *(p for p in data.rglob("*") if p.is_dir())]
        assert database in files and any("outbox" in p.parts for p in files)
        assert any("incoming" in p.parts for p in files)
        assert {p: stat.S_IMODE(p.stat().st_mode) for p in files} == {p: 0o600 for p in files}
        assert {p: stat.S_IMODE(p.stat().st_mode) for p in folders} == {p: 0o700 for p in folders}
