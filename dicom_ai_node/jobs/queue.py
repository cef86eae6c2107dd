"""The job queue: enqueue, claim with a lease, renew, finish, recover, retry.

A worker claims the most urgent queued job (priority, then age) with one UPDATE whose
sub-select carries ``FOR UPDATE SKIP LOCKED``: on PostgreSQL several workers on several hosts
skip each other's rows; on SQLite the clause renders as nothing and ``BEGIN IMMEDIATE``
serialises writers instead. A claimed job holds a lease that its worker renews.

When a job's worker dies (its lease ran out, or its node restarts and finds the job still
running), the lost attempt is judged by :func:`interrupted` (the crash policy of
``docs/reliability.md``): an attempt during which the process crashed on its own, running only
this job, counts against ``max_attempts``; one ended from outside (a kill, a lost host, a lease
that expired) does not, up to ``max_interruptions`` in a row as a backstop.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

from pydantic import BaseModel
from sqlalchemy import ColumnElement, func, select, update
from sqlalchemy.orm import QueryableAttribute, Session

from dicom_ai_node.jobs.crashes import CrashLookup, summary
from dicom_ai_node.jobs.models import Delivery, DeliveryState, Feedback, Job, JobState, utcnow
from dicom_ai_node.jobs.store import add_event, upsert

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttemptLimits:
    """How many failed attempts a job gets, and how many interrupted ones (a backstop against
    a job whose process is killed from outside every time, e.g. by the OOM killer)."""

    max_attempts: int
    max_interruptions: int


def charged(job: Job) -> int:
    """The attempts that count against the job: all but those interrupted from outside."""
    return job.attempts - job.interruptions


@dataclass(frozen=True)
class JobSpec:
    """A job to queue: which data, which route and model, where the results go."""

    level: str
    study_instance_uid: str
    series_instance_uid: str | None
    generation: int
    modality: str
    route: str
    model: str
    outputs: tuple[str, ...]
    destinations: tuple[str, ...]
    priority: int
    shadow: bool = False


def recorded_weights(session: Session, model: str, version: str) -> set[str]:
    """The weights hashes the job log has recorded for ``model`` at ``version``."""
    rows = session.scalars(
        select(Job.weights_sha256)
        .where(Job.model == model, Job.model_version == version, Job.weights_sha256.is_not(None))
        .distinct()
    )
    return {str(sha) for sha in rows}


def add_feedback(session: Session, job_id: int, agree: bool, comment: str, author: str) -> Feedback:
    """Record a radiologist's agreement with a finished job's finding. Raises ``LookupError``
    for an unknown job and ``ValueError`` for one without a finding yet."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.label is None:
        raise ValueError(f"job {job_id} has no finding to agree with (state {job.state})")
    feedback = Feedback(job_id=job_id, agree=agree, comment=comment, author=author)
    session.add(feedback)
    session.flush()
    add_event(
        session,
        "feedback",
        f"job {job_id}: {author} {'agrees' if agree else 'disagrees'} with {job.label}",
        job_id=job_id,
        study=job.study_instance_uid,
        series=job.series_instance_uid,
    )
    return feedback


def latest_feedback(session: Session) -> list[tuple[str, str, bool, bool]]:
    """(model, version, the job's finding was positive, the latest feedback agrees) per job
    with feedback."""
    latest = select(func.max(Feedback.id).label("id")).group_by(Feedback.job_id).subquery()
    rows = session.execute(
        select(Job.model, Job.model_version, Job.positive, Feedback.agree)
        .join(Feedback, Feedback.job_id == Job.id)
        .join(latest, latest.c.id == Feedback.id)
        .where(Job.positive.is_not(None))
    ).all()
    return [(str(m), str(v or ""), bool(p), bool(a)) for m, v, p, a in rows]


def worker_id(node_name: str | None = None) -> str:
    """An id naming this process, for leases: ``<node>:<pid>``."""
    return f"{node_name or socket.gethostname()}:{os.getpid()}"


def held_by(column: QueryableAttribute[str | None], holder: str) -> ColumnElement[bool]:
    """``column`` names ``holder``: one process (``<node>:<pid>``, as :func:`worker_id`
    makes it) or, given a node name, any process of that node."""
    if ":" in holder:
        return column == holder
    return column.startswith(f"{holder}:", autoescape=True)


