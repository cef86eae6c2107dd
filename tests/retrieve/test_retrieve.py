"""Query/retrieve from Orthanc as the PACS: C-FIND, C-MOVE to the node, C-GET, and the
`run` command, the API and the job list's form, a study-level route fetching the series it
lacks; an unknown study and a PACS that refuses the move."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Literal

import httpx
import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO
from pydicom.uid import generate_uid
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    StudyRootQueryRetrieveInformationModelFind,
)
from sqlalchemy import select

from dicom_ai_node.config import SourceSettings
from dicom_ai_node.jobs.models import AuditRecord, Event, Instance, Job
from dicom_ai_node.node import Node
from dicom_ai_node.retrieve import Retriever, retrieve_studies
from tests.support.helpers import free_port, instance, make_settings, wait_for, write
from tests.support.joblog import TOKEN
from tests.support.orthanc import Orthanc, running_orthanc

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def pacs_port() -> int:
    """Orthanc's DICOM port, known before the node starts (its [[sources]] entry)."""
    return free_port()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pacs_port: int) -> Iterator[Node]:
    settings = make_settings(
        tmp_path_factory.mktemp("retrieve"),
        dicom={"bind": "127.0.0.1", "port": free_port()},
        http={"token": TOKEN},
        assemble={"stable_seconds": 3600},
        routes=[
            {"name": "ct", "model": "head-ct-hemorrhage-demo", "where": {"Modality": ["CT"]}},
            {"name": "everything", "model": "cxr-opacity-demo"},
        ],
        sources=[{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": pacs_port}],
    )
    running = Node(settings, models={})
    running.start()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def pacs(node: Node, tmp_path_factory: pytest.TempPathFactory, pacs_port: int) -> Iterator[Orthanc]:
    with running_orthanc(
        tmp_path_factory.mktemp("pacs"),
        {"ainode": (node.settings.dicom.ae_title, "127.0.0.1", node.scp.port)},
        config={"DicomAlwaysAllowMove": True},  # a move request from any AE: then its target
        dicom_port=pacs_port,
    ) as orthanc:
        yield orthanc


def upload_study(
    pacs: Orthanc, folder: Path, count: int, modality: str = "CT"
) -> tuple[str, list[str]]:
    """A study of ``count`` instances in the PACS: its UID and their SOP Instance UIDs."""
    study, series = generate_uid(), generate_uid()
    images = [
        instance(
            study=study,
            series=series,
            Modality=modality,
            StudyDate="20261201",
            ImagesInAcquisition=count,  # the node completes the series as soon as all are in
        )
        for _ in range(count)
    ]
    pacs.upload([write(ds, folder) for ds in images])
    return study, [str(ds.SOPInstanceUID) for ds in images]


def on_node(node: Node, sops: list[str]) -> set[str]:
    with node.sessions() as session:
        rows = session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(sops)))
        return {row.sop_instance_uid for row in rows if node.spool.locate(row.path).is_file()}


def source(pacs: Orthanc, retrieve: Literal["move", "get"] = "move") -> SourceSettings:
    return SourceSettings(
        name="pacs", ae_title=pacs.aet, host="127.0.0.1", port=pacs.dicom_port, retrieve=retrieve
    )


def test_find_then_move_into_the_node(node: Node, pacs: Orthanc, tmp_path: Path) -> None:
    study, sops = upload_study(pacs, tmp_path, 3)
    retriever = Retriever(source(pacs), node.settings.dicom.ae_title)
    found = retriever.find(since=date(2026, 12, 1), modality="CT")
    assert study in {match.study_instance_uid for match in found}
    assert [m.instances for m in retriever.find(study)] == [3]
    outcomes = retrieve_studies(retriever, found, "ct", node.engine)
    assert all(o.ok for o in outcomes), outcomes
    assert on_node(node, sops) == set(sops)  # the move returns once every sub-operation did


def audited(node: Node, event_id: str, study: str) -> ET.Element | None:
    """The audit message of ``event_id`` that names ``study`` (in the job log's audit table)."""
    with node.sessions() as session:
        messages = session.scalars(
            select(AuditRecord.message).where(AuditRecord.event_id == event_id)
        )
        for message in messages:
            if study.encode() in message.encode() or study in _queried_study(message):
                return ET.fromstring(message)
    return None


def _queried_study(message: str) -> str:
    """The Study Instance UID of a Query message's identifier (ParticipantObjectQuery)."""
    query = ET.fromstring(message).find("ParticipantObjectIdentification/ParticipantObjectQuery")
    if query is None or not query.text:
        return ""
    identifier = dcmread(DicomBytesIO(base64.b64decode(query.text)), force=True)
    return str(identifier.get("StudyInstanceUID", ""))


