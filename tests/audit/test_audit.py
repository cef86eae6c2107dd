"""The audit trail: DICOM audit messages (PS3.15 A.5) for one study's life, stored in the job
log and sent to a real syslog repository (rsyslogd) that is down at first."""

from __future__ import annotations

import contextlib
import socket
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.audit.messages import (
    INSTANCES_ACCESSED,
    AuditEvent,
    Participant,
    Peer,
    association_event,
)
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import AuditSettings
from dicom_ai_node.jobs.models import AuditRecord, Delivery, Job
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.certs import make_certificates
from tests.support.helpers import free_port, run_tool, storescp, wait_for
from tests.support.rsyslog import rsyslog

TOKEN = "audit-test-token"
STUDY = "1.2.840.10008.5.1.4.1.1"


def test_an_audit_event_refuses_what_the_schema_does_not_allow() -> None:
    now = datetime.now(UTC)
    who = [Participant("X", True)]
    accessed = INSTANCES_ACCESSED
    with pytest.raises(ValueError, match="EventActionCode"):
        AuditEvent(accessed, "X", 0, now, who)
    with pytest.raises(ValueError, match="EventOutcomeIndicator"):
        AuditEvent(accessed, "R", 3, now, who)
    with pytest.raises(ValueError, match="time zone"):
        AuditEvent(accessed, "R", 0, datetime.now(), who)
    with pytest.raises(ValueError, match="ActiveParticipant"):
        AuditEvent(accessed, "R", 0, now, [])


def coded(element: ET.Element, tag: str) -> tuple[str, str]:
    """(csd-code, codeSystemName) of a coded child, which must carry its originalText."""
    child = element.find(tag)
    assert child is not None, f"{tag} missing"
    assert child.get("originalText"), f"{tag} without originalText"
    return child.get("csd-code", ""), child.get("codeSystemName", "")


def objects(message: ET.Element) -> dict[str, ET.Element]:
    """Participant objects by ID type code."""
    found = {}
    for obj in message.findall("ParticipantObjectIdentification"):
        assert obj.get("ParticipantObjectID")
        assert obj.get("ParticipantObjectTypeCode") and obj.get("ParticipantObjectTypeCodeRole")
        found[coded(obj, "ParticipantObjectIDTypeCode")[0]] = obj
    return found


def check_common(message: ET.Element, node_name: str) -> tuple[str, str, ET.Element]:
    """The elements every audit message has (PS3.15 A.5.1): (EventID, action, identification)."""
    assert message.tag == "AuditMessage"
    identification = message.find("EventIdentification")
    assert identification is not None
    action = identification.get("EventActionCode", "")
    assert action in "CRUDE" and action
    assert datetime.fromisoformat(identification.get("EventDateTime", "")).tzinfo is not None
    assert identification.get("EventOutcomeIndicator") in ("0", "4", "8", "12")
    event_id, system = coded(identification, "EventID")
    assert system == "DCM"
    participants = message.findall("ActiveParticipant")
    assert participants
    for p in participants:
        assert p.get("UserID") is not None and p.get("UserIsRequestor") in ("true", "false")
    source = message.find("AuditSourceIdentification")
    assert source is not None and source.get("AuditSourceID") == node_name
    assert coded(source, "AuditSourceTypeCode")[0] == "4"
    return event_id, action, identification


def check_study(message: ET.Element, study: str, patient: str, with_classes: bool) -> None:
    """A.5.3.2 / A.5.3.4: the study (system object, report role) and its patient."""
    found = objects(message)
    study_object = found["110180"]
    assert study_object.get("ParticipantObjectID") == study
    assert (
        study_object.get("ParticipantObjectTypeCode"),
        study_object.get("ParticipantObjectTypeCodeRole"),
    ) == ("2", "3")
    if with_classes:
        classes = study_object.findall("SOPClass")
        assert classes and all(c.get("UID", "").startswith(STUDY) for c in classes)
        assert all(int(c.get("NumberOfInstances", "0")) >= 1 for c in classes)
    patient_object = found["2"]
    assert patient_object.get("ParticipantObjectID") == patient
    assert (
        patient_object.get("ParticipantObjectTypeCode"),
        patient_object.get("ParticipantObjectTypeCodeRole"),
    ) == ("1", "1")


