"""The notifier's tables in the job log: a cursor over the events and an outbox.

``notification_cursors`` holds, per webhook URL, the id of the last event already turned
into notifications; ``notifications`` is the outbox, one row per message with its retry
state. The cursor moves in the same transaction that fills the outbox, so after a crash
every event is turned into its notifications exactly once (migration ``0002``).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from dicom_ai_node.jobs.models import Base, utcnow


class NotificationState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    FAILED = "failed"


class NotificationCursor(Base):
    """How far the notifier has read the event log, per webhook."""

    __tablename__ = "notification_cursors"

    url: Mapped[str] = mapped_column(String(512), primary_key=True)
    event_id: Mapped[int] = mapped_column(Integer)


class Notification(Base):
    """One webhook message (its body fixed when it was queued) and its delivery attempts.

    ``key`` makes a message unique per webhook: ``positive:job:<id>`` for a finding
    (announced once per job), ``failed:event:<id>`` for a failure (announced each time).
    """

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    url: Mapped[str] = mapped_column(String(512))
    key: Mapped[str] = mapped_column(String(64))
    trigger: Mapped[str] = mapped_column(String(16))
    job_id: Mapped[int | None] = mapped_column(Integer, default=None, index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(default=dict)
    state: Mapped[str] = mapped_column(String(16), default=NotificationState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    lease_owner: Mapped[str | None] = mapped_column(String(128), default=None)
    lease_expires_at: Mapped[datetime | None] = mapped_column(default=None)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None] = mapped_column(default=None)

    __table_args__ = (
        UniqueConstraint("url", "key", name="uq_notifications_url_key"),
        Index("ix_notifications_due", "state", "next_attempt_at"),
    )
