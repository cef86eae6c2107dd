"""Sending results to destinations that fail, with real peers on loopback.

Each test runs the whole node (the demo models, a synthetic chest radiograph sent by DCMTK
``storescu``) and points its results at a peer that misbehaves: nothing listening, an
association rejected, failure statuses, a peer that never answers. The job log must show the
retries, the results must arrive once the peer is well, with the same SOP Instance UIDs.
"""

from __future__ import annotations

import itertools
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event as DicomEvent
from sqlalchemy import select

from dicom_ai_node.infer.preprocess import frame_attributes, pixel_aspect
from dicom_ai_node.jobs.models import Delivery, Event, Job, Result
from dicom_ai_node.node import Node
from dicom_ai_node.report.render import output_size
from dicom_ai_node.synth import Label, Task, generate_studies
from tests.support.helpers import (
    ROOT,
    free_port,
    received_uids,
    rows_with_colour,
    run_tool,
    storescp,
    wait_for,
)

pytestmark = pytest.mark.peers

# --- peers ---------------------------------------------------------------------------------


ABORT = -1  # a scripted "status": the peer aborts the association instead of answering


class PynetdicomPeer:
    """A pynetdicom storage SCP whose C-STORE answers are scripted: ``statuses`` are returned
    in turn (then 0x0000), :data:`ABORT` drops the association mid-transfer; every request's
    SOP Instance UID is recorded in ``received``."""

    def __init__(self, port: int, *, aet: str = "PACS", require_called_aet: bool = False) -> None:
        self.statuses: list[int] = []
        self.received: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        ae = AE(ae_title=aet)
        ae.require_called_aet = require_called_aet
        ae.supported_contexts = AllStoragePresentationContexts
        server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )
        assert server is not None
        self.server = server

    def _store(self, event: DicomEvent) -> int:
        with self._lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            self.received.append((str(event.dataset.SOPInstanceUID), status))
        if status == ABORT:
            event.assoc.abort()
        return status

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def pynetdicom_peer(port: int, **kwargs: Any) -> Iterator[PynetdicomPeer]:
    peer = PynetdicomPeer(port, **kwargs)
    try:
        yield peer
    finally:
        peer.close()


@contextmanager
def silent_peer(port: int) -> Iterator[None]:
    """A TCP listener that accepts connections and never says a word (a hung PACS)."""
    with socket.socket() as server:
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", port))
        server.listen(16)
        yield


# --- the node --------------------------------------------------------------------------------


def start_node(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    destinations: dict[str, tuple[str, int]],
    options: dict[str, dict[str, Any]] | None = None,
    **dispatch: Any,
) -> Node:
    """A node whose shipped routes send to ``destinations`` (name -> (AE title, port)),
    with more settings of some of them in ``options`` (name -> settings)."""
    routes = [{**route, "destinations": list(destinations)} for route in shipped_routes]
    return node_factory(
        models=demo_models,
        routes=routes,
        destinations=[
            {"name": name, "ae_title": aet, "host": "127.0.0.1", "port": port}
            | (options or {}).get(name, {})
            for name, (aet, port) in destinations.items()
        ],
        dispatch={"retry_base_seconds": 0.2, "retry_max_seconds": 0.4, **dispatch},
    )


def send_radiograph(node: Node, tmp_path: Path, seed: int = 5) -> str:
    """Send a positive synthetic chest radiograph to the node; returns its Study UID."""
    return send_study(node, radiograph(tmp_path, seed))


def radiograph(tmp_path: Path, seed: int = 5) -> Path:
    """A positive synthetic chest radiograph study (its folder, named by its Study UID)."""
    return generate_studies(Task.CXR_OPACITY, Label.POSITIVE, 1, tmp_path / "synth", seed)[0]


def send_study(node: Node, study: Path) -> str:
    """Send a study folder to the node by DCMTK storescu; returns its Study UID."""
    run_tool("storescu", "+sd", "+r", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(study))
    return study.name


def job_in(node: Node, study_uid: str, *states: str, timeout: float = 60) -> Job:
    def reached() -> Job | None:
        with node.read_sessions() as session:
            job = session.scalars(select(Job).where(Job.study_instance_uid == study_uid)).first()
        return job if job is not None and job.state in states else None

    job: Job = wait_for(reached, timeout=timeout, interval=0.05)
    return job


def deliveries(node: Node, job_id: int, destination: str | None = None) -> list[Delivery]:
    with node.read_sessions() as session:
        query = select(Delivery).where(Delivery.job_id == job_id).order_by(Delivery.id)
        if destination is not None:
            query = query.where(Delivery.destination == destination)
        return list(session.scalars(query))


