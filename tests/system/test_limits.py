"""Resource limits from the configuration, each enforced with a clear error, on a real node:
concurrent associations, instance size, instances per series and the inference time limit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import select

from dicom_ai_node.jobs.models import Event, Instance, Job
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import run_tool, wait_for
from tests.support.malformed import base_ct

pytestmark = pytest.mark.peers

CT = "1.2.840.10008.5.1.4.1.1.2"
FINAL = ("done", "failed", "skipped")


def _jobs(node: Node, count: int) -> list[Job]:
    def finished() -> list[Job] | None:
        with node.read_sessions() as session:
            jobs = list(session.scalars(select(Job).order_by(Job.id)))
        return jobs if sum(job.state in FINAL for job in jobs) >= count else None

    jobs: list[Job] = wait_for(finished, timeout=90, interval=0.1)
    return jobs


def _send_study(node: Node, study: Path) -> None:
    run_tool("storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(study))


def test_association_beyond_the_maximum_is_rejected(node_factory: Callable[..., Node]) -> None:
    node = node_factory(dicom={"maximum_associations": 2})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    held = [ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        # PS3.8 9.3.4: rejected-transient, service-provider (presentation), local limit exceeded.
        third = run_tool("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), check=False)
        assert third.returncode != 0
        assert "Local Limit Exceeded" in third.stderr, third.stderr
    finally:
        for assoc in held:
            assoc.release()
    # Once one ends, there is room again.
    wait_for(lambda: len(node.scp.ae.active_associations) == 0, timeout=5)
    again = run_tool("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), check=False)
    assert again.returncode == 0, again.stderr


def test_instance_over_the_size_limit_is_refused_with_out_of_resources(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(dicom={"max_instance_mb": 0.1})  # 100 KiB
    small = base_ct()  # 39 KiB
    large = base_ct()
    large.Rows = large.Columns = 256  # 128 KiB of pixel data
    large.PixelData = bytes(256 * 256 * 2)
    ae = AE(ae_title="SIZES")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert assoc.is_established
    refused, accepted = assoc.send_c_store(large), assoc.send_c_store(small)
    assoc.release()
    assert refused.Status == 0xA700  # PS3.4 B.2.3: out of resources
    assert refused.ErrorComment.startswith("instance too large: 0.1 MB, limit 0.1 MB")
    assert accepted.Status == 0x0000
    with node.read_sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
        refusals = list(session.scalars(select(Event).where(Event.kind == "instance_refused")))
    assert stored == {small.SOPInstanceUID}
    assert [e.data["status"] for e in refusals] == [0xA700]
    assert "instance too large" in refusals[0].message


def test_series_over_the_instance_limit_fails_its_job_at_once(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    node = node_factory(
        models=demo_models, routes=shipped_routes, assemble={"max_instances_per_series": 5}
    )
    big = generate_studies(Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 1, tmp_path, slices=6)[0]
    small = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 1, tmp_path, seed=1, slices=4
    )[0]
    _send_study(node, big)
    _send_study(node, small)
    jobs = {job.study_instance_uid: job for job in _jobs(node, 2)}
    refused, served = jobs[big.name], jobs[small.name]
    assert refused.state == "failed" and refused.attempts == 1
    assert refused.error == (
        "series too large: 6 instances, more than [assemble] max_instances_per_series = 5"
    )
    assert served.state == "done", served.error
    with node.read_sessions() as session:  # all six were stored: the node keeps what arrives
        count = len(
            session.scalars(select(Instance).where(Instance.study_instance_uid == big.name)).all()
        )
    assert count == 6


def test_inference_over_the_time_limit_fails_and_the_worker_goes_on(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    limit = 1.5
    node = node_factory(
        models=demo_models, routes=shipped_routes, worker={"job_timeout_seconds": limit}
    )
    # 20000 frames of 16 x 16: 10 MB to send, about 15 s of inference at ~0.8 ms a frame.
    slow = base_ct()
    frames = 20_000
    slow.Rows = slow.Columns = 16
    slow.NumberOfFrames = frames
    slow.PixelData = (
        np.random.default_rng(1).integers(0, 2000, (frames, 16, 16), dtype=np.int16).tobytes()
    )
    ae = AE(ae_title="SLOW")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert assoc.is_established
    assert assoc.send_c_store(slow).Status == 0x0000
    assoc.release()
    quick = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 1, tmp_path, seed=4242, slices=12
    )[0]
    _send_study(node, quick)
    jobs = {job.study_instance_uid: job for job in _jobs(node, 2)}
    stopped, served = jobs[slow.StudyInstanceUID], jobs[quick.name]
    assert stopped.state == "failed" and stopped.attempts == 1
    assert stopped.error is not None
    assert stopped.error.startswith(f"inference stopped after {limit:g} s (the job time limit)")
    assert stopped.started_at is not None and stopped.finished_at is not None
    # Stopped within a batch of the limit, not after the 15 s the whole series would take.
    assert (stopped.finished_at - stopped.started_at).total_seconds() < limit + 3
    assert (served.state, served.label, served.positive) == ("done", "hemorrhage", True)
    assert served.finished_at is not None and served.finished_at > stopped.finished_at
