"""The nodes of a cluster sharing one job log: each records a heartbeat; one silent for
longer than the timeout is dead, and the others close its open associations (so its series
can complete) and clean up its partial files. Its jobs, deliveries and notifications need
nothing more: they are claimed again by the others once their leases run out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from datetime import datetime, timedelta

from pydantic import BaseModel
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.config import ClusterSettings
from dicom_ai_node.jobs.loop import PollingLoop
from dicom_ai_node.jobs.models import Association, NodeRecord, utcnow
from dicom_ai_node.jobs.store import upsert

log = logging.getLogger(__name__)


def heartbeat(
    session: Session, name: str, version: str, *, started: bool = False, now: datetime | None = None
) -> None:
    """Record that node ``name`` is alive (``started``: it has just started)."""
    now = now or utcnow()
    values: dict[str, object] = {"heartbeat_at": now, "version": version}
    if started:
        values["started_at"] = now
    session.execute(
        upsert(session, NodeRecord)
        .values({"name": name, "started_at": now, **values})
        .on_conflict_do_update(index_elements=["name"], set_=values)
    )


def dead_nodes(session: Session, timeout_seconds: float, now: datetime | None = None) -> list[str]:
    """The nodes whose last heartbeat is older than ``timeout_seconds``."""
    cutoff = (now or utcnow()) - timedelta(seconds=timeout_seconds)
    return list(
        session.scalars(select(NodeRecord.name).where(NodeRecord.heartbeat_at < cutoff)).all()
    )


def live_peers(
    session: Session, name: str, timeout_seconds: float, now: datetime | None = None
) -> list[str]:
    """The other nodes whose heartbeat is recent (they may be writing to the spool now)."""
    cutoff = (now or utcnow()) - timedelta(seconds=timeout_seconds)
    return list(
        session.scalars(
            select(NodeRecord.name).where(
                NodeRecord.heartbeat_at >= cutoff, NodeRecord.name != name
            )
        ).all()
    )


class NodeHealth(BaseModel):
    """A node of the cluster as the job log tells it: ``live`` while its last heartbeat is
    younger than ``[cluster] node_timeout_seconds``, after which the others take over."""

    name: str
    version: str
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float
    live: bool


def cluster_nodes(
    session: Session, timeout_seconds: float, now: datetime | None = None
) -> list[NodeHealth]:
    """Every node that has written a heartbeat to the job log, by name, with its health."""
    now = now or utcnow()
    nodes = []
    for row in session.scalars(select(NodeRecord).order_by(NodeRecord.name)):
        age = (now - row.heartbeat_at).total_seconds()
        nodes.append(
            NodeHealth(
                name=row.name,
                version=row.version,
                started_at=row.started_at,
                heartbeat_at=row.heartbeat_at,
                heartbeat_age_seconds=age,
                live=age <= timeout_seconds,
            )
        )
    return nodes


def close_associations(
    session: Session, node_names: Collection[str], owner: str | None = None
) -> int:
    """Associations that nodes ``node_names`` (or the one process ``owner``) had open when
    they died can no longer send: closed as lost (at a node's own startup, by the others once
    it is known dead, by the supervisor when a receiver process died), so that their series
    can complete."""
    if not node_names and owner is None:
        return 0
    held = Association.owner == owner if owner else Association.node_name.in_(list(node_names))
    result = session.execute(
        update(Association)
        .where(held, Association.ended_at.is_(None))
        .values(ended_at=utcnow(), outcome="lost")
    )
    return int(result.rowcount)  # type: ignore[attr-defined]


class Heartbeat(PollingLoop):
    """Every ``heartbeat_seconds``: record this node's heartbeat and close the open
    associations of dead nodes. ``deferred`` runs once, ``node_timeout_seconds`` after the
    start: what had to wait until no live node could still be writing what it finds."""

    thread_name = "heartbeat"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        name: str,
        version: str,
        settings: ClusterSettings,
        deferred: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(settings.heartbeat_seconds)
        self.sessions = sessions
        self.name = name
        self.version = version
        self.settings = settings
        self._deferred = deferred
        self._deferred_at = time.monotonic() + settings.node_timeout_seconds

    def run_once(self) -> bool:
        with self.sessions.begin() as session:
            heartbeat(session, self.name, self.version)
            dead = dead_nodes(session, self.settings.node_timeout_seconds)
            closed = close_associations(session, dead)
        if closed:
            log.warning(
                "closed %d associations of dead nodes (%s)", closed, ", ".join(sorted(dead))
            )
        if self._deferred is not None and time.monotonic() >= self._deferred_at:
            deferred, self._deferred = self._deferred, None
            deferred()
        return False
