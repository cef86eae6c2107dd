"""The job log on a real PostgreSQL: migrations, the SKIP LOCKED claim, a node's receipt.

A throwaway cluster (Debian's ``postgresql``) is started on a free loopback port in a
temporary folder, as the ``postgres`` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.db import create_db_engine, session_factory, upgrade
from dicom_ai_node.jobs.models import Instance, Job, Series
from dicom_ai_node.jobs.queue import JobSpec, enqueue
from dicom_ai_node.node import Node
from tests.support.helpers import claim_from_threads, free_port, instance, wait_for

pytestmark = pytest.mark.peers


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    if not found:
        pytest.fail("PostgreSQL is not installed; run `make test`, which installs it")
    return Path(found[-1]).parent


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A database on a PostgreSQL cluster of its own, for this module's tests."""
    bin_dir = _postgres_bin()
    folder = Path(tempfile.mkdtemp(prefix="ainode-pg-"))
    folder.chmod(0o755)
    data = folder / "data"
    data.mkdir()
    shutil.chown(data, "postgres", "postgres")
    port = free_port()

    def as_postgres(*args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", *args],
            check=True,
            capture_output=True,
            cwd=folder,
        )

    as_postgres(str(bin_dir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres")
    as_postgres(
        str(bin_dir / "pg_ctl"),
        "-D",
        str(data),
        "-l",
        str(data / "server.log"),
        "-o",
        f"-p {port} -k {data} -c listen_addresses=127.0.0.1 -c fsync=off",
        "-w",
        "start",
    )
    try:
        as_postgres(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "ainode")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/ainode"
    finally:
        as_postgres(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(folder, ignore_errors=True)


def empty_job_log(url: str) -> Engine:
    """An engine on the migrated, emptied job log at ``url`` (each test starts afresh)."""
    engine = create_db_engine(url)
    upgrade(engine)
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "TRUNCATE jobs, predictions, results, deliveries, events, instances, series, "
            "studies, associations CASCADE"
        )
    return engine


@pytest.fixture
def sessions(postgres_url: str) -> Iterator[sessionmaker[Session]]:
    engine = empty_job_log(postgres_url)
    yield session_factory(engine)
    engine.dispose()


def test_migrations_apply_and_skip_locked_claims_each_job_once(
    sessions: sessionmaker[Session],
) -> None:
    specs = [
        JobSpec("series", "1.2", f"1.2.{n}", 0, "CT", "r", "m", ("sr",), (), n % 3)
        for n in range(40)
    ]
    with sessions.begin() as session:
        enqueue(session, specs)
    claimed = claim_from_threads(sessions, 4)
    assert len(claimed) == 40 and len(set(claimed)) == 40
    with sessions() as session:
        priorities = [
            job.priority for job in session.scalars(select(Job).order_by(Job.started_at, Job.id))
        ]
    assert priorities[:5] == [2] * 5  # the most urgent were claimed first


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
