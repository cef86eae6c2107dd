"""A cluster of three `serve` processes with Orthanc as the PACS, one node killed -9 for good.

Three nodes on 127.0.0.2, .3 and .4 (as three hosts would be) share one PostgreSQL job log
started by the test and one data folder; they start at the same moment against a fresh
database. Head CT series are spread over them (one study's two series go to two different
nodes), and each node also has an association left open part-way through a series. As soon
as a node is seen running a job (or, in the second case, sending results: deliveries leased),
its whole process group is killed with SIGKILL and never restarted. The survivors must take
over: its job or deliveries once their leases run out, its open association once its
heartbeat is older than the node timeout (so its half series completes), and every series
ends with one job, done, whose SR and SC are in Orthanc exactly once (counted there), with
nothing that any node acknowledged lost.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pynetdicom import AE
from pynetdicom.association import Association as ScuAssociation
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.db import create_db_engine
from dicom_ai_node.jobs.models import Delivery, Event, Instance, Job, NodeRecord
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import wait_for
from tests.support.orthanc import Orthanc, running_orthanc, strings
from tests.support.postgres import fresh_database
from tests.support.served import Served

pytestmark = [pytest.mark.peers, pytest.mark.slow]

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAMES = ("node-a", "node-b", "node-c")
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
SLICES = 6
# Only what takeover needs is short: a dead node's job lease (the [worker] lease of
# Served, 5 s), its delivery leases (4 x [dispatch] timeout) and its heartbeat age. The node
# timeout stays ten heartbeats long: a live node judged dead would have its open
# associations closed, and its series split into two generations.
CONFIG = """
[dicom]
network_timeout = 600            # the held associations stay open until the test ends them

[cluster]
heartbeat_seconds = 1
node_timeout_seconds = 10

[worker]
poll_seconds = 0.2

[dispatch]
timeout = 5
poll_seconds = 0.2
retry_base_seconds = 0.5
retry_max_seconds = 2

[[destinations]]
name = "pacs"
ae_title = "{aet}"
host = "127.0.0.1"
port = {port}

[[routes]]
name = "head-ct"
model = "head-ct-hemorrhage-demo"
where = {{ Modality = ["CT"], BodyPartExamined = ["HEAD"] }}
outputs = ["sr", "sc"]
destinations = ["pacs"]
"""
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
)


def series(tmp_path: Path) -> list[list[Dataset]]:
    """Six small synthetic head CT series (positive and negative): the first two are one
    study's two series; the others are studies of their own."""
    studies = [
        *generate_studies(
            Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 3, tmp_path, seed=5, size=128, slices=SLICES
        ),
        *generate_studies(
            Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 3, tmp_path, seed=5, size=128, slices=SLICES
        ),
    ]
    out: list[list[Dataset]] = [
        [dcmread(path) for path in sorted(study.rglob("*.dcm"))] for study in studies
    ]
    for ds in out[1]:  # the second series joins the first one's study
        for keyword in STUDY_KEYWORDS:
            setattr(ds, keyword, getattr(out[0][0], keyword))
        ds.SeriesNumber = 2
    return out


def associate(host: str, port: int, datasets: list[Dataset]) -> ScuAssociation:
    ae = AE(ae_title="CLUSTERTEST")
    ae.network_timeout = 600
    for sop_class, syntax in sorted(
        {(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID) for ds in datasets}
    ):
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate(host, port, ae_title="AINODE")
    assert assoc.is_established, f"no association with {host}:{port}"
    return assoc


def store(assoc: ScuAssociation, datasets: list[Dataset]) -> list[str]:
    """C-STORE ``datasets``; the SOP Instance UIDs acknowledged with 0x0000."""
    acknowledged = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        if int(status.get("Status", -1)) == 0:
            acknowledged.append(str(ds.SOPInstanceUID))
    return acknowledged


def send(host: str, port: int, datasets: list[Dataset]) -> list[str]:
    assoc = associate(host, port, datasets)
    acknowledged = store(assoc, datasets)
    assoc.release()
    return acknowledged


