"""The assembler loop: completes series and studies, routes them to jobs, applies retention.

It takes what it works with explicitly (the job log, the rules, the spool) and tells whoever
runs it that jobs were queued through ``on_queued``; it knows nothing of the worker.

A study-level rule with ``fetch_missing`` first asks ``fetch_missing`` (source, study,
instances the node holds per series, route) for what the source holds more of, outside the
job log's transaction; when it fetched series, the job waits for the study to complete again
with them (a new generation), otherwise it is queued now.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.assemble import CompletedStudy, complete_series, complete_studies
from dicom_ai_node.config import AssembleSettings, RouteSettings
from dicom_ai_node.jobs.loop import PollingLoop
from dicom_ai_node.jobs.models import utcnow
from dicom_ai_node.jobs.queue import JobSpec, enqueue, record_skipped
from dicom_ai_node.jobs.store import add_event
from dicom_ai_node.route import plan_series, plan_study
from dicom_ai_node.spool import Spool
from dicom_ai_node.spool.retention import prune

log = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 600.0

FetchMissing = Callable[[str, str, dict[str, int], str], list[str]]


class Assembler(PollingLoop):
    """Every poll: complete series and studies and queue their jobs; now and then, prune
    the received files older than ``retention_days`` (0: keep them)."""

    thread_name = "assemble"

    def __init__(
        self,
        sessions: sessionmaker[Session],
        rules: Sequence[RouteSettings],
        settings: AssembleSettings,
        spool: Spool,
        *,
        retention_days: float = 0.0,
        on_queued: Callable[[], None] = lambda: None,
        fetch_missing: FetchMissing | None = None,
    ) -> None:
        super().__init__(settings.poll_seconds)
        self.sessions = sessions
        self.rules = rules
        self.settings = settings
        self.spool = spool
        self.retention_days = retention_days
        self.on_queued = on_queued
        self.fetch_missing = fetch_missing
        self._fetch_from = {r.name: r.fetch_missing for r in rules if r.fetch_missing}
        self._next_prune = 0.0

    def run_once(self) -> bool:
        if self.assemble_once():
            self.on_queued()
        if self.retention_days and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
            self.prune_once()
        return False  # the next pass is due at the next poll, whatever this one found

    def prune_once(self) -> int:
        """Apply ``[storage] retention_days``; returns how many series were pruned."""
        with self.sessions.begin() as session:
            pruned = prune(session, self.spool, utcnow(), self.retention_days)
        if pruned:
            log.info("retention: deleted the received files of %d processed series", pruned)
        return pruned

    def assemble_once(self) -> int:
        """Complete what is complete and queue its jobs; returns how many jobs were queued."""
        stable = self.settings.stable_seconds
        queued = 0
        waiting: list[tuple[CompletedStudy, JobSpec]] = []
        with self.sessions.begin() as session:
            now = utcnow()
            for series in complete_series(session, now, stable):
                specs, reason = plan_series(self.rules, series)
                add_event(
                    session,
                    "series_complete",
                    f"series complete ({series.rule}): {series.instance_count} instances, "
                    f"{series.modality}",
                    study=series.study_instance_uid,
                    series=series.series_instance_uid,
                    generation=series.generation,
                    rule=series.rule,
                )
                if reason:
                    skipped = record_skipped(
                        session,
                        series.study_instance_uid,
                        series.series_instance_uid,
                        series.generation,
                        series.modality,
                        reason,
                    )
                    if skipped is not None:
                        log.info(
                            "job %d skipped: series %s: %s",
                            skipped.id,
                            series.series_instance_uid,
                            reason,
                            extra={"job_id": skipped.id},
                        )
                for job in enqueue(session, specs):
                    log.info(
                        "job %d queued: route %s, model %s",
                        job.id,
                        job.route,
                        job.model,
                        extra={"job_id": job.id},
                    )
                    queued += 1
            for study in complete_studies(session, now, stable):
                specs = plan_study(self.rules, study)
                if self.fetch_missing is not None:
                    waiting += [(study, s) for s in specs if s.route in self._fetch_from]
                    specs = [s for s in specs if s.route not in self._fetch_from]
                queued += self._enqueue_study(session, specs)
        for study, spec in waiting:
            assert self.fetch_missing is not None
            held = {s.series_instance_uid: s.instance_count for s in study.series}
            source = self._fetch_from[spec.route]
            if self.fetch_missing(source, study.study_instance_uid, held, spec.route):
                continue  # queued when the study completes again, with what was fetched
            with self.sessions.begin() as session:
                queued += self._enqueue_study(session, [spec])
        return queued

    @staticmethod
    def _enqueue_study(session: Session, specs: Sequence[JobSpec]) -> int:
        jobs = enqueue(session, specs)
        for job in jobs:
            log.info("job %d queued: study route %s", job.id, job.route, extra={"job_id": job.id})
        return len(jobs)
