"""DICOM audit messages (PS3.15 Annex A.5, the XML schema of RFC 3881's lineage), built by
pure functions from typed values.

Each builder follows the message's table in PS3.15 A.5.3: the EventID and EventActionCode it
names, the active participants with their RoleIDCode, and the participant objects with their
type, role and ID type. There is no audit event for a DICOM association as such: its start and
end are recorded as *User Authenticated* (110114) *Login* / *Logout* of the calling AE
(A.5.3.12), the association being where a peer is identified (by AE title, address and, with
TLS, certificate).
"""

from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

# EventOutcomeIndicator (PS3.15 A.5.1, RFC 3881 5.1.4)
SUCCESS = 0
MINOR_FAILURE = 4
SERIOUS_FAILURE = 8


@dataclass(frozen=True)
class Code:
    """A coded value: ``csd-code``, ``codeSystemName``, ``originalText`` (PS3.15 A.5.1)."""

    code: str
    meaning: str
    system: str = "DCM"


# PS3.16 CID 400-405 and PS3.15 A.5.3
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
QUERY = Code("110112", "Query")
SECURITY_ALERT = Code("110113", "Security Alert")
USER_AUTHENTICATED = Code("110114", "User Authenticated")
LOGIN = Code("110122", "Login")
LOGOUT = Code("110123", "Logout")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
USE_OF_RESTRICTED_FUNCTION = Code("110132", "Use of Restricted Function")
DESTINATION = Code("110152", "Destination Role ID")
SOURCE = Code("110153", "Source Role ID")
APPLICATION = Code("110150", "Application")
STUDY_INSTANCE_UID = Code("110180", "Study Instance UID")
SOP_CLASS_UID = Code("110181", "SOP Class UID")
PATIENT_NUMBER = Code("2", "Patient Number", "RFC-3881")
NODE_ID = Code("110182", "Node ID")

# NetworkAccessPointTypeCode: 1 machine name, 2 IP address (RFC 3881 5.3.3)
IP_ADDRESS = 2
# ParticipantObjectTypeCode (RFC 3881 5.5.1) and ParticipantObjectTypeCodeRole (5.5.2)
PERSON, SYSTEM_OBJECT = 1, 2
ROLE_PATIENT, ROLE_REPORT, ROLE_SECURITY_RESOURCE = 1, 3, 13


@dataclass(frozen=True)
class Participant:
    """An ActiveParticipant: who (a user, an AE, a process) took part, from where."""

    user_id: str
    is_requestor: bool
    role: Code | None = None
    alternative_user_id: str = ""
    address: str = ""


@dataclass(frozen=True)
class ParticipantObject:
    """A ParticipantObjectIdentification: what the event was about (a study, a patient...).

    ``sop_classes`` maps SOP Class UIDs to their number of instances (the DICOM ``SOPClass``
    element of a study object); ``query`` is a query's identifier as sent and ``details``
    ParticipantObjectDetail type/value pairs (both base64-encoded in the XML)."""

    object_id: str
    type_code: int
    role: int
    id_type: Code
    name: str = ""
    description: str = ""
    sop_classes: Mapping[str, int] = field(default_factory=dict)
    query: bytes = b""
    details: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AuditEvent:
    """One audit message's content (PS3.15 A.5.1); ``event_type`` is its EventTypeCode."""

    event_id: Code
    action: str  # EventActionCode: C(reate), R(ead), U(pdate), D(elete), E(xecute)
    outcome: int
    at: datetime
    participants: Sequence[Participant]
    objects: Sequence[ParticipantObject] = ()
    event_type: Code | None = None

    def __post_init__(self) -> None:
        if self.action not in ("C", "R", "U", "D", "E"):
            raise ValueError(f"EventActionCode {self.action!r} is not one of C, R, U, D, E")
        if self.outcome not in (SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, 12):
            raise ValueError(f"EventOutcomeIndicator {self.outcome} is not 0, 4, 8 or 12")
        if self.at.tzinfo is None:
            raise ValueError("EventDateTime needs a time zone")
        if not self.participants:
            raise ValueError("an audit message needs at least one ActiveParticipant")


def _code(parent: ET.Element, tag: str, code: Code) -> None:
    ET.SubElement(
        parent,
        tag,
        {"csd-code": code.code, "codeSystemName": code.system, "originalText": code.meaning},
    )


