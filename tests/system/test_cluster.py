"""Several nodes sharing one PostgreSQL job log and one spool folder, racing on purpose.

The nodes run in-process on 127.0.0.2, .3 and .4 (as three hosts would), with one data
folder between them; the races are forced with barriers, not left to timing.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from io import BytesIO
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic.script import ScriptDirectory
from pydicom import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.assemble.loop import Assembler
from dicom_ai_node.config import AssembleSettings, ClusterSettings, RouteSettings
from dicom_ai_node.dispatch.deliveries import plan_deliveries
from dicom_ai_node.jobs.db import MIGRATIONS, create_db_engine, session_factory
from dicom_ai_node.jobs.models import (
    Association,
    Delivery,
    Job,
    JobState,
    NodeRecord,
    Notification,
    Result,
    Series,
    utcnow,
)
from dicom_ai_node.jobs.nodes import Heartbeat, heartbeat
from dicom_ai_node.jobs.outbox import claim_due as claim_leased
from dicom_ai_node.node import Node
from dicom_ai_node.receive.header import read_header
from dicom_ai_node.receive.record import open_association, record_instance
from dicom_ai_node.spool import Spool
from tests.support.helpers import instance, make_settings, wait_for
from tests.support.joblog import job_with_results
from tests.support.postgres import empty_job_log, fresh_database

pytestmark = pytest.mark.peers

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
T = TypeVar("T")


def together(count: int, action: Callable[[int], T]) -> list[T]:
    """``action(0..count-1)`` on ``count`` threads released at the same moment; the
    results in order, or the first error raised."""
    barrier = threading.Barrier(count)
    results: list[Any] = [None] * count

    def run(n: int) -> None:
        barrier.wait()
        try:
            results[n] = action(n)
        except BaseException as exc:  # re-raised below, in the test's thread
            results[n] = exc

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        if isinstance(result, BaseException):
            raise result
    return results


def send(host: str, port: int, datasets: list[Dataset]) -> list[int]:
    ae = AE(ae_title="CLUSTERTEST")
    ae.add_requested_context(datasets[0].SOPClassUID)
    assoc = ae.associate(host, port, ae_title="AINODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets]
    assoc.release()
    return statuses


def test_three_nodes_start_together_on_a_fresh_database_and_share_the_work(
    postgres_url: str, tmp_path: Path
) -> None:
    """Started at the same moment against an empty database, all three migrate in turn and
    start; a study whose series go to different nodes (one series split over two) gets one
    job per series, wherever its parts arrived."""
    url = fresh_database(postgres_url, "fresh")
    nodes = [
        Node(
            make_settings(
                tmp_path,
                node_name=f"node-{n}",
                database={"url": url},
                dicom={"bind": host},
                http={"bind": host},
                routes=[],
            ),
            models={},
        )
        for n, host in enumerate(HOSTS)
    ]
    try:
        together(3, lambda n: nodes[n].start())
        engine = create_db_engine(url)
        with engine.connect() as connection:
            versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
            names = connection.execute(select(NodeRecord.name).order_by(NodeRecord.name)).all()
        assert [v for (v,) in versions] == [ScriptDirectory(str(MIGRATIONS)).get_current_head()]
        assert [n for (n,) in names] == ["node-0", "node-1", "node-2"]

        study = generate_uid()
        series = [generate_uid() for _ in range(3)]
        parts = {
            0: [instance(study=study, series=series[0], InstanceNumber=i) for i in (1, 2)],
            1: [
                instance(study=study, series=series[1], InstanceNumber=1),
                instance(study=study, series=series[2], InstanceNumber=1),
            ],
            2: [instance(study=study, series=series[2], InstanceNumber=2)],
        }
        statuses = together(3, lambda n: send(HOSTS[n], nodes[n].scp.port, parts[n]))
        assert statuses == [[0, 0], [0, 0], [0]]

        def settled() -> list[Job] | None:
            with Session(engine) as session:
                jobs = list(session.scalars(select(Job)))
            return jobs if len(jobs) >= 3 else None

        jobs = wait_for(settled, timeout=30)
        with Session(engine) as session:
            counts = dict(
                session.execute(select(Series.series_instance_uid, Series.instance_count)).all()
            )
        assert sorted(job.series_instance_uid or "" for job in jobs) == sorted(series)
        assert {job.state for job in jobs} == {JobState.SKIPPED.value}
        assert counts == {series[0]: 2, series[1]: 1, series[2]: 2}
        engine.dispose()
    finally:
        for node in nodes:
            node.stop()


def _ready_series(pg_sessions: sessionmaker[Session], spool: Spool, count: int) -> None:
    """``count`` received series whose associations have ended: complete at the next pass."""
    with pg_sessions.begin() as session:
        for _ in range(count):
            ds = instance(Modality="CR", BodyPartExamined="CHEST")
            path = spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
            record_instance(
                session.connection(), read_header(_encoded(ds)), spool.stored(path), 1, None, "X"
            )


def _encoded(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_racing_assemblers_queue_one_job_per_series_generation_and_route(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    spool = Spool(tmp_path / "var")
    _ready_series(pg_sessions, spool, 20)
    rules = [
        RouteSettings(name=name, model="m", where={"Modality": ["CR"]}, destinations=[])
        for name in ("first", "second")
    ]
    assemblers = [
        Assembler(pg_sessions, rules, AssembleSettings(stable_seconds=0), spool) for _ in range(3)
    ]

    def assemble(n: int) -> int:
        return sum(assemblers[n].assemble_once() for _ in range(5))

    queued = together(3, assemble)
    with pg_sessions() as session:
        keys = session.scalars(select(Job.unique_key)).all()
    assert len(keys) == 40 and len(set(keys)) == 40
    assert sum(queued) == 40  # each job counted by the one assembler that queued it


def test_racing_workers_plan_one_delivery_per_result_and_destination(
    pg_sessions: sessionmaker[Session],
) -> None:
    with pg_sessions.begin() as session:
        job, results = job_with_results(session, ["a", "b"], ("sr", "sr", "sr"))

    def plan(_n: int) -> int:
        with pg_sessions.begin() as session:
            return plan_deliveries(session, job, results)

    planned = together(4, plan)
    with pg_sessions() as session:
        rows = session.execute(select(Delivery.result_uid, Delivery.destination)).all()
    assert len(rows) == 6 and len(set(rows)) == 6
    assert sum(planned) == 6


def test_a_dead_nodes_deliveries_and_notifications_are_taken_over_once_their_leases_expire(
    pg_sessions: sessionmaker[Session],
) -> None:
    """The shared leased outbox: rows leased by a dead node are claimed by a living one
    once the lease has run out; rows a live node holds are not."""
    now = utcnow()
    with pg_sessions.begin() as session:
        job = Job(study_instance_uid="1.2", series_instance_uid="1.2.3", destinations=["pacs"])
        session.add(job)
        session.flush()
        for n, expires in enumerate((now - timedelta(seconds=1), now + timedelta(minutes=5))):
            uid = f"1.2.9.{n}"
            session.add(
                Result(
                    sop_instance_uid=uid,
                    job_id=job.id,
                    kind="sr",
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                    series_instance_uid="1.2.9",
                    path=f"outbox/1.2/1.2.9/{uid}.dcm",
                )
            )
            session.flush()
            owner = "dead:1" if n == 0 else "alive:1"
            session.add(
                Delivery(
                    job_id=job.id,
                    result_uid=uid,
                    destination="pacs",
                    lease_owner=owner,
                    lease_expires_at=expires,
                )
            )
            session.add(
                Notification(
                    url="http://127.0.0.1:9/hook",
                    key=f"positive:job:{n}",
                    trigger="positive",
                    lease_owner=owner,
                    lease_expires_at=expires,
                )
            )
    with pg_sessions.begin() as session:
        deliveries = claim_leased(session, Delivery, "survivor:1", 60, 10)
        notifications = claim_leased(session, Notification, "survivor:1", 60, 10)
    with pg_sessions() as session:
        owners = session.scalars(select(Delivery.lease_owner).order_by(Delivery.id)).all()
        hooks = session.scalars(select(Notification.lease_owner).order_by(Notification.id)).all()
    assert len(deliveries) == 1 and len(notifications) == 1
    assert list(owners) == list(hooks) == ["survivor:1", "alive:1"]


def test_a_dead_nodes_associations_are_closed_by_the_living_so_its_series_complete(
    pg_sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cluster = ClusterSettings(heartbeat_seconds=0.1, node_timeout_seconds=1)
    long_ago = utcnow() - timedelta(minutes=5)
    with pg_sessions.begin() as session:
        heartbeat(session, "dead", "0", started=True, now=long_ago)
        heartbeat(session, "alive", "0", started=True)
        for owner in ("dead", "alive"):
            open_association(session, f"assoc-{owner}", owner, "X", "AINODE", "127.0.0.1")
    Heartbeat(pg_sessions, "survivor", "0", cluster).run_once()
    with pg_sessions() as session:
        ended = dict(session.execute(select(Association.id, Association.outcome)).all())
        beats = session.scalars(select(NodeRecord.name)).all()
    assert ended == {"assoc-dead": "lost", "assoc-alive": "open"}
    assert sorted(beats) == ["alive", "dead", "survivor"]


def test_a_starting_node_leaves_a_live_peers_fresh_files_to_it(
    postgres_url: str, tmp_path: Path
) -> None:
    """A file a live peer has just written (its row not yet committed) and its partial file
    are not touched by a node that starts; the fresh file is re-indexed only once the peer
    had all the time it needed to record it."""
    engine = empty_job_log(postgres_url)
    pg_sessions = session_factory(engine)
    with pg_sessions.begin() as session:
        heartbeat(session, "peer", "0", started=True)
    peer_spool = Spool(tmp_path / "var", "peer")
    ds = instance()
    path = peer_spool.instance_path(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    peer_spool.write(path, _encoded(ds))
    partial = path.parent / ".tmp-0123456789abcdef0123456789abcdef-peer"
    partial.write_bytes(b"half")
    mine = path.parent / ".tmp-0123456789abcdef0123456789abcdef-late"
    mine.write_bytes(b"half")
    node = Node(
        make_settings(
            tmp_path,
            node_name="late",
            database={"url": postgres_url},
            cluster={"heartbeat_seconds": 0.1, "node_timeout_seconds": 1},
            routes=[],
        ),
        models={},
    )
    node.start()
    try:
        with pg_sessions() as session:
            assert session.scalar(select(func.count()).select_from(Series)) == 0
        assert partial.exists() and not mine.exists()

        def indexed() -> bool:
            with pg_sessions() as session:
                return session.scalar(select(func.count()).select_from(Series)) == 1

        wait_for(indexed, timeout=10)
    finally:
        node.stop()
        engine.dispose()
