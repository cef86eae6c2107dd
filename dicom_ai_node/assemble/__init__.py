"""assemble: decides when a series (or a whole study) is complete enough to process.

A series is complete when every association that brought instances of it has ended
(released, aborted or lost) and no instance of it has arrived for ``stable_seconds``. A study
is complete when all its series are complete and it too has been quiet that long. An instance
that arrives later reopens its series and study with a new generation; they complete again
and are routed again, so late images produce a follow-up job instead of being lost.

Assemblers of several nodes may run at once: each locks the rows it completes and skips
those another holds, and the job log's unique job key settles any race left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Association, Instance, Series, SeriesState, Study


@dataclass(frozen=True)
class CompletedSeries:
    """A series that has just become complete, with what routing needs to know of it."""

    study_instance_uid: str
    series_instance_uid: str
    generation: int
    modality: str
    calling_ae_title: str
    instance_count: int
    attributes: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CompletedStudy:
    """A study whose series are all complete, with the series it holds."""

    study_instance_uid: str
    generation: int
    series: tuple[CompletedSeries, ...]


def _as_completed(series: Series) -> CompletedSeries:
    return CompletedSeries(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        generation=series.generation,
        modality=series.modality,
        calling_ae_title=series.calling_ae_title,
        instance_count=series.instance_count,
        attributes=dict(series.attributes),
    )


def complete_series(
    session: Session, now: datetime, stable_seconds: float
) -> list[CompletedSeries]:
    """Mark complete, and return, the series that are now complete (in the caller's transaction)."""
    cutoff = now - timedelta(seconds=stable_seconds)
    open_association = exists().where(
        Instance.series_instance_uid == Series.series_instance_uid,
        Instance.association_id == Association.id,
        Association.ended_at.is_(None),
    )
    ready = session.scalars(
        select(Series)
        .where(
            Series.state == SeriesState.RECEIVING.value,
            Series.last_received_at <= cutoff,
            ~open_association,
        )
        .order_by(Series.last_received_at)
        # Assemblers of other nodes skip the series this one is completing (PostgreSQL).
        .with_for_update(skip_locked=True, of=Series)
    ).all()
    for series in ready:
        series.state = SeriesState.COMPLETE.value
        series.completed_at = now
    return [_as_completed(series) for series in ready]


def complete_studies(
    session: Session, now: datetime, stable_seconds: float
) -> list[CompletedStudy]:
    """Mark complete, and return, the studies whose series are all complete and quiet."""
    cutoff = now - timedelta(seconds=stable_seconds)
    series_open = exists().where(
        Series.study_instance_uid == Study.study_instance_uid,
        Series.state != SeriesState.COMPLETE.value,
    )
    ready = session.scalars(
        select(Study)
        .where(
            Study.state == SeriesState.RECEIVING.value,
            Study.last_received_at <= cutoff,
            ~series_open,
        )
        .with_for_update(skip_locked=True, of=Study)
    ).all()
    studies = []
    for study in ready:
        study.state = SeriesState.COMPLETE.value
        members = session.scalars(
            select(Series).where(Series.study_instance_uid == study.study_instance_uid)
        ).all()
        studies.append(
            CompletedStudy(
                study_instance_uid=study.study_instance_uid,
                generation=study.generation,
                series=tuple(_as_completed(series) for series in members),
            )
        )
    return studies