def roles(message: ET.Element) -> dict[str, ET.Element]:
    found = {}
    for p in message.findall("ActiveParticipant"):
        role = p.find("RoleIDCode")
        if role is not None:
            found[role.get("csd-code", "")] = p
    return found


def parse(log: Path) -> list[ET.Element]:
    messages = []
    for line in log.read_text(encoding="utf-8").splitlines():
        assert "IHE+RFC-3881" in line  # the MSGID of RFC 5424 audit messages (ATNA)
        messages.append(ET.fromstring(line[line.index("<AuditMessage") :]))
    return messages


@pytest.mark.peers
@pytest.mark.slow
def test_one_study_life_reaches_the_audit_repository_after_it_was_down(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    syslog_port, pacs_port = free_port(), free_port()
    study = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "study", seed=7)[0]
    with storescp(pacs_port, tmp_path / "pacs"):
        node = node_factory(
            models=demo_models,
            routes=[{**route, "destinations": ["pacs"]} for route in shipped_routes],
            http={"token": TOKEN},
            destinations=[
                {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}
            ],
            audit={
                "syslog": f"127.0.0.1:{syslog_port}",
                "retry_base_seconds": 0.2,
                "retry_max_seconds": 0.5,
            },
        )
        port = str(node.scp.port)
        run_tool(
            "storescu", "+sd", "+r", "-aet", "CT1", "-aec", "AINODE", "127.0.0.1", port, str(study)
        )

        def delivered() -> Job | None:
            with node.read_sessions() as session:
                job = session.scalars(select(Job)).first()
            return job if job is not None and job.state == "done" else None

        job = wait_for(delivered, timeout=120)
    base = f"http://127.0.0.1:{node.http.port}"
    with httpx.Client(base_url=base, timeout=10) as browser:
        assert browser.get("/?token=wrong").status_code == 403
        assert browser.get(f"/jobs/{job.id}?token={TOKEN}").status_code == 303
        assert browser.get(f"/jobs/{job.id}").status_code == 200
    with socket.create_connection(("127.0.0.1", node.scp.port)) as probe:  # a security alert
        probe.sendall(b"GET / HTTP/1.0\r\n\r\n")
        probe.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            probe.recv(1)

    def sample(outcome: str) -> float:
        value = node.metrics.registry.get_sample_value(
            "dicom_ai_node_audit_messages_total", {"outcome": outcome}
        )
        return value or 0.0

    # association login and logout, received, created, one per result sent, the wrong token,
    # the login, the job viewed, the probe's security alert
    with node.read_sessions() as session:
        results = session.scalar(select(func.count()).select_from(Delivery))
    assert results is not None and results >= 2
    expected = 8 + results

    def stored() -> int:
        with node.read_sessions() as session:
            return session.scalar(select(func.count()).select_from(AuditRecord)) or 0

    # the repository is down: the study went through all the same, the messages wait
    wait_for(lambda: stored() == expected and sample("send_failed") >= 2)
    assert sample("sent") == 0
    with rsyslog(syslog_port, tmp_path / "rsyslog") as log:
        wait_for(lambda: sample("sent") == expected, timeout=30)
        wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == expected)
        messages = parse(log)
    assert sample("dropped") == 0

    node_name = node.settings.node_name
    patient = str(run_tool("dcmdump", "+P", "PatientID", str(next(study.rglob("*.dcm")))).stdout)
    patient_id = patient.split("[", 1)[1].split("]", 1)[0]
    seen: dict[tuple[str, str, str], list[ET.Element]] = {}
    for message in messages:
        event_id, action, identification = check_common(message, node_name)
        event_type = identification.find("EventTypeCode")
        kind = event_type.get("csd-code", "") if event_type is not None else ""
        seen.setdefault((event_id, action, kind), []).append(message)

    # association from CT1 (Login ... Logout), A.5.3.12
    for kind in ("110122", "110123"):
        association = [
            m
            for m in seen[("110114", "E", kind)]
            if any(p.get("UserID") == "CT1" for p in m.findall("ActiveParticipant"))
        ]
        assert len(association) == 1
        participants = {p.get("UserID"): p for p in association[0].findall("ActiveParticipant")}
        assert participants["CT1"].get("UserIsRequestor") == "true"
        assert participants["CT1"].get("NetworkAccessPointID") == "127.0.0.1"
        assert participants["AINODE"].get("UserIsRequestor") == "false"
    # received (A.5.3.4, action C): source CT1, destination the node
    (received,) = seen[("110104", "C", "")]
    by_role = roles(received)
    assert by_role["110153"].get("UserID") == "CT1"
    assert by_role["110152"].get("UserID") == "AINODE"
    check_study(received, study.name, patient_id, with_classes=True)
    sop_class = received.find("ParticipantObjectIdentification/SOPClass")
    assert sop_class is not None and sop_class.get("NumberOfInstances") == str(
        len(list(study.rglob("*.dcm")))
    )
    # processed: the model created the results (A.5.3.2, action C)
    (created,) = seen[("110103", "C", "")]
    check_study(created, study.name, patient_id, with_classes=True)
    assert "cxr" in (created.find("ActiveParticipant").get("UserID") or "")  # type: ignore[union-attr]
    # delivered: one per result sent to the PACS (A.5.3.4, action R)
    sent = seen[("110104", "R", "")]
    assert len(sent) >= 2
    for message in sent:
        assert roles(message)["110152"].get("UserID") == "PACS"
        assert roles(message)["110153"].get("UserID") == "AINODE"
        check_study(message, study.name, patient_id, with_classes=True)
    # viewed on the dashboard by the token's identity (A.5.3.2, action R)
    (viewed,) = seen[("110103", "R", "")]
    check_study(viewed, study.name, patient_id, with_classes=False)
    viewer = viewed.find("ActiveParticipant")
    assert viewer is not None and (viewer.get("UserID") or "").startswith("token:")
    assert viewer.get("NetworkAccessPointID") == "127.0.0.1"
    # the token login, the wrong token before it, and the probe on the DICOM port
    logins = seen[("110114", "E", "110122")]
    outcomes = sorted(
        m[0].get("EventOutcomeIndicator", "")
        for m in logins
        if not any(p.get("UserID") == "CT1" for p in m.findall("ActiveParticipant"))
    )
    assert outcomes == ["0", "4"]
    (alert,) = seen[("110113", "E", "110126")]
    assert "not_an_association_request" in (
        alert.findtext("ParticipantObjectIdentification/ParticipantObjectDescription") or ""
    )


@pytest.mark.peers
def test_messages_go_over_tls_to_a_repository_that_checks_nothing_but_its_own_certificate(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    certs = make_certificates(tmp_path / "certs")
    port = free_port()
    counts: Counter[str] = Counter()
    trail = AuditTrail(
        sessions,
        AuditSettings(syslog=f"127.0.0.1:{port}", tls=True, ca_certificates=certs.ca),
        "tls-node",
        lambda outcome: counts.update([outcome]),
    )
    with rsyslog(port, tmp_path / "rsyslog", certs) as log:
        trail.start()
        try:
            trail.record(
                association_event(
                    Peer("CT1", "127.0.0.5"), Peer("AINODE", "127.0.0.1"), True, datetime.now(UTC)
                )
            )
            wait_for(lambda: counts["sent"] == 1)
            wait_for(lambda: log.exists() and log.read_text().count("\n") == 1)
        finally:
            trail.stop()
        (message,) = parse(log)
    event_id, action, _ = check_common(message, "tls-node")
    assert (event_id, action) == ("110114", "E")
    assert counts["stored"] == 1 and counts["send_failed"] == 0
