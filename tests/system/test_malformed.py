"""Malformed instances over the wire to a running node, between good studies.

Every case of :mod:`tests.support.malformed` is sent to a node running the shipped routes and
the demo models, interleaved with good synthetic studies. The node must answer each with a proper
C-STORE status (PS3.4 B.2.3; a failure carries an Error Comment and an ``instance_refused``
event), finish the job of every stored one (``failed`` with a clear error, or ``done`` with
the skipped images recorded), stay healthy, and still label the good studies correctly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, _config
from sqlalchemy import select

from dicom_ai_node.jobs.models import Event, Instance, Job
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import run_tool, wait_for
from tests.support.malformed import Case, corpus

pytestmark = pytest.mark.peers

FINAL = ("done", "failed", "skipped", "failed_to_deliver")


@dataclass
class Outcome:
    """What the node did with one case: the status it answered, and its job's end."""

    case: Case
    status: int
    comment: str = ""
    job: str | None = None
    detail: str = ""


@contextmanager
def raw_sending() -> Iterator[None]:
    """Make pynetdicom send a file's data set bytes as they are, without decoding them."""
    before = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = before


def send_raw(port: int, cases: list[Case], folder: Path) -> dict[str, Dataset]:
    """Send each case's bytes on one association; the response status of each by name."""
    folder.mkdir(parents=True, exist_ok=True)
    ae = AE(ae_title="MALFORMED")
    for context in dict.fromkeys((c.sop_class, c.transfer_syntax) for c in cases):
        ae.add_requested_context(*context)
    statuses: dict[str, Dataset] = {}
    with raw_sending():
        assoc = ae.associate("127.0.0.1", port, ae_title="AINODE")
        assert assoc.is_established
        for case in cases:
            path = folder / f"{case.name}.dcm"
            path.write_bytes(case.data)
            statuses[case.name] = assoc.send_c_store(path)
        assoc.release()
    return statuses


def send_storescu(port: int, case: Case, folder: Path) -> int:
    """Send a case with DCMTK's storescu; the status it reports (success or not)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{case.name}.dcm"
    path.write_bytes(case.data)
    result = run_tool(
        "storescu", "-v", "-aec", "AINODE", "127.0.0.1", str(port), str(path), check=False
    )
    return 0x0000 if "Received Store Response (Success)" in result.stderr else 0xFFFF


def send_study(port: int, study: Path) -> None:
    run_tool("storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(port), str(study))


def jobs_by_series(node: Node) -> dict[str, Job]:
    with node.read_sessions() as session:
        return {
            job.series_instance_uid or job.study_instance_uid: job
            for job in session.scalars(select(Job))
        }


def events(node: Node, kind: str) -> list[Event]:
    with node.read_sessions() as session:
        return list(session.scalars(select(Event).where(Event.kind == kind)))


def outcome_table(outcomes: list[Outcome]) -> str:
    """A Markdown table of the outcomes (the figures of docs/reliability.md)."""
    lines = [
        "| case | what | status | job | why |",
        "|------|------|--------|-----|-----|",
    ]
    for o in outcomes:
        why = (o.comment or o.detail).replace("|", "/")[:110]
        lines.append(
            f"| {o.case.name} | {o.case.what} | 0x{o.status:04X} | {o.job or '-'} | {why} |"
        )
    return "\n".join(lines)


def test_malformed_inputs_between_good_studies(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    node = node_factory(models=demo_models, routes=shipped_routes)
    port = node.scp.port
    good = [
        (Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, "hemorrhage"),
        (Task.CXR_OPACITY, Label.NEGATIVE, "opacity"),
        (Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, "hemorrhage"),
    ]
    studies = [
        generate_studies(task, label, 1, tmp_path / "good" / str(i), seed=4242, slices=12)[0]
        for i, (task, label, _) in enumerate(good)
    ]
    cases = corpus()
    raw = [c for c in cases if c.sender == "pynetdicom"]
    dcmtk = [c for c in cases if c.sender == "storescu"]
    statuses: dict[str, int] = {}
    comments: dict[str, str] = {}
    halves = (raw[: len(raw) // 2], raw[len(raw) // 2 :])
    # good, bad, good, bad (raw then by storescu), good: the node serves all in turn.
    for step, study in enumerate(studies):
        send_study(port, study)
        if step < len(halves):
            for name, status in send_raw(port, halves[step], tmp_path / "raw").items():
                statuses[name] = int(status.Status)
                comments[name] = str(status.get("ErrorComment", ""))
        if step == 1:
            for case in dcmtk:
                statuses[case.name] = send_storescu(port, case, tmp_path / "dcmtk")

    outcomes = [Outcome(c, statuses[c.name], comments.get(c.name, "")) for c in cases]
    for o in outcomes:
        assert o.status == o.case.status, (o.case.name, hex(o.status), o.comment)
        if o.status != 0x0000:
            assert o.comment, o.case.name  # PS3.7 C.4: Error Comment on a failure

    expected_series = {c.series for c in cases if c.job is not None}
    good_series = {next(s.iterdir()).name for s in studies}

    def all_final() -> dict[str, Job] | None:
        jobs = jobs_by_series(node)
        wanted = expected_series | good_series
        if all(s in jobs and jobs[s].state in FINAL for s in wanted):
            return jobs
        return None

    jobs: dict[str, Job] = wait_for(all_final, timeout=120, interval=0.2)

    # The good studies were served correctly around the malformed ones.
    for study, (_, label, positive_label) in zip(studies, good, strict=True):
        job = jobs[next(study.iterdir()).name]
        assert job.state == "done", (job.state, job.error)
        assert job.positive == (label is Label.POSITIVE), (job.label, job.probability)
        assert (job.label == positive_label) == (label is Label.POSITIVE)

    skipped_events = {e.job_id: e for e in events(node, "images_skipped")}
    refused = [e.message for e in events(node, "instance_refused")]
    with node.read_sessions() as session:
        stored = set(session.scalars(select(Instance.sop_instance_uid)))
    for o in outcomes:
        case = o.case
        if case.job is None:
            assert case.sop_instance not in stored, case.name
            assert any(o.comment in message for message in refused), case.name
            continue
        assert case.sop_instance in stored, case.name
        job = jobs[case.series]
        o.job = job.state
        assert job.state == case.job, (case.name, job.state, job.error)
        if job.state == "failed":
            assert job.error and "no usable image" in job.error, (case.name, job.error)
            assert job.attempts == 1, "a permanent error is not retried"
            o.detail = job.error.replace(f"{case.sop_instance}: ", "")
        elif job.state == "skipped":
            assert job.error and "no route matches" in job.error
            o.detail = job.error
        elif case.skipped:
            event = skipped_events[job.id]
            reasons = {uid: why for uid, why in event.data["skipped"]}
            assert case.sop_instance in reasons, (case.name, reasons)
            o.detail = f"image skipped: {reasons[case.sop_instance]}"
        else:
            o.detail = f"{job.label} ({job.probability:.2f})"

    assert node.health() == []
    assert node.worker._thread is not None and node.worker._thread.is_alive()
    assert not list(node.spool.root.parent.rglob("tmp/*.dcm"))
    counts = {
        status: len(list(group))
        for status, group in itertools.groupby(sorted(o.status for o in outcomes))
    }
    print(
        f"\n{len(outcomes)} malformed inputs: "
        + ", ".join(f"0x{status:04X}: {n}" for status, n in counts.items())
    )
    print(outcome_table(outcomes))