def test_get_stores_through_the_ingest(node: Node, pacs: Orthanc, tmp_path: Path) -> None:
    study, sops = upload_study(pacs, tmp_path, 2, modality="MR")
    retriever = Retriever(
        source(pacs, "get"), node.settings.dicom.ae_title, node.scp.ingest, node.audit
    )
    found = retriever.find(since=date(2026, 12, 1), modality="MR")
    (outcome,) = retrieve_studies(retriever, found, "ct", node.engine)
    assert (outcome.ok, outcome.completed) == (True, 2)
    assert on_node(node, sops) == set(sops)
    # PS3.15 A.5.3.4: what the C-GET brought, the node receiving (C) from the PACS (source)
    message = wait_for(lambda: audited(node, "110104", study))
    assert message.find("EventIdentification").get("EventActionCode") == "C"  # type: ignore[union-attr]
    roles = {
        p.get("UserID"): p.find("RoleIDCode").get("csd-code")  # type: ignore[union-attr]
        for p in message.findall("ActiveParticipant")
    }
    assert roles == {pacs.aet: "110153", node.settings.dicom.ae_title: "110152"}
    (counted,) = message.findall("ParticipantObjectIdentification/SOPClass")
    assert counted.get("NumberOfInstances") == "2"


def test_pacs_that_refuses_the_move(node: Node, pacs: Orthanc, tmp_path: Path) -> None:
    upload_study(pacs, tmp_path, 1, modality="US")
    (study,) = Retriever(source(pacs), node.settings.dicom.ae_title).find(
        since=date(2026, 12, 1), modality="US"
    )
    stranger = Retriever(source(pacs), "STRANGER")  # a move destination Orthanc does not know
    outcome = stranger.retrieve(study.study_instance_uid)
    assert (outcome.ok, outcome.status) == (False, 0xC000)  # Orthanc 1.10's answer
    assert outcome.error == "C-MOVE answered 0xC000"


def run_cli(
    node: Node, pacs: Orthanc, tmp_path: Path, *args: str
) -> subprocess.CompletedProcess[str]:
    config = tmp_path / "node.toml"
    config.write_text(
        f'[dicom]\nae_title = "{node.settings.dicom.ae_title}"\n'
        f'[storage]\ndata_dir = "{node.settings.storage.data_dir}"\nmin_free_mb = 0\n'
        f'[[sources]]\nname = "pacs"\nae_title = "{pacs.aet}"\nhost = "127.0.0.1"\n'
        f"port = {pacs.dicom_port}\n"
        '[[routes]]\nname = "ct"\nmodel = "head-ct-hemorrhage-demo"\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "dicom_ai_node", "run", "--config", str(config), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=120,
    )


def test_run_command_moves_a_study_and_records_it(
    node: Node, pacs: Orthanc, tmp_path: Path
) -> None:
    unknown = run_cli(node, pacs, tmp_path, "--route", "ct", "--study", generate_uid())
    assert unknown.returncode == 1
    assert "holds no study" in unknown.stderr
    study, sops = upload_study(pacs, tmp_path, 2)
    result = run_cli(node, pacs, tmp_path, "--route", "ct", "--study", study)
    assert result.returncode == 0, result.stderr
    assert "retrieved 1 of 1 studies from pacs" in result.stdout
    assert on_node(node, sops) == set(sops)
    with node.sessions() as session:
        event = session.scalars(
            select(Event).where(Event.kind == "retrieved", Event.study_instance_uid == study)
        ).one()
    assert event.data["route"] == "ct"
    # Pulled for "ct": only that route runs, not "everything" (which a pushed study gets).
    assert wait_for(lambda: routes_of_jobs(node, study), timeout=10) == ["ct"]


def routes_of_jobs(node: Node, study: str) -> list[str]:
    with node.sessions() as session:
        return [
            str(job.route)
            for job in session.scalars(select(Job).where(Job.study_instance_uid == study))
        ]


def test_api_pulls_in_the_background(node: Node, pacs: Orthanc, tmp_path: Path) -> None:
    study, sops = upload_study(pacs, tmp_path, 2)
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{node.http.port}",
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    pulled = api.post("/api/pull", json={"route": "ct", "study": study, "source": "pacs"})
    assert pulled.status_code == 202, pulled.text
    assert pulled.json() == {"source": "pacs", "studies": [study]}
    wait_for(lambda: on_node(node, sops) == set(sops), timeout=30)
    # PS3.15 A.5.3.10: the C-FIND, its SOP Class and the identifier as sent
    query = wait_for(lambda: audited(node, "110112", study))
    (asked,) = query.findall("ParticipantObjectIdentification")
    assert asked.get("ParticipantObjectID") == str(StudyRootQueryRetrieveInformationModelFind)
    assert asked.find("ParticipantObjectIDTypeCode").get("csd-code") == "110181"  # type: ignore[union-attr]
    detail = asked.find("ParticipantObjectDetail")
    assert detail is not None and detail.get("type") == "TransferSyntax"
    unknown = api.post("/api/pull", json={"route": "ct", "study": generate_uid()})
    assert unknown.status_code == 404
    assert "holds no matching study" in unknown.json()["detail"]
    assert api.post("/api/pull", json={"route": "nope", "study": study}).status_code == 400
    both = {"route": "ct", "study": study, "since": "2026-12-01"}
    assert api.post("/api/pull", json=both).status_code == 422


