"""Webhook notifications of positive findings and failures, crash-safe through the job log.

The :class:`Notifier` reads the event log past a per-webhook cursor and turns the events
that matter into rows of an outbox (``notifications``), moving the cursor in the same
transaction; a sender then POSTs the due rows and records each attempt in the row and in the
job's events, retrying with exponential backoff. A restart therefore loses nothing (the
outbox and cursor are committed before anything is sent) and queues nothing twice (the
cursor, and a unique key per webhook and message). A POST whose answer was lost to a crash
is sent again: receivers should de-duplicate on the ``key`` of the body (also sent as the
``Idempotency-Key`` header).

On PostgreSQL an event id can commit after a larger one; each scan therefore also re-reads
the last ``overlap`` seconds of events, which the unique key makes harmless.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import NotificationSettings, Trigger
from dicom_ai_node.jobs.loop import PollingLoop
from dicom_ai_node.jobs.models import (
    Event,
    Job,
    JobState,
    Notification,
    NotificationCursor,
    NotificationState,
    Study,
    utcnow,
)
from dicom_ai_node.jobs.outbox import Retries, Settled, claim_due, settle
from dicom_ai_node.jobs.store import add_event, upsert
from dicom_ai_node.metrics import NodeMetrics

log = logging.getLogger(__name__)

# Event kinds (written by jobs.queue.transition) that may start a notification.
POSITIVE_KINDS = (f"job_{JobState.DELIVERING.value}", f"job_{JobState.DONE.value}")
FAILED_KINDS = (f"job_{JobState.FAILED.value}", f"job_{JobState.FAILED_TO_DELIVER.value}")


def redact(url: str) -> str:
    """``url`` without credentials or query, for logs and events (it may carry a secret)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    return f"{parts.scheme}://{host}{f':{parts.port}' if parts.port else ''}{parts.path}"


def retries(webhook: NotificationSettings) -> Retries:
    """A webhook's retry schedule."""
    return Retries(webhook.max_attempts, webhook.retry_base_seconds, webhook.retry_max_seconds)


