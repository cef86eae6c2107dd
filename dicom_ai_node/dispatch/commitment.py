"""Storage Commitment Push Model, SCU side (PS3.4 Annex J).

After its results are stored, a destination with ``commitment = true`` is asked to commit
them: one N-ACTION (Action Type 1, Request Storage Commitment) with a new Transaction UID
and the Referenced SOP Sequence (J.3.2). The peer answers later with an N-EVENT-REPORT
(Event Type 1: all committed, 2: some failed, with Failed SOP Sequence and a Failure Reason
each, J.3.3), on the same association or on one it opens to the node, whose listener
accepts the SOP Class for that (:class:`CommitmentReports` records either). The same
association needs no role negotiation: its requester (the node) is the SCU, its acceptor
the SCP, the roles the SOP Class has (J.3.3.1.2, Note 1: only a new association, which the
SCP requests, proposes the SCP role by SCP/SCU Role Selection, PS3.7 D.3.3.4). The node
keeps it open after the N-ACTION response for up to ``commitment_wait_seconds`` of the
destination, until the answer is recorded (J.3.3.1.2 lets the SCU release at any time,
so a PACS that answers on it is not cut short by the release). Until then a
delivery is ``sent``; confirmed it is ``done`` with ``committed_at``; a failed reference is
sent again and committed again, and a request unanswered after
``commitment_timeout_seconds`` is sent again too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import DispatchSettings
from dicom_ai_node.dispatch.scu import Peer, associate
from dicom_ai_node.jobs.models import Delivery, DeliveryState, utcnow
from dicom_ai_node.jobs.queue import settle_job
from dicom_ai_node.jobs.store import add_event

log = logging.getLogger(__name__)

# The well-known SOP Instance of the Storage Commitment Push Model (PS3.4 J.3.5)
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"
REQUEST_COMMITMENT = 1  # Action Type ID (PS3.4 J.3.2)
STATUS_SUCCESS = 0x0000
STATUS_PROCESSING_FAILURE = 0x0110


@dataclass(frozen=True)
class CommitmentReport:
    """An N-EVENT-REPORT's Event Information: what the peer committed and what it did not,
    each failure with its Failure Reason (PS3.4 J.3.3.1)."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, int], ...]