def node_of(owner: str) -> str:
    """The node of a lease owner (:func:`worker_id`): ``<node>`` of ``<node>:<pid>``."""
    node, colon, _pid = owner.rpartition(":")
    return node if colon else owner


def job_key(level: str, study: str, series: str | None, generation: int, route: str) -> str:
    """The job's unique key: one job per series (or study), generation and route."""
    return f"{level}:{series or study}:{generation}:{route}"


def _insert_once(session: Session, **values: object) -> Job | None:
    """Insert a job unless one with its key exists (several nodes may race to queue it);
    the new job, or ``None`` when another got there first."""
    job_id = session.execute(
        upsert(session, Job)
        .values(**values)
        .on_conflict_do_nothing(index_elements=["unique_key"])
        .returning(Job.id)
    ).scalar_one_or_none()
    return None if job_id is None else session.get(Job, job_id)


def enqueue(session: Session, specs: Iterable[JobSpec]) -> list[Job]:
    """Queue one job per spec (in the caller's transaction); a spec whose job exists
    already (queued by another node) is left out of the list returned."""
    jobs = []
    for spec in specs:
        now = utcnow()
        job = _insert_once(
            session,
            level=spec.level,
            study_instance_uid=spec.study_instance_uid,
            series_instance_uid=spec.series_instance_uid,
            generation=spec.generation,
            modality=spec.modality,
            route=spec.route,
            model=spec.model,
            outputs=list(spec.outputs),
            destinations=list(spec.destinations),
            priority=spec.priority,
            shadow=spec.shadow,
            state=JobState.QUEUED.value,
            created_at=now,
            updated_at=now,
            unique_key=job_key(
                spec.level,
                spec.study_instance_uid,
                spec.series_instance_uid,
                spec.generation,
                spec.route,
            ),
        )
        if job is None:
            continue
        add_event(
            session,
            "job_queued",
            f"job {job.id} queued: route {spec.route}, model {spec.model}, "
            f"priority {spec.priority}{', shadow mode' if spec.shadow else ''}",
            job_id=job.id,
            study=spec.study_instance_uid,
            series=spec.series_instance_uid,
        )
        jobs.append(job)
    return jobs


def record_skipped(
    session: Session,
    study: str,
    series: str,
    generation: int,
    modality: str,
    reason: str,
) -> Job | None:
    """Record a series that no route wanted, as a job in state ``skipped`` with the reason
    (``None`` when another node recorded it already)."""
    now = utcnow()
    job = _insert_once(
        session,
        level="series",
        study_instance_uid=study,
        series_instance_uid=series,
        generation=generation,
        modality=modality,
        state=JobState.SKIPPED.value,
        error=reason,
        created_at=now,
        updated_at=now,
        finished_at=now,
        unique_key=job_key("series", study, series, generation, ""),
    )
    if job is None:
        return None
    add_event(session, "series_skipped", reason, job_id=job.id, study=study, series=series)
    return job


def claim(
    session: Session,
    owner: str,
    lease_seconds: float,
    max_attempts: int,
    now: datetime | None = None,
) -> Job | None:
    """Claim the most urgent queued job for ``owner`` and mark it running, ``ran_by`` its
    node; ``None`` when there is none. (Running jobs whose lease expired are put back by
    :func:`reap_expired` first.)
    """
    now = now or utcnow()
    next_id = (
        select(Job.id)
        .where(
            Job.state == JobState.QUEUED.value,
            Job.attempts - Job.interruptions < max_attempts,
        )
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
        .scalar_subquery()
    )
    claimed = session.execute(
        update(Job)
        .where(Job.id == next_id)
        .values(
            state=JobState.RUNNING.value,
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            ran_by=node_of(owner),
            attempts=Job.attempts + 1,
            started_at=now,
            updated_at=now,
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).scalar_one_or_none()
    if claimed is None:
        return None
    job = session.get(Job, claimed, populate_existing=True)
    assert job is not None
    add_event(
        session,
        "job_running",
        f"job {job.id} claimed by {owner} (attempt {job.attempts})",
        job_id=job.id,
        study=job.study_instance_uid,
        series=job.series_instance_uid,
    )
    return job


def renew(session: Session, job_id: int, owner: str, lease_seconds: float) -> bool:
    """Extend a lease; ``False`` if the job is no longer ours (lease lost to another)."""
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING.value)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def transition(
    session: Session,
    job_id: int,
    state: JobState,
    message: str,
    *,
    owner: str | None = None,
    **fields: object,
) -> bool:
    """Move a job to ``state`` and log it; with ``owner``, only if we still hold its lease."""
    now = utcnow()
    condition = [Job.id == job_id]
    if owner is not None:
        condition += [Job.lease_owner == owner, Job.state == JobState.RUNNING.value]
    values: dict[str, object] = {"state": state.value, "updated_at": now, **fields}
    if state in (JobState.DONE, JobState.FAILED, JobState.FAILED_TO_DELIVER):
        values["finished_at"] = now
    if state != JobState.RUNNING:
        values["lease_owner"] = None
        values["lease_expires_at"] = None
    result = session.execute(
        update(Job).where(*condition).values(**values).execution_options(synchronize_session=False)
    )
    if not result.rowcount:  # type: ignore[attr-defined]
        return False
    job = session.get(Job, job_id, populate_existing=True)
    assert job is not None
    add_event(
        session,
        f"job_{state.value}",
        message,
        job_id=job_id,
        study=job.study_instance_uid,
        series=job.series_instance_uid,
    )
    return True


