"""Delivering results: one row per (result, destination), retried with exponential backoff.

A destination that is down only delays its own deliveries: each destination has its own
sender, and a failed attempt schedules the next one ``base * 2**attempts`` seconds later
(capped), until ``max_attempts`` when the delivery fails and its job becomes
``failed_to_deliver`` (``dicom-ai-node jobs retry ID`` sends it again). Results keep their
SOP Instance UIDs across retries, so a peer that stored an object before the answer was lost
receives the same object again, never a second copy with a new UID.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping
from datetime import datetime
from pathlib import Path

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import DestinationSettings, DispatchSettings
from dicom_ai_node.dispatch.commitment import (
    CommitmentReports,
    expire_requests,
    new_transaction,
    request_commitment,
)
from dicom_ai_node.dispatch.scu import Peer, SendOutcome, send_files
from dicom_ai_node.dispatch.stow import WebPeer, stow_files
from dicom_ai_node.jobs.loop import PollingLoop
from dicom_ai_node.jobs.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    Result,
    utcnow,
)
from dicom_ai_node.jobs.outbox import Retries, Settled, settle
from dicom_ai_node.jobs.outbox import claim_due as claim_leased
from dicom_ai_node.jobs.queue import held_by, node_of, settle_job
from dicom_ai_node.jobs.store import add_event, upsert
from dicom_ai_node.spool import Spool
from dicom_ai_node.tls import client_context, peer_context

log = logging.getLogger(__name__)


def peer(destination: DestinationSettings, calling_ae_title: str) -> Peer | WebPeer:
    """The peer of a configured destination; its TLS context (certificates read now, so a
    missing file is a configuration error at startup, not a failed delivery later)."""
    if destination.type == "dicomweb":
        https = destination.url.startswith("https://")
        return WebPeer(
            destination.url,
            username=destination.username,
            password=destination.password.get_secret_value(),
            token=destination.token.get_secret_value(),
            tls=client_context(
                f"destinations.{destination.name}",
                destination.ca_certificates,
                destination.certificate,
                destination.private_key,
            )
            if https
            else None,
        )
    return Peer(
        destination.ae_title,
        destination.host,
        destination.port,
        calling_ae_title,
        tls=peer_context(destination, "destinations"),
        server_name=destination.server_name,
    )


def send(paths: list[Path], to: Peer | WebPeer, timeout: float) -> list[SendOutcome]:
    """Send files by C-STORE or STOW-RS, as the peer is; one outcome per file."""
    if isinstance(to, WebPeer):
        return stow_files(paths, to, timeout=timeout)
    return send_files(paths, to, timeout=timeout)


def plan_deliveries(
    session: Session,
    job: Job,
    results: list[Result],
    chosen: Mapping[str, Collection[str]] | None = None,
) -> int:
    """Create the delivery rows of a job's results; returns how many.

    One row per result and destination, whoever plans it: a row that exists already (the
    same result planned by a racing worker) is not added again. ``chosen`` maps a
    destination to the SOP Instance UIDs of the results it gets (its output profile
    applied: the kinds it lists, the SC of its layout); a destination it does not name
    gets them all.
    """
    count = 0
    for destination in job.destinations:
        if destination == "outbox":
            continue
        wanted = None if chosen is None else chosen.get(destination)
        for result in results:
            if wanted is not None and result.sop_instance_uid not in wanted:
                continue
            inserted = session.execute(
                upsert(session, Delivery)
                .values(
                    job_id=job.id,
                    result_uid=result.sop_instance_uid,
                    destination=destination,
                    state=DeliveryState.PENDING.value,
                    attempts=0,
                    next_attempt_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["result_uid", "destination"])
                .returning(Delivery.id)
            ).scalar_one_or_none()
            count += inserted is not None
    return count


def claim_due(
    session: Session, destination: str, owner: str, lease_seconds: float, limit: int = 50
) -> list[tuple[Delivery, Result]]:
    """Claim the due deliveries to ``destination`` (lease-protected like jobs)."""
    ids = claim_leased(
        session, Delivery, owner, lease_seconds, limit, Delivery.destination == destination
    )
    if not ids:
        return []
    rows = session.execute(
        select(Delivery, Result)
        .join(Result, Result.sop_instance_uid == Delivery.result_uid)
        .where(Delivery.id.in_(ids))
        .order_by(Delivery.id)
        .execution_options(populate_existing=True)
    ).all()
    return [(delivery, result) for delivery, result in rows]


def release_leases(session: Session, holder: str) -> int:
    """Free the deliveries a node (at its startup) or one of its processes (when it died)
    had claimed, so they are sent now rather than when their leases would have run out;
    ``holder`` as for :func:`~dicom_ai_node.jobs.queue.held_by`."""
    result = session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.PENDING.value, held_by(Delivery.lease_owner, holder))
        .values(lease_owner=None, lease_expires_at=None)
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


def retries(settings: DispatchSettings) -> Retries:
    """The retry schedule of ``[dispatch]``."""
    return Retries(settings.max_attempts, settings.retry_base_seconds, settings.retry_max_seconds)


def record_outcome(
    session: Session,
    delivery_id: int,
    outcome: SendOutcome,
    settings: DispatchSettings,
    now: datetime | None = None,
    commitment: bool = False,
    sent_by: str | None = None,
) -> int | None:
    """Record one attempt; schedule the next one or close the delivery (with
    ``commitment``, a stored result waits as ``sent`` for the peer to commit it). A stored
    result records ``sent_by``, the node whose dispatcher sent it.

    Returns the job's id when this completed the delivery of its results (job now ``done``).
    """
    now = now or utcnow()
    delivery = session.get(Delivery, delivery_id, populate_existing=True)
    if delivery is None:
        return None
    delivery.last_status = outcome.status
    delivery.last_error = outcome.error or None
    stored = DeliveryState.SENT if commitment else DeliveryState.DONE
    settled = settle(delivery, outcome.ok, retries(settings), stored.value, now)
    what = f"{delivery.result_uid} to {delivery.destination}"
    status = f"0x{outcome.status:04X}" if outcome.status is not None else "no status"
    if settled is Settled.SENT:
        delivery.delivered_at = now
        delivery.sent_by = sent_by
        delivery.commitment_requested_at = now if commitment else None
        kind, message = "delivered", f"sent {what}: {status}"
    elif settled is Settled.FAILED:
        kind = "delivery_failed"
        message = (
            f"gave up sending {what} after {delivery.attempts} attempts: {status} {outcome.error}"
        )
    else:
        kind = "delivery_retry"
        message = (
            f"sending {what} failed ({status} {outcome.error}); attempt "
            f"{delivery.attempts + 1} at {delivery.next_attempt_at:%H:%M:%S}"
        )
    add_event(
        session,
        kind,
        message,
        job_id=delivery.job_id,
        destination=delivery.destination,
        status=outcome.status,
    )
    session.flush()
    return delivery.job_id if settle_job(session, delivery.job_id) else None


def last_received(session: Session, job_id: int) -> datetime | None:
    """When the last instance of a job's series (or study) arrived."""
    job = session.get(Job, job_id)
    if job is None:
        return None
    query = select(func.max(Instance.received_at)).where(
        Instance.study_instance_uid == job.study_instance_uid
    )
    if job.series_instance_uid is not None:
        query = query.where(Instance.series_instance_uid == job.series_instance_uid)
    value: datetime | None = session.scalar(query)
    return value


