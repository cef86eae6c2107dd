"""Orthanc as the PACS: it sends a study to the node, the results come back into that study.

Everything is real: an Orthanc process on loopback ports with its own storage, the node
in-process with the demo models and the shipped routes (plus Orthanc as a destination), and
Orthanc's REST API both to trigger the C-STORE to the node and to look at what came back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicom_ai_node.jobs.models import Delivery, Event, Job, Result
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import free_port, wait_for
from tests.support.orthanc import Orthanc, strings

pytestmark = pytest.mark.peers

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection


@pytest.fixture
def orthanc_and_port(tmp_path: Path) -> Iterator[tuple[Orthanc, int]]:
    """An Orthanc that knows the node (on a port chosen now) as modality ``ainode``."""
    node_port = free_port()
    orthanc = Orthanc(tmp_path / "orthanc", {"ainode": ("AINODE", "127.0.0.1", node_port)})
    try:
        orthanc.start()
        yield orthanc, node_port
    finally:
        orthanc.stop()


def start_node(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    orthanc: Orthanc,
    node_port: int,
    **overrides: Any,
) -> Node:
    """A node on ``node_port`` whose shipped routes also send to Orthanc (``pacs``)."""
    routes = [{**route, "destinations": ["outbox", "pacs"]} for route in shipped_routes]
    destination = {
        "name": "pacs",
        "ae_title": orthanc.aet,
        "host": "127.0.0.1",
        "port": orthanc.dicom_port,
    }
    return node_factory(
        models=demo_models,
        routes=routes,
        destinations=[destination],
        dicom={"port": node_port},
        **overrides,
    )


def job_of(node: Node, study_uid: str, states: tuple[str, ...], timeout: float = 90) -> Job:
    """Wait for the study's job to reach one of ``states``."""

    def reached() -> Job | None:
        with node.read_sessions() as session:
            job = session.scalars(select(Job).where(Job.study_instance_uid == study_uid)).first()
        return job if job is not None and job.state in states else None

    job: Job = wait_for(reached, timeout=timeout, interval=0.1)
    return job


def results_in_orthanc(orthanc: Orthanc, study_uid: str) -> dict[str, list[dict[str, Any]]]:
    """SOP Class UID -> the tags of every instance of that class in the study, in Orthanc."""
    study_id = orthanc.study_id(study_uid)
    assert study_id is not None, "the study is not in Orthanc"
    by_class: dict[str, list[dict[str, Any]]] = {}
    for series in orthanc.series_of(study_id):
        for instance_id in series["Instances"]:
            tags = orthanc.tags(instance_id)
            by_class.setdefault(tags["SOPClassUID"], []).append(tags)
    return by_class


@pytest.mark.parametrize(
    ("task", "meaning", "kinds"),
    [
        (Task.HEAD_CT_HEMORRHAGE, "Intracranial hemorrhage", {SR_CLASS, SC_CLASS, KOS_CLASS}),
        (Task.CXR_OPACITY, "opacity", {SR_CLASS, SC_CLASS}),
    ],
)
def test_orthanc_sends_a_study_and_gets_the_results_back(
    orthanc_and_port: tuple[Orthanc, int],
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
    task: Task,
    meaning: str,
    kinds: set[str],
) -> None:
    orthanc, node_port = orthanc_and_port
    node = start_node(node_factory, demo_models, shipped_routes, orthanc, node_port)
    study = generate_studies(task, Label.POSITIVE, 1, tmp_path / "synth", seed=7, slices=10)[0]
    sources = sorted(study.rglob("*.dcm"))
    study_id = orthanc.upload(sources)
    orthanc.send_study("ainode", study_id)

    job = job_of(node, study.name, ("done", "failed", "failed_to_deliver"))
    assert job.state == "done", job.error
    assert job.positive is True
    by_class = results_in_orthanc(orthanc, study.name)
    # the source images are still there, untouched, and one copy of each result beside them
    sources_back = [c for c in by_class if c not in kinds]
    assert sum(len(by_class[c]) for c in sources_back) == len(sources)
    assert {c: len(by_class[c]) for c in kinds} == dict.fromkeys(kinds, 1)

    model = demo_models[str(job.model)].card
    sr = by_class[SR_CLASS][0]
    sc = by_class[SC_CLASS][0]
    assert sr["StudyInstanceUID"] == sc["StudyInstanceUID"] == study.name
    assert sr["SeriesDescription"] == f"AI: {model.name} {model.version}"
    assert sc["SeriesDescription"] == f"AI: {model.name} {model.version} result image"
    assert meaning in set(strings(sr["ContentSequence"]))
    if KOS_CLASS in kinds:
        kos = by_class[KOS_CLASS][0]
        assert kos["SeriesDescription"] == f"AI: {model.name} {model.version} key images"
    # what Orthanc holds is what the node recorded
    with node.read_sessions() as session:
        recorded = set(
            session.scalars(select(Result.sop_instance_uid).where(Result.job_id == job.id))
        )
    stored = {tags["SOPInstanceUID"] for c in kinds for tags in by_class[c]}
    assert stored == recorded


def test_results_survive_a_pacs_outage(
    orthanc_and_port: tuple[Orthanc, int],
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Orthanc stops after sending the study and before the results are due; the node
    retries with backoff; once Orthanc is back (same storage) every result arrives once."""
    orthanc, node_port = orthanc_and_port
    # Orthanc closes its DICOM port ~2 s after SIGTERM: results must be due later than that.
    node = start_node(
        node_factory,
        demo_models,
        shipped_routes,
        orthanc,
        node_port,
        assemble={"stable_seconds": 5},
        dispatch={"retry_base_seconds": 0.2, "retry_max_seconds": 0.5, "max_attempts": 1000},
    )
    study = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 1, tmp_path / "synth", seed=11, slices=8
    )[0]
    study_id = orthanc.upload(sorted(study.rglob("*.dcm")))
    orthanc.send_study("ainode", study_id)
    orthanc.stop()

    def retries() -> int:
        with node.read_sessions() as session:
            return int(
                session.scalar(
                    select(func.count()).select_from(Event).where(Event.kind == "delivery_retry")
                )
                or 0
            )

    # the results are due while Orthanc is down: the node retries, and keeps the job open
    wait_for(lambda: retries() >= 6, timeout=60, interval=0.1)
    job = job_of(node, study.name, ("delivering",), timeout=5)
    with node.read_sessions() as session:
        pending = session.scalars(select(Delivery).where(Delivery.job_id == job.id)).all()
    assert pending and all(d.state == "pending" and d.attempts >= 1 for d in pending)
    assert all(d.last_error for d in pending)

    orthanc.start()
    job = job_of(node, study.name, ("done", "failed", "failed_to_deliver"), timeout=60)
    assert job.state == "done", job.error

    with node.read_sessions() as session:
        results = {
            r.sop_instance_uid: r.series_instance_uid
            for r in session.scalars(select(Result).where(Result.job_id == job.id))
        }
        deliveries = session.scalars(select(Delivery).where(Delivery.job_id == job.id)).all()
        delivered = session.scalars(
            select(Event.message).where(Event.kind == "delivered", Event.job_id == job.id)
        ).all()
    assert len(results) == 3  # SR, SC, KOS
    assert all(d.state == "done" and d.attempts > 1 for d in deliveries)
    # one successful send per result: nothing was stored twice
    assert len(delivered) == len(results)
    held = orthanc.instances_by_series_uid(str(orthanc.study_id(study.name)))
    for sop_uid, series_uid in results.items():
        assert held[series_uid] == [sop_uid]
