"""The job queue on a real SQLite job log: claim order, leases, recovery, concurrency."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.models import Event, Job, JobState, utcnow
from dicom_ai_node.jobs.queue import (
    AttemptLimits,
    JobSpec,
    claim,
    enqueue,
    reap_expired,
    recover,
    renew,
    retry,
    transition,
)
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


LIMITS = AttemptLimits(max_attempts=2, max_interruptions=3)
ABORTED = "Fatal Python error: Aborted\n\nCurrent thread 0x00007f (most recent call first):"


def no_crash(owner: str) -> str | None:
    return None


def test_expired_leases_are_interruptions_not_failures(sessions: sessionmaker[Session]) -> None:
    """A worker that vanished (killed, host lost) costs the job nothing, up to the backstop."""
    with sessions.begin() as session:
        (job,) = enqueue(session, [spec()])
    for attempt in (1, 2, 3):
        later = utcnow() + timedelta(hours=attempt)
        with sessions.begin() as session:
            taken = claim(session, f"dead:{attempt}", 60, LIMITS.max_attempts, now=later)
            assert taken is not None and taken.id == job.id and taken.attempts == attempt
        with sessions.begin() as session:
            assert reap_expired(session, no_crash, LIMITS, now=later) == []  # lease still valid
            owners = reap_expired(session, no_crash, LIMITS, now=later + timedelta(minutes=5))
            assert owners == [f"dead:{attempt}"]
    with sessions() as session:
        failed = session.get(Job, job.id)
        assert failed is not None
        assert (failed.state, failed.attempts, failed.interruptions) == ("failed", 3, 3)
        assert "interrupted 3 times" in (failed.error or "")
        messages = [e.message for e in session.scalars(select(Event).where(Event.job_id == job.id))]
    assert sum("interrupted, not counted" in m for m in messages) == 2


def test_ran_by_names_the_node_of_the_latest_attempt_after_its_lease_is_gone(
    sessions: sessionmaker[Session],
) -> None:
    """A job's lease names ``<node>:<pid>`` and goes when the attempt ends; ``ran_by`` keeps
    the node (not the process), and a node taking over a dead one's job takes it over."""
    with sessions.begin() as session:
        (job,) = enqueue(session, [spec()])
        assert job.ran_by is None
    later = utcnow() + timedelta(hours=1)
    with sessions.begin() as session:
        claim(session, "host-a.example:4242", 60, LIMITS.max_attempts, now=later)
    with sessions.begin() as session:
        reap_expired(session, no_crash, LIMITS, now=later + timedelta(minutes=5))
    with sessions() as session:
        lost = session.get(Job, job.id)
        assert lost is not None
        assert (lost.state, lost.lease_owner, lost.ran_by) == ("queued", None, "host-a.example")
    with sessions.begin() as session:
        taken = claim(session, "host-b:7", 60, LIMITS.max_attempts)
        assert taken is not None and taken.ran_by == "host-b"
        assert transition(session, job.id, JobState.DONE, "done", owner="host-b:7")
    with sessions() as session:
        done = session.get(Job, job.id)
        assert done is not None
        assert (done.state, done.lease_owner, done.ran_by) == ("done", None, "host-b")


def test_a_crash_while_running_the_job_alone_counts_against_it(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        (job,) = enqueue(session, [spec()])
    crashed = {"poison:1": ABORTED, "poison:2": ABORTED}
    for attempt in (1, 2):
        later = utcnow() + timedelta(hours=attempt)
        with sessions.begin() as session:
            assert claim(session, f"poison:{attempt}", 60, LIMITS.max_attempts, now=later)
        with sessions.begin() as session:
            reap_expired(session, crashed.get, LIMITS, now=later + timedelta(minutes=5))
    with sessions() as session:
        failed = session.get(Job, job.id)
        assert failed is not None
        assert (failed.state, failed.attempts, failed.interruptions) == ("failed", 2, 0)
        assert "crashed on this job 2 times (Fatal Python error: Aborted)" in (failed.error or "")
    with sessions.begin() as session:
        assert retry(session, job.id).state == JobState.QUEUED
        again = claim(session, "fixed:1", 60, LIMITS.max_attempts)
        assert again is not None and again.id == job.id


def test_a_crash_is_not_blamed_on_one_of_several_jobs_of_the_process(
    sessions: sessionmaker[Session],
) -> None:
    with sessions.begin() as session:
        first, second = enqueue(session, [spec(series="1.1"), spec(series="1.2")])
        assert claim(session, "busy:1", 60, 1) and claim(session, "busy:1", 60, 1)
    with sessions.begin() as session:
        later = utcnow() + timedelta(minutes=5)
        reap_expired(session, {"busy:1": ABORTED}.get, AttemptLimits(1, 3), now=later)
    with sessions() as session:
        jobs = [session.get(Job, first.id), session.get(Job, second.id)]
        assert [(j.state, j.interruptions) for j in jobs if j] == [("queued", 1), ("queued", 1)]


def test_renew_fails_for_a_worker_that_lost_its_lease(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        enqueue(session, [spec()])
        job = claim(session, "a:1", 60, 3)
        assert job is not None
        job_id = job.id
    with sessions.begin() as session:
        assert renew(session, job_id, "a:1", 60)
        later = utcnow() + timedelta(minutes=5)
        assert reap_expired(session, no_crash, LIMITS, now=later) == ["a:1"]
        assert claim(session, "b:2", 60, 3, now=later) is not None
    with sessions.begin() as session:
        assert not renew(session, job_id, "a:1", 60)


def test_recover_judges_this_nodes_running_jobs(sessions: sessionmaker[Session]) -> None:
    with sessions.begin() as session:
        enqueue(session, [spec(series="1.1"), spec(series="1.2"), spec(series="1.3")])
        mine = claim(session, "here:100", 60, 3)
        other = claim(session, "elsewhere:7", 60, 3)
        spent = claim(session, "here:101", 60, 3)
        assert mine and other and spent
        spent.attempts = 3  # its third attempt: the two before had crashed too
        ids = mine.id, other.id, spent.id
    crashes = {"here:101": ABORTED}
    with sessions.begin() as session:
        recovered = recover(session, "here", crashes.get, AttemptLimits(3, 10))
    assert recovered == {ids[0]: "here:100", ids[2]: "here:101"}
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