class _Sender(PollingLoop):
    """The loop sending to one destination."""

    def __init__(self, dispatcher: Dispatcher, destination: str) -> None:
        super().__init__(dispatcher.settings.poll_seconds)
        self.thread_name = f"dispatch-{destination}"
        self.dispatcher = dispatcher
        self.destination = destination

    def run_once(self) -> bool:
        return self.dispatcher.run_once(self.destination) > 0


class Dispatcher:
    """One sender thread per destination, so a slow or dead peer holds up only itself."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        destinations: list[DestinationSettings],
        settings: DispatchSettings,
        calling_ae_title: str,
        owner: str,
        spool: Spool,
        on_outcome: Callable[[str, SendOutcome], None] | None = None,
        on_delivered: Callable[[float], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.owner = owner
        self.node_name = node_of(owner)
        self.spool = spool
        self.on_outcome = on_outcome
        self.on_delivered = on_delivered
        self.peers = {d.name: peer(d, calling_ae_title) for d in destinations}
        # destinations that commit -> how long an association waits for the answer on it
        self.committing = {d.name: d.commitment_wait_seconds for d in destinations if d.commitment}
        self.reports = CommitmentReports(sessions, settings)
        self._senders = [_Sender(self, name) for name in self.peers]

    def start(self) -> None:
        for sender in self._senders:
            sender.start()

    def wake(self) -> None:
        """Look for due deliveries now (results were just written)."""
        for sender in self._senders:
            sender.wake()

    def stop(self, timeout: float | None = None) -> None:
        for sender in self._senders:
            sender.stop(timeout)

    def run_once(self, name: str) -> int:
        """Send what is due to destination ``name`` (and, for one that commits, ask it to
        commit what it stored); returns how many were attempted."""
        commitment = name in self.committing
        with self.sessions.begin() as session:
            if commitment:
                expire_requests(session, name, self.settings)
            due = claim_due(session, name, self.owner, self.settings.timeout * 4)
        if not due:
            return 0
        by_path = {self.spool.locate(result.path): (delivery, result) for delivery, result in due}
        outcomes = send(list(by_path), self.peers[name], self.settings.timeout)
        stored: list[tuple[Delivery, Result]] = []
        for outcome in outcomes:
            delivery, _ = by_path[outcome.path]
            with self.sessions.begin() as session:
                done_job = record_outcome(
                    session,
                    delivery.id,
                    outcome,
                    self.settings,
                    commitment=commitment,
                    sent_by=self.node_name,
                )
                received = last_received(session, done_job) if done_job is not None else None
            if received is not None and self.on_delivered is not None:
                self.on_delivered((utcnow() - received).total_seconds())
            if self.on_outcome is not None:
                self.on_outcome(name, outcome)
            level = logging.INFO if outcome.ok else logging.WARNING
            log.log(
                level,
                "dispatch to %s: %s %s",
                name,
                outcome.sop_instance_uid,
                f"0x{outcome.status:04X}" if outcome.status is not None else outcome.error,
            )
            if commitment and outcome.ok:
                stored.append(by_path[outcome.path])
        if stored:
            self._request_commitment(name, stored)
        return len(outcomes)

    def _request_commitment(self, name: str, stored: list[tuple[Delivery, Result]]) -> None:
        """Ask ``name`` to commit what it just stored (PS3.4 J.3.2), waiting up to its
        ``commitment_wait_seconds`` for an answer on the same association; an unanswered or
        refused request is sent again after ``commitment_timeout_seconds``."""
        to = self.peers[name]
        assert isinstance(to, Peer)
        with self.sessions.begin() as session:
            uid = new_transaction(session, name, [d for d, _ in stored], utcnow())
        references = [(r.sop_class_uid, r.sop_instance_uid) for _, r in stored]
        error = request_commitment(
            to, uid, references, self.settings.timeout, self.reports, self.committing[name]
        )
        if error:
            with self.sessions.begin() as session:
                for job_id in sorted({d.job_id for d, _ in stored}):
                    add_event(
                        session,
                        "commitment_request_failed",
                        f"asking {name} to commit (transaction {uid}) failed: {error}; "
                        f"asked again after {self.settings.commitment_timeout_seconds:g} s",
                        job_id=job_id,
                        destination=name,
                        transaction_uid=uid,
                    )
        if error:
            log.warning("storage commitment request to %s failed: %s", name, error)