def interrupted(
    session: Session, job: Job, crash: str | None, limits: AttemptLimits, *, alone: bool
) -> None:
    """Judge the attempt of a running job whose worker is gone, and queue or fail the job.

    ``crash`` is what the worker's process wrote as it crashed (:mod:`jobs.crashes`), or
    ``None`` when it was stopped from outside: then the attempt is not the job's fault and is
    not counted. A crash is counted against the job only when the job was ``alone``, the only
    one its process was running; otherwise no single job can be blamed.
    """
    owner = job.lease_owner or "?"
    if crash is not None and alone:
        if charged(job) >= limits.max_attempts:
            transition(
                session,
                job.id,
                JobState.FAILED,
                f"job {job.id} failed: its worker process crashed during {charged(job)} "
                f"attempts, the last ({owner}) with: {crash}",
                error=f"the worker process crashed on this job {charged(job)} times "
                f"({summary(crash)}); `jobs retry {job.id}` runs it again",
            )
        else:
            transition(
                session,
                job.id,
                JobState.QUEUED,
                f"job {job.id} attempt {job.attempts} counted as failed: its worker process "
                f"({owner}) crashed with: {crash}",
                error=f"worker process crashed: {summary(crash)}",
            )
        return
    cause = "crashed while running other work too" if crash else "stopped (killed or lost)"
    if job.interruptions + 1 >= limits.max_interruptions:
        transition(
            session,
            job.id,
            JobState.FAILED,
            f"job {job.id} failed: its worker {cause} during {job.interruptions + 1} attempts",
            interruptions=job.interruptions + 1,
            error=f"interrupted {job.interruptions + 1} times: its worker process died each "
            f"time it ran this job (out of memory?); `jobs retry {job.id}` runs it again",
        )
    else:
        transition(
            session,
            job.id,
            JobState.QUEUED,
            f"job {job.id} attempt {job.attempts} interrupted, not counted: its worker "
            f"({owner}) {cause}",
            interruptions=job.interruptions + 1,
        )


def recover(
    session: Session, holder: str, crash_of: CrashLookup, limits: AttemptLimits
) -> dict[int, str]:
    """Judge the jobs a node (at its startup) or one of its processes (when it died) was
    running (:func:`interrupted`); ``holder`` as for :func:`held_by`.

    Returns the jobs that were running, by id, with the lease owner each had.
    """
    running = session.scalars(
        select(Job).where(Job.state == JobState.RUNNING.value, held_by(Job.lease_owner, holder))
    ).all()
    return _judge(session, running, crash_of, limits)


def reap_expired(
    session: Session, crash_of: CrashLookup, limits: AttemptLimits, now: datetime | None = None
) -> list[str]:
    """Judge the running jobs whose lease expired (their worker died or hung, on any host);
    returns the lease owners whose jobs were judged, so their crash records can go."""
    now = now or utcnow()
    expired = session.scalars(
        select(Job)
        .where(Job.state == JobState.RUNNING.value, Job.lease_expires_at < now)
        .with_for_update(skip_locked=True)
    ).all()
    return sorted(set(_judge(session, expired, crash_of, limits).values()))