def events(node: Node, job_id: int, kind: str) -> list[Event]:
    with node.read_sessions() as session:
        query = select(Event).where(Event.job_id == job_id, Event.kind == kind)
        return list(session.scalars(query.order_by(Event.id)))


def result_uids(node: Node, job_id: int) -> list[str]:
    with node.read_sessions() as session:
        query = select(Result.sop_instance_uid).where(Result.job_id == job_id)
        return sorted(session.scalars(query))


# --- tests -----------------------------------------------------------------------------------


def test_refused_connection_is_retried_with_backoff_until_the_peer_comes_up(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    port = free_port()  # nothing listens here yet
    node = start_node(
        node_factory, demo_models, shipped_routes, {"pacs": ("PACS", port)}, max_attempts=100
    )
    study = send_radiograph(node, tmp_path)
    job = job_in(node, study, "delivering")
    wait_for(lambda: all(d.attempts >= 3 for d in deliveries(node, job.id)), timeout=30)

    pending = deliveries(node, job.id)
    assert len(pending) == 2  # SR and SC
    assert all(d.state == "pending" and d.last_status is None for d in pending)
    assert all("association" in (d.last_error or "") for d in pending)
    retries = events(node, job.id, "delivery_retry")
    assert len(retries) >= 6
    # exponential backoff: the gaps between a delivery's attempts grow (0.2 s, 0.4 s cap)
    first = [e.at for e in retries if pending[0].result_uid in e.message]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(first)]
    assert gaps[0] >= 0.15 and max(gaps) >= 0.35, gaps

    with storescp(port, tmp_path / "pacs") as folder:
        job = job_in(node, study, "done", timeout=30)
        assert received_uids(folder) == result_uids(node, job.id)
    done = deliveries(node, job.id)
    assert all(d.state == "done" and d.delivered_at and d.attempts > 3 for d in done)
    assert len(events(node, job.id, "delivered")) == 2


