"""The node's audit trail: a background queue that stores each audit message in the job log
(``audit_records``, append-only) and sends it to the syslog repository when one is set.

:meth:`AuditTrail.record` never blocks and never raises: a full queue drops the message
(counted and logged), a job log or repository that fails is retried by the background thread,
so the DICOM path is never held up or failed by auditing. Messages not yet sent when the
repository is down wait in a bounded backlog and go out, in order, once it is back.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable

from sqlalchemy import insert
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.audit.messages import AuditEvent, to_xml
from dicom_ai_node.audit.syslog import SyslogConnection, syslog_message
from dicom_ai_node.config import AuditSettings
from dicom_ai_node.jobs.models import AuditRecord
from dicom_ai_node.tls import client_context

log = logging.getLogger(__name__)


class AuditTrail:
    """Records audit events for ``source_id`` (the node's name); ``count`` is called with
    ``stored``, ``sent``, ``dropped``, ``store_failed`` or ``send_failed`` (the metrics)."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        settings: AuditSettings,
        source_id: str,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.settings = settings
        self.source_id = source_id
        self._count = count or (lambda outcome: None)
        self._queue: queue.Queue[AuditEvent | None] = queue.Queue(settings.queue_size)
        self._backlog: deque[bytes] = deque()
        self._connection: SyslogConnection | None = None
        if settings.syslog:
            host, _, port = settings.syslog.rpartition(":")
            context = (
                client_context(
                    "audit", settings.ca_certificates, settings.certificate, settings.private_key
                )
                if settings.tls
                else None
            )
            self._connection = SyslogConnection(host.strip("[]"), int(port), context, 5.0)
        self._thread: threading.Thread | None = None
        self._retry_at = 0.0
        self._delay = settings.retry_base_seconds
        self._hostname = socket.gethostname()

    def record(self, event: AuditEvent) -> None:
        """Queue ``event`` (returns at once)."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self._count("dropped")
            log.warning("audit queue full: an audit message was dropped")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Store and send what is queued (up to ``timeout``), then stop."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
        self._thread = None
        if self._connection is not None:
            self._connection.close()

    def _run(self) -> None:
        while True:
            wait = max(0.0, self._retry_at - time.monotonic()) if self._backlog else None
            try:
                event = self._queue.get(timeout=wait)
            except queue.Empty:
                self._send()
                continue
            if event is None:
                self._send()
                return
            self._store(event)
            self._send()

    def _store(self, event: AuditEvent) -> None:
        xml = to_xml(event, self.source_id, self.settings.enterprise_site_id)
        for attempt in range(3):
            try:
                with self.sessions.begin() as session:
                    session.execute(
                        insert(AuditRecord).values(
                            at=event.at,
                            event_id=event.event_id.code,
                            outcome=event.outcome,
                            message=xml,
                        )
                    )
                self._count("stored")
                break
            except Exception:
                if attempt == 2:
                    self._count("store_failed")
                    log.exception("cannot store an audit message in the job log")
                else:
                    time.sleep(0.1)
        if self._connection is None:
            return
        if len(self._backlog) >= self.settings.queue_size:
            self._backlog.popleft()
            self._count("dropped")
        self._backlog.append(syslog_message(xml, event.at, self._hostname, self.source_id))

    def _send(self) -> None:
        """Send the backlog in order; on failure wait (exponential backoff) and retry."""
        if self._connection is None or not self._backlog or time.monotonic() < self._retry_at:
            return
        while self._backlog:
            try:
                self._connection.send(self._backlog[0])
            except OSError as exc:
                self._count("send_failed")
                log.warning(
                    "audit repository %s unreachable (%s): %d messages wait, retry in %.1f s",
                    self.settings.syslog,
                    exc,
                    len(self._backlog),
                    self._delay,
                )
                self._retry_at = time.monotonic() + self._delay
                self._delay = min(self._delay * 2, self.settings.retry_max_seconds)
                return
            self._backlog.popleft()
            self._count("sent")
        self._delay = self.settings.retry_base_seconds
