"""The worker loop: claim a job, run it with its lease kept alive, record the outcome.

The work itself is a callable handed in by the node (inference and reporting), so this loop
knows nothing of the stages it drives. A job that raises is queued again until it has used
its attempts, then marked failed with the error; one that raises :class:`PermanentJobError`
is failed at once, since running it again would fail the same way. Before each claim the
worker judges the running jobs whose lease expired (their worker died, on any host), by the
crash policy of :mod:`dicom_ai_node.jobs.queue`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.jobs.crashes import CrashRecords
from dicom_ai_node.jobs.loop import PollingLoop
from dicom_ai_node.jobs.models import Job, JobState
from dicom_ai_node.jobs.queue import (
    AttemptLimits,
    charged,
    claim,
    reap_expired,
    renew,
    transition,
)

log = logging.getLogger(__name__)

JobHandler = Callable[[Job], None]


class PermanentJobError(Exception):
    """An error that another attempt cannot fix (the job's data or its limits): the job is
    failed at once instead of being queued again."""


class LeaseLostError(RuntimeError):
    """The job's lease went to another worker while this one ran it (this one took too
    long, or was thought dead): its outcome is dropped, the other worker's counts."""


class Worker(PollingLoop):
    """Runs queued jobs one at a time on a background thread."""

    thread_name = "worker"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        handler: JobHandler,
        owner: str,
        *,
        lease_seconds: float,
        limits: AttemptLimits,
        crashes: CrashRecords,
        poll_seconds: float,
    ) -> None:
        super().__init__(poll_seconds)
        self.sessions = sessions
        self.handler = handler
        self.owner = owner
        self.lease_seconds = lease_seconds
        self.limits = limits
        self.crashes = crashes

    def run_once(self) -> bool:
        """Claim and run one job; ``False`` when the queue was empty."""
        with self.sessions.begin() as session:
            reaped = reap_expired(session, self.crashes.of, self.limits)
            job = claim(session, self.owner, self.lease_seconds, self.limits.max_attempts)
        for owner in reaped:
            self.crashes.forget(owner)
        if job is None:
            return False
        log.info(
            "job %d running: %s %s, route %s, model %s (attempt %d)",
            job.id,
            job.level,
            job.series_instance_uid or job.study_instance_uid,
            job.route,
            job.model,
            job.attempts,
            extra={"job_id": job.id},
        )
        beating = threading.Event()
        heartbeat = threading.Thread(
            target=self._heartbeat, args=(job.id, beating), name=f"lease-{job.id}", daemon=True
        )
        heartbeat.start()
        try:
            self.handler(job)
        except Exception as exc:
            beating.set()
            heartbeat.join()
            self._failed(job, exc)
        else:
            beating.set()
            heartbeat.join()
        return True

    def _heartbeat(self, job_id: int, done: threading.Event) -> None:
        while not done.wait(self.lease_seconds / 3):
            try:
                with self.sessions.begin() as session:
                    renewed = renew(session, job_id, self.owner, self.lease_seconds)
                if not renewed:
                    if not done.is_set():  # not merely finished a moment ago
                        log.warning(
                            "job %d: lease lost to another worker", job_id, extra={"job_id": job_id}
                        )
                    return
            except Exception:
                log.exception("job %d: cannot renew the lease", job_id)

    def _failed(self, job: Job, exc: Exception) -> None:
        if isinstance(exc, LeaseLostError):
            log.warning("%s", exc)
            return
        # A permanent error's message is written for the operator; others get their type.
        permanent = isinstance(exc, PermanentJobError)
        error = str(exc) if permanent else f"{type(exc).__name__}: {exc}"
        last = charged(job) >= self.limits.max_attempts or permanent
        state = JobState.FAILED if last else JobState.QUEUED
        if last:
            log.error(
                "job %d failed (attempt %d): %s",
                job.id,
                job.attempts,
                error,
                extra={"job_id": job.id},
            )
        else:
            log.warning(
                "job %d attempt %d failed, will retry: %s",
                job.id,
                job.attempts,
                error,
                extra={"job_id": job.id},
            )
        with self.sessions.begin() as session:
            transition(
                session,
                job.id,
                state,
                f"job {job.id} attempt {job.attempts} failed: {error}",
                owner=self.owner,
                error=error[:2000],
            )
