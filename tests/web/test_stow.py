"""STOW-RS into a running node (PS3.18 10.5): httpx by hand, and Orthanc's DICOMweb plugin."""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicom_ai_node.jobs.models import AuditRecord, Event, Instance
from dicom_ai_node.node import Node
from tests.support.helpers import instance, make_settings, wait_for, write
from tests.support.joblog import TOKEN
from tests.support.orthanc import running_orthanc

FAILED_SOP = "00081198"
REFERENCED_SOP = "00081199"
FAILURE_REASON = "00081197"
SOP_INSTANCE = "00081155"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    root = tmp_path_factory.mktemp("stow")
    settings = make_settings(
        root,
        http={"token": TOKEN, "stow_max_mb": 2},
        assemble={"stable_seconds": 3600},  # keep the series open: only reception is tested
    )
    running = Node(settings, models={})
    running.start()
    yield running
    running.stop()


def url(node: Node) -> str:
    return f"http://127.0.0.1:{node.http.port}/dicomweb/studies"


def multipart(*parts: tuple[str, bytes], boundary: str = "") -> tuple[bytes, str]:
    """A multipart/related body of ``(Content-Type, content)`` parts and its Content-Type."""
    boundary = boundary or uuid.uuid4().hex
    body = b"preamble, ignored\r\n"
    for content_type, content in parts:
        body += f"--{boundary}\r\nContent-Type: {content_type}\r\n\r\n".encode() + content
        body += b"\r\n"
    body += f"--{boundary}--\r\nepilogue\r\n".encode()
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def part10(ds: Dataset, folder: Path) -> bytes:
    return write(ds, folder).read_bytes()


def post(node: Node, body: bytes, content_type: str, **headers: str) -> httpx.Response:
    return httpx.post(
        url(node), content=body, headers={**AUTH, "Content-Type": content_type, **headers}
    )


def stored_uids(node: Node, study: str) -> set[str]:
    with node.sessions() as session:
        rows = session.scalars(select(Instance).where(Instance.study_instance_uid == study))
        return {row.sop_instance_uid for row in rows if node.spool.locate(row.path).is_file()}


def test_instances_stored_and_referenced(node: Node, tmp_path: Path) -> None:
    study = instance().StudyInstanceUID
    series = [instance(study=study, series="1.2.3.4.1"), instance(study=study)]
    body, content_type = multipart(*[("application/dicom", part10(ds, tmp_path)) for ds in series])
    answer = post(node, body, content_type, Accept="application/dicom+json")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/dicom+json"
    items = answer.json()[REFERENCED_SOP]["Value"]
    assert [item[SOP_INSTANCE]["Value"][0] for item in items] == [
        str(ds.SOPInstanceUID) for ds in series
    ]
    assert FAILED_SOP not in answer.json()
    assert stored_uids(node, study) == {str(ds.SOPInstanceUID) for ds in series}
    with node.sessions() as session:
        events = session.scalars(select(Event.message).where(Event.kind == "stow_received"))
        assert "2 of 2 instances stored" in " ".join(events)

    def audited() -> str | None:  # PS3.15 A.5.3.4: instances received (C) by STOW-RS
        with node.sessions() as session:
            query = select(AuditRecord.message).where(AuditRecord.event_id == "110104")
            return next((m for m in session.scalars(query) if str(study) in m), None)

    message = ET.fromstring(wait_for(audited))
    assert message.find("EventIdentification").get("EventActionCode") == "C"  # type: ignore[union-attr]
    (counted,) = message.findall("ParticipantObjectIdentification/SOPClass")
    assert counted.get("NumberOfInstances") == "2"


def test_some_parts_not_dicom_answer_202_with_reasons(node: Node, tmp_path: Path) -> None:
    good = instance()
    body, content_type = multipart(
        ("application/dicom", part10(good, tmp_path)),
        ("application/dicom", b"this is not a DICOM file"),
    )
    answer = post(node, body, content_type)
    assert answer.status_code == 202, answer.text
    failed = answer.json()[FAILED_SOP]["Value"]
    assert [item[FAILURE_REASON]["Value"] for item in failed] == [[0xC000]]
    assert stored_uids(node, good.StudyInstanceUID) == {good.SOPInstanceUID}


def test_no_part_stored_answers_409(node: Node, tmp_path: Path) -> None:
    ds = instance()
    del ds.StudyInstanceUID
    body, content_type = multipart(("application/dicom", part10(ds, tmp_path)))
    answer = post(node, body, content_type)
    assert answer.status_code == 409, answer.text
    item = answer.json()[FAILED_SOP]["Value"][0]
    assert item[FAILURE_REASON]["Value"] == [0xC000]


@pytest.mark.parametrize(
    ("parts", "content_type", "status", "detail"),
    [
        ([("text/plain", b"hello")], "", 415, "part 1 is text/plain"),
        ([("application/dicom", b"x")], "application/dicom", 415, "multipart/related"),
        ([("application/dicom", b"x")], "multipart/related", 400, "boundary"),
        (
            [("application/dicom", b"x")],
            'multipart/related; type="application/dicom+xml"; boundary=b',
            415,
            "application/dicom+xml",
        ),
    ],
)
def test_bad_requests_store_nothing(
    node: Node, parts: list[tuple[str, bytes]], content_type: str, status: int, detail: str
) -> None:
    body, default = multipart(*parts)
    answer = post(node, body, content_type or default)
    assert answer.status_code == status
    assert detail in answer.json()["detail"]


def test_xml_only_accept_is_406(node: Node) -> None:
    body, content_type = multipart(("application/dicom", b"x"))
    answer = post(node, body, content_type, Accept="application/dicom+xml")
    assert answer.status_code == 406


def test_truncated_body_is_400(node: Node, tmp_path: Path) -> None:
    body, content_type = multipart(("application/dicom", part10(instance(), tmp_path)))
    answer = post(node, body[: body.rindex(b"\r\n--")], content_type)
    assert answer.status_code == 400
    assert "not closed by a boundary" in answer.json()["detail"]


def test_body_over_the_limit_is_413(node: Node) -> None:
    body, content_type = multipart(("application/dicom", b"\0" * (3 * 2**20)))
    assert post(node, body, content_type).status_code == 413


def test_token_required(node: Node) -> None:
    body, content_type = multipart(("application/dicom", b"x"))
    answer = httpx.post(url(node), content=body, headers={"Content-Type": content_type})
    assert answer.status_code == 401
    assert answer.json() == {"detail": "a token is required"}
    wrong = {"Content-Type": content_type, "Authorization": "Bearer nope"}
    assert httpx.post(url(node), content=body, headers=wrong).status_code == 403


@pytest.mark.peers
def test_orthanc_sends_a_study_by_stow(node: Node, tmp_path: Path) -> None:
    study = instance().StudyInstanceUID
    files = [write(instance(study=study, series="1.2.3.4.9"), tmp_path) for _ in range(3)]
    servers = {
        "ainode": {
            "Url": f"http://127.0.0.1:{node.http.port}/dicomweb/",
            "HttpHeaders": {"Authorization": f"Bearer {TOKEN}"},
        }
    }
    with running_orthanc(
        tmp_path / "orthanc",
        plugins=("dicomweb",),
        config={"DicomWeb": {"Servers": servers}},
    ) as orthanc:
        study_id = orthanc.upload(files)
        orthanc.post("/dicom-web/servers/ainode/stow", {"Resources": [study_id]})
        expected = {path.stem for path in files}
        wait_for(lambda: stored_uids(node, study) == expected, timeout=10)
