"""The C-STORE SCP against real peers: DCMTK echoscu/storescu/dcmsend and pynetdicom."""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, build_context
from sqlalchemy import func, select

from dicom_ai_node.jobs.models import Association, Instance, Series
from dicom_ai_node.node import Node
from tests.support.helpers import instance, run_tool, wait_for, write

pytestmark = pytest.mark.peers

CT = "1.2.840.10008.5.1.4.1.1.2"

# One file of every transfer syntax in pydicom's own test data.
TRANSFER_SYNTAX_FILES = {
    "implicit VR little endian": "MR_small_implicit.dcm",
    "explicit VR little endian": "CT_small.dcm",
    "explicit VR big endian": "MR_small_bigendian.dcm",
    "deflated": "image_dfl.dcm",
    "RLE lossless": "MR_small_RLE.dcm",
    "JPEG baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG extended": "JPEG-lossy.dcm",
    "JPEG lossless SV1": "SC_rgb_jpeg_gdcm.dcm",
    "JPEG-LS lossless": "MR_small_jpeg_ls_lossless.dcm",
    "JPEG 2000 lossless": "MR_small_jp2klossless.dcm",
    "JPEG 2000": "JPEG2000.dcm",
}


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set of a Part 10 file, without preamble, file meta and the Data Set
    Trailing Padding (FFFC,FFFC), which DCMTK drops when sending (PS3.10 7.2 allows it)."""
    raw = path.read_bytes()
    ds = dcmread(BytesIO(raw))
    # 128-byte preamble + "DICM" + group 2 (its length is in (0002,0000) + 12 header bytes).
    data = raw[132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength) :]
    if "DataSetTrailingPadding" in ds:
        big = ds.file_meta.TransferSyntaxUID == ExplicitVRBigEndian
        data = data[: data.rfind(b"\xff\xfc\xff\xfc" if big else b"\xfc\xff\xfc\xff")]
    return data


def dcmtk_encoded(path: Path, folder: Path) -> Path:
    """``path`` as DCMTK itself writes it (no group lengths...), which is what its network
    tools put on the wire; comparing with it checks that the node changed no byte."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / path.name
    run_tool("dcmconv", str(path), str(out))
    return out


def stored(node: Node) -> dict[str, Instance]:
    with node.sessions() as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


@pytest.fixture
def node(node_factory: Callable[..., Node]) -> Node:
    return node_factory()


def test_echoscu_gets_an_answer(node: Node) -> None:
    result = run_tool("echoscu", "-aec", "AINODE", "127.0.0.1", str(node.scp.port))
    assert result.returncode == 0


def test_storescu_file_is_stored_byte_for_byte(node: Node, tmp_path: Path) -> None:
    sent = dcmtk_encoded(write(instance(), tmp_path / "in"), tmp_path / "dcmtk")
    run_tool("storescu", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(sent))
    ds = dcmread(sent, stop_before_pixels=True)
    row = stored(node)[ds.SOPInstanceUID]
    assert dataset_bytes(node.spool.locate(row.path)) == dataset_bytes(sent)
    assert node.spool.locate(row.path).relative_to(node.spool.incoming).parts == (
        ds.StudyInstanceUID,
        ds.SeriesInstanceUID,
        f"{ds.SOPInstanceUID}.dcm",
    )
    assert row.transfer_syntax_uid == ExplicitVRLittleEndian


@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAX_FILES))
def test_every_transfer_syntax_is_stored_as_sent(node: Node, name: str, tmp_path: Path) -> None:
    path = get_testdata_file(TRANSFER_SYNTAX_FILES[name])
    assert path is not None
    sent = dcmtk_encoded(Path(path), tmp_path)
    # dcmsend proposes each file's own transfer syntax, compressed ones included; for
    # uncompressed files it proposes explicit VR little endian first, so those go by
    # storescu told to propose the file's syntax first.
    sender = {
        "implicit VR little endian": ["storescu", "--propose-implicit"],
        "explicit VR big endian": ["storescu", "--propose-big"],
    }.get(name, ["dcmsend"])
    run_tool(*sender, "-aec", "AINODE", "127.0.0.1", str(node.scp.port), str(sent))
    ds = dcmread(sent, stop_before_pixels=True)
    row = stored(node)[ds.SOPInstanceUID]
    assert row.transfer_syntax_uid == ds.file_meta.TransferSyntaxUID
    if ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        # DCMTK deflates the data set anew when sending (and pads the stream to an even
        # length), so the bytes on the wire are not the file's: compare what they encode.
        assert dcmread(node.spool.locate(row.path)) == dcmread(sent)
    else:
        assert dataset_bytes(node.spool.locate(row.path)) == dataset_bytes(sent)


def test_compressed_syntax_is_preferred_when_offered_beside_uncompressed(node: Node) -> None:
    ds = instance("MR_small_jp2klossless.dcm")
    ae = AE(ae_title="PREFER")
    ae.requested_contexts = [
        build_context(
            ds.SOPClassUID, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless]
        )
    ]
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert assoc.is_established
    assert assoc.accepted_contexts[0].transfer_syntax[0] == JPEG2000Lossless
    status = assoc.send_c_store(ds)
    assoc.release()
    assert status.Status == 0x0000
    assert stored(node)[ds.SOPInstanceUID].transfer_syntax_uid == JPEG2000Lossless


