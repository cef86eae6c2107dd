"""Group commit of received instances: shared transactions, and a bad instance failing alone."""

from __future__ import annotations

import threading

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Engine, event, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.models import Instance
from dicom_ai_node.receive.header import InstanceHeader
from dicom_ai_node.receive.record import GroupCommit, Recorded
from tests.support.helpers import wait_for


def _header(study: str, series: str) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=CTImageStorage,
        sop_instance_uid=generate_uid(),
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


def _record_while_first_waits(
    engine: Engine, association_ids: list[str | None]
) -> tuple[list[InstanceHeader], dict[int, Recorded | Exception], int]:
    """Record one instance, blocked on the job log's write lock, while len(association_ids)
    more are handed in; returns the headers, each call's outcome and how many commits ran."""
    recorder = GroupCommit(engine)
    study, series = generate_uid(), generate_uid()
    headers = [_header(study, series) for _ in range(1 + len(association_ids))]
    outcomes: dict[int, Recorded | Exception] = {}
    commits: list[object] = []

    def committed(connection: object) -> None:
        commits.append(connection)

    event.listen(engine, "commit", committed)

    def record(n: int, association_id: str | None) -> None:
        try:
            outcomes[n] = recorder.record(headers[n], f"p/{n}.dcm", 1, association_id, "SCU")
        except Exception as exc:
            outcomes[n] = exc

    threads = [threading.Thread(target=record, args=(0, None))]
    with engine.connect() as holder:
        lock = holder.begin()  # BEGIN IMMEDIATE: holds the write lock
        threads[0].start()
        wait_for(lambda: recorder._leading)  # the first leads, waiting for the lock
        for n, association_id in enumerate(association_ids, 1):
            threads.append(threading.Thread(target=record, args=(n, association_id)))
            threads[-1].start()
        wait_for(lambda: len(recorder._queue) == len(association_ids))
        lock.rollback()
    for thread in threads:
        thread.join(timeout=30)
    event.remove(engine, "commit", committed)
    return headers, outcomes, len(commits)


def _stored(sessions: sessionmaker[Session]) -> set[str]:
    with sessions() as session:
        return set(session.scalars(select(Instance.sop_instance_uid)))


def test_instances_handed_in_meanwhile_share_one_transaction(
    sessions: sessionmaker[Session],
) -> None:
    engine = sessions.kw["bind"]
    headers, outcomes, commits = _record_while_first_waits(engine, [None, None, None])
    assert all(isinstance(outcomes[n], Recorded) for n in range(4)), outcomes
    assert commits == 2  # the first alone, then the three that waited, together
    assert _stored(sessions) == {h.sop_instance_uid for h in headers}


def test_a_bad_instance_in_a_shared_transaction_fails_alone(
    sessions: sessionmaker[Session],
) -> None:
    engine = sessions.kw["bind"]
    # an association the job log does not know: its instance row breaks the foreign key
    headers, outcomes, _ = _record_while_first_waits(engine, [None, "no-such-association", None])
    assert isinstance(outcomes[2], IntegrityError), outcomes
    assert all(isinstance(outcomes[n], Recorded) for n in (0, 1, 3)), outcomes
    assert _stored(sessions) == {headers[n].sop_instance_uid for n in (0, 1, 3)}
