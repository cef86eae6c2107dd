"""The receive stage's writes to the job log: instances, series, studies, associations.

These run on the association threads, so each is a handful of statements in one short
transaction; :class:`GroupCommit` lets the instances of concurrent associations share one.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, bindparam, case, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.models import (
    Association,
    Instance,
    Series,
    SeriesState,
    Study,
    UTCDateTime,
    utcnow,
)
from dicom_ai_node.jobs.queue import worker_id
from dicom_ai_node.jobs.store import add_event, upsert_for
from dicom_ai_node.receive.header import InstanceHeader, UnreadableInstanceError, read_header
from dicom_ai_node.spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    """What recording an instance did: whether it replaced an earlier copy, and where."""

    duplicate: bool
    old_path: str | None
    generation: int


@dataclass(frozen=True)
class _Statements:
    existing: Any
    study: Any
    series: Any
    series_left: Any
    instance: Any
    association: Any


def _reopened(model: Any) -> dict[str, Any]:
    """SET clauses for a row that receives an instance: receiving again, a new generation
    if it was complete."""
    return {
        "state": SeriesState.RECEIVING.value,
        "last_received_at": bindparam("now", type_=UTCDateTime()),
        "generation": case(
            (model.state == SeriesState.COMPLETE.value, model.generation + 1),
            else_=model.generation,
        ),
    }


@functools.cache
def _statements(dialect: str) -> _Statements:
    """The statements of :func:`record_instance`, built once per dialect: they run for every
    instance received, and building and compiling them anew each time costs more than
    executing them."""
    study = upsert_for(dialect, Study).values(
        study_instance_uid=bindparam("study"),
        patient_id=bindparam("patient_id"),
        accession_number=bindparam("accession_number"),
        study_date=bindparam("study_date"),
        study_description=bindparam("study_description"),
        state=SeriesState.RECEIVING.value,
        generation=0,
        first_received_at=bindparam("now"),
        last_received_at=bindparam("now"),
    )
    series = upsert_for(dialect, Series).values(
        series_instance_uid=bindparam("series"),
        study_instance_uid=bindparam("study"),
        modality=bindparam("modality"),
        attributes=bindparam("attributes"),
        calling_ae_title=bindparam("calling"),
        instance_count=1,
        state=SeriesState.RECEIVING.value,
        generation=0,
        first_received_at=bindparam("now"),
        last_received_at=bindparam("now"),
    )
    instance_columns = (
        "series_instance_uid",
        "study_instance_uid",
        "sop_class_uid",
        "transfer_syntax_uid",
        "instance_number",
        "path",
        "size",
        "association_id",
        "received_at",
        "generation",
    )
    instance = upsert_for(dialect, Instance).values(
        sop_instance_uid=bindparam("sop"),
        series_instance_uid=bindparam("series"),
        study_instance_uid=bindparam("study"),
        sop_class_uid=bindparam("sop_class"),
        transfer_syntax_uid=bindparam("transfer_syntax"),
        instance_number=bindparam("instance_number"),
        path=bindparam("path"),
        size=bindparam("size"),
        association_id=bindparam("association"),
        received_at=bindparam("now"),
        generation=bindparam("generation"),
    )
    return _Statements(
        existing=select(Instance.series_instance_uid, Instance.path).where(
            Instance.sop_instance_uid == bindparam("sop")
        ),
        study=study.on_conflict_do_update(
            index_elements=["study_instance_uid"], set_=_reopened(Study)
        ),
        series=series.on_conflict_do_update(
            index_elements=["series_instance_uid"],
            set_={
                **_reopened(Series),
                "instance_count": Series.instance_count + bindparam("added"),
                "completed_at": None,
            },
        ).returning(Series.generation),
        series_left=update(Series)
        .where(Series.series_instance_uid == bindparam("old_series"))
        .values(instance_count=Series.instance_count - 1),
        instance=instance.on_conflict_do_update(
            index_elements=["sop_instance_uid"],
            set_={name: getattr(instance.excluded, name) for name in instance_columns},
        ),
        association=update(Association)
        .where(Association.id == bindparam("association"))
        .values(instances=Association.instances + 1),
    )


def record_instance(
    connection: Connection,
    header: InstanceHeader,
    path: str,
    size: int,
    association_id: str | None,
    calling_ae_title: str,
    now: datetime | None = None,
) -> Recorded:
    """Record a received instance and update its series and study (in the caller's
    transaction).

    Duplicates (same SOP Instance UID) replace the earlier copy: the newest file wins, the
    instance is counted once. An instance arriving for a series or study already complete
    reopens it with a new ``generation``, so it is assembled and routed again (a follow-up
    job), rather than being folded silently into a finished job.
    """
    sql = _statements(connection.dialect.name)
    now = now or utcnow()
    existing = connection.execute(sql.existing, {"sop": header.sop_instance_uid}).first()
    moved = existing is not None and existing.series_instance_uid != header.series_instance_uid
    params = {
        "now": now,
        "study": header.study_instance_uid,
        "series": header.series_instance_uid,
        "sop": header.sop_instance_uid,
        "association": association_id,
    }
    connection.execute(
        sql.study,
        {
            **params,
            "patient_id": header.patient_id,
            "accession_number": header.accession_number,
            "study_date": header.study_date,
            "study_description": header.study_description,
        },
    )
    generation: int = connection.execute(
        sql.series,
        {
            **params,
            "modality": header.modality[:16],
            "attributes": header.attributes,
            "calling": calling_ae_title,
            "added": 1 if existing is None or moved else 0,
        },
    ).scalar_one()
    if moved and existing is not None:
        connection.execute(sql.series_left, {"old_series": existing.series_instance_uid})
    connection.execute(
        sql.instance,
        {
            **params,
            "sop_class": header.sop_class_uid,
            "transfer_syntax": header.transfer_syntax_uid,
            "instance_number": header.instance_number,
            "path": path,
            "size": size,
            "generation": generation,
        },
    )
    if association_id is not None:
        connection.execute(sql.association, params)
    if existing is not None:
        add_event(
            connection,
            "duplicate_instance",
            f"SOP Instance {header.sop_instance_uid} received again; the new copy replaces "
            "the earlier one",
            study=header.study_instance_uid,
            series=header.series_instance_uid,
            association_id=association_id,
        )
    old_path = existing.path if existing is not None and existing.path != path else None
    return Recorded(duplicate=existing is not None, old_path=old_path, generation=generation)


@dataclass
class _Pending:
    """One instance waiting for a transaction that records it."""

    header: InstanceHeader
    path: str
    size: int
    association_id: str | None
    calling_ae_title: str
    done: bool = False
    recorded: Recorded | None = None
    error: BaseException | None = None


class GroupCommit:
    """Records received instances, those of concurrent associations in shared transactions.

    :meth:`record` returns once a committed transaction holds the instance (or raises what
    recording it raised), as one transaction per instance would. While one thread runs a
    transaction, the instances that other threads hand in meanwhile wait and are then
    recorded together, up to ``max_batch``, in the next one, by whichever of them leads:
    waiting on a lock here instead of in SQLite's busy handler (which sleeps 1, 2, 5, 10...
    ms between tries), and one commit for several instances. If a shared transaction fails,
    each of its instances is retried in a transaction of its own, so that one bad instance
    (say, of an association whose row is missing) fails alone. Within one process only;
    other processes' writers still take their turns through the database's own lock.
    """

    def __init__(self, engine: Engine, max_batch: int = 32) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self._queue: list[_Pending] = []
        self._leading = False
        self._cond = threading.Condition()

    def record(
        self,
        header: InstanceHeader,
        path: str,
        size: int,
        association_id: str | None,
        calling_ae_title: str,
    ) -> Recorded:
        """Record one instance (see :func:`record_instance`) in a committed transaction."""
        item = _Pending(header, path, size, association_id, calling_ae_title)
        with self._cond:
            self._queue.append(item)
            while not item.done:
                if self._leading:
                    self._cond.wait()
                    continue
                self._leading = True
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
                self._cond.release()
                try:
                    self._commit(batch)
                finally:
                    self._cond.acquire()
                    self._leading = False
                    self._cond.notify_all()
        if item.error is not None:
            raise item.error
        assert item.recorded is not None
        return item.recorded

    def _commit(self, batch: list[_Pending]) -> None:
        """Record ``batch`` in one transaction, else each in its own; every item ends done."""
        try:
            try:
                with self.engine.begin() as connection:
                    recorded = [self._one(connection, item) for item in batch]
            except Exception as exc:
                if len(batch) == 1:
                    batch[0].error = exc
                    return
                for item in batch:
                    try:
                        with self.engine.begin() as connection:
                            item.recorded = self._one(connection, item)
                    except Exception as each:
                        item.error = each
            else:
                for item, result in zip(batch, recorded, strict=True):
                    item.recorded = result
        except BaseException as exc:  # interrupted: fail the rest rather than leave them
            for item in batch:
                if item.recorded is None and item.error is None:
                    item.error = exc
            raise
        finally:
            for item in batch:
                item.done = True

    @staticmethod
    def _one(connection: Connection, item: _Pending) -> Recorded:
        return record_instance(
            connection,
            item.header,
            item.path,
            item.size,
            item.association_id,
            item.calling_ae_title,
        )


def open_association(
    session: Session,
    association_id: str,
    node_name: str,
    calling_ae_title: str,
    called_ae_title: str,
    peer_address: str,
) -> None:
    """Record an accepted association (a series stays open while one of its is open)."""
    session.add(
        Association(
            id=association_id,
            node_name=node_name,
            owner=worker_id(node_name),
            calling_ae_title=calling_ae_title,
            called_ae_title=called_ae_title,
            peer_address=peer_address,
        )
    )


def close_association(session: Session, association_id: str, outcome: str) -> None:
    """Record the end of an association (released, aborted, or closed by the network)."""
    session.execute(
        update(Association)
        .where(Association.id == association_id, Association.ended_at.is_(None))
        .values(ended_at=utcnow(), outcome=outcome)
    )


def reindex(
    sessions: sessionmaker[Session], spool: Spool, settled_before: float | None = None
) -> int:
    """Record the spool files that the job log does not know; returns how many.

    A process may die between writing a file and committing its row (and on SQLite, with
    ``synchronous=NORMAL``, a power loss may drop the last commits while the fsynced files
    survive), so at startup the spool is the truth. In a shared spool another live node may
    have just written a file whose row it is about to commit: ``settled_before`` (a POSIX
    time) limits the pass to the files written before then. Unreadable files are left alone
    and logged.
    """
    with sessions() as session, session.begin():
        known = set(session.scalars(select(Instance.path)).all())
    added = 0
    for path in spool.received_files(settled_before):
        stored = spool.stored(path)
        if stored in known:
            continue
        data = path.read_bytes()
        try:
            header = read_header(data)
        except UnreadableInstanceError as exc:
            log.error("spool file %s is not usable: %s", path, exc)
            continue
        with sessions.begin() as session:
            record_instance(session.connection(), header, stored, len(data), None, "")
            add_event(
                session,
                "reindexed",
                f"{path.name} was in the spool but not in the job log; recorded it",
                study=header.study_instance_uid,
                series=header.series_instance_uid,
            )
        added += 1
    return added