def to_xml(event: AuditEvent, source_id: str, site_id: str = "") -> str:
    """The audit message as XML (PS3.15 A.5.1), the node being its AuditSource (type 4,
    application server process tier)."""
    root = ET.Element("AuditMessage")
    identification = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": event.at.isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(event.outcome),
        },
    )
    _code(identification, "EventID", event.event_id)
    if event.event_type is not None:
        _code(identification, "EventTypeCode", event.event_type)
    for p in event.participants:
        attributes = {"UserID": p.user_id, "UserIsRequestor": "true" if p.is_requestor else "false"}
        if p.alternative_user_id:
            attributes["AlternativeUserID"] = p.alternative_user_id
        if p.address:
            attributes["NetworkAccessPointID"] = p.address
            attributes["NetworkAccessPointTypeCode"] = str(IP_ADDRESS)
        participant = ET.SubElement(root, "ActiveParticipant", attributes)
        if p.role is not None:
            _code(participant, "RoleIDCode", p.role)
    source = ET.SubElement(
        root,
        "AuditSourceIdentification",
        {"AuditSourceID": source_id, **({"AuditEnterpriseSiteID": site_id} if site_id else {})},
    )
    _code(source, "AuditSourceTypeCode", Code("4", "Application Server"))
    for o in event.objects:
        obj = ET.SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": o.object_id,
                "ParticipantObjectTypeCode": str(o.type_code),
                "ParticipantObjectTypeCodeRole": str(o.role),
            },
        )
        _code(obj, "ParticipantObjectIDTypeCode", o.id_type)
        if o.name:
            ET.SubElement(obj, "ParticipantObjectName").text = o.name
        if o.description:
            ET.SubElement(obj, "ParticipantObjectDescription").text = o.description
        if o.query:
            ET.SubElement(obj, "ParticipantObjectQuery").text = base64.b64encode(o.query).decode()
        for kind, value in o.details.items():
            encoded = base64.b64encode(value.encode()).decode()
            ET.SubElement(obj, "ParticipantObjectDetail", {"type": kind, "value": encoded})
        for uid, count in sorted(o.sop_classes.items()):
            ET.SubElement(obj, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
    return ET.tostring(root, encoding="unicode")


# --- the node's events (PS3.15 A.5.3) ------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """A DICOM application entity and where it is."""

    ae_title: str
    address: str


def study_objects(
    study_uid: str, patient_id: str, sop_classes: Mapping[str, int]
) -> list[ParticipantObject]:
    """A study (with its SOP classes and counts) and its patient, as A.5.3.4 and A.5.3.3 list
    them."""
    objects = [
        ParticipantObject(
            study_uid, SYSTEM_OBJECT, ROLE_REPORT, STUDY_INSTANCE_UID, sop_classes=sop_classes
        )
    ]
    if patient_id:
        objects.append(ParticipantObject(patient_id, PERSON, ROLE_PATIENT, PATIENT_NUMBER))
    return objects


def association_event(requestor: Peer, acceptor: Peer, started: bool, at: datetime) -> AuditEvent:
    """An association begun (Login) or ended (Logout) by ``requestor`` (A.5.3.12)."""
    return AuditEvent(
        USER_AUTHENTICATED,
        "E",
        SUCCESS,
        at,
        [
            Participant(requestor.ae_title, True, APPLICATION, address=requestor.address),
            Participant(acceptor.ae_title, False, APPLICATION, address=acceptor.address),
        ],
        event_type=LOGIN if started else LOGOUT,
    )


def transferred_event(
    source: Peer,
    destination: Peer,
    study_uid: str,
    patient_id: str,
    sop_classes: Mapping[str, int],
    at: datetime,
    *,
    received: bool,
    outcome: int = SUCCESS,
) -> AuditEvent:
    """Instances of one study moved from ``source`` to ``destination`` (A.5.3.4): ``C``
    when the node received them (it creates them), ``R`` when it sent them (read out)."""
    return AuditEvent(
        INSTANCES_TRANSFERRED,
        "C" if received else "R",
        outcome,
        at,
        [
            Participant(source.ae_title, not received, SOURCE, address=source.address),
            Participant(destination.ae_title, received, DESTINATION, address=destination.address),
        ],
        study_objects(study_uid, patient_id, sop_classes),
    )


@dataclass
class ReceivedTally:
    """Instances received, counted per study (its patient ID, and instances per SOP Class
    UID): what one A.5.3.4 message reports for each study."""

    studies: dict[str, tuple[str, Counter[str]]] = field(default_factory=dict)

    def add(self, study_uid: str, patient_id: str, sop_class_uid: str) -> None:
        _, counts = self.studies.setdefault(study_uid, (patient_id, Counter()))
        counts[sop_class_uid] += 1

    def events(
        self, source: Peer, destination: Peer, at: datetime, only: str | None = None
    ) -> list[AuditEvent]:
        """A DICOM Instances Transferred message (C) per study, or for study ``only``; the
        studies reported leave the tally."""
        chosen = list(self.studies) if only is None else [only]
        return [
            transferred_event(
                source, destination, study, *self.studies.pop(study), at, received=True
            )
            for study in chosen
            if study in self.studies
        ]


def accessed_event(
    user: str, address: str, uri: str, study_uid: str, patient_id: str, at: datetime
) -> AuditEvent:
    """A user read a study's job and results on the dashboard or API (A.5.3.2); the address
    read (``uri``) is the study object's description."""
    return AuditEvent(
        INSTANCES_ACCESSED,
        "R",
        SUCCESS,
        at,
        [Participant(user, True, address=address)],
        [
            ParticipantObject(
                study_uid, SYSTEM_OBJECT, ROLE_REPORT, STUDY_INSTANCE_UID, description=uri
            ),
            *study_objects(study_uid, patient_id, {})[1:],
        ],
    )


def login_event(user: str, address: str, ok: bool, node: str, at: datetime) -> AuditEvent:
    """A token presented to the dashboard or API, right or wrong (A.5.3.12)."""
    return AuditEvent(
        USER_AUTHENTICATED,
        "E",
        SUCCESS if ok else MINOR_FAILURE,
        at,
        [Participant(user, True, address=address), Participant(node, False, APPLICATION)],
        event_type=LOGIN,
    )


def alert_event(
    reporter: str, subject: str, address: str, detail: str, at: datetime, *, network: bool
) -> AuditEvent:
    """A security alert (A.5.3.11): a refused DICOM peer (``network``: Node Authentication)
    or a refused HTTP client (Use of Restricted Function); ``subject`` is who was refused."""
    return AuditEvent(
        SECURITY_ALERT,
        "E",
        MINOR_FAILURE,
        at,
        [Participant(reporter, True, APPLICATION), Participant(subject, False, address=address)],
        [
            ParticipantObject(
                address or subject,
                SYSTEM_OBJECT,
                ROLE_SECURITY_RESOURCE,
                NODE_ID,
                description=detail,
            )
        ],
        event_type=NODE_AUTHENTICATION if network else USE_OF_RESTRICTED_FUNCTION,
    )


def created_event(
    process: str,
    study_uid: str,
    patient_id: str,
    sop_classes: Mapping[str, int],
    at: datetime,
) -> AuditEvent:
    """The node's ``process`` (a model) made new instances in a study: its results
    (A.5.3.2, DICOM Instances Accessed with EventActionCode C)."""
    return AuditEvent(
        INSTANCES_ACCESSED,
        "C",
        SUCCESS,
        at,
        [Participant(process, True, APPLICATION)],
        study_objects(study_uid, patient_id, sop_classes),
    )


def query_event(
    requestor: Peer,
    responder: Peer,
    sop_class: str,
    query: bytes,
    transfer_syntax: str,
    at: datetime,
    outcome: int = SUCCESS,
) -> AuditEvent:
    """The node queried a peer (A.5.3.10): the Query/Retrieve SOP Class used, the identifier
    as sent (``query``, encoded in ``transfer_syntax``)."""
    return AuditEvent(
        QUERY,
        "E",
        outcome,
        at,
        [
            Participant(requestor.ae_title, True, SOURCE, address=requestor.address),
            Participant(responder.ae_title, False, DESTINATION, address=responder.address),
        ],
        [
            ParticipantObject(
                sop_class,
                SYSTEM_OBJECT,
                ROLE_REPORT,
                SOP_CLASS_UID,
                query=query,
                details={"TransferSyntax": transfer_syntax},
            )
        ],
    )