def test_calling_ae_not_allowed_is_rejected(node_factory: Callable[..., Node]) -> None:
    node = node_factory(dicom={"allowed_calling_aets": ["PACS"]})
    refused = run_tool(
        "echoscu",
        "-aet",
        "STRANGER",
        "-aec",
        "AINODE",
        "127.0.0.1",
        str(node.scp.port),
        check=False,
    )
    assert refused.returncode != 0
    assert "Rejected" in refused.stderr or "reject" in refused.stderr.lower()
    allowed = run_tool(
        "echoscu", "-aet", "PACS", "-aec", "AINODE", "127.0.0.1", str(node.scp.port), check=False
    )
    assert allowed.returncode == 0


def test_wrong_called_ae_is_rejected(node: Node) -> None:
    ae = AE(ae_title="SENDER")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="NOTTHENODE")
    assert assoc.is_rejected


def test_several_senders_at_once_lose_nothing(node: Node) -> None:
    senders, per_sender = 5, 12
    template = instance()
    sent: list[str] = []
    errors: list[str] = []
    lock = threading.Lock()

    def sender(n: int) -> None:
        ae = AE(ae_title=f"SENDER{n}")
        ae.add_requested_context(CT, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
        if not assoc.is_established:
            errors.append(f"sender {n}: no association")
            return
        series = generate_uid()
        for _ in range(per_sender):
            ds = copy.deepcopy(template)
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = generate_uid()
            status = assoc.send_c_store(ds)
            with lock:
                if status and status.Status == 0:
                    sent.append(ds.SOPInstanceUID)
                else:
                    errors.append(f"sender {n}: {status}")
        assoc.release()

    threads = [threading.Thread(target=sender, args=(n,)) for n in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    rows = stored(node)
    assert len(rows) == len(sent), (len(rows), len(sent))
    assert sorted(rows) == sorted(sent)
    assert len(sent) == senders * per_sender
    assert all(node.spool.locate(row.path).is_file() for row in rows.values())
    with node.sessions() as session:
        counts = session.scalars(select(Series.instance_count)).all()
        assocs = session.scalars(select(Association).where(Association.instances > 0)).all()
    assert sorted(counts) == [per_sender] * senders
    assert len(assocs) == senders


def _send(node: Node, *datasets: Dataset, calling: str = "TESTSCU") -> list[Dataset]:
    ae = AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert assoc.is_established
    statuses = [assoc.send_c_store(ds) for ds in datasets]
    assoc.release()
    return statuses


def test_duplicate_sop_instance_replaces_and_is_counted_once(node: Node) -> None:
    first = instance(PatientName="First^Copy")
    second = copy.deepcopy(first)
    second.PatientName = "Second^Copy"
    statuses = _send(node, first, second)
    assert [s.Status for s in statuses] == [0, 0]
    rows = stored(node)
    assert list(rows) == [first.SOPInstanceUID]
    assert dcmread(node.spool.locate(rows[first.SOPInstanceUID].path)).PatientName == "Second^Copy"
    with node.sessions() as session:
        series = session.get(Series, first.SeriesInstanceUID)
        assert series is not None and series.instance_count == 1
    files = list(node.spool.incoming.rglob("*.dcm"))
    assert len(files) == 1


def test_data_set_without_series_uid_gets_cannot_understand(node: Node) -> None:
    bad = instance()
    del bad.SeriesInstanceUID
    good = instance()
    statuses = _send(node, bad, good)
    assert statuses[0].Status == 0xC000
    assert "SeriesInstanceUID" in statuses[0].ErrorComment
    assert statuses[1].Status == 0x0000
    assert list(stored(node)) == [good.SOPInstanceUID]


def test_uid_with_path_characters_never_escapes_the_spool(node: Node) -> None:
    bad = instance(study="1.2.3/../../../../tmp")
    statuses = _send(node, bad)
    assert statuses[0].Status == 0xC000
    assert not stored(node)
    assert not list(node.spool.root.parent.rglob(f"{bad.SOPInstanceUID}.dcm"))


def test_refuses_with_out_of_resources_below_the_free_space_floor(
    node_factory: Callable[..., Node],
) -> None:
    node = node_factory(storage={"min_free_mb": 10**9})  # a petabyte: always below
    statuses = _send(node, instance())
    assert statuses[0].Status == 0xA700
    assert not stored(node)


def test_association_end_is_recorded(node: Node) -> None:
    _send(node, instance(), calling="ENDTEST")

    def ended() -> Association | None:
        with node.sessions() as session:
            return session.scalars(
                select(Association).where(
                    Association.calling_ae_title == "ENDTEST", Association.ended_at.is_not(None)
                )
            ).first()

    assoc = wait_for(ended, timeout=5)
    assert assoc.outcome == "released"
    assert assoc.instances == 1


def test_rle_from_pydicom_client_keeps_its_syntax(node: Node) -> None:
    ds = instance("MR_small_RLE.dcm")
    assert ds.file_meta.TransferSyntaxUID == RLELossless
    statuses = _send(node, ds)
    assert statuses[0].Status == 0
    with node.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
    assert stored(node)[ds.SOPInstanceUID].transfer_syntax_uid == RLELossless
