"""The receive stage's writes to the job log: instances, series, studies, associations.

These run on the association threads, so each is a handful of statements in one short
transaction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import case, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.models import Association, Instance, Series, SeriesState, Study, utcnow
from dicom_ai_node.jobs.store import add_event, upsert
from dicom_ai_node.receive.header import InstanceHeader, UnreadableInstanceError, read_header
from dicom_ai_node.spool import Spool

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recorded:
    """What recording an instance did: whether it replaced an earlier copy, and where."""

    duplicate: bool
    old_path: str | None
    generation: int


def record_instance(
    session: Session,
    header: InstanceHeader,
    path: str,
    size: int,
    association_id: str | None,
    calling_ae_title: str,
    now: datetime | None = None,
) -> Recorded:
    """Record a received instance and update its series and study.

    Duplicates (same SOP Instance UID) replace the earlier copy: the newest file wins, the
    instance is counted once. An instance arriving for a series or study already complete
    reopens it with a new ``generation``, so it is assembled and routed again (a follow-up
    job), rather than being folded silently into a finished job.
    """
    now = now or utcnow()
    existing = session.get(Instance, header.sop_instance_uid)
    moved = existing is not None and existing.series_instance_uid != header.series_instance_uid
    new_in_series = existing is None or moved

    reopen = {
        "state": SeriesState.RECEIVING.value,
        "last_received_at": now,
    }
    study_stmt = upsert(session, Study).values(
        study_instance_uid=header.study_instance_uid,
        patient_id=header.patient_id,
        accession_number=header.accession_number,
        study_date=header.study_date,
        study_description=header.study_description,
        state=SeriesState.RECEIVING.value,
        generation=0,
        first_received_at=now,
        last_received_at=now,
    )
    session.execute(
        study_stmt.on_conflict_do_update(
            index_elements=["study_instance_uid"],
            set_={
                **reopen,
                "generation": case(
                    (Study.state == SeriesState.COMPLETE.value, Study.generation + 1),
                    else_=Study.generation,
                ),
            },
        )
    )
    series_stmt = upsert(session, Series).values(
        series_instance_uid=header.series_instance_uid,
        study_instance_uid=header.study_instance_uid,
        modality=header.modality[:16],
        attributes=header.attributes,
        calling_ae_title=calling_ae_title,
        instance_count=1,
        state=SeriesState.RECEIVING.value,
        generation=0,
        first_received_at=now,
        last_received_at=now,
    )
    generation: int = session.execute(
        series_stmt.on_conflict_do_update(
            index_elements=["series_instance_uid"],
            set_={
                **reopen,
                "instance_count": Series.instance_count + (1 if new_in_series else 0),
                "generation": case(
                    (Series.state == SeriesState.COMPLETE.value, Series.generation + 1),
                    else_=Series.generation,
                ),
                "completed_at": None,
            },
        ).returning(Series.generation)
    ).scalar_one()
    if moved and existing is not None:
        session.execute(
            update(Series)
            .where(Series.series_instance_uid == existing.series_instance_uid)
            .values(instance_count=Series.instance_count - 1)
        )
    values = {
        "series_instance_uid": header.series_instance_uid,
        "study_instance_uid": header.study_instance_uid,
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "path": path,
        "size": size,
        "association_id": association_id,
        "received_at": now,
        "generation": generation,
    }
    session.execute(
        upsert(session, Instance)
        .values(sop_instance_uid=header.sop_instance_uid, **values)
        .on_conflict_do_update(index_elements=["sop_instance_uid"], set_=values)
    )
    if association_id is not None:
        session.execute(
            update(Association)
            .where(Association.id == association_id)
            .values(instances=Association.instances + 1)
        )
    if existing is not None:
        add_event(
            session,
            "duplicate_instance",
            f"SOP Instance {header.sop_instance_uid} received again; the new copy replaces "
            "the earlier one",
            study=header.study_instance_uid,
            series=header.series_instance_uid,
            association_id=association_id,
        )
    old_path = existing.path if existing is not None and existing.path != path else None
    return Recorded(duplicate=existing is not None, old_path=old_path, generation=generation)


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


def close_stale_associations(session: Session, node_name: str) -> int:
    """At startup: associations this node had open when it died can no longer send."""
    ids = session.scalars(
        select(Association.id).where(
            Association.node_name == node_name, Association.ended_at.is_(None)
        )
    ).all()
    for association_id in ids:
        close_association(session, association_id, "lost")
    return len(ids)


def reindex(sessions: sessionmaker[Session], spool: Spool) -> int:
    """Record the spool files that the job log does not know; returns how many.

    The job log commits with ``synchronous=NORMAL``: a power loss may drop its last commits
    while the fsynced files survive, so at startup the spool is the truth. Unreadable files
    are left alone and logged.
    """
    with sessions() as session:
        known = set(session.scalars(select(Instance.path)).all())
    added = 0
    for path in spool.received_files():
        if str(path) in known:
            continue
        data = path.read_bytes()
        try:
            header = read_header(data)
        except UnreadableInstanceError as exc:
            log.error("spool file %s is not usable: %s", path, exc)
            continue
        with sessions.begin() as session:
            record_instance(session, header, str(path), len(data), None, "")
            add_event(
                session,
                "reindexed",
                f"{path.name} was in the spool but not in the job log; recorded it",
                study=header.study_instance_uid,
                series=header.series_instance_uid,
            )
        added += 1
    return added
