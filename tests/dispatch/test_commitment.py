"""Storage Commitment (PS3.4 Annex J) with real Orthancs, which are Storage Commitment SCPs.

One node, no models: its jobs are written into the job log as ready to deliver, with real
files. ``pacs`` is an Orthanc that knows the node (so it sends its N-EVENT-REPORT back, on an
association of its own) and silently drops the first copy of every instance it receives
(a Lua filter): the first commitment is refused (no such instance), the node sends the
result again and asks again, and only then is the delivery ``committed``. ``mute`` does not
know the node, so its answer never comes: the request times out and is retried, then given up.
``same`` is a pynetdicom Storage and Storage Commitment SCP that does not know the node either
and answers on the association that asked (PS3.4 J.3.3.1.2, Note 1).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, build_context, evt
from pynetdicom.association import Association
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import StorageCommitmentPushModel  # type: ignore[attr-defined]
from sqlalchemy import select

from dicom_ai_node.dispatch.commitment import COMMITMENT_INSTANCE
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


@dataclass
class Report:
    """One N-EVENT-REPORT the peer sent: on which association, and the node's answer."""

    assoc: Association
    transaction_uid: str
    status: int | None


class SameAssociationPeer:
    """A pynetdicom Storage SCP and Storage Commitment SCP that answers each N-ACTION with
    an N-EVENT-REPORT on the same association (committing what it stored), once its
    N-ACTION response is sent and ``go`` is set. It does not know the node, so it opens no
    association of its own."""

    def __init__(self, port: int) -> None:
        self.stored: set[str] = set()
        self.requests: list[tuple[Association, str]] = []
        self.reports: list[Report] = []
        self.go = threading.Event()
        self._responded = threading.Event()
        self._threads: list[threading.Thread] = []
        ae = AE(ae_title="SAME")
        ae.supported_contexts = [
            *AllStoragePresentationContexts,
            build_context(StorageCommitmentPushModel),
        ]
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._store),
            (evt.EVT_N_ACTION, self._action),
            (evt.EVT_PDU_SENT, self._sent),
        ]
        server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
        assert server is not None
        self.server = server

    def _store(self, event: evt.Event) -> int:
        self.stored.add(str(event.dataset.SOPInstanceUID))
        return 0x0000

    def _action(self, event: evt.Event) -> tuple[int, None]:
        info = event.action_information
        self.requests.append((event.assoc, str(info.TransactionUID)))
        self._responded.clear()
        thread = threading.Thread(target=self._report, args=(event.assoc, info))
        self._threads.append(thread)
        thread.start()
        return 0x0000, None

    def _sent(self, event: evt.Event) -> None:
        # the first P-DATA after an N-ACTION is its response (pynetdicom answers once the
        # handler has returned); an N-EVENT-REPORT sent before it would be taken for it
        if isinstance(event.pdu, P_DATA_TF):
            self._responded.set()

    def _report(self, assoc: Association, request: Dataset) -> None:
        if not (self._responded.wait(30) and self.go.wait(30) and assoc.is_established):
            self.reports.append(Report(assoc, str(request.TransactionUID), None))
            return
        info = Dataset()
        info.TransactionUID = request.TransactionUID
        info.ReferencedSOPSequence = [
            item
            for item in request.ReferencedSOPSequence
            if item.ReferencedSOPInstanceUID in self.stored
        ]
        status, _ = assoc.send_n_event_report(
            info, 1, StorageCommitmentPushModel, COMMITMENT_INSTANCE
        )
        code = int(status.Status) if status and "Status" in status else None
        self.reports.append(Report(assoc, str(request.TransactionUID), code))

    def close(self) -> None:
        self.go.set()
        for thread in self._threads:
            thread.join(30)
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Setup:
    node: Node
    pacs: Orthanc
    same: SameAssociationPeer


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
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
    same_port = free_port()
    destinations = [
        {"name": name, "ae_title": peer.aet, "host": "127.0.0.1", "port": peer.dicom_port}
        | {"commitment": True}
        for name, peer in (("pacs", pacs), ("mute", mute))
    ]
    destinations.append(
        {"name": "same", "ae_title": "SAME", "host": "127.0.0.1", "port": same_port}
        | {"commitment": True, "commitment_wait_seconds": 60}  # the test says when to answer
    )
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
    same = SameAssociationPeer(same_port)
    node.start()
    try:
        yield Setup(node, pacs, same)
    finally:
        node.stop()
        same.close()
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


def test_refused_commitment_is_sent_again_and_committed(setup: Setup) -> None:
    node, pacs = setup.node, setup.pacs
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


def test_commitment_that_never_comes_is_retried_then_given_up(setup: Setup) -> None:
    node = setup.node
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


def test_answer_on_the_same_association_commits(setup: Setup) -> None:
    """The peer answers on the association of the N-ACTION, which the node keeps open for
    it: the delivery is ``sent`` until that report, ``done`` and committed after it."""
    node, same = setup.node, setup.same
    job_id, uid = deliver(node, "same")
    wait_for(lambda: same.requests, timeout=30)
    # asked, answered N-ACTION success, report held back: sent, not committed
    job, delivery, _ = job_rows(node, job_id)
    assert (job.state, delivery.state, delivery.committed_at) == ("delivering", "sent", None)
    assert same.stored == {uid} and same.reports == []
    same.go.set()
    wait_for(lambda: job_rows(node, job_id)[0].state == "done", timeout=30)
    _, delivery, events = job_rows(node, job_id)
    kinds = [e.kind for e in events if e.kind not in ("state", "job_done")]
    assert kinds == ["delivered", "commitment_requested", "committed"], kinds
    assert delivery.state == "done" and delivery.committed_at is not None
    [(asked_on, transaction)] = same.requests
    [report] = same.reports
    assert report.assoc is asked_on  # the same association, still open for the report
    assert (report.transaction_uid, report.status) == (transaction, 0x0000)
    assert transaction == delivery.transaction_uid
    # the node released the association once it had answered
    wait_for(lambda: asked_on.is_released, timeout=30)
