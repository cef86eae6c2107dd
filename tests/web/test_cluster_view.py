"""The whole cluster as one node's API, pages and metrics show it, from a shared job log:
which node received, ran and delivered each job, and each node's last heartbeat."""

from __future__ import annotations

import re
from datetime import timedelta
from io import BytesIO
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from dicom_ai_node.config import DispatchSettings
from dicom_ai_node.dispatch.deliveries import record_outcome
from dicom_ai_node.dispatch.scu import SendOutcome
from dicom_ai_node.jobs.models import Delivery, Job, JobState, utcnow
from dicom_ai_node.jobs.nodes import heartbeat
from dicom_ai_node.jobs.queue import claim, transition
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.receive.header import read_header
from dicom_ai_node.receive.record import open_association, record_instance
from tests.support.helpers import instance
from tests.support.joblog import JobLog


def received(job_log: JobLog, job_id: int, association: str, node: str) -> None:
    """One instance of the job's series received by ``node`` in ``association``."""
    with job_log.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.series_instance_uid is not None
        study, series = job.study_instance_uid, job.series_instance_uid
    ds = instance(study=study, series=series)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    with job_log.sessions.begin() as session:
        open_association(session, association, node, "MODALITY", "AINODE", "127.0.0.1")
        session.flush()
        record_instance(
            session.connection(),
            read_header(buffer.getvalue()),
            f"incoming/{study}/{series}/{ds.SOPInstanceUID}.dcm",
            1,
            association,
            "MODALITY",
        )


def test_a_job_names_the_nodes_that_received_ran_and_delivered_it(serve, job_log):
    """Two nodes' associations brought the series, a third node ran the job (its lease gone
    once done) and the first delivered it; a node that received another series is not named.
    """
    job_id = job_log.add("split", JobState.QUEUED, 0.8, image=True, deliveries={"pacs": "pending"})
    other_id = job_log.add("elsewhere", JobState.DONE, 0.2)
    with job_log.sessions() as session:
        delivery = session.scalars(select(Delivery).where(Delivery.job_id == job_id)).one()
    received(job_log, job_id, "assoc-a", "node-a")
    received(job_log, job_id, "assoc-b", "node-b")
    received(job_log, other_id, "assoc-x", "node-x")
    with job_log.sessions.begin() as session:
        assert claim(session, "node-c:4242", 60, 3) is not None
        assert transition(session, job_id, JobState.DELIVERING, "results", owner="node-c:4242")
    with job_log.sessions.begin() as session:
        outcome = SendOutcome(Path("sc.dcm"), delivery.result_uid, 0x0000)
        done = record_outcome(session, delivery.id, outcome, DispatchSettings(), sent_by="node-a")
        assert done == job_id
    running = serve()
    with running.client() as client:
        detail = client.get(f"/api/jobs/{job_id}").json()
        listed = {j["id"]: j for j in client.get("/api/jobs").json()["items"]}
        worklist = {j["id"]: j for j in client.get("/api/worklist").json()}
        page = client.get(f"/jobs/{job_id}").text
        jobs_page = client.get("/jobs").text
    assert detail["state"] == "done"
    assert detail["received_by"] == ["node-a", "node-b"]
    assert detail["ran_by"] == "node-c"
    assert [(d["destination"], d["sent_by"]) for d in detail["deliveries"]] == [
        ("pacs", ["node-a"])
    ]
    for summary in (listed[job_id], worklist[job_id]):
        assert (summary["received_by"], summary["ran_by"]) == (["node-a", "node-b"], "node-c")
    assert (listed[other_id]["received_by"], listed[other_id]["ran_by"]) == (["node-x"], None)
    assert '<dd id="received-by">node-a, node-b</dd>' in page
    assert '<dd id="ran-by">node-c</dd>' in page
    assert re.search(r'<td class="sent-by">node-a</td>', page)
    row = re.search(rf'<tr data-job="{job_id}">.*?</tr>', jobs_page, re.S)
    assert row is not None and "node-a, node-b → node-c" in row.group(0)


def test_every_node_of_the_cluster_with_its_heartbeat(serve, job_log):
    """Nodes sharing the job log, live or dead by ``node_timeout_seconds``, in ``/api/nodes``,
    on the destinations page and in ``/metrics`` (open, no token), whichever node serves."""
    long_ago = utcnow() - timedelta(minutes=10)
    with job_log.sessions.begin() as session:
        heartbeat(session, "node-a", "1.2.0", started=True)
        heartbeat(session, "node-b", "1.1.0", started=True, now=long_ago)
    reads = job_log.sessions
    running = serve(metrics=NodeMetrics(reads, 30), node_timeout_seconds=30)
    with running.client(token=None) as anonymous:
        assert anonymous.get("/api/nodes").status_code == 401
        exposition = anonymous.get("/metrics").text
    with running.client() as client:
        nodes = {n["name"]: n for n in client.get("/api/nodes").json()}
        page = client.get("/destinations").text
    assert sorted(nodes) == ["node-a", "node-b"]
    assert (nodes["node-a"]["live"], nodes["node-a"]["version"]) == (True, "1.2.0")
    assert nodes["node-a"]["heartbeat_age_seconds"] < 30
    assert (nodes["node-b"]["live"], nodes["node-b"]["version"]) == (False, "1.1.0")
    assert nodes["node-b"]["heartbeat_age_seconds"] >= 600
    assert '<tr data-node="node-a" data-live="true">' in page
    assert '<tr data-node="node-b" data-live="false">' in page
    row = re.search(r'<tr data-node="node-b".*?</tr>', page, re.S)
    assert row is not None and "● dead" in row.group(0) and "10 min" in row.group(0)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(exposition)
        for sample in family.samples
    }
    assert samples[("dicom_ai_node_node_up", (("node", "node-a"),))] == 1
    assert samples[("dicom_ai_node_node_up", (("node", "node-b"),))] == 0
    assert samples[("dicom_ai_node_node_heartbeat_age_seconds", (("node", "node-b"),))] >= 600