def test_job_list_form_pulls_with_the_form_token(node: Node, pacs: Orthanc, tmp_path: Path) -> None:
    study, sops = upload_study(pacs, tmp_path, 1)
    own = f"http://127.0.0.1:{node.http.port}"
    with httpx.Client(base_url=own, timeout=30) as browser:
        assert browser.get(f"/jobs?token={TOKEN}").status_code == 303  # the session cookie
        page = browser.get("/jobs")
        match = re.search(r'action="(/jobs/pull\?csrf=[0-9a-f]+)"', page.text)
        assert match is not None, page.text
        assert "<option>pacs</option>" in page.text and "<option>ct</option>" in page.text
        form = {"route": "ct", "source": "pacs", "study": study, "since": "", "modality": ""}
        evil = browser.post(match.group(1), data=form, headers={"Origin": "https://evil.example"})
        assert evil.status_code == 403  # cross-site
        assert browser.post("/jobs/pull", data=form, headers={"Origin": own}).status_code == 403
        assert on_node(node, sops) == set()  # neither refused post pulled anything
        pulled = browser.post(match.group(1), data=form, headers={"Origin": own})
        assert pulled.status_code == 303
        assert "retrieving 1 studies from pacs" in browser.get(pulled.headers["location"]).text
        wait_for(lambda: on_node(node, sops) == set(sops), timeout=30)
        unknown = browser.post(match.group(1), data={**form, "study": generate_uid()})
        assert "holds+no+matching+study" in unknown.headers["location"]
        neither = browser.post(match.group(1), data={**form, "study": ""})
        assert "give+either+study+or+since" in neither.headers["location"]


@pytest.fixture(scope="module")
def study_node(tmp_path_factory: pytest.TempPathFactory, pacs: Orthanc) -> Iterator[Node]:
    """A node with a study-level route that fetches missing series from the PACS by C-GET
    (as the AE title Orthanc knows)."""
    settings = make_settings(
        tmp_path_factory.mktemp("fetch-missing"),
        routes=[
            {
                "name": "study-ct",
                "model": "head-ct-hemorrhage-demo",
                "level": "study",
                "fetch_missing": "pacs",
            }
        ],
        sources=[source(pacs, "get").model_dump()],
    )
    running = Node(settings, models={})
    running.start()
    yield running
    running.stop()


def study_jobs(node: Node, study: str) -> list[tuple[str, int]]:
    with node.sessions() as session:
        jobs = session.scalars(select(Job).where(Job.study_instance_uid == study))
        return [(str(job.route), job.generation) for job in jobs]


def test_study_route_fetches_the_missing_series_first(
    study_node: Node, pacs: Orthanc, tmp_path: Path
) -> None:
    study, first, second = generate_uid(), generate_uid(), generate_uid()
    images = [
        instance(study=study, series=series, Modality="CT", ImagesInAcquisition=count)
        for series, count in ((first, 2), (first, 2), (second, 1))
    ]
    pacs.upload([write(ds, tmp_path) for ds in images])
    whole = generate_uid()
    held = [instance(study=whole, Modality="CT", ImagesInAcquisition=1)]
    pacs.upload([write(held[0], tmp_path)])
    for ds in [*images[:2], *held]:  # the node is sent the first series only
        data = write(ds, tmp_path).read_bytes()
        assert study_node.scp.ingest.store(data, association_id=None, calling_ae_title="CT").ok
    assert wait_for(lambda: study_jobs(study_node, study), timeout=30) == [("study-ct", 1)]
    assert on_node(study_node, [str(ds.SOPInstanceUID) for ds in images]) == {
        str(ds.SOPInstanceUID) for ds in images
    }
    with study_node.sessions() as session:
        (fetched,) = session.scalars(
            select(Event).where(Event.kind == "missing_fetched", Event.study_instance_uid == study)
        ).all()
    assert fetched.data["fetched"] == [second]
    assert f"series {second} 1 instances" in fetched.message
    # a study the node holds whole is queued at once, with nothing fetched
    assert wait_for(lambda: study_jobs(study_node, whole), timeout=30) == [("study-ct", 0)]
    with study_node.sessions() as session:
        assert not session.scalars(
            select(Event).where(Event.kind == "missing_fetched", Event.study_instance_uid == whole)
        ).all()
