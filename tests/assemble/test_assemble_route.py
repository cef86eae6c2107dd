"""Series completion and routing on a running node: what becomes a job, what is skipped."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from dicom_ai_node.assemble import CompletedSeries
from dicom_ai_node.config import RouteSettings
from dicom_ai_node.jobs.models import Job, Series, Study
from dicom_ai_node.node import Node
from dicom_ai_node.route import mismatch, plan_series
from tests.support.helpers import instance, wait_for

ROUTES: list[dict[str, Any]] = [
    {
        "name": "head-ct",
        "model": "head-model",
        "where": {"Modality": ["CT"], "BodyPartExamined": ["HEAD"]},
        "priority": 20,
    },
    {
        "name": "mr-study",
        "model": "mr-model",
        "level": "study",
        "where": {"Modality": ["MR"]},
        "priority": 1,
    },
]


def jobs(node: Node) -> list[Job]:
    with node.sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.id)))


def open_association(node: Node, calling: str = "MODALITY") -> Any:
    ae = AE(ae_title=calling)
    for sop_class in ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"):
        ae.add_requested_context(sop_class)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert assoc.is_established
    return assoc


def send(node: Node, *datasets: Dataset) -> None:
    assoc = open_association(node)
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    assoc.release()


def series_of(n: int, **attributes: Any) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    return [
        instance(study=study, series=series, InstanceNumber=i + 1, **attributes) for i in range(n)
    ]


def test_series_stays_open_while_its_association_is_open(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(routes=[])
    assoc = open_association(node)
    datasets = series_of(2, BodyPartExamined="HEAD")
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0
    # once the stable time has passed, a pass of the assembler decides: the series stays open
    stable_until = time.monotonic() + 3 * node.settings.assemble.stable_seconds
    wait_for(lambda: time.monotonic() > stable_until)
    node.assembler.assemble_once()
    with node.sessions() as session:
        series = session.get(Series, datasets[0].SeriesInstanceUID)
        assert series is not None and series.state == "receiving"
        assert series.instance_count == 2
    assoc.release()
    skipped = wait_for(lambda: jobs(node))
    assert [job.state for job in skipped] == ["skipped"]
    assert "no route matches" in (skipped[0].error or "")


def test_matching_series_is_queued_with_route_model_and_priority(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(routes=ROUTES)
    node.worker.stop()  # keep the job in the queue to look at it
    head = series_of(3, BodyPartExamined="HEAD")
    knee = series_of(1, BodyPartExamined="KNEE")
    send(node, *head, *knee)
    found = wait_for(lambda: len(jobs(node)) == 2 and jobs(node))
    by_series = {job.series_instance_uid: job for job in found}
    queued = by_series[head[0].SeriesInstanceUID]
    assert (queued.state, queued.route, queued.model, queued.priority) == (
        "queued",
        "head-ct",
        "head-model",
        20,
    )
    skipped = by_series[knee[0].SeriesInstanceUID]
    assert skipped.state == "skipped"
    assert "BodyPartExamined=KNEE" in (skipped.error or "")


def test_late_instance_reopens_the_series_and_makes_a_follow_up_job(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(routes=ROUTES)
    node.worker.stop()
    first, late = series_of(2, BodyPartExamined="HEAD")
    send(node, first)
    wait_for(lambda: len(jobs(node)) == 1)
    send(node, late)
    both = wait_for(lambda: len(jobs(node)) == 2 and jobs(node))
    assert [job.generation for job in both] == [0, 1]
    assert {job.series_instance_uid for job in both} == {first.SeriesInstanceUID}
    with node.sessions() as session:
        series = session.get(Series, first.SeriesInstanceUID)
        assert series is not None and series.instance_count == 2


def test_study_level_route_makes_one_job_for_the_whole_study(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(routes=ROUTES)
    node.worker.stop()
    study = generate_uid()
    series_a = [instance("MR_small.dcm", study=study, series=generate_uid())]
    series_b = [instance("MR_small.dcm", study=study, series=generate_uid())]
    send(node, *series_a, *series_b)
    wait_for(lambda: jobs(node))

    def study_complete() -> bool:
        with node.sessions() as session:
            study_row = session.get(Study, study)
            return study_row is not None and study_row.state == "complete"

    wait_for(study_complete)
    node.assembler.assemble_once()  # a pass after everything completed: nothing is left to queue
    found = jobs(node)
    assert len(found) == 1
    assert (found[0].level, found[0].route, found[0].series_instance_uid) == (
        "study",
        "mr-study",
        None,
    )
    assert found[0].study_instance_uid == study


def completed(**attributes: Any) -> CompletedSeries:
    return CompletedSeries("1.2", "1.2.3", 0, "CT", "PACS", 1, attributes)


def test_route_matching_rules() -> None:
    rule = RouteSettings(
        name="r",
        model="m",
        where={
            "Modality": ["ct"],
            "SeriesDescription": "/brain|head/",
            "ImageType": ["AXIAL"],
            "CallingAETitle": ["PACS"],
        },
    )
    match = completed(
        Modality="CT", SeriesDescription="Routine HEAD w/o", ImageType=["ORIGINAL", "AXIAL"]
    )
    assert mismatch(rule, match) is None
    assert "absent" in (mismatch(rule, completed(Modality="CT")) or "")
    wrong = completed(Modality="CT", SeriesDescription="chest", ImageType=["AXIAL"])
    assert "SeriesDescription" in (mismatch(rule, wrong) or "")
    specs, reason = plan_series([rule], wrong)
    assert specs == [] and reason.startswith("no route matches")
