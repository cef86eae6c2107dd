"""Driving an in-process node: send it a study with storescu, wait for its finished jobs."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from dicom_ai_node.jobs.models import Job
from dicom_ai_node.node import Node
from tests.support.helpers import run_tool, wait_for


def store_study(node: Node, study: Path) -> None:
    """C-STORE every file under ``study`` to the node (DCMTK storescu, one association)."""
    run_tool("storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(study))


def done_jobs(node: Node, count: int, timeout: float = 120) -> list[Job]:
    """The node's jobs in state ``done``, once there are ``count`` of them."""

    def done() -> list[Job] | None:
        with node.read_sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.state == "done")))
        return jobs if len(jobs) >= count else None

    jobs: list[Job] = wait_for(done, timeout=timeout)
    return jobs
