"""The job queue on a real SQLite job log: claim order, leases, recovery, concurrency."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.models import Event, Job, JobState, utcnow
from dicom_ai_node.jobs.queue import JobSpec, claim, enqueue, recover, renew, retry
from tests.support.helpers import claim_from_threads


def spec(priority: int = 0, series: str = "1.2.3") -> JobSpec:
    return JobSpec(
        level="series",
        study_instance_uid="1.2",
        series_instance_uid=series,
        generation=0,
        modality="CT",
        route="r",
        model="m",
        outputs=("sr",),
        destinations=(),
        priority=priority,
    )


def test_claims_by_priority_then_age(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        low_old, high, low_new = enqueue(
            session, [spec(0, "1.2.3.1"), spec(5, "1.2.3.2"), spec(0, "1.2.3.3")]
        )
        ids = [low_old.id, high.id, low_new.id]
    order = []
    for _ in range(3):
        with sessions.begin() as session:
            job = claim(session, "w:1", 60, 3)
            assert job is not None
            assert job.state == JobState.RUNNING
            order.append(job.id)
    assert order == [ids[1], ids[0], ids[2]]
    with sessions.begin() as session:
        assert claim(session, "w:1", 60, 3) is None


def test_concurrent_workers_claim_each_job_once(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        enqueue(session, [spec(i % 3, f"1.2.{i}") for i in range(60)])
    claimed = claim_from_threads(sessions, 6)
    assert len(claimed) == 60
    assert len(set(claimed)) == 60


def test_a_job_is_queued_once_per_series_generation_and_route(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        assert len(enqueue(session, [spec(), spec(5)])) == 1
    with sessions.begin() as session:
        assert enqueue(session, [spec()]) == []
        assert len(enqueue(session, [spec(series="1.2.4")])) == 1
    with sessions() as session:
        assert len(session.scalars(select(Job)).all()) == 2


def test_expired_lease_is_claimed_again_until_attempts_run_out(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        (job,) = enqueue(session, [spec()])
    for attempt in (1, 2):
        with sessions.begin() as session:
            taken = claim(
                session, f"dead:{attempt}", 60, 2, now=utcnow() + timedelta(hours=attempt)
            )
            assert taken is not None and taken.id == job.id
            assert taken.attempts == attempt
    with sessions.begin() as session:
        assert claim(session, "w:3", 60, 2, now=utcnow() + timedelta(hours=9)) is None


def test_renew_fails_for_a_worker_that_lost_its_lease(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        enqueue(session, [spec()])
        job = claim(session, "a:1", 60, 3)
        assert job is not None
        job_id = job.id
    with sessions.begin() as session:
        assert renew(session, job_id, "a:1", 60)
        later = claim(session, "b:2", 60, 3, now=utcnow() + timedelta(minutes=5))
        assert later is not None
    with sessions.begin() as session:
        assert not renew(session, job_id, "a:1", 60)


def test_recover_requeues_this_nodes_running_jobs(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        enqueue(session, [spec(series="1.1"), spec(series="1.2"), spec(series="1.3")])
        mine = claim(session, "here:100", 60, 3)
        other = claim(session, "elsewhere:7", 60, 3)
        spent = claim(session, "here:100", 60, 3)
        assert mine and other and spent
        spent.attempts = 3  # as if it had killed its worker three times already
        ids = mine.id, other.id, spent.id
    with sessions.begin() as session:
        assert sorted(recover(session, "here", max_attempts=3)) == sorted([ids[0], ids[2]])
    with sessions() as session:
        states = {job.id: job.state for job in session.scalars(select(Job))}
        kinds = [e.kind for e in session.scalars(select(Event).where(Event.job_id == ids[0]))]
    assert states == {ids[0]: "queued", ids[1]: "running", ids[2]: "failed"}
    assert kinds[-1] == "job_queued"


def test_retry_requeues_a_failed_job_and_refuses_a_running_one(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        enqueue(session, [spec()])
        job = claim(session, "w:1", 60, 3)
        assert job is not None
        with pytest.raises(ValueError, match="running already"):
            retry(session, job.id)
        job.state = JobState.FAILED.value
        session.flush()
        again = retry(session, job.id)
        assert again.state == JobState.QUEUED
        assert again.attempts == 0
        with pytest.raises(LookupError):
            retry(session, 999)
