"""The validators on what the running node really produced from synthetic studies.

tests/report checks the builders on hand-made inputs; here the objects come from the node's
outbox after a positive head CT and a positive chest radiograph went through it by
``storescu`` (the demo models, the shipped routes): ``dciodvfy`` on every object, pixelmed's
``DicomSRValidator`` on the SRs and the KOS, ``dsr2html`` on the SRs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
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


def test_node_output_passes_the_validators(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    node = node_factory(models=demo_models, routes=shipped_routes)
    for task in (Task.HEAD_CT_HEMORRHAGE, Task.CXR_OPACITY):
        study = generate_studies(task, Label.POSITIVE, 1, tmp_path / task.value, 99, slices=10)[0]
        run_tool(
            "storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(study)
        )

    def finished() -> list[Job] | None:
        with node.read_sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.state == "done")))
        return jobs if len(jobs) == 2 else None

    jobs = wait_for(finished, timeout=120)
    with node.read_sessions() as session:
        results = list(session.scalars(select(Result).order_by(Result.job_id, Result.kind)))
    assert sorted(r.kind for r in results) == ["kos", "sc", "sc", "sr", "sr"]
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
