"""STOW-RS delivery (PS3.18 10.5) to a real Orthanc with its DICOMweb plugin.

The client alone first (stored, refused, server down), then the whole node with a
``dicomweb`` destination whose server is down for a while: the results arrive once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom.filereader import read_file_meta_info
from sqlalchemy import select

from dicom_ai_node.dispatch.stow import WebPeer, stow_files
from dicom_ai_node.jobs.models import Delivery, Event, Job, Result
from dicom_ai_node.node import Node
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import free_port, instance, run_tool, wait_for, write
from tests.support.orthanc import Orthanc

pytestmark = pytest.mark.peers

USERS = {"ainode": "s3cret"}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    pacs = Orthanc(tmp_path_factory.mktemp("orthanc"), plugins=("dicomweb",), users=USERS)
    pacs.start()
    try:
        yield pacs
    finally:
        pacs.stop()


def stored(orthanc: Orthanc, uid: str) -> int:
    """How many instances Orthanc holds with this SOP Instance UID."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": uid}})
    return len(found)


def test_each_instance_is_stored_once_and_reported(orthanc: Orthanc, tmp_path: Path) -> None:
    study = instance().StudyInstanceUID
    files = [write(instance(study=study), tmp_path) for _ in range(3)]
    peer = WebPeer(orthanc.dicomweb_url, username="ainode", password="s3cret")
    outcomes = stow_files(files, peer)
    assert [o.path for o in outcomes] == files
    assert all(o.ok and o.status == 0x0000 for o in outcomes), outcomes
    # sent again (a retry after a lost response): still one of each on the server
    assert all(o.ok for o in stow_files(files, peer))
    assert [stored(orthanc, o.sop_instance_uid) for o in outcomes] == [1, 1, 1]


def test_refused_and_unreachable_requests_leave_files_undelivered(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    files = [write(instance(), tmp_path)]
    refused = stow_files(files, WebPeer(orthanc.dicomweb_url, username="ainode", password="no"))
    assert refused[0].status is None and "HTTP 401" in refused[0].error
    bearer = stow_files(files, WebPeer(orthanc.dicomweb_url, token="not-a-token"))
    assert bearer[0].status is None and "HTTP 401" in bearer[0].error
    down = stow_files(files, WebPeer(f"http://127.0.0.1:{free_port()}/dicom-web"), timeout=5)
    assert down[0].status is None and "ConnectError" in down[0].error
    assert stored(orthanc, refused[0].sop_instance_uid) == 0


def test_failed_sop_sequence_gives_each_instance_its_reason(tmp_path: Path) -> None:
    """A 202 response parsed per instance: one stored, one failed with its Failure Reason,
    one not mentioned (kept for a retry). Served by a real HTTP server on loopback."""
    files = [write(instance(), tmp_path) for _ in range(3)]
    uids = [str(read_file_meta_info(path).MediaStorageSOPInstanceUID) for path in files]
    body = {
        "00081199": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uids[0]]}}]},
        "00081198": {
            "vr": "SQ",
            "Value": [
                {
                    "00081155": {"vr": "UI", "Value": [uids[1]]},
                    "00081197": {"vr": "US", "Value": [0xA700]},
                }
            ],
        },
    }
    with json_server(202, body) as url:
        outcomes = stow_files(files, WebPeer(url))
    assert [o.status for o in outcomes] == [0x0000, 0xA700, None]
    assert "reason 0xA700" in outcomes[1].error and "not in the response" in outcomes[2].error


@contextmanager
def json_server(status: int, body: dict[str, Any]) -> Iterator[str]:
    """An HTTP server on loopback answering every POST with ``status`` and ``body`` as
    JSON; yields its DICOMweb service root."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            raw = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/dicom+json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.slow
def test_node_delivers_by_stow_once_after_an_outage(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    pacs = Orthanc(tmp_path / "web-pacs", plugins=("dicomweb",), users=USERS)  # not started
    routes = [{**route, "destinations": ["web"]} for route in shipped_routes]
    destination = {
        "name": "web",
        "type": "dicomweb",
        "url": pacs.dicomweb_url,
        "username": "ainode",
        "password": "s3cret",
    }
    node = node_factory(
        models=demo_models,
        routes=routes,
        destinations=[destination],
        dispatch={"retry_base_seconds": 0.2, "retry_max_seconds": 0.4, "max_attempts": 100},
    )
    study = generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "synth", 5)[0]
    run_tool("storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(study))

    def rows() -> tuple[Job | None, list[Delivery], list[Event], list[str]]:
        with node.read_sessions() as session:
            job = session.scalars(select(Job).where(Job.study_instance_uid == study.name)).first()
            if job is None:
                return None, [], [], []
            deliveries = list(session.scalars(select(Delivery).where(Delivery.job_id == job.id)))
            events = list(session.scalars(select(Event).where(Event.job_id == job.id)))
            results = list(
                session.scalars(select(Result.sop_instance_uid).where(Result.job_id == job.id))
            )
        return job, deliveries, events, results

    wait_for(lambda: (d := rows()[1]) and all(x.attempts >= 2 for x in d), timeout=90)
    _, pending, events, _ = rows()
    assert all(d.state == "pending" and "ConnectError" in (d.last_error or "") for d in pending)
    assert any(e.kind == "delivery_retry" and "STOW-RS" in e.message for e in events)
    pacs.start()
    try:
        wait_for(lambda: (job := rows()[0]) is not None and job.state == "done", timeout=60)
        _, done, events, results = rows()
        assert len(results) == len(done) == 2  # SR and SC
        assert [stored(pacs, uid) for uid in results] == [1, 1]
        assert sorted(e.message.split()[1] for e in events if e.kind == "delivered") == sorted(
            results
        )
        assert all(d.state == "done" and d.last_status == 0 for d in done)
    finally:
        pacs.stop()