def request_dataset(transaction_uid: str, references: Sequence[tuple[str, str]]) -> Dataset:
    """The N-ACTION Action Information: Transaction UID and (SOP Class, SOP Instance) pairs."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    items = []
    for sop_class, sop_instance in references:
        item = Dataset()
        item.ReferencedSOPClassUID = sop_class
        item.ReferencedSOPInstanceUID = sop_instance
        items.append(item)
    ds.ReferencedSOPSequence = items
    return ds


def parse_report(info: Dataset) -> CommitmentReport:
    """Read an N-EVENT-REPORT's Event Information; raises ``ValueError`` without a
    Transaction UID."""
    uid = str(info.get("TransactionUID", ""))
    if not uid:
        raise ValueError("no Transaction UID in the storage commitment report")
    committed = tuple(
        str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", [])
    )
    failed = tuple(
        (str(item.ReferencedSOPInstanceUID), int(item.get("FailureReason", 0x0110)))
        for item in info.get("FailedSOPSequence", [])
    )
    return CommitmentReport(uid, committed, failed)


class CommitmentReports:
    """Records storage commitment reports in the job log, whichever association brings
    them (the node's listener, or the association that asked)."""

    def __init__(self, sessions: sessionmaker[Session], settings: DispatchSettings) -> None:
        self.sessions = sessions
        self.settings = settings

    def handle(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """The EVT_N_EVENT_REPORT handler: (status, Event Reply)."""
        if str(event.request.AffectedSOPClassUID) != StorageCommitmentPushModel:
            return STATUS_PROCESSING_FAILURE, None
        try:
            report = parse_report(event.event_information)
            with self.sessions.begin() as session:
                known = record_report(session, report, self.settings)
        except Exception:
            log.exception("could not record a storage commitment report")
            return STATUS_PROCESSING_FAILURE, None
        if not known:
            log.warning("commitment report for unknown transaction %s", report.transaction_uid)
        return STATUS_SUCCESS, None

    def answered(self, transaction_uid: str) -> bool:
        """Whether no delivery of the transaction awaits the peer's answer any more (it
        came, on whichever association, or the request expired)."""
        with self.sessions() as session:
            waiting = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(
                    Delivery.transaction_uid == transaction_uid,
                    Delivery.state == DeliveryState.SENT.value,
                )
            )
        return not waiting


def request_commitment(
    peer: Peer,
    transaction_uid: str,
    references: Sequence[tuple[str, str]],
    timeout: float,
    reports: CommitmentReports,
    wait: float = 0.0,
) -> str:
    """Send the N-ACTION; ``""`` when the peer accepted the request, else why not.

    A report arriving on this association is recorded by ``reports``; after a successful
    N-ACTION the association stays open for up to ``wait`` seconds, until the transaction
    is answered (on it, or on an association of the peer's own) or the peer releases it.
    """
    context = build_context(StorageCommitmentPushModel)
    # Answered once the N-EVENT-REPORT response is on its way: a release sent before it
    # would reach the peer first (pynetdicom lets a release overtake the reactor's answer).
    reported, arrived = threading.Event(), threading.Event()

    def on_report(event: evt.Event) -> tuple[int, Dataset | None]:
        reported.set()
        return reports.handle(event)

    def on_pdu_sent(event: evt.Event) -> None:
        if reported.is_set() and isinstance(event.pdu, P_DATA_TF):
            arrived.set()  # the only P-DATA sent after the report: its response

    handlers = [(evt.EVT_N_EVENT_REPORT, on_report), (evt.EVT_PDU_SENT, on_pdu_sent)]
    assoc = associate(peer, [context], timeout, handlers)
    if not assoc.is_established:
        return "association rejected" if assoc.is_rejected else "association failed or aborted"
    try:
        if not assoc.accepted_contexts:
            return "the peer does not support Storage Commitment Push Model"
        status, _ = assoc.send_n_action(
            request_dataset(transaction_uid, references),
            REQUEST_COMMITMENT,
            StorageCommitmentPushModel,
            COMMITMENT_INSTANCE,
        )
        if not status or "Status" not in status:
            return "no response to N-ACTION"
        if int(status.Status) != STATUS_SUCCESS:
            return f"N-ACTION status 0x{int(status.Status):04X}"
        _await_answer(assoc, reported, arrived, transaction_uid, reports, wait)
        return ""
    finally:
        if assoc.is_established:
            assoc.release()


# How often the wait for an answer looks in the job log, for one that came on the peer's
# own association, possibly to another process of the node.
_ANSWER_POLL_SECONDS = 0.2


def _await_answer(
    assoc: Association,
    reported: threading.Event,
    arrived: threading.Event,
    transaction_uid: str,
    reports: CommitmentReports,
    wait: float,
) -> None:
    """Hold ``assoc`` open until the transaction is answered, the peer ends the
    association, or ``wait`` seconds have passed.

    An answer on ``assoc`` counts once its response is sent (``arrived``); one recorded
    while none came on ``assoc`` (``reported`` is set before the report is recorded)
    came on another association, or the request expired.
    """
    deadline = time.monotonic() + wait
    while assoc.is_established:
        left = deadline - time.monotonic()
        if left <= 0 or arrived.wait(min(left, _ANSWER_POLL_SECONDS)):
            return
        if reports.answered(transaction_uid) and not reported.is_set():
            return


def new_transaction(
    session: Session, destination: str, deliveries: Sequence[Delivery], now: datetime
) -> str:
    """Give deliveries just sent a new Transaction UID, recorded before asking since the
    answer may come before the N-ACTION response; one event per job."""
    uid = str(generate_uid())
    session.execute(
        update(Delivery)
        .where(Delivery.id.in_([d.id for d in deliveries]))
        .values(transaction_uid=uid, commitment_requested_at=now)
        .execution_options(synchronize_session=False)
    )
    for job_id in sorted({d.job_id for d in deliveries}):
        count = sum(d.job_id == job_id for d in deliveries)
        add_event(
            session,
            "commitment_requested",
            f"asking {destination} to commit {count} results (transaction {uid})",
            job_id=job_id,
            destination=destination,
            transaction_uid=uid,
        )
    return uid


def _send_again(
    session: Session, delivery: Delivery, settings: DispatchSettings, kind: str, why: str
) -> None:
    """Back to ``pending`` (sent now), or ``failed`` after ``max_attempts``."""
    what = f"{delivery.result_uid} to {delivery.destination}"
    delivery.transaction_uid = None
    if delivery.attempts >= settings.max_attempts:
        delivery.state = DeliveryState.FAILED.value
        message = f"gave up on {what} after {delivery.attempts} attempts: {why}"
    else:
        delivery.state = DeliveryState.PENDING.value
        delivery.next_attempt_at = utcnow()
        message = f"{what} not committed ({why}); sending it again"
    add_event(session, kind, message, job_id=delivery.job_id, destination=delivery.destination)


def record_report(session: Session, report: CommitmentReport, settings: DispatchSettings) -> bool:
    """Apply a report to the deliveries of its transaction; ``False`` if none has it."""
    deliveries = session.scalars(
        select(Delivery).where(Delivery.transaction_uid == report.transaction_uid)
    ).all()
    committed = set(report.committed)
    failed = dict(report.failed)
    now = utcnow()
    for delivery in deliveries:
        if delivery.state != DeliveryState.SENT.value:
            continue
        if delivery.result_uid in committed:
            delivery.state = DeliveryState.DONE.value
            delivery.committed_at = now
            add_event(
                session,
                "committed",
                f"{delivery.destination} committed {delivery.result_uid}",
                job_id=delivery.job_id,
                destination=delivery.destination,
                transaction_uid=report.transaction_uid,
            )
        elif delivery.result_uid in failed:
            reason = f"Failure Reason 0x{failed[delivery.result_uid]:04X}"
            _send_again(session, delivery, settings, "commitment_failed", reason)
    session.flush()
    for job_id in sorted({d.job_id for d in deliveries}):
        settle_job(session, job_id)
    return bool(deliveries)


def expire_requests(
    session: Session, destination: str, settings: DispatchSettings, now: datetime | None = None
) -> int:
    """Send again what ``destination`` was asked to commit too long ago; returns how many."""
    now = now or utcnow()
    cutoff = now - timedelta(seconds=settings.commitment_timeout_seconds)
    stale = session.scalars(
        select(Delivery).where(
            Delivery.destination == destination,
            Delivery.state == DeliveryState.SENT.value,
            Delivery.commitment_requested_at < cutoff,
        )
    ).all()
    for delivery in stale:
        why = f"no answer within {settings.commitment_timeout_seconds:g} s"
        _send_again(session, delivery, settings, "commitment_timeout", why)
    session.flush()
    for job_id in sorted({d.job_id for d in stale}):
        settle_job(session, job_id)  # failed after max_attempts
    return len(stale)
