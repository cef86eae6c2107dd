"""The node: wires the stages together around the job log and owns start and stop.

Threads of one process: the DICOM listener (pynetdicom, one thread per association), the
assembler (completes series and studies, routes them to jobs), the worker (runs a job:
inference, then the result objects, written to the outbox) and one dispatcher per
destination. Each reads and writes the job log, so a restart resumes where it stopped.
"""

from __future__ import annotations

import datetime
import logging
import time
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from pydicom import Dataset, dcmread
from pydicom.charset import python_encoding
from pydicom.uid import KeyObjectSelectionDocumentStorage, generate_uid
from sqlalchemy import select, text
from sqlalchemy.orm import Session

from dicom_ai_node import __version__
from dicom_ai_node.assemble import complete_series, complete_studies
from dicom_ai_node.config import ConfigError, Settings
from dicom_ai_node.dispatch.deliveries import Dispatcher, plan_deliveries, release_leases
from dicom_ai_node.jobs.db import create_db_engine, read_only, session_factory, upgrade
from dicom_ai_node.jobs.loop import PollingLoop
from dicom_ai_node.jobs.models import Instance, Job, JobState, Prediction, Result, utcnow
from dicom_ai_node.jobs.queue import enqueue, record_skipped, recover, transition, worker_id
from dicom_ai_node.jobs.store import add_event, upsert
from dicom_ai_node.jobs.worker import LeaseLostError, PermanentJobError, Worker
from dicom_ai_node.receive.record import close_stale_associations, reindex
from dicom_ai_node.receive.scp import StorageSCP
from dicom_ai_node.route import plan_series, plan_study
from dicom_ai_node.spool import Spool
from dicom_ai_node.spool.retention import prune
from dicom_ai_node.web.metrics import NodeMetrics
from dicom_ai_node.web.notify import Notifier
from dicom_ai_node.web.server import HttpServer

if TYPE_CHECKING:
    from dicom_ai_node.infer.evaluation import ExpectedRate
    from dicom_ai_node.infer.prediction import SeriesPrediction
    from dicom_ai_node.infer.runtime import LoadedModel

log = logging.getLogger(__name__)

PRUNE_INTERVAL_SECONDS = 600.0


def result_kind(sop_class_uid: str) -> str:
    """``sr``, ``kos`` or ``sc``: which output a result object is (by its SOP Class, PS3.4 B.5)."""
    if sop_class_uid == KeyObjectSelectionDocumentStorage:
        return "kos"
    return "sr" if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88.") else "sc"


def usable(ds: Dataset) -> Dataset:
    """``ds`` made safe to copy into result objects: elements that cannot be decoded (a VR
    PS3.5 6.2 does not define, a length that does not fit the VR) are dropped, and a Specific
    Character Set with a term PS3.3 C.12.1.1.2 does not define becomes ISO_IR 192, after
    every text value was decoded (pydicom falls back to its default for such terms).

    Only source headers copied into the results are touched; the received files are not.
    """
    for tag in list(ds.keys()):
        try:
            element = ds[tag]
        except Exception:  # pydicom raises NotImplementedError, BytesLengthException...
            del ds[tag]
            continue
        if element.VR == "SQ":
            for item in element.value:
                usable(item)
    terms = ds.get("SpecificCharacterSet")
    if terms is not None:
        values = [terms] if isinstance(terms, str) else list(terms)
        if any(term and term not in python_encoding for term in values):
            ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


class _Assembler(PollingLoop):
    """Every poll: complete series and studies and queue their jobs; now and then, prune."""

    thread_name = "assemble"

    def __init__(self, node: Node) -> None:
        super().__init__(node.settings.assemble.poll_seconds)
        self.node = node
        self._next_prune = 0.0

    def run_once(self) -> bool:
        if self.node.assemble_once():
            self.node.worker.wake()
        if self.node.settings.storage.retention_days and time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + PRUNE_INTERVAL_SECONDS
            self.node.prune_once()
        return False  # the next pass is due at the next poll, whatever this one found