def test_failure_statuses_are_retried_with_the_same_sop_instance_uids(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    port = free_port()
    with pynetdicom_peer(port) as peer:
        peer.statuses = [0xA700, 0xA700, 0xA700, 0xA700]  # out of resources, twice per result
        node = start_node(node_factory, demo_models, shipped_routes, {"pacs": ("PACS", port)})
        study = send_radiograph(node, tmp_path)
        job = job_in(node, study, "done", "failed_to_deliver", timeout=60)
    assert job.state == "done", job.error
    uids = result_uids(node, job.id)
    statuses = [status for _, status in peer.received]
    assert statuses.count(0xA700) == 4 and statuses.count(0x0000) == 2
    # every attempt sent one of the node's recorded results, never a new UID
    assert sorted({uid for uid, _ in peer.received}) == uids
    stored = sorted(uid for uid, status in peer.received if status == 0)
    assert stored == uids
    retries = events(node, job.id, "delivery_retry")
    assert len(retries) == 4 and all("0xA700" in e.message for e in retries)
    assert all(d.attempts == 3 and d.last_status == 0 for d in deliveries(node, job.id))


def test_peer_closing_mid_transfer_is_retried_and_delivered_once(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The peer aborts the association in the middle of the first C-STORE: the attempt is
    recorded as failed without a status, and the retry delivers the same objects."""
    port = free_port()
    with pynetdicom_peer(port) as peer:
        peer.statuses = [ABORT]
        node = start_node(node_factory, demo_models, shipped_routes, {"pacs": ("PACS", port)})
        study = send_radiograph(node, tmp_path)
        job = job_in(node, study, "done", "failed_to_deliver", timeout=60)
    assert job.state == "done", job.error
    uids = result_uids(node, job.id)
    assert peer.received[0][1] == ABORT
    assert sorted(uid for uid, status in peer.received if status == 0) == uids
    retries = events(node, job.id, "delivery_retry")
    assert retries and all("no status" in e.message for e in retries)


def test_rejected_association_gives_up_then_an_operator_retry_delivers(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """The peer rejects the association (called AE title unknown to it) until attempts run
    out: the job is ``failed_to_deliver``. Once the peer is fixed, ``jobs retry`` sends
    the same objects and the job becomes ``done``."""
    port = free_port()
    with pynetdicom_peer(port, aet="PACS", require_called_aet=True) as peer:
        node = start_node(
            node_factory,
            demo_models,
            shipped_routes,
            {"pacs": ("AINODE_RESULTS", port)},
            max_attempts=3,
        )
        study = send_radiograph(node, tmp_path)
        job = job_in(node, study, "failed_to_deliver", "done", timeout=60)
        assert peer.received == []
    assert job.state == "failed_to_deliver"
    failed = deliveries(node, job.id)
    assert all(d.state == "failed" and d.attempts == 3 for d in failed)
    assert all(d.last_error == "association rejected" for d in failed)
    assert len(events(node, job.id, "delivery_retry")) == 4
    assert len(events(node, job.id, "delivery_failed")) == 2

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\ndata_dir = "{node.settings.storage.data_dir}"\n')
    with storescp(port, tmp_path / "pacs", aet="AINODE_RESULTS") as folder:
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "dicom_ai_node",
                "jobs",
                "retry",
                str(job.id),
                "-c",
                str(config),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        assert "2 deliveries queued again" in run.stdout
        job = job_in(node, study, "done", timeout=30)
        assert received_uids(folder) == result_uids(node, job.id)
    assert all(d.state == "done" for d in deliveries(node, job.id))


def test_a_dead_destination_does_not_delay_another(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """One destination hangs (accepts TCP, never answers); the other gets its results
    promptly, while the hung one is still waiting for its association."""
    good, hung = free_port(), free_port()
    with silent_peer(hung), storescp(good, tmp_path / "good") as folder:
        node = start_node(
            node_factory,
            demo_models,
            shipped_routes,
            {"hung": ("PACS", hung), "good": ("PACS", good)},
            timeout=20,
            max_attempts=100,
        )
        study = send_radiograph(node, tmp_path)
        job = job_in(node, study, "delivering")
        started = time.monotonic()
        wait_for(lambda: all(d.state == "done" for d in deliveries(node, job.id, "good")))
        assert time.monotonic() - started < 5
        assert len(list(folder.iterdir())) == 2
        # the hung destination is still on its first attempt
        assert all(
            d.state == "pending" and d.attempts == 0 for d in deliveries(node, job.id, "hung")
        )
        assert job_in(node, study, "delivering").id == job.id
    # closing the silent listener resets the hung connection, so the node stops promptly


YELLOW = (255, 220, 0)  # the burned-in result line of a positive result


def test_each_destination_gets_the_sc_of_its_layout(
    node_factory: Callable[..., Node],
    demo_models: dict[str, Any],
    shipped_routes: list[dict[str, Any]],
    tmp_path: Path,
) -> None:
    """Two PACS, one asking for the result text below the image and one above: each
    receives the SR and exactly one SC, of its own layout, with a SOP Instance UID of its
    own (the two SCs are one series, PS3.3 A.1.2.3)."""
    below_port, above_port = free_port(), free_port()
    with (
        storescp(below_port, tmp_path / "below") as below_dir,
        storescp(above_port, tmp_path / "above") as above_dir,
    ):
        node = start_node(
            node_factory,
            demo_models,
            shipped_routes,
            {"below": ("PACS", below_port), "above": ("PACS", above_port)},
            {"below": {"sc_layout": "below"}, "above": {"sc_layout": "above"}},
        )
        study = radiograph(tmp_path)
        job = job_in(node, send_study(node, study), "done", "failed_to_deliver")
    assert job.state == "done" and job.positive, job.error
    got = {}
    for name, folder in (("below", below_dir), ("above", above_dir)):
        received = [dcmread(path) for path in sorted(folder.iterdir())]
        scs = [ds for ds in received if ds.SOPClassUID == SecondaryCaptureImageStorage]
        assert len(received) == 2 and len(scs) == 1, (name, [ds.SOPClassUID for ds in received])
        got[name] = scs[0]
        assert f"burned in {name} the image" in scs[0].DerivationDescription
        assert len(deliveries(node, job.id, name)) == 2
    below, above = got["below"], got["above"]
    assert below.SOPInstanceUID != above.SOPInstanceUID
    assert below.SeriesInstanceUID == above.SeriesInstanceUID
    assert (below.InstanceNumber, above.InstanceNumber) == (1, 2)
    # the job wrote exactly these two SCs (no layout that no destination asked for)
    assert sorted(result_uids(node, job.id)) == sorted(
        {
            str(ds.SOPInstanceUID)
            for folder in (below_dir, above_dir)
            for ds in map(dcmread, folder.iterdir())
        }
    )
    # the pixels: the same image, the result text in a band after it or before it
    source = dcmread(next(path for path in study.rglob("*") if path.is_file()))
    aspect = pixel_aspect(frame_attributes(source, 0))
    image_rows = output_size(int(source.Rows), int(source.Columns), aspect)[0]
    band = int(below.Rows) - image_rows
    assert below.Rows == above.Rows and band > 0
    below_pixels, above_pixels = below.pixel_array, above.pixel_array
    assert np.array_equal(below_pixels[:image_rows], above_pixels[band:])
    text = rows_with_colour(below_pixels, YELLOW)
    assert text.size and text.min() >= image_rows, text
    text = rows_with_colour(above_pixels, YELLOW)
    assert text.size and text.max() < band, text