class Notifier(PollingLoop):
    """One thread that fills the outbox from the event log and sends it to the webhooks.

    ``dashboard_url`` (e.g. ``http://ai-node.example:8080``) makes the body link to the
    job's page; ``owner`` names this process in leases so several nodes sharing one job
    log never send the same row at once.
    """

    thread_name = "notify"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        webhooks: Sequence[NotificationSettings],
        *,
        owner: str,
        node_name: str = "",
        dashboard_url: str = "",
        poll_seconds: float = 1.0,
        overlap_seconds: float = 30.0,
        metrics: NodeMetrics | None = None,
    ) -> None:
        super().__init__(poll_seconds)
        self.sessions = sessions
        self.webhooks = {webhook.url: webhook for webhook in webhooks}
        self.owner = owner
        self.node_name = node_name
        self.dashboard_url = dashboard_url.rstrip("/")
        self.overlap = timedelta(seconds=overlap_seconds)
        self.metrics = metrics

    def start(self) -> None:
        """Start the thread (nothing to do without webhooks)."""
        if self.webhooks:
            super().start()

    def run_once(self) -> bool:
        self.scan_once()
        return self.send_once() > 0

    # --- events -> outbox --------------------------------------------------------------------

    def scan_once(self) -> int:
        """Queue the notifications of the events past each webhook's cursor; how many new.

        A webhook seen for the first time starts at the end of the log: it is not told of the
        past, except of the events of the last ``overlap`` seconds.
        """
        queued = 0
        for webhook in self.webhooks.values():
            with self.sessions.begin() as session:
                queued += self._scan(session, webhook)
        return queued

    def _scan(self, session: Session, webhook: NotificationSettings) -> int:
        last = session.scalar(select(func.max(Event.id))) or 0
        cursor = session.get(NotificationCursor, webhook.url, with_for_update=True)
        if cursor is None:
            session.add(NotificationCursor(url=webhook.url, event_id=last))
            return 0
        kinds = [
            *(POSITIVE_KINDS if "positive" in webhook.on else ()),
            *(FAILED_KINDS if "failed" in webhook.on else ()),
        ]
        recent = utcnow() - self.overlap
        rows = session.execute(
            select(Event, Job, Study.accession_number)
            .join(Job, Job.id == Event.job_id)
            .outerjoin(Study, Study.study_instance_uid == Job.study_instance_uid)
            .where(
                Event.kind.in_(kinds),
                Event.id <= last,
                or_(Event.id > cursor.event_id, Event.at >= recent),
            )
            .order_by(Event.id)
        ).all()
        queued = 0
        for event, job, accession in rows:
            trigger: Trigger
            if job.shadow:  # shadow mode notifies nobody
                continue
            if event.kind in POSITIVE_KINDS:
                if not job.positive:
                    continue
                trigger, key = "positive", f"positive:job:{job.id}"
            else:
                trigger, key = "failed", f"failed:event:{event.id}"
            payload = self._payload(trigger, key, event, job, accession or "")
            inserted = session.execute(
                upsert(session, Notification)
                .values(
                    url=webhook.url,
                    key=key,
                    trigger=trigger,
                    job_id=job.id,
                    payload=payload,
                    state=NotificationState.PENDING.value,
                    attempts=0,
                    next_attempt_at=utcnow(),
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["url", "key"])
            )
            queued += int(inserted.rowcount)  # type: ignore[attr-defined]
        cursor.event_id = last
        if queued:
            self._wake.set()
        return queued

    def _payload(
        self, trigger: Trigger, key: str, event: Event, job: Job, accession: str
    ) -> dict[str, Any]:
        """The JSON body, fixed when queued: what happened, to which study, and a link."""
        return {
            "key": key,
            "event": trigger,
            "node": self.node_name,
            "at": event.at.isoformat(),
            "message": event.message,
            "job_id": job.id,
            "state": job.state,
            "study_instance_uid": job.study_instance_uid,
            "series_instance_uid": job.series_instance_uid,
            "accession_number": accession,
            "modality": job.modality,
            "model": job.model,
            "model_version": job.model_version,
            "label": job.label,
            "probability": job.probability,
            "error": job.error,
            "dashboard_url": f"{self.dashboard_url}/jobs/{job.id}" if self.dashboard_url else None,
        }

    # --- outbox -> webhooks ------------------------------------------------------------------

    def send_once(self, limit: int = 20) -> int:
        """POST the due notifications; returns how many were attempted."""
        with self.sessions.begin() as session:
            due = self._claim(session, limit)
        for notification in due:
            error = self._post(self.webhooks[notification.url], notification)
            with self.sessions.begin() as session:
                self._record(session, notification.id, error)
            if self.metrics is not None:
                self.metrics.notification_attempt(error is None)
        return len(due)

    def _claim(self, session: Session, limit: int) -> list[Notification]:
        longest = max(webhook.timeout for webhook in self.webhooks.values())
        ids = claim_due(
            session,
            Notification,
            self.owner,
            4 * longest,
            limit,
            Notification.url.in_(list(self.webhooks)),
        )
        if not ids:
            return []
        return list(
            session.scalars(
                select(Notification)
                .where(Notification.id.in_(ids))
                .order_by(Notification.id)
                .execution_options(populate_existing=True)
            ).all()
        )

    def _post(self, webhook: NotificationSettings, notification: Notification) -> str | None:
        """One POST; ``None`` on a 2xx answer, else what went wrong."""
        request = urllib.request.Request(
            webhook.url,
            data=json.dumps(notification.payload).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "User-Agent": "dicom-ai-node",
                "Idempotency-Key": notification.payload["key"],
                **webhook.headers,
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=webhook.timeout) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code} {exc.reason}"
        except (OSError, ValueError) as exc:
            return f"{type(exc).__name__}: {exc}"
        return None

    def _record(self, session: Session, notification_id: int, error: str | None) -> None:
        notification = session.get(Notification, notification_id, populate_existing=True)
        if notification is None:
            return
        webhook = self.webhooks[notification.url]
        now: datetime = utcnow()
        notification.last_error = error
        settled = settle(
            notification, error is None, retries(webhook), NotificationState.SENT.value, now
        )
        what = f"{notification.trigger} notification to {redact(notification.url)}"
        if settled is Settled.SENT:
            notification.sent_at = now
            kind, message = "notification_sent", f"sent the {what}"
        elif settled is Settled.FAILED:
            kind = "notification_failed"
            message = f"gave up the {what} after {notification.attempts} attempts: {error}"
        else:
            kind = "notification_retry"
            message = (
                f"the {what} failed ({error}); attempt {notification.attempts + 1} "
                f"at {notification.next_attempt_at:%H:%M:%S}"
            )
        (log.info if error is None else log.warning)("job %s: %s", notification.job_id, message)
        add_event(
            session,
            kind,
            message,
            job_id=notification.job_id,
            study=notification.payload.get("study_instance_uid"),
            series=notification.payload.get("series_instance_uid"),
            notification_id=notification.id,
            attempts=notification.attempts,
        )
