"""The Modality Performed Procedure Step SOP Class as SCP (PS3.4 Annex F.7).

A modality (or the RIS/PACS that forwards its MPPS) creates a step with N-CREATE (status
``IN PROGRESS``) and ends it with N-SET (``COMPLETED`` or ``DISCONTINUED``), listing the series
it made and their instances in the Performed Series Sequence (0040,0340). The node records the
step and the series it lists; the assembler completes a listed series as soon as every
instance the COMPLETED step names is in the spool (see :mod:`dicom_ai_node.assemble`).

Statuses (PS3.4 F.7.2.1.3, F.7.2.2.3; PS3.7 Annex C): 0x0111 for an N-CREATE of a step that
exists, 0x0112 for an N-SET of a step the node does not know, 0x0106 for a status value
outside PS3.3 C.4.14, 0x0110 with Error ID 0xA710 for an N-SET of a step that has already
ended, 0x0110 when the attribute list cannot be read or the job log fails.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from sqlalchemy import delete, insert
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.models import PerformedSeries, PerformedStep, utcnow
from dicom_ai_node.jobs.store import add_event

log = logging.getLogger(__name__)

IN_PROGRESS, COMPLETED, DISCONTINUED = "IN PROGRESS", "COMPLETED", "DISCONTINUED"
_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)

STATUS_SUCCESS = 0x0000
STATUS_INVALID_ATTRIBUTE_VALUE = 0x0106
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_DUPLICATE_SOP_INSTANCE = 0x0111
STATUS_NO_SUCH_SOP_INSTANCE = 0x0112
ERROR_ID_NO_LONGER_UPDATABLE = 0xA710  # PS3.4 F.7.2.2.4


class StepRefusedError(Exception):
    """An N-CREATE or N-SET the node answers with a failure ``status``."""

    def __init__(self, status: int, reason: str, error_id: int | None = None) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.error_id = error_id

    def as_status(self) -> Dataset:
        """The response status with an Error Comment (and Error ID) (PS3.7 C.4.2)."""
        status = Dataset()
        status.Status = self.status
        status.ErrorComment = self.reason[:64]
        if self.error_id is not None:
            status.ErrorID = self.error_id
        return status


@dataclass(frozen=True)
class StepAttributes:
    """What the node keeps of a step's attribute list (``None``: not in this message)."""

    status: str | None
    study_instance_uid: str | None
    series: dict[str, tuple[str, ...]] | None


def _text(value: object) -> str:
    return str(value or "").strip().rstrip("\0")


def read_step(ds: Dataset) -> StepAttributes:
    """The Performed Procedure Step Status (0040,0252), the Study Instance UID of the first
    Scheduled Step Attributes item (0040,0270) and, per Performed Series Sequence item, its
    Series Instance UID and the instances of its Referenced Image (0008,1140) and Referenced
    Non-Image Composite SOP Instance (0040,0220) Sequences (PS3.3 C.4.13, C.4.14, C.4.15).
    Raises :class:`StepRefusedError`."""
    try:
        status = (
            _text(ds.PerformedProcedureStepStatus) if "PerformedProcedureStepStatus" in ds else None
        )
        study = None
        for item in ds.get("ScheduledStepAttributesSequence") or []:
            study = _text(item.get("StudyInstanceUID")) or None
            break
        series: dict[str, tuple[str, ...]] | None = None
        if "PerformedSeriesSequence" in ds:
            series = {}
            for item in ds.PerformedSeriesSequence or []:
                uid = _text(item.get("SeriesInstanceUID"))
                if not uid:
                    continue
                refs = [
                    _text(ref.get("ReferencedSOPInstanceUID"))
                    for keyword in (
                        "ReferencedImageSequence",
                        "ReferencedNonImageCompositeSOPInstanceSequence",
                    )
                    for ref in item.get(keyword) or []
                ]
                series[uid] = tuple(sorted({ref for ref in refs if ref}))
    except Exception as exc:  # pydicom's deferred decode raises whatever it meets
        raise StepRefusedError(
            STATUS_PROCESSING_FAILURE, f"cannot read the attribute list: {type(exc).__name__}"
        ) from exc
    if status is not None and status not in _STATUSES:
        raise StepRefusedError(
            STATUS_INVALID_ATTRIBUTE_VALUE, f"Performed Procedure Step Status {status!r}"
        )
    return StepAttributes(status, study, series)


