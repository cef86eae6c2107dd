"""Retention: processed series lose their received files; results and the log stay."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from dicom_ai_node.jobs.models import Event, Instance, Job, Result, Series
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import run_tool, wait_for

pytestmark = pytest.mark.peers


def test_retention_prunes_processed_series_only(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    node = node_factory(
        models=demo_models,
        routes=shipped_routes,
        storage={"retention_days": 1e-5},  # under a second
    )
    done_study = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "a", seed=31)[0]
    run_tool(
        "dcmsend", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), "+sd", "+r", str(done_study)
    )

    def done() -> Job | None:
        with node.read_sessions() as session:
            return session.scalars(select(Job).where(Job.state == "done")).first()

    job = wait_for(done, timeout=60)
    node.worker.stop()  # the next study's job stays queued
    queued_study = generate_studies(Task.CXR_OPACITY, Label.NEGATIVE, 1, tmp_path / "b", seed=32)[0]
    run_tool(
        "dcmsend", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), "+sd", "+r", str(queued_study)
    )

    def queued() -> Job | None:
        with node.read_sessions() as session:
            return session.scalars(select(Job).where(Job.state == "queued")).first()

    wait_for(queued, timeout=30)
    # the done series passes its retention time (under a second) while the other waits
    assert wait_for(node.assembler.prune_once, timeout=10) == 1
    incoming = node.spool.incoming
    assert not (incoming / job.study_instance_uid).exists()
    assert (incoming / queued_study.name).is_dir()  # its job has not run yet
    with node.read_sessions() as session:
        series = session.get(Series, job.series_instance_uid)
        assert series is not None and series.pruned_at is not None
        results = session.scalars(select(Result).where(Result.job_id == job.id)).all()
        kept = session.scalar(select(func.count()).select_from(Instance))
        events = [e.kind for e in session.scalars(select(Event))]
    assert results and all(node.spool.locate(r.path).is_file() for r in results)
    assert kept == 2  # the job log keeps every instance row
    assert "series_pruned" in events
    assert node.assembler.prune_once() == 0  # nothing twice
