"""Storage Commitment (PS3.4 Annex J) with real Orthancs, which are Storage Commitment SCPs.

One node, no models: its jobs are written into the job log as ready to deliver, with real
files. ``pacs`` is an Orthanc that knows the node (so it sends its N-EVENT-REPORT back, on an
association of its own) and silently drops the first copy of every instance it receives
(a Lua filter): the first commitment is refused (no such instance), the node sends the
result again and asks again, and only then is the delivery ``committed``. ``mute`` does not
know the node, so its answer never comes: the request times out and is retried, then given up.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy import select

from dicom_ai_node.dispatch.deliveries import plan_deliveries
from dicom_ai_node.jobs.models import Delivery, Event, Job, JobState, Result
from dicom_ai_node.node import Node
from tests.support.helpers import free_port, instance, make_settings, wait_for, write
from tests.support.orthanc import Orthanc

pytestmark = pytest.mark.peers

TOKEN = "commitment-token"
# Orthanc's ReceivedInstanceFilter: false discards the instance yet answers C-STORE success
# (a PACS that loses what it acknowledged); each SOP Instance is dropped once.
DROP_FIRST_COPY = """
seen = {}
function ReceivedInstanceFilter(dicom, origin, info)
  local uid = dicom.SOPInstanceUID
  if seen[uid] == nil then
    seen[uid] = true
    return false
  end
  return true
end
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Node, Orthanc]]:
    root = tmp_path_factory.mktemp("commitment")
    node_port = free_port()
    lua = root / "drop-first-copy.lua"
    lua.write_text(DROP_FIRST_COPY)
    pacs = Orthanc(
        root / "pacs",
        modalities={"ainode": ("AINODE", "127.0.0.1", node_port)},
        config={"LuaScripts": [str(lua)]},
    )
    mute = Orthanc(root / "mute", aet="MUTE")
    destinations = [
        {"name": name, "ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port}
        | {"commitment": True}
        for name, peer in (("pacs", pacs), ("mute", mute))
    ]
    settings = make_settings(
        root,
        dicom={"port": node_port},
        http={"token": TOKEN},
        destinations=destinations,
        dispatch={"commitment_timeout_seconds": 1.0, "max_attempts": 2},
    )
    node = Node(settings, models={})
    pacs.start()
    mute.start()
    node.start()
    try:
        yield node, pacs
    finally:
        node.stop()
        pacs.stop()
        mute.stop()


def deliver(node: Node, destination: str) -> tuple[int, str]:
    """A job ready to deliver one real file to ``destination``: (job id, SOP Instance UID)."""
    ds = instance()
    path = write(ds, node.spool.root / "outbox" / destination)
    with node.sessions.begin() as session:
        job = Job(
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            destinations=[destination],
            state=JobState.DELIVERING.value,
        )
        session.add(job)
        session.flush()
        result = Result(
            sop_instance_uid=ds.SOPInstanceUID,
            job_id=job.id,
            kind="sc",
            sop_class_uid=ds.SOPClassUID,
            series_instance_uid=ds.SeriesInstanceUID,
            path=str(path.relative_to(node.spool.root)),
        )
        session.add(result)
        session.flush()
        plan_deliveries(session, job, [result])
        job_id = job.id
    node.dispatcher.wake()
    return job_id, str(ds.SOPInstanceUID)


def job_rows(node: Node, job_id: int) -> tuple[Job, Delivery, list[Event]]:
    with node.read_sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        delivery = session.scalars(select(Delivery).where(Delivery.job_id == job_id)).one()
        events = list(session.scalars(select(Event).where(Event.job_id == job_id)))
    return job, delivery, events


def test_refused_commitment_is_sent_again_and_committed(setup: tuple[Node, Orthanc]) -> None:
    node, pacs = setup
    job_id, uid = deliver(node, "pacs")
    wait_for(lambda: job_rows(node, job_id)[0].state == "done", timeout=30)
    _, delivery, events = job_rows(node, job_id)
    kinds = [e.kind for e in events if e.kind not in ("state", "job_done")]
    assert kinds == [
        "delivered",
        "commitment_requested",
        "commitment_failed",  # Orthanc dropped the first copy: no such instance
        "delivered",
        "commitment_requested",
        "committed",
    ], kinds
    failed = next(e for e in events if e.kind == "commitment_failed")
    assert "Failure Reason 0x0112" in failed.message
    assert delivery.state == "done" and delivery.attempts == 2
    assert delivery.committed_at is not None and delivery.transaction_uid
    found = pacs.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": uid}})
    assert len(found) == 1
    auth = {"Authorization": f"Bearer {TOKEN}"}
    base = f"http://127.0.0.1:{node.http.port}"
    shown = {d["name"]: d for d in httpx.get(f"{base}/api/destinations", headers=auth).json()}
    assert (shown["pacs"]["sent"], shown["pacs"]["committed"]) == (1, 1)
    detail = httpx.get(f"{base}/api/jobs/{job_id}", headers=auth).json()
    assert [(d["delivered"], d["committed"]) for d in detail["deliveries"]] == [(1, 1)]
    page = httpx.get(f"{base}/destinations", headers=auth).text
    assert '<td class="num committed">1</td>' in page


def test_commitment_that_never_comes_is_retried_then_given_up(
    setup: tuple[Node, Orthanc],
) -> None:
    node, _ = setup
    job_id, _ = deliver(node, "mute")
    # sent and asked to commit, but not committed: shown as sent, not done
    wait_for(lambda: job_rows(node, job_id)[1].state == "sent", timeout=30)
    job, delivery, _ = job_rows(node, job_id)
    assert job.state == "delivering" and delivery.committed_at is None
    wait_for(lambda: job_rows(node, job_id)[0].state == "failed_to_deliver", timeout=30)
    _, delivery, events = job_rows(node, job_id)
    kinds = [e.kind for e in events if e.kind in ("delivered", "commitment_timeout")]
    assert kinds == ["delivered", "commitment_timeout", "delivered", "commitment_timeout"]
    timeouts = [e.message for e in events if e.kind == "commitment_timeout"]
    assert "sending it again" in timeouts[0] and "gave up" in timeouts[1], timeouts
    assert delivery.state == "failed" and delivery.committed_at is None
