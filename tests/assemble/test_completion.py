"""Completion from what the sender says: MPPS (a pynetdicom MPPS SCU) and Images in
Acquisition, on a running node whose stable time is too long to ever be the reason."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    ModalityPerformedProcedureStep,
)
from sqlalchemy import select

from dicom_ai_node.jobs.models import Event, Series
from dicom_ai_node.node import Node
from tests.support.helpers import instance, make_settings, wait_for


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    settings = make_settings(
        tmp_path_factory.mktemp("completion"), assemble={"stable_seconds": 3600}
    )
    running = Node(settings, models={})
    running.start()
    yield running
    running.stop()


@pytest.fixture
def assoc(node: Node) -> Iterator[Association]:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(ModalityPerformedProcedureStep)
    association = ae.associate("127.0.0.1", node.scp.port, ae_title="AINODE")
    assert association.is_established
    yield association
    association.release()


def store(assoc: Association, datasets: list[Dataset]) -> None:
    for ds in datasets:
        assert assoc.send_c_store(ds).Status == 0x0000


def step(status: str, study: str = "", series: dict[str, list[str]] | None = None) -> Dataset:
    """An MPPS attribute list (PS3.3 C.4.13-C.4.15, the parts the node reads)."""
    ds = Dataset()
    ds.PerformedProcedureStepStatus = status
    scheduled = Dataset()
    scheduled.StudyInstanceUID = study
    ds.ScheduledStepAttributesSequence = [scheduled]
    ds.PerformedSeriesSequence = []
    for uid, sops in (series or {}).items():
        item = Dataset()
        item.SeriesInstanceUID = uid
        refs = []
        for sop in sops:
            ref = Dataset()
            ref.ReferencedSOPClassUID = CTImageStorage
            ref.ReferencedSOPInstanceUID = sop
            refs.append(ref)
        item.ReferencedImageSequence = refs
        ds.PerformedSeriesSequence.append(item)
    return ds


def create(assoc: Association, uid: str, ds: Dataset) -> int:
    status, _ = assoc.send_n_create(ds, ModalityPerformedProcedureStep, uid)
    return int(status.Status)


def update(assoc: Association, uid: str, ds: Dataset) -> Dataset:
    status, _ = assoc.send_n_set(ds, ModalityPerformedProcedureStep, uid)
    return status


def completion_rule(node: Node, series: str) -> str | None:
    with node.sessions() as session:
        event = session.scalars(
            select(Event).where(
                Event.kind == "series_complete", Event.series_instance_uid == series
            )
        ).first()
        return None if event is None else str(event.data["rule"])


def series_state(node: Node, series: str) -> str:
    with node.sessions() as session:
        row = session.get(Series, series)
        assert row is not None
        return row.state


def ct_series(count: int, images_in_acquisition: int | None = None) -> list[Dataset]:
    study, series = generate_uid(), generate_uid()
    images = [instance(study=study, series=series) for _ in range(count)]
    for ds in images:
        if images_in_acquisition is not None:
            ds.ImagesInAcquisition = images_in_acquisition
    return images


def listing(images: list[Dataset]) -> tuple[str, str, dict[str, list[str]]]:
    """(study, series, the Performed Series listing) of one series' images."""
    study, series = images[0].StudyInstanceUID, images[0].SeriesInstanceUID
    return study, series, {series: [ds.SOPInstanceUID for ds in images]}


def test_completed_step_completes_its_series_once_all_listed_instances_are_in(
    node: Node, assoc: Association
) -> None:
    images = ct_series(3)
    study, series, listed = listing(images)
    uid = generate_uid()
    assert create(assoc, uid, step("IN PROGRESS", study)) == 0x0000
    store(assoc, images[:2])
    assert update(assoc, uid, step("COMPLETED", study, listed)).Status == 0x0000
    # The step says three; two are in: the series waits (here, while the association is open).
    store(assoc, images[2:])
    assert wait_for(lambda: completion_rule(node, series), timeout=10) == "mpps"
    assert series_state(node, series) == "complete"


def test_discontinued_step_is_recorded_and_completes_nothing(
    node: Node, assoc: Association
) -> None:
    images = ct_series(2)
    study, series, listed = listing(images)
    uid = generate_uid()
    store(assoc, images)
    assert create(assoc, uid, step("IN PROGRESS", study)) == 0x0000
    assert update(assoc, uid, step("DISCONTINUED", study, listed)).Status == 0x0000
    with node.sessions() as session:
        kinds = session.scalars(
            select(Event.kind).where(
                Event.kind.like("mpps_%"), Event.data["step"].as_string() == uid
            )
        ).all()
    assert kinds == ["mpps_in_progress", "mpps_discontinued"]
    # The node's assembler has run since (a later series completes); this one has not.
    later = ct_series(1, images_in_acquisition=1)
    store(assoc, later)
    wait_for(lambda: completion_rule(node, later[0].SeriesInstanceUID), timeout=10)
    assert series_state(node, series) == "receiving"


def test_images_in_acquisition_completes_the_series(node: Node, assoc: Association) -> None:
    images = ct_series(2, images_in_acquisition=2)
    series = images[0].SeriesInstanceUID
    store(assoc, images)
    assert wait_for(lambda: completion_rule(node, series), timeout=10) == "expected_count"


def test_bad_steps_get_their_status(node: Node, assoc: Association) -> None:
    unknown = update(assoc, generate_uid(), step("COMPLETED"))
    assert unknown.Status == 0x0112  # No such SOP Instance
    uid = generate_uid()
    assert create(assoc, uid, step("COMPLETED")) == 0x0106  # must start IN PROGRESS
    assert create(assoc, uid, step("IN PROGRESS")) == 0x0000
    assert create(assoc, uid, step("IN PROGRESS")) == 0x0111  # Duplicate SOP Instance
    assert update(assoc, uid, step("FINISHED")).Status == 0x0106
    assert update(assoc, uid, step("COMPLETED")).Status == 0x0000
    ended = update(assoc, uid, step("DISCONTINUED"))
    assert (ended.Status, ended.ErrorID) == (0x0110, 0xA710)  # may no longer be updated