class Node:
    """A running node. ``start()`` returns once it listens; ``stop()`` shuts it down cleanly.

    ``models`` maps model names to loaded models; by default the models the routes name are
    loaded from the bundled packages and ``[models] dirs``.
    """

    def __init__(self, settings: Settings, models: dict[str, LoadedModel] | None = None) -> None:
        self.settings = settings
        self.owner = worker_id(settings.node_name)
        self.engine = create_db_engine(settings.database_url, settings.database.busy_timeout_ms)
        self.sessions = session_factory(self.engine)
        self.read_sessions = session_factory(read_only(self.engine))
        self.spool = Spool(settings.storage.data_dir)
        self.models = models if models is not None else self._load_models()
        self.metrics = NodeMetrics(self.read_sessions, self._expected_rates())
        extra = tuple(
            sorted({key for route in settings.routes for key in route.where} - {"CallingAETitle"})
        )
        self.scp = StorageSCP(
            settings.dicom,
            self.spool,
            self.sessions,
            settings.node_name,
            min_free_bytes=settings.storage.min_free_mb * 1024 * 1024,
            extra_keywords=extra,
            metrics=self.metrics,
        )
        self.worker = Worker(
            self.sessions,
            self.process_job,
            self.owner,
            lease_seconds=settings.worker.lease_seconds,
            max_attempts=settings.worker.max_attempts,
            poll_seconds=settings.worker.poll_seconds,
        )
        self.dispatcher = Dispatcher(
            self.sessions,
            settings.destinations,
            settings.dispatch,
            settings.dicom.ae_title,
            self.owner,
            on_outcome=lambda name, outcome: self.metrics.dispatch_attempt(name, outcome.ok),
            on_delivered=lambda seconds: self.metrics.end_to_end_seconds(seconds, "delivered"),
        )
        self.http = HttpServer(
            self.sessions,
            read_sessions=self.read_sessions,
            metrics=self.metrics,
            health=self.health,
            bind=settings.http.bind,
            port=settings.http.port,
            token=settings.http.token,
            destinations=settings.destinations,
            node_name=settings.node_name,
        )
        self.notifier = Notifier(
            self.sessions,
            settings.notifications,
            owner=self.owner,
            node_name=settings.node_name,
            dashboard_url=settings.http.public_url,
            metrics=self.metrics,
        )
        self.assembler = _Assembler(self)

    def _load_models(self) -> dict[str, LoadedModel]:
        """Load the models the routes name (each once), refusing unknown or broken ones."""
        from dicom_ai_node.infer.runtime import LoadedModel, ModelPackageError, read_cards

        if not self.settings.routes:
            return {}
        try:
            cards = read_cards(self.settings.models.dirs)
        except (ModelPackageError, OSError, ValueError) as exc:
            raise ConfigError(f"models: {exc}") from None
        for i, route in enumerate(self.settings.routes):
            if route.model not in cards:
                raise ConfigError(
                    f"routes[{i}].model: no model package named {route.model!r} "
                    f"(found: {', '.join(sorted(cards)) or 'none'})"
                )
        models = {}
        for name in sorted({route.model for route in self.settings.routes}):
            package, card = cards[name]
            try:
                models[name] = LoadedModel(package, card=card)
            except ModelPackageError as exc:
                raise ConfigError(f"models: {exc}") from None
            log.info("model %s %s loaded from %s", card.name, card.version, package)
        return models

    def _expected_rates(self) -> dict[str, ExpectedRate]:
        """Per loaded model, the positive rate its package's evaluation leads to expect."""
        from dicom_ai_node.infer.evaluation import expected_positive_rate

        rates = {}
        for name, model in self.models.items():
            expected = expected_positive_rate(model.package, model.card)
            if expected is not None:
                rates[name] = expected
        return rates

    def _check_model_identities(self) -> None:
        """Refuse a model whose weights differ from those the job log recorded for the same
        name and version: new weights need a new version, or results could not be traced."""
        from dicom_ai_node.jobs.queue import recorded_weights

        with self.read_sessions() as session:
            for model in self.models.values():
                card = model.card
                other = recorded_weights(session, card.name, card.version) - {model.weights_sha256}
                if other:
                    raise ConfigError(
                        f"models: model package {card.name} ({model.package}): version "
                        f"{card.version} has weights sha256 {model.weights_sha256}, but earlier "
                        f"jobs of that version ran weights {', '.join(sorted(other))}; "
                        "give changed weights a new version in model.toml"
                    )

    # --- start and stop --------------------------------------------------------------------

    def start(self) -> None:
        """Migrate the job log, recover from a previous run, start every stage."""
        upgrade(self.engine)
        self._check_model_identities()
        with self.sessions.begin() as session:
            lost = close_stale_associations(session, self.settings.node_name)
            requeued = recover(session, self.settings.node_name, self.settings.worker.max_attempts)
            release_leases(session, self.settings.node_name)
        cleaned = self.spool.clean_temporary()
        reindexed = reindex(self.sessions, self.spool)
        if lost or requeued or cleaned or reindexed:
            log.warning(
                "recovered from an unclean stop: %d associations closed, jobs %s requeued, "
                "%d partial files removed, %d spool files re-indexed",
                lost,
                requeued,
                cleaned,
                reindexed,
            )
        self.scp.start()
        self.assembler.start()
        self.worker.start()
        self.dispatcher.start()
        self.http.start()
        self.notifier.start()

    def health(self) -> list[str]:
        """What is wrong with the node (nothing = healthy), for ``/healthz``."""
        problems = [] if self.scp.listening else ["the DICOM listener is not listening"]
        try:
            with self.read_sessions() as session:
                session.execute(text("SELECT 1"))
        except Exception as exc:
            problems.append(f"job log: {type(exc).__name__}: {exc}")
        missing = {route.model for route in self.settings.routes} - set(self.models)
        if missing:
            problems.append(f"models not loaded: {', '.join(sorted(missing))}")
        if not self.scp.space_left():
            problems.append(
                f"spool below its free-space floor ({self.settings.storage.min_free_mb} MB): "
                "refusing new instances"
            )
        return problems

    def stop(self) -> None:
        """Stop accepting, let in-flight associations finish, stop the stages."""
        self.http.stop()
        self.scp.stop()
        self.assembler.stop()
        self.worker.stop()
        self.dispatcher.stop()
        self.notifier.stop()
        self.engine.dispose()

    # --- assemble and route ----------------------------------------------------------------

    def prune_once(self) -> int:
        """Apply ``[storage] retention_days``; returns how many series were pruned."""
        with self.sessions.begin() as session:
            pruned = prune(session, self.spool, utcnow(), self.settings.storage.retention_days)
        if pruned:
            log.info("retention: deleted the received files of %d processed series", pruned)
        return pruned

    def assemble_once(self) -> int:
        """Complete what is complete and queue its jobs; returns how many jobs were queued."""
        rules = self.settings.routes
        stable = self.settings.assemble.stable_seconds
        queued = 0
        with self.sessions.begin() as session:
            now = utcnow()
            for series in complete_series(session, now, stable):
                specs, reason = plan_series(rules, series)
                add_event(
                    session,
                    "series_complete",
                    f"series complete: {series.instance_count} instances, {series.modality}",
                    study=series.study_instance_uid,
                    series=series.series_instance_uid,
                    generation=series.generation,
                )
                if reason:
                    job = record_skipped(
                        session,
                        series.study_instance_uid,
                        series.series_instance_uid,
                        series.generation,
                        series.modality,
                        reason,
                    )
                    log.info(
                        "job %d skipped: series %s: %s",
                        job.id,
                        series.series_instance_uid,
                        reason,
                        extra={"job_id": job.id},
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
                for job in enqueue(session, plan_study(rules, study)):
                    log.info(
                        "job %d queued: study route %s", job.id, job.route, extra={"job_id": job.id}
                    )
                    queued += 1
        return queued

    # --- the job -----------------------------------------------------------------------------

    def _instances(self, session: Session, job: Job) -> list[Instance]:
        query = select(Instance).where(Instance.study_instance_uid == job.study_instance_uid)
        if job.series_instance_uid is not None:
            query = query.where(Instance.series_instance_uid == job.series_instance_uid)
        rows = session.scalars(query).all()
        return sorted(rows, key=lambda i: (i.series_instance_uid, i.instance_number or 0))

    def process_job(self, job: Job) -> None:
        """Run a claimed job: infer, record predictions, write results, plan deliveries.

        Fails the job at once (:class:`PermanentJobError`) when it has more instances than
        ``[assemble] max_instances_per_series``, when no image of it can be decoded, or when
        inference runs past ``[worker] job_timeout_seconds``: trying again would fail alike.
        Images that cannot be decoded are skipped and recorded in an ``images_skipped`` event.
        """
        from dicom_ai_node.infer.runtime import InferenceTimeoutError, NoUsableImagesError

        with self.read_sessions() as session:
            instances = self._instances(session, job)
        if not instances:
            raise RuntimeError("the job's instances are no longer in the spool")
        limit = self.settings.assemble.max_instances_per_series
        if len(instances) > limit:
            raise PermanentJobError(
                f"{job.level} too large: {len(instances)} instances, more than "
                f"[assemble] max_instances_per_series = {limit}"
            )
        model = self.models.get(job.model or "")
        if model is None:
            raise RuntimeError(f"model {job.model!r} is not loaded")
        paths = [Path(instance.path) for instance in instances]
        started = time.monotonic()
        try:
            prediction = model.predict_series(
                paths, timeout=self.settings.worker.job_timeout_seconds
            )
        except (NoUsableImagesError, InferenceTimeoutError) as exc:
            raise PermanentJobError(str(exc)) from exc
        self.metrics.inference_seconds(model.card.name, time.monotonic() - started)
        used = {image.sop_instance_uid for image in prediction.images}
        datasets = self._report(
            job,
            model,
            [Path(i.path) for i in instances if i.sop_instance_uid in used],
            prediction,
        )
        with self.sessions.begin() as session:
            self._record_prediction(session, job, prediction)
            if prediction.skipped:
                add_event(
                    session,
                    "images_skipped",
                    f"job {job.id}: {len(prediction.skipped)} images or frames skipped: "
                    + "; ".join(f"{uid}: {why}" for uid, why in prediction.skipped[:3]),
                    job_id=job.id,
                    study=job.study_instance_uid,
                    series=job.series_instance_uid,
                    skipped=[list(item) for item in prediction.skipped[:100]],
                )
            results = self._write_results(session, job, datasets)
            # Shadow mode: results are recorded (job log and outbox) but go nowhere else.
            deliveries = 0 if job.shadow else plan_deliveries(session, job, results)
            state = JobState.DELIVERING if deliveries else JobState.DONE
            moved = transition(
                session,
                job.id,
                state,
                f"job {job.id}: {prediction.label} ({prediction.probability:.3f}); "
                f"{len(results)} result objects, {deliveries} deliveries",
                owner=self.owner,
                label=prediction.label,
                probability=prediction.probability,
                positive=prediction.positive,
                model_version=prediction.model_version,
                weights_sha256=prediction.weights_sha256,
                error=None,
            )
            if not moved:  # roll back: the worker that holds the lease records the job
                raise LeaseLostError(f"job {job.id}: the lease went to another worker")
        log.info(
            "job %d %s: %s %.3f (%s %s, %d images), %d results, %d deliveries",
            job.id,
            state.value,
            prediction.label,
            prediction.probability,
            prediction.model,
            prediction.model_version,
            len(prediction.images),
            len(results),
            deliveries,
            extra={"job_id": job.id},
        )
        last_received = max(instance.received_at for instance in instances)
        self.metrics.end_to_end_seconds((utcnow() - last_received).total_seconds(), "written")
        self.notifier.wake()
        if deliveries:
            self.dispatcher.wake()

    def _report(
        self, job: Job, model: LoadedModel, paths: list[Path], prediction: SeriesPrediction
    ) -> list[Any]:
        from dicom_ai_node.report import Output, ReportContext, build_results, result_uids

        if not job.outputs:
            return []
        # Only the images the prediction used: the skipped ones may not even parse.
        sources = [usable(dcmread(path, stop_before_pixels=True)) for path in paths]
        key_uid = prediction.key_image.sop_instance_uid
        key_path = next(
            p for p, s in zip(paths, sources, strict=True) if s.SOPInstanceUID == key_uid
        )
        context = ReportContext(
            station_ae_title=self.settings.dicom.ae_title,
            device_uid=generate_uid(entropy_srcs=["device", self.settings.node_name]),
            software_version=__version__,
            created=datetime.datetime.now(datetime.UTC),
        )
        return list(
            build_results(
                sources,
                usable(dcmread(key_path)),
                prediction,
                model.card,
                [cast(Output, output) for output in job.outputs],
                result_uids(f"job:{job.id}:{job.study_instance_uid}:{job.generation}"),
                context,
            )
        )

    def _record_prediction(self, session: Session, job: Job, prediction: SeriesPrediction) -> None:
        session.query(Prediction).filter(Prediction.job_id == job.id).delete()
        for image in prediction.images:
            session.add(
                Prediction(
                    job_id=job.id,
                    sop_instance_uid=image.sop_instance_uid,
                    frame_number=image.frame_number,
                    label=image.label,
                    probability=image.probabilities[prediction.positive_label],
                    probabilities=image.probabilities,
                )
            )

    def _write_results(self, session: Session, job: Job, datasets: list[Any]) -> list[Result]:
        results = []
        for ds in datasets:
            path = self.spool.result_path(
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            self.spool.write(path, buffer.getvalue())
            kind = result_kind(str(ds.SOPClassUID))
            values = {
                "job_id": job.id,
                "kind": kind,
                "sop_class_uid": str(ds.SOPClassUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "path": str(path),
            }
            session.execute(
                upsert(session, Result)
                .values(sop_instance_uid=str(ds.SOPInstanceUID), **values)
                .on_conflict_do_update(index_elements=["sop_instance_uid"], set_=values)
            )
            result = session.get(Result, str(ds.SOPInstanceUID))
            assert result is not None
            results.append(result)
        return results