def claimants(session: Session, job_id: int) -> list[str]:
    """The node of each worker that claimed the job, in order (from its events)."""
    messages = session.scalars(
        select(Event.message)
        .where(Event.job_id == job_id, Event.kind == "job_running")
        .order_by(Event.id)
    ).all()
    found = [re.search(r"claimed by ([^:\s]+):", message) for message in messages]
    return [match.group(1) for match in found if match]


def source_series(tags: dict[str, Any], sources: dict[str, str]) -> set[str]:
    """The source series a result (its tags in Orthanc) refers to, by their Series Instance
    UID (the SR's evidence) or one of their SOP Instance UIDs (the SC's source image);
    ``sources`` maps each of those UIDs to its series."""
    named = set(strings(tags))
    return {series for uid, series in sources.items() if uid in named}


@pytest.fixture
def orthanc(tmp_path: Path) -> Iterator[Orthanc]:
    with running_orthanc(tmp_path / "orthanc") as pacs:
        yield pacs


def lease_holder(session: Session, holding: str) -> str | None:
    """The worker holding a running job, or a delivery it is sending (``holding``)."""
    if holding == "job":
        query = select(Job.lease_owner).where(Job.state == "running")
    else:
        query = select(Delivery.lease_owner).where(
            Delivery.state == "pending", Delivery.lease_owner.is_not(None)
        )
    owner: str | None = session.scalars(query).first()
    return owner


def held_by(session: Session, holding: str, node: str) -> list[int]:
    """The running jobs, or the deliveries being sent (``holding``), that ``node`` leases."""
    if holding == "job":
        query = select(Job.id).where(Job.state == "running", Job.lease_owner.like(f"{node}:%"))
    else:
        query = select(Delivery.id).where(
            Delivery.state == "pending", Delivery.lease_owner.like(f"{node}:%")
        )
    return list(session.scalars(query).all())


