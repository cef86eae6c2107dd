"""The leased outbox that deliveries and webhook notifications share.

Rows of an outbox table (``deliveries``, ``notifications``) are ``pending`` until sent or
given up. A sender claims the due ones with a lease (``FOR UPDATE SKIP LOCKED`` on
PostgreSQL, so senders of several nodes skip each other's rows; a dead sender's rows are
claimed again once its lease runs out), attempts them, and settles each: sent, failed for
good after ``max_attempts``, or due again after an exponential, capped backoff.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, or_, select, update
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import utcnow

PENDING = "pending"


class Settled(StrEnum):
    """What became of an attempted outbox row."""

    SENT = "sent"
    FAILED = "failed"
    RETRY = "retry"


@dataclass(frozen=True)
class Retries:
    """How an outbox retries: at most ``max_attempts``, waiting ``base * 2**(n-1)``
    seconds after the n-th failure, at most ``maximum``."""

    max_attempts: int
    base_seconds: float
    max_seconds: float

    def backoff(self, attempts: int) -> timedelta:
        """The wait after the ``attempts``-th failed attempt."""
        seconds = self.base_seconds * 2 ** max(attempts - 1, 0)
        return timedelta(seconds=min(seconds, self.max_seconds))


def claim_due(
    session: Session,
    model: Any,
    owner: str,
    lease_seconds: float,
    limit: int,
    *where: ColumnElement[bool],
) -> list[int]:
    """Lease the due pending rows of ``model`` matching ``where`` to ``owner``; their ids,
    oldest due first."""
    now = utcnow()
    ids: list[int] = list(
        session.scalars(
            select(model.id)
            .where(
                model.state == PENDING,
                model.next_attempt_at <= now,
                or_(model.lease_expires_at.is_(None), model.lease_expires_at < now),
                *where,
            )
            .order_by(model.next_attempt_at, model.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
    )
    if ids:
        session.execute(
            update(model)
            .where(model.id.in_(ids))
            .values(lease_owner=owner, lease_expires_at=now + timedelta(seconds=lease_seconds))
            .execution_options(synchronize_session=False)
        )
    return ids


def settle(row: Any, ok: bool, retries: Retries, done_state: str, now: datetime) -> Settled:
    """Record one attempt on a claimed ``row``: ``done_state`` when ``ok``, ``failed``
    after the last attempt, else due again after the backoff. The lease is released."""
    row.attempts += 1
    row.lease_owner = None
    row.lease_expires_at = None
    if ok:
        row.state = done_state
        return Settled.SENT
    if row.attempts >= retries.max_attempts:
        row.state = Settled.FAILED.value
        return Settled.FAILED
    row.next_attempt_at = now + retries.backoff(row.attempts)
    return Settled.RETRY
