"""The job log on a real PostgreSQL: migrations, the SKIP LOCKED claim, a node's receipt."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.models import Instance, Job, Series
from dicom_ai_node.jobs.queue import JobSpec, claim, enqueue
from dicom_ai_node.node import Node
from tests.support.helpers import claim_from_threads, instance, wait_for
from tests.support.postgres import empty_job_log

pytestmark = pytest.mark.peers


def test_migrations_apply_and_skip_locked_claims_each_job_once(
    pg_sessions: sessionmaker[Session],
) -> None:
    specs = [
        JobSpec("series", "1.2", f"1.2.{n}", 0, "CT", "r", "m", ("sr",), (), n % 3)
        for n in range(40)
    ]
    with pg_sessions.begin() as session:
        enqueue(session, specs)
    first = []
    for _ in range(5):  # one claimer: the most urgent come first
        with pg_sessions.begin() as session:
            job = claim(session, "w:0", 60, 3)
            assert job is not None
            first.append(job.priority)
    assert first == [2] * 5
    # four racing claimers take the rest, each job once (timestamps taken before each claim
    # do not tell the claims' order apart under load, so that is not what is checked here)
    claimed = claim_from_threads(pg_sessions, 4)
    assert len(claimed) == 35 and len(set(claimed)) == 35


def test_node_records_instances_and_routes_on_postgres(
    node_factory: Callable[..., Node], postgres_url: str, tmp_path: Path
) -> None:
    empty_job_log(postgres_url).dispose()
    node = node_factory(routes=[], database={"url": postgres_url})
    study, series = generate_uid(), generate_uid()
    datasets = [instance(study=study, series=series, InstanceNumber=n) for n in range(1, 4)]
    ae = AE(ae_title="PGTEST")
    ae.add_requested_context(datasets[0].SOPClassUID)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds).Status for ds in [*datasets, datasets[0]]]  # a duplicate
    assoc.release()
    assert statuses == [0, 0, 0, 0]

    def skipped() -> Job | None:
        with node.read_sessions() as session:
            return session.scalars(select(Job)).first()

    job = wait_for(skipped, timeout=30)
    assert job.state == "skipped"
    with node.read_sessions() as session:
        stored = session.scalars(select(Instance.sop_instance_uid)).all()
        row = session.get(Series, series)
    assert sorted(stored) == sorted(ds.SOPInstanceUID for ds in datasets)
    assert row is not None and row.instance_count == 3 and row.state == "complete"
    assert os.path.isdir(node.spool.incoming / study / series)