@pytest.fixture
def engine(cluster: list[Served]) -> Iterator[Engine]:
    """The cluster's job log, as the test reads it."""
    engine = create_db_engine(cluster[0].database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def cluster(postgres_url: str, orthanc: Orthanc, tmp_path: Path) -> Iterator[list[Served]]:
    """Three `serve` processes on a fresh database and one data folder, started together."""
    url = fresh_database(postgres_url, "cluster")
    config = tmp_path / "node.toml"
    config.write_text(CONFIG.format(aet=orthanc.aet, port=orthanc.dicom_port))
    nodes = [
        Served(
            tmp_path,
            config,
            bind=host,
            database_url=url,
            data_dir=tmp_path / "shared",
            node_name=name,
        )
        for host, name in zip(HOSTS, NAMES, strict=True)
    ]
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_listening(timeout=180)
        yield nodes
    finally:
        for node in nodes:
            if node.proc is not None:
                node.kill()


@pytest.mark.parametrize("holding", ["job", "delivery"])
def test_a_node_killed_for_good_mid_work_loses_nothing_and_each_series_gets_one_result_set(
    cluster: list[Served], engine: Engine, orthanc: Orthanc, tmp_path: Path, holding: str
) -> None:
    everything = series(tmp_path / "synth")
    by_sop = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for s in everything for ds in s}
    by_series = [str(s[0].SeriesInstanceUID) for s in everything]
    acknowledged: list[str] = []

    # Each node: half a series on an association kept open, then a whole series.
    held = [associate(node.bind, node.port, everything[3 + n]) for n, node in enumerate(cluster)]
    for n, assoc in enumerate(held):
        acknowledged += store(assoc, everything[3 + n][: SLICES // 2])
    with ThreadPoolExecutor(3) as pool:  # series 0 and 1 are one study's, on two nodes
        sent = pool.map(lambda n: send(cluster[n].bind, cluster[n].port, everything[n]), range(3))
        for uids in sent:
            acknowledged += uids
    assert len(acknowledged) == 3 * SLICES + 3 * (SLICES // 2)

    # Kill the first node seen holding such work, with all its processes, for good.
    def holder() -> str | None:
        with Session(engine) as session:
            return lease_holder(session, holding)

    owner = wait_for(holder, timeout=120, interval=0.005)
    victim_index = NAMES.index(owner.split(":")[0])
    victim_name = NAMES[victim_index]
    assert cluster[victim_index].kill() == -9
    with Session(engine) as session:
        held_at_kill = held_by(session, holding, victim_name)
        finished_before = set(
            session.scalars(select(Job.id).where(Job.state.in_(("delivering", "done")))).all()
        )
    assert held_at_kill, f"the victim finished its {holding} before it was killed: not mid-work"

    # The survivors' open associations finish their series; the victim's stays half sent.
    for n, assoc in enumerate(held):
        if n == victim_index:
            assoc.abort()
            continue
        acknowledged += store(assoc, everything[3 + n][SLICES // 2 :])
        assoc.release()

    def all_done() -> list[Job] | None:
        with Session(engine) as session:
            jobs = list(session.scalars(select(Job)))
        ended = all(job.state in ("done", "failed", "failed_to_deliver") for job in jobs)
        return jobs if ended and len(jobs) >= len(everything) else None

    try:
        jobs = wait_for(all_done, timeout=300, interval=0.2)
    except AssertionError:
        with Session(engine) as session:
            states = [(j.id, j.series_instance_uid, j.state) for j in session.scalars(select(Job))]
        raise AssertionError(f"not every job ended within 300 s: {states}") from None
    survivors = set(NAMES) - {victim_name}

    # The three nodes migrated one at a time and all started.
    with engine.connect() as connection:
        versions = connection.execute(text("SELECT version_num FROM alembic_version")).all()
    assert len(versions) == 1

    with Session(engine) as session:
        nodes = set(session.scalars(select(NodeRecord.name)).all())
        instances = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
        deliveries = list(session.scalars(select(Delivery)))
        claimed = {job.id: claimants(session, job.id) for job in jobs}
    assert nodes == set(NAMES)

    # Nothing acknowledged is lost: each is in the job log and in the shared spool.
    assert len(set(acknowledged)) == len(acknowledged)
    missing = [uid for uid in acknowledged if uid not in instances]
    assert not missing, f"acknowledged but not in the job log: {missing}"
    for uid in acknowledged:
        path = cluster[0].data / instances[uid].path
        assert not Path(instances[uid].path).is_absolute()
        assert path.is_file(), f"acknowledged but not in the spool: {path}"
    assert set(instances) == set(acknowledged)

    # One job per series, each done; the victim's were finished by the survivors.
    assert sorted(job.series_instance_uid or "" for job in jobs) == sorted(by_series)
    assert {job.id: job.state for job in jobs} == {job.id: "done" for job in jobs}, [
        (job.id, job.state, job.error) for job in jobs
    ]
    for job in jobs:
        if job.id not in finished_before:
            assert claimed[job.id][-1] in survivors, (job.id, claimed[job.id])
    if holding == "job":
        for job_id in held_at_kill:
            job = next(j for j in jobs if j.id == job_id)
            assert victim_name in claimed[job_id] and claimed[job_id][-1] in survivors
            assert job.interruptions >= 1  # the kill was not counted as a failure
    victim_series = everything[3 + victim_index][0].SeriesInstanceUID
    half = next(job for job in jobs if job.series_instance_uid == victim_series)
    assert claimed[half.id] and set(claimed[half.id]) <= survivors

    # One delivery of each result, done; in Orthanc exactly one SR and one SC per series.
    assert len(deliveries) == 2 * len(everything)
    assert {d.state for d in deliveries} == {"done"}
    assert len({(d.result_uid, d.destination) for d in deliveries}) == len(deliveries)
    per_series: Counter[tuple[str, str]] = Counter()
    in_orthanc = set()
    for instance_id in orthanc.get("/instances"):
        tags = orthanc.tags(instance_id)
        refers = source_series(tags, {**by_sop, **{uid: uid for uid in by_series}})
        assert len(refers) == 1, (tags["SOPInstanceUID"], tags["SOPClassUID"], refers)
        per_series[(refers.pop(), tags["SOPClassUID"])] += 1
        in_orthanc.add(tags["SOPInstanceUID"])
    assert dict(per_series) == {(s, kind): 1 for s in by_series for kind in (SR_CLASS, SC_CLASS)}
    assert in_orthanc == {d.result_uid for d in deliveries}