class PerformedSteps:
    """Records MPPS N-CREATE and N-SET requests in the job log."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        """A job-log transaction; a failure of the job log itself is refused with 0x0110."""
        try:
            with self.sessions.begin() as session:
                yield session
        except StepRefusedError:
            raise
        except Exception as exc:
            log.exception("MPPS: cannot record a step in the job log")
            raise StepRefusedError(
                STATUS_PROCESSING_FAILURE, f"job log unavailable: {type(exc).__name__}"
            ) from exc

    def create(self, uid: str | None, calling_ae_title: str, ds: Dataset) -> tuple[str, Dataset]:
        """N-CREATE: a new step, which must be ``IN PROGRESS`` (PS3.4 F.7.2.1.2). Returns
        its SOP Instance UID (made here when the request had none) and the attribute list
        to answer with. Raises :class:`StepRefusedError`."""
        step = read_step(ds)
        if step.status != IN_PROGRESS:
            raise StepRefusedError(
                STATUS_INVALID_ATTRIBUTE_VALUE,
                f"a new step must be {IN_PROGRESS}, not {step.status or 'empty'}",
            )
        uid = uid or generate_uid()
        with self._transaction() as session:
            if session.get(PerformedStep, uid) is not None:
                raise StepRefusedError(STATUS_DUPLICATE_SOP_INSTANCE, f"step {uid} exists")
            session.add(
                PerformedStep(
                    sop_instance_uid=uid,
                    status=IN_PROGRESS,
                    calling_ae_title=calling_ae_title[:16],
                    study_instance_uid=step.study_instance_uid,
                )
            )
            session.flush()
            self._record(session, uid, step, calling_ae_title)
        return uid, ds

    def update(self, uid: str, calling_ae_title: str, ds: Dataset) -> Dataset:
        """N-SET: change a step that is ``IN PROGRESS`` (PS3.4 F.7.2.2.2). Returns the
        attribute list to answer with. Raises :class:`StepRefusedError`."""
        step = read_step(ds)
        with self._transaction() as session:
            row = session.get(PerformedStep, uid)
            if row is None:
                raise StepRefusedError(STATUS_NO_SUCH_SOP_INSTANCE, f"no step {uid}")
            if row.status != IN_PROGRESS:
                raise StepRefusedError(
                    STATUS_PROCESSING_FAILURE,
                    f"step is {row.status}: it may no longer be updated",
                    ERROR_ID_NO_LONGER_UPDATABLE,
                )
            if step.status is not None:
                row.status = step.status
            row.updated_at = utcnow()
            self._record(session, uid, step, calling_ae_title)
        return ds

    @staticmethod
    def _record(session: Session, uid: str, step: StepAttributes, calling: str) -> None:
        if step.series is not None:  # N-SET replaces a sequence whole (PS3.4 F.7.2.2.2)
            session.execute(delete(PerformedSeries).where(PerformedSeries.step_uid == uid))
            if step.series:
                session.execute(
                    insert(PerformedSeries),
                    [
                        {"step_uid": uid, "series_instance_uid": s, "sop_instance_uids": list(i)}
                        for s, i in step.series.items()
                    ],
                )
        if step.status is not None:
            listed = len(step.series or {})
            add_event(
                session,
                f"mpps_{step.status.replace(' ', '_').lower()}",
                f"MPPS {uid} from {calling}: {step.status}, {listed} series listed",
                study=step.study_instance_uid,
                step=uid,
            )
