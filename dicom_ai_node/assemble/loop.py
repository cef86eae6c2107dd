"""The assembler loop: completes series and studies, routes them to jobs, applies retention.

It takes what it works with explicitly (the job log, the rules, the spool) and tells whoever
runs it that jobs were queued through ``on_queued``; it knows nothing of the worker.

A study-level rule with ``fetch_missing`` first asks ``fetch_missing`` (source, study,
instances the node holds per series, route) for what the source holds more of, before the
study is marked complete and outside the job log's transaction: the fetched series join the
study, which completes (and gets its job) with them. Until that look is done for a study's
generation, the study is left receiving, so a node that stops in between loses nothing: it
looks again. A look that fetched nothing new is not repeated for the same generation.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.assemble import (
    CompletedStudy,
    complete_series,
    complete_studies,
    leave_receiving,
    ready_studies,
)
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
        self._looked: set[tuple[str, int]] = set()  # (study, generation) looked at for missing
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
        if self.fetch_missing is not None and self._fetch_from:
            self._look_for_missing(stable)
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
                if self._not_looked_at(study):  # ready since the look: looked at next pass
                    leave_receiving(session, study.study_instance_uid)
                    continue
                queued += self._enqueue_study(session, plan_study(self.rules, study))
        return queued

    def _fetch_routes(self, study: CompletedStudy) -> list[JobSpec]:
        return [s for s in plan_study(self.rules, study) if s.route in self._fetch_from]

    def _not_looked_at(self, study: CompletedStudy) -> bool:
        key = (study.study_instance_uid, study.generation)
        return (
            self.fetch_missing is not None
            and bool(self._fetch_routes(study))
            and (key not in self._looked)
        )

    def _look_for_missing(self, stable: float) -> None:
        """For each study ready now on a ``fetch_missing`` route, fetch what its source holds
        more of, before the study is marked complete (outside the job log's transaction)."""
        assert self.fetch_missing is not None
        with self.sessions() as session:
            ready = ready_studies(session, utcnow(), stable)
        for study in ready:
            key = (study.study_instance_uid, study.generation)
            if key in self._looked:
                continue
            held = {s.series_instance_uid: s.instance_count for s in study.series}
            for spec in self._fetch_routes(study):
                self.fetch_missing(
                    self._fetch_from[spec.route], study.study_instance_uid, held, spec.route
                )
            self._looked.add(key)
        if len(self._looked) > 100_000:
            self._looked.clear()  # at worst a study is looked at once more

    @staticmethod
    def _enqueue_study(session: Session, specs: Sequence[JobSpec]) -> int:
        jobs = enqueue(session, specs)
        for job in jobs:
            log.info("job %d queued: study route %s", job.id, job.route, extra={"job_id": job.id})
        return len(jobs)
