"""The Storage SCP (PS3.4 Annex B), Verification SCP (PS3.4 Annex A) and Modality Performed
Procedure Step SCP (PS3.4 Annex F, see :mod:`.mpps`).

The C-STORE handler runs on the association's own thread and only does I/O: it hands the
data set as received to :class:`~dicom_ai_node.receive.ingest.Ingest` (spool, fsync, job log)
and answers success (0x0000), or the failure status from PS3.4 B.2.3 that the ingest gave,
with an Error Comment saying why.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    VerificationPresentationContexts,
    build_context,
    evt,
)
from pynetdicom.association import Association as PynetdicomAssociation
from pynetdicom.dimse_primitives import C_STORE, N_CREATE, N_SET
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    ModalityPerformedProcedureStep,
    StorageCommitmentPushModel,
)
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.audit.messages import (
    Peer,
    ReceivedTally,
    alert_event,
    association_event,
)
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import DicomSettings
from dicom_ai_node.jobs.models import utcnow
from dicom_ai_node.jobs.store import add_event
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.receive.access import AddressPolicy
from dicom_ai_node.receive.guard import ConnectionGuard, GuardedAE
from dicom_ai_node.receive.ingest import STATUS_SUCCESS, Ingest
from dicom_ai_node.receive.mpps import PerformedSteps, StepRefusedError
from dicom_ai_node.receive.reactor import ReactiveDUL
from dicom_ai_node.receive.record import close_association, open_association
from dicom_ai_node.tls import server_context

log = logging.getLogger(__name__)

#: At a stop, an association whose last PDU was the node's, this long ago, is not waited for.
IDLE_AT_STOP_SECONDS = 2.0
_UNCOMPRESSED = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian})
_SUPPORTED = frozenset(ALL_TRANSFER_SYNTAXES)


def preferred_transfer_syntaxes(proposed: Sequence[str]) -> list[str]:
    """The order in which to accept the proposed transfer syntaxes of one SOP Class.

    The acceptor chooses among the syntaxes a requestor proposes (PS3.8 Section 9.3.3.2).
    Compressed ones (encapsulated and deflate) come first, so that a sender whose file is
    compressed need not decompress it for us; then the uncompressed ones in the requestor's
    own order, since requestors list first the syntax their data is in. Either way the node
    stores what arrives without transcoding it.
    """
    ordered = list(dict.fromkeys(ts for ts in proposed if ts in _SUPPORTED))
    return [ts for ts in ordered if ts not in _UNCOMPRESSED] + [
        ts for ts in ordered if ts in _UNCOMPRESSED
    ]


def _acceptable(sop_class: str, syntaxes: list[str]) -> PresentationContext:
    """The context accepting ``sop_class``; the storage commitment one accepts a peer as
    SCP too (its N-EVENT-REPORT)."""
    context = build_context(sop_class, syntaxes or None)
    if sop_class == StorageCommitmentPushModel:
        context.scu_role = context.scp_role = True
    return context


@dataclass
class _AssociationInfo:
    id: str
    calling_ae_title: str
    peer: str
    started: float
    called: Peer
    stored: int = 0
    failed: int = 0
    received: ReceivedTally = field(default_factory=ReceivedTally)  # for the audit trail

    @property
    def requestor(self) -> Peer:
        return Peer(self.calling_ae_title, self.peer.rsplit(":", 1)[0])


def _status(code: int, comment: str) -> Dataset:
    """A C-STORE response status with an Error Comment (0000,0902), at most 64 characters."""
    status = Dataset()
    status.Status = code
    status.ErrorComment = comment[:64]
    return status


class StorageSCP:
    """The node's listener: accepts associations and stores what they send.

    ``ingest`` stores what arrives (the node's STOW-RS service and C-GET share it);
    ``metrics`` counts instances and associations. ``listener``, a bound and listening
    socket, is accepted on instead of binding ``[dicom] bind`` and ``port``: the receiver
    processes of one node share the one socket their supervisor opened (``shared``: more
    than one does, see :class:`~dicom_ai_node.receive.guard.GuardedAE`).
    """

    def __init__(
        self,
        settings: DicomSettings,
        ingest: Ingest,
        sessions: sessionmaker[Session],
        node_name: str,
        *,
        metrics: NodeMetrics | None = None,
        audit: AuditTrail | None = None,
        commitment_reports: Callable[[evt.Event], tuple[int, Dataset | None]] | None = None,
        listener: socket.socket | None = None,
        shared: bool = False,
    ) -> None:
        self.settings = settings
        self.commitment_reports = commitment_reports
        self.audit = audit
        self.spool = ingest.spool
        self.sessions = sessions
        self.engine = ingest.engine
        self.node_name = node_name
        self.metrics = metrics
        self.ingest = ingest
        self.steps = PerformedSteps(sessions)
        self._associations: dict[int, _AssociationInfo] = {}
        self._lock = threading.Lock()
        self._server: Any = None
        self._addresses = AddressPolicy(settings.allowed_addresses)
        self.guard = ConnectionGuard(
            settings.limits,
            self._addresses,
            metrics.connection_refused if metrics is not None else None,
            self._record_connection_refused,
        )
        self._ssl_context = server_context(settings.tls) if settings.tls.enabled else None
        self.ae = self._make_ae(listener, shared)
        self._sop_classes = {str(cx.abstract_syntax) for cx in self.ae.supported_contexts}

    def _make_ae(self, listener: socket.socket | None, shared: bool) -> AE:
        s = self.settings
        ae = GuardedAE(self.guard, s.ae_title, listener, shared)
        ae.maximum_associations = s.maximum_associations
        ae.acse_timeout = s.acse_timeout
        ae.dimse_timeout = s.dimse_timeout
        ae.network_timeout = s.network_timeout
        ae.maximum_pdu_size = s.maximum_pdu_size
        ae.require_called_aet = True
        if s.allowed_calling_aets:
            ae.require_calling_aet = list(s.allowed_calling_aets)
        for context in AllStoragePresentationContexts + VerificationPresentationContexts:
            assert context.abstract_syntax is not None
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(ModalityPerformedProcedureStep)
        if self.commitment_reports is not None:
            # A PACS answers a storage commitment request on an association it opens, as
            # the SOP Class's SCP (PS3.4 J.3.3; SCP/SCU role selection, PS3.7 D.3.3.4).
            ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
        return ae

    @property
    def port(self) -> int:
        """The port actually listened on (useful when configured as 0)."""
        if self._server is None:
            raise RuntimeError("the SCP is not started")
        return int(self._server.server_address[1])

    @property
    def listening(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        """Start listening in the background (returns at once)."""
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_CREATE, self._on_n_create),
            (evt.EVT_N_SET, self._on_n_set),
            (evt.EVT_N_EVENT_REPORT, self._on_n_event_report),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_RELEASED, self._on_ended, ["released"]),
            (evt.EVT_ABORTED, self._on_ended, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._on_ended, ["closed"]),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        self._server = self.ae.start_server(
            (self.settings.bind, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=self._ssl_context,
        )
        log.info(
            "DICOM listener %s on %s:%d%s",
            self.settings.ae_title,
            self.settings.bind,
            self.port,
            " (TLS)" if self._ssl_context else "",
        )

    def stop(self, grace_seconds: float = 30.0) -> None:
        """Stop accepting associations, let established ones finish (up to the grace), stop.

        Connections that never negotiated an association (a port probe, a peer still
        silent) are not waited for, nor are associations whose last PDU was the node's own
        (an answer, so no request is being handled) sent :data:`IDLE_AT_STOP_SECONDS` ago or
        more: a peer may keep an association open and idle for as long as it likes
        (Orthanc keeps the ones it opened to send storage commitment reports), and releasing
        it (A-RELEASE, PS3.8 Section 7.2) is the peer's to ask. Those are aborted (A-ABORT,
        PS3.8 Section 7.3): nothing is in flight on them, so nothing acknowledged is lost,
        and a sender that had more to send sends it again once the node is back.
        """
        if self._server is None:
            return
        self._server.shutdown()
        deadline = time.monotonic() + grace_seconds
        while time.monotonic() < deadline and any(
            assoc.is_established and not self._idle(assoc) for assoc in self.ae.active_associations
        ):
            time.sleep(0.05)
        for assoc in self.ae.active_associations:
            if assoc.is_established:
                log.warning(
                    "aborting association still open at shutdown%s: %s",
                    " (idle)" if self._idle(assoc) else "",
                    assoc.name,
                )
            assoc.abort()
        self._server = None

    @staticmethod
    def _idle(assoc: PynetdicomAssociation) -> bool:
        """Whether ``assoc`` has been idle for :data:`IDLE_AT_STOP_SECONDS` (see
        :meth:`ReactiveDUL.idle_seconds`)."""
        dul = assoc.dul
        return isinstance(dul, ReactiveDUL) and dul.idle_seconds() >= IDLE_AT_STOP_SECONDS

    # --- association bookkeeping -----------------------------------------------------------

    def _info(self, assoc: PynetdicomAssociation) -> _AssociationInfo | None:
        with self._lock:
            return self._associations.get(id(assoc))

    def _refused_address(self, assoc: PynetdicomAssociation) -> bool:
        """Reject the association if its calling AE title may not come from its address
        (``allowed_addresses``): A-ASSOCIATE-RJ rejected-permanent, DICOM UL service-user,
        calling-AE-title-not-recognized (PS3.8 Section 9.3.4, the nearest reason it defines),
        as pynetdicom itself rejects an AE title outside ``allowed_calling_aets``."""
        primitive = assoc.requestor.primitive
        assert primitive is not None
        calling, address = str(primitive.calling_ae_title), assoc.requestor.address
        if not self._addresses or self._addresses.allows(calling, address):
            return False
        log.warning(
            "association from %s (%s:%s) rejected: that AE title may not connect from there",
            calling.strip(),
            address,
            assoc.requestor.port,
        )
        if self.metrics is not None:
            self.metrics.association_rejected()
        self._alert(address, calling, f"calling AE title {calling.strip()} not allowed from there")
        assoc.acse.send_reject(0x01, 0x01, 0x03)
        assoc.kill()  # as pynetdicom does after its own rejections (acse.py)
        return True

    def _on_requested(self, event: evt.Event) -> None:
        """Check the source address (see :meth:`_refused_address`) and order the
        association's transfer syntaxes (see :func:`preferred_transfer_syntaxes`)."""
        if self._refused_address(event.assoc):
            return
        if self.guard.admit(event.assoc) is not None:
            # PS3.8 9.3.4: rejected-transient, UL service-provider (presentation), local limit
            event.assoc.acse.send_reject(0x02, 0x03, 0x02)
            event.assoc.kill()
            return
        primitive = event.assoc.requestor.primitive
        assert primitive is not None
        requested = primitive.presentation_context_definition_list
        proposed: dict[str, list[str]] = {}
        for context in requested:
            proposed.setdefault(str(context.abstract_syntax), []).extend(
                str(ts) for ts in context.transfer_syntax
            )
        event.assoc.acceptor.supported_contexts = [
            _acceptable(sop_class, preferred_transfer_syntaxes(syntaxes))
            for sop_class, syntaxes in proposed.items()
            if sop_class in self._sop_classes
        ]

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        requestor = assoc.requestor
        info = _AssociationInfo(
            id=str(uuid.uuid4()),
            calling_ae_title=requestor.ae_title,
            peer=f"{requestor.address}:{requestor.port}",
            started=time.monotonic(),
            called=Peer(assoc.acceptor.ae_title, assoc.acceptor.address),
        )
        with self._lock:
            self._associations[id(assoc)] = info
        if self.audit is not None:
            self.audit.record(association_event(info.requestor, info.called, True, utcnow()))
        if self.metrics is not None:
            self.metrics.association_opened()
        try:
            with self.sessions.begin() as session:
                open_association(
                    session,
                    info.id,
                    self.node_name,
                    info.calling_ae_title,
                    assoc.acceptor.ae_title,
                    info.peer,
                )
        except Exception:
            log.exception("association %s: cannot record it in the job log", info.id)

    def _on_ended(self, event: evt.Event, outcome: str) -> None:
        self.guard.ended(event.assoc)
        with self._lock:
            info = self._associations.pop(id(event.assoc), None)
        if info is None:
            return  # already recorded (a release is followed by a connection close)
        self._audit_end(info)
        if self.metrics is not None:
            self.metrics.association_closed()
        try:
            with self.sessions.begin() as session:
                close_association(session, info.id, outcome)
        except Exception:
            log.exception("association %s: cannot record its end", info.id)
        log.info(
            "association %s from %s (%s) %s after %.1f s: %d stored, %d refused",
            info.id[:8],
            info.calling_ae_title,
            info.peer,
            outcome,
            time.monotonic() - info.started,
            info.stored,
            info.failed,
            extra={"association_id": info.id},
        )

    def _audit_end(self, info: _AssociationInfo) -> None:
        """Audit what the association stored (one message per study) and its end."""
        if self.audit is None:
            return
        now = utcnow()
        for event in info.received.events(info.requestor, info.called, now):
            self.audit.record(event)
        self.audit.record(association_event(info.requestor, info.called, False, now))

    def _alert(self, address: str, subject: str, detail: str) -> None:
        if self.audit is not None:
            self.audit.record(
                alert_event(
                    self.settings.ae_title, subject, address, detail, utcnow(), network=True
                )
            )

    def _on_rejected(self, event: evt.Event) -> None:
        self.guard.ended(event.assoc)
        if self.metrics is not None:
            self.metrics.association_rejected()
        requestor = event.assoc.requestor
        log.warning(
            "association from %s (%s:%s) rejected",
            requestor.ae_title,
            requestor.address,
            requestor.port,
        )
        self._alert(requestor.address, requestor.ae_title, "association rejected")

    # --- DIMSE services --------------------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        info = self._info(event.assoc)
        request = cast(C_STORE, event.request)
        stored = self.ingest.store(
            event.encoded_dataset(),
            association_id=info.id if info else None,
            calling_ae_title=info.calling_ae_title if info else "",
            transfer_syntax_uid=str(event.context.transfer_syntax),
            sop_instance_uid=str(request.AffectedSOPInstanceUID).rstrip("\0 "),
            sop_class_uid=str(request.AffectedSOPClassUID).rstrip("\0 "),
        )
        if info is not None:
            if stored.ok:
                info.stored += 1
            else:
                info.failed += 1
            if stored.ok and stored.header is not None:
                header = stored.header
                info.received.add(
                    header.study_instance_uid, header.patient_id, header.sop_class_uid
                )
        if self.metrics is not None:
            self.metrics.instance_received(
                info.calling_ae_title if info else "", stored.status, stored.size
            )
        return STATUS_SUCCESS if stored.ok else _status(stored.status, stored.reason)

    def _record_connection_refused(self, address: str, reason: str, message: str) -> None:
        """Add a ``connection_refused`` event (the "refused sources" of the dashboard)."""
        try:
            with self.engine.begin() as connection:
                add_event(connection, "connection_refused", message, address=address, reason=reason)
        except Exception:
            log.exception("cannot record a refused connection in the job log")
        self._alert(address, address, f"{reason}: {message}")

    def _on_n_create(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        """MPPS N-CREATE (PS3.4 F.7.2.1): record a step in progress."""
        request = cast(N_CREATE, event.request)
        asked = str(request.AffectedSOPInstanceUID or "").rstrip("\0 ") or None
        calling = event.assoc.requestor.ae_title
        try:
            uid, attributes = self.steps.create(asked, calling, event.attribute_list)
        except StepRefusedError as exc:
            return self._refused_step("N-CREATE", asked, exc), None
        if asked is None:
            attributes.AffectedSOPInstanceUID = uid  # PS3.7 10.1.5.1.4
        return STATUS_SUCCESS, attributes

    def _on_n_set(self, event: evt.Event) -> tuple[int | Dataset, Dataset | None]:
        """MPPS N-SET (PS3.4 F.7.2.2): update, complete or discontinue a step."""
        request = cast(N_SET, event.request)
        uid = str(request.RequestedSOPInstanceUID or "").rstrip("\0 ")
        calling = event.assoc.requestor.ae_title
        try:
            attributes = self.steps.update(uid, calling, event.modification_list)
        except StepRefusedError as exc:
            return self._refused_step("N-SET", uid, exc), None
        return STATUS_SUCCESS, attributes

    def _on_n_event_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """A storage commitment report (PS3.4 J.3.3), recorded by the dispatcher's handler."""
        if self.commitment_reports is None:
            return 0x0112, None  # no such SOP Instance: we asked nothing (PS3.7 C.4.2)
        return self.commitment_reports(event)

    @staticmethod
    def _refused_step(operation: str, uid: str | None, exc: StepRefusedError) -> Dataset:
        log.warning("MPPS %s of %s refused (0x%04X): %s", operation, uid, exc.status, exc.reason)
        return exc.as_status()

    def space_left(self) -> bool:
        """Whether the spool has more free space than the floor (see :class:`Ingest`)."""
        return self.ingest.space_left()
