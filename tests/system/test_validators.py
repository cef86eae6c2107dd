"""The validators on what the running node really produced from synthetic studies.

tests/report checks the builders on hand-made inputs; here the objects come from the node's
outbox after a positive head CT and a positive chest radiograph went through it by
``storescu`` (the demo models, the shipped routes): ``dciodvfy`` on every object, pixelmed's
``DicomSRValidator`` on the SRs and the KOS, ``dsr2html`` on the SRs. A late image then
reopens the radiograph's series: its second run's SR amends the first one's (Predecessor
Documents Sequence) and passes the validators too.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicom_ai_node.jobs.models import Job, Result
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import run_tool, wait_for
from tests.support.validators import dciodvfy_errors, dcmtk_sr, sr_validator

pytestmark = pytest.mark.peers

MEANINGS = {"head-ct-hemorrhage-demo": "Intracranial hemorrhage", "cxr-opacity-demo": "opacity"}


def series_probability(sr: Dataset) -> str:
    """The first percentage's value, as encoded: the series result's probability (a NUM
    named by the finding, unit %)."""
    pending = list(sr.ContentSequence)
    while pending:
        item = pending.pop(0)
        value = item.get("MeasuredValueSequence", [None])[0] if item.ValueType == "NUM" else None
        if value is not None and value.MeasurementUnitsCodeSequence[0].CodeValue == "%":
            return str(value.NumericValue)
        pending[:0] = list(item.get("ContentSequence", []))
    raise AssertionError("no probability in the SR")


def store(node: Node, folder: Path) -> None:
    port = str(node.scp.port)
    run_tool("storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", port, str(folder))


def generation(job: Job) -> int:
    return job.generation


def test_node_output_passes_the_validators(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    node = node_factory(models=demo_models, routes=shipped_routes)
    studies = {}
    for task in (Task.HEAD_CT_HEMORRHAGE, Task.CXR_OPACITY):
        study = generate_studies(task, Label.POSITIVE, 1, tmp_path / task.value, 99, slices=10)[0]
        studies[task] = study
        store(node, study)

    def finished(count: int) -> list[Job] | None:
        with node.read_sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.state == "done")))
        return jobs if len(jobs) == count else None

    wait_for(lambda: finished(2), timeout=120)
    # a late image of the radiograph's series: the series is run again (generation 1)
    late = dcmread(next(studies[Task.CXR_OPACITY].rglob("*.dcm")))
    late.SOPInstanceUID = generate_uid()
    late.InstanceNumber = 2
    late_dir = tmp_path / "late"
    late_dir.mkdir()
    late.save_as(late_dir / "late.dcm", enforce_file_format=True)
    store(node, late_dir)
    jobs = wait_for(lambda: finished(3), timeout=120)
    with node.read_sessions() as session:
        results = list(session.scalars(select(Result).order_by(Result.job_id, Result.kind)))
    assert sorted(r.kind for r in results) == ["kos", "sc", "sc", "sc", "sr", "sr", "sr"]
    first, amended = sorted((j for j in jobs if j.model == "cxr-opacity-demo"), key=generation)
    assert (first.generation, amended.generation) == (0, 1)
    first_sr, amended_sr = (
        dcmread(node.spool.locate(r.path))
        for job in (first, amended)
        for r in results
        if r.job_id == job.id and r.kind == "sr"
    )
    cited = amended_sr.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert cited.SeriesInstanceUID == first_sr.SeriesInstanceUID
    assert cited.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first_sr.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in first_sr
    by_job = {job.id: job for job in jobs}
    assert all(by_job[r.job_id].positive for r in results)

    for result in results:
        assert dciodvfy_errors(node.spool.locate(result.path)) == [], result.kind
    for result in results:
        if result.kind != "sr":
            continue
        job = by_job[result.job_id]
        path = node.spool.locate(result.path)
        html = dcmtk_sr("dsr2html", path)
        probability = series_probability(dcmread(path))
        assert abs(float(probability) / 100 - float(job.probability or 0)) < 1e-3
        assert MEANINGS[str(job.model)] in html
        assert probability in html
    documents = [r for r in results if r.kind in ("sr", "kos")]
    for result, findings in zip(
        documents, sr_validator([node.spool.locate(r.path) for r in documents]), strict=True
    ):
        assert findings.errors == [], f"{result.kind}: {findings.errors}"
