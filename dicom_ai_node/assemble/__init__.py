"""assemble: decides when a series (or a whole study) is complete enough to process.

A series is complete by the first of these rules that holds (the ``rule`` of the result, and
of the ``series_complete`` event):

- ``mpps``: a Modality Performed Procedure Step that lists it is COMPLETED (PS3.4 F.7.2.2)
  and every instance the step lists for it is in; no wait. A listing completes a series once:
  instances arriving after that fall back to the stable time.
- ``expected_count``: its first generation holds as many instances as the first instance's
  Images in Acquisition (0020,1002, PS3.3 C.7.6.1) says; no wait.
- ``stable``: every association that brought instances of it has ended (released, aborted or
  lost) and no instance of it has arrived for ``stable_seconds``: the fallback.

A series or study pulled for a route (``requested_routes``) carries those routes, so that only
they are applied to it. A study
is complete when all its series are complete and it too has been quiet that long. An instance
that arrives later reopens its series and study with a new generation; they complete again
and are routed again, so late images produce a follow-up job instead of being lost.

Assemblers of several nodes may run at once: each locks the rows it completes and skips
those another holds, and the job log's unique job key settles any race left.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import (
    Association,
    Instance,
    PerformedSeries,
    PerformedStep,
    RequestedRoute,
    Series,
    SeriesState,
    Study,
)
from dicom_ai_node.receive.mpps import COMPLETED

CompletionRule = Literal["mpps", "expected_count", "stable"]


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
    rule: CompletionRule = "stable"
    # The routes its study was pulled for (``run --route``); empty: every configured route.
    requested_routes: tuple[str, ...] = ()


@dataclass(frozen=True)
class CompletedStudy:
    """A study whose series are all complete, with the series it holds."""

    study_instance_uid: str
    generation: int
    series: tuple[CompletedSeries, ...]
    requested_routes: tuple[str, ...] = ()


def _requested(session: Session, studies: set[str]) -> dict[str, tuple[str, ...]]:
    """The requested routes of each of ``studies`` that has some."""
    found: dict[str, list[str]] = {}
    if studies:
        rows = session.execute(
            select(RequestedRoute.study_instance_uid, RequestedRoute.route)
            .where(RequestedRoute.study_instance_uid.in_(studies))
            .order_by(RequestedRoute.route)
        )
        for study, route in rows:
            found.setdefault(study, []).append(route)
    return {study: tuple(routes) for study, routes in found.items()}


def _as_completed(series: Series, rule: CompletionRule = "stable") -> CompletedSeries:
    return CompletedSeries(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
        generation=series.generation,
        modality=series.modality,
        calling_ae_title=series.calling_ae_title,
        instance_count=series.instance_count,
        attributes=dict(series.attributes),
        rule=rule,
    )


def _mpps_complete(session: Session) -> list[Series]:
    """Receiving series listed by a COMPLETED step whose listed instances are all in."""
    listed = session.execute(
        select(Series, PerformedSeries)
        .join(PerformedSeries, PerformedSeries.series_instance_uid == Series.series_instance_uid)
        .join(PerformedStep, PerformedStep.sop_instance_uid == PerformedSeries.step_uid)
        .where(
            Series.state == SeriesState.RECEIVING.value,
            PerformedStep.status == COMPLETED,
            PerformedSeries.completed_generation.is_(None),
        )
        .with_for_update(skip_locked=True, of=[Series, PerformedSeries])
    ).all()
    ready = []
    for series, listing in listed:
        wanted = set(listing.sop_instance_uids)
        if not wanted or series.instance_count < len(wanted):
            continue
        present = session.scalars(
            select(Instance.sop_instance_uid).where(
                Instance.series_instance_uid == series.series_instance_uid,
                Instance.sop_instance_uid.in_(wanted),
            )
        ).all()
        if len(set(present)) == len(wanted):
            listing.completed_generation = series.generation
            if series not in ready:
                ready.append(series)
    return ready


def _count_complete(session: Session) -> list[Series]:
    """First-generation receiving series that hold their Images in Acquisition."""
    receiving = session.scalars(
        select(Series)
        .where(Series.state == SeriesState.RECEIVING.value, Series.generation == 0)
        .with_for_update(skip_locked=True, of=Series)
    ).all()
    ready = []
    for series in receiving:
        expected = series.attributes.get("ImagesInAcquisition")
        if isinstance(expected, int) and expected > 0 and series.instance_count >= expected:
            ready.append(series)
    return ready


def _stable_complete(session: Session, now: datetime, stable_seconds: float) -> list[Series]:
    """Receiving series with no open association and quiet for ``stable_seconds``."""
    cutoff = now - timedelta(seconds=stable_seconds)
    open_association = exists().where(
        Instance.series_instance_uid == Series.series_instance_uid,
        Instance.association_id == Association.id,
        Association.ended_at.is_(None),
    )
    return list(
        session.scalars(
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
    )


def complete_series(
    session: Session, now: datetime, stable_seconds: float
) -> list[CompletedSeries]:
    """Mark complete, and return, the series that are now complete, each with the rule that
    completed it (in the caller's transaction)."""
    completed: list[CompletedSeries] = []
    rules: list[tuple[CompletionRule, list[Series]]] = [
        ("mpps", _mpps_complete(session)),
        ("expected_count", _count_complete(session)),
    ]
    for rule, ready in rules:
        for series in ready:
            if series.state == SeriesState.RECEIVING.value:
                series.state = SeriesState.COMPLETE.value
                series.completed_at = now
                completed.append(_as_completed(series, rule))
    session.flush()
    for series in _stable_complete(session, now, stable_seconds):
        series.state = SeriesState.COMPLETE.value
        series.completed_at = now
        completed.append(_as_completed(series))
    requested = _requested(session, {c.study_instance_uid for c in completed})
    return [replace(c, requested_routes=requested.get(c.study_instance_uid, ())) for c in completed]


def _ready_studies(session: Session, now: datetime, stable_seconds: float) -> Sequence[Study]:
    """The receiving studies whose series are all complete and quiet (locked, skipping rows
    another node holds)."""
    cutoff = now - timedelta(seconds=stable_seconds)
    series_open = exists().where(
        Series.study_instance_uid == Study.study_instance_uid,
        Series.state != SeriesState.COMPLETE.value,
    )
    return session.scalars(
        select(Study)
        .where(
            Study.state == SeriesState.RECEIVING.value,
            Study.last_received_at <= cutoff,
            ~series_open,
        )
        .with_for_update(skip_locked=True, of=Study)
    ).all()


def _as_studies(session: Session, ready: Sequence[Study]) -> list[CompletedStudy]:
    requested = _requested(session, {study.study_instance_uid for study in ready})
    studies = []
    for study in ready:
        members = session.scalars(
            select(Series).where(Series.study_instance_uid == study.study_instance_uid)
        ).all()
        studies.append(
            CompletedStudy(
                study_instance_uid=study.study_instance_uid,
                generation=study.generation,
                series=tuple(_as_completed(series) for series in members),
                requested_routes=requested.get(study.study_instance_uid, ()),
            )
        )
    return studies


def ready_studies(session: Session, now: datetime, stable_seconds: float) -> list[CompletedStudy]:
    """The studies :func:`complete_studies` would complete now, without marking them: a look
    before completing (to fetch missing series first)."""
    return _as_studies(session, _ready_studies(session, now, stable_seconds))


def complete_studies(
    session: Session, now: datetime, stable_seconds: float
) -> list[CompletedStudy]:
    """Mark complete, and return, the studies whose series are all complete and quiet."""
    ready = _ready_studies(session, now, stable_seconds)
    for study in ready:
        study.state = SeriesState.COMPLETE.value
    return _as_studies(session, ready)


def leave_receiving(session: Session, study_instance_uid: str) -> None:
    """Undo :func:`complete_studies` for one study in the same transaction: it stays
    receiving (and completes at a later pass)."""
    study = session.get(Study, study_instance_uid)
    if study is not None:
        study.state = SeriesState.RECEIVING.value