def _judge(
    session: Session, jobs: Sequence[Job], crash_of: CrashLookup, limits: AttemptLimits
) -> dict[int, str]:
    """:func:`interrupted` on each job, counting what each owner ran before any is moved."""
    owners = {job.id: job.lease_owner or "" for job in jobs}
    counts = session.execute(
        select(Job.lease_owner, func.count())
        .where(Job.state == JobState.RUNNING.value, Job.lease_owner.in_(set(owners.values())))
        .group_by(Job.lease_owner)
    )
    running = {owner: count for owner, count in counts}
    for job in jobs:
        owner = owners[job.id]
        interrupted(session, job, crash_of(owner), limits, alone=running.get(owner) == 1)
    return owners


def retry(session: Session, job_id: int) -> Job:
    """Queue a finished or failed job again (operator action), with fresh attempts.

    Raises ``LookupError`` for an unknown id and ``ValueError`` for a job that is queued or
    running already.
    """
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.state in (JobState.QUEUED.value, JobState.RUNNING.value):
        raise ValueError(f"job {job_id} is {job.state} already")
    if job.state == JobState.SKIPPED.value:
        raise ValueError(f"job {job_id} was skipped (no route matched); nothing to retry")
    transition(
        session,
        job_id,
        JobState.QUEUED,
        f"job {job_id} queued again by an operator",
        attempts=0,
        interruptions=0,
        error=None,
    )
    session.refresh(job)
    return job


def settle_job(session: Session, job_id: int) -> bool:
    """Close a delivering job once none of its deliveries is pending or awaiting its
    storage commitment; ``True`` if done."""
    job = session.get(Job, job_id)
    if job is None or job.state != JobState.DELIVERING.value:
        return False
    states = set(session.scalars(select(Delivery.state).where(Delivery.job_id == job_id)).all())
    if states & {DeliveryState.PENDING.value, DeliveryState.SENT.value}:
        return False
    if DeliveryState.FAILED.value in states:
        transition(
            session,
            job_id,
            JobState.FAILED_TO_DELIVER,
            f"job {job_id}: some results could not be delivered",
            error="delivery failed",
        )
        log.warning(
            "job %d failed_to_deliver: some results could not be delivered",
            job_id,
            extra={"job_id": job_id},
        )
        return False
    transition(session, job_id, JobState.DONE, f"job {job_id}: all results delivered")
    log.info("job %d done: all results delivered", job_id, extra={"job_id": job_id})
    return True


def versions(session: Session, job: Job) -> list[Job]:
    """Every run of ``job``'s series (or study) and route, oldest generation first: a series
    that late instances reopened is processed again as a new generation, whose results
    amend the earlier ones."""
    query = select(Job).where(
        Job.level == job.level,
        Job.study_instance_uid == job.study_instance_uid,
    )
    query = query.where(
        Job.series_instance_uid.is_(None)
        if job.series_instance_uid is None
        else Job.series_instance_uid == job.series_instance_uid
    )
    query = query.where(Job.route.is_(None) if job.route is None else Job.route == job.route)
    return list(session.scalars(query.order_by(Job.generation, Job.id)).all())


def resend(session: Session, job_id: int) -> int:
    """Make a job's failed deliveries pending again (operator retry); returns how many."""
    result = session.execute(
        update(Delivery)
        .where(
            Delivery.job_id == job_id,
            Delivery.state == DeliveryState.FAILED.value,
        )
        .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    count = int(result.rowcount)  # type: ignore[attr-defined]
    if count:
        transition(
            session,
            job_id,
            JobState.DELIVERING,
            f"job {job_id}: {count} failed deliveries queued again by an operator",
        )
    return count


class RetryOutcome(BaseModel):
    job_id: int
    action: Literal["requeued", "resend"]
    deliveries: int
    state: str


def retry_job(session: Session, job_id: int) -> RetryOutcome:
    """The operator's retry (``dicom-ai-node jobs retry``, the API and the dashboard alike):
    re-send the failed deliveries of a job that failed to deliver, else run the job again.
    Raises ``LookupError`` for an unknown job and ``ValueError`` for one that cannot be
    retried now."""
    job = session.get(Job, job_id)
    if job is None:
        raise LookupError(f"no job {job_id}")
    if job.state == JobState.FAILED_TO_DELIVER.value:
        count = resend(session, job_id)
        session.refresh(job)
        return RetryOutcome(job_id=job_id, action="resend", deliveries=count, state=job.state)
    job = retry(session, job_id)
    return RetryOutcome(job_id=job_id, action="requeued", deliveries=0, state=job.state)
