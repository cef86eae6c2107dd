"""The whole node on real studies: storescu in, the demo models, results in the outbox."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_ai_node.jobs.models import Job, Prediction, Result
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import run_tool, wait_for

pytestmark = pytest.mark.peers


def finished_jobs(node: Node, count: int) -> list[Job]:
    def done() -> list[Job] | None:
        with node.read_sessions() as session:
            jobs = list(session.scalars(select(Job).order_by(Job.id)))
        finished = [j for j in jobs if j.state in ("done", "failed", "failed_to_deliver")]
        return jobs if len(finished) >= count else None

    jobs: list[Job] = wait_for(done, timeout=120)
    return jobs


@pytest.mark.parametrize(
    ("task", "positive_label", "outputs"),
    [
        (Task.CXR_OPACITY, "opacity", {"sr", "sc"}),
        (Task.HEAD_CT_HEMORRHAGE, "hemorrhage", {"sr", "sc", "kos"}),
    ],
)
def test_positive_and_negative_studies_get_the_right_labels(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
    task: Task,
    positive_label: str,
    outputs: set[str],
) -> None:
    node = node_factory(models=demo_models, routes=shipped_routes)
    studies = {
        label: generate_studies(task, label, 1, tmp_path / label.value, seed=4242, slices=12)[0]
        for label in (Label.POSITIVE, Label.NEGATIVE)
    }
    for study in studies.values():
        run_tool(
            "storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(study)
        )
    jobs = finished_jobs(node, 2)
    by_study = {job.study_instance_uid: job for job in jobs}
    positive = by_study[studies[Label.POSITIVE].name]
    negative = by_study[studies[Label.NEGATIVE].name]
    assert (positive.state, positive.label, positive.positive) == ("done", positive_label, True)
    assert (negative.state, negative.positive) == ("done", False)
    assert negative.label != positive_label
    assert positive.probability is not None and positive.probability >= 0.5
    assert negative.probability is not None and negative.probability < 0.5
    with node.read_sessions() as session:
        results = session.scalars(select(Result).where(Result.job_id == positive.id)).all()
        predictions = session.scalars(
            select(Prediction).where(Prediction.job_id == positive.id)
        ).all()
    sent = list(studies[Label.POSITIVE].rglob("*.dcm"))
    assert len(predictions) == len(sent)
    assert {r.kind for r in results} == outputs
    for result in results:
        ds = dcmread(node.spool.locate(result.path))
        assert ds.StudyInstanceUID == positive.study_instance_uid
        assert ds.SeriesInstanceUID != positive.series_instance_uid
        assert node.spool.locate(result.path).is_relative_to(node.spool.outbox)
        assert not Path(result.path).is_absolute()  # hosts may mount the spool anywhere
