"""The job runner: runs one claimed job, infer -> report -> outbox -> plan deliveries.

It is what the worker (:class:`~dicom_ai_node.jobs.worker.Worker`) calls with each job it
claims. Its dependencies are given explicitly: the job log, the spool, the loaded models,
the settings it reads; ``on_results`` is told how many deliveries a finished job planned,
so whoever runs it can wake the dispatcher and the notifier.
"""

from __future__ import annotations

import datetime
import logging
import time
from collections import Counter
from collections.abc import Callable, Sequence
from io import BytesIO
from pathlib import Path
from typing import TYPE_CHECKING, cast

from pydicom import Dataset, dcmread
from pydicom.charset import python_encoding
from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node import __version__
from dicom_ai_node.audit.messages import created_event
from dicom_ai_node.audit.trail import AuditTrail
from dicom_ai_node.config import DestinationSettings, Settings
from dicom_ai_node.dispatch.deliveries import plan_deliveries
from dicom_ai_node.jobs.models import Instance, Job, JobState, Prediction, Result, utcnow
from dicom_ai_node.jobs.queue import transition, versions
from dicom_ai_node.jobs.store import add_event, upsert
from dicom_ai_node.jobs.worker import LeaseLostError, PermanentJobError
from dicom_ai_node.metrics import NodeMetrics
from dicom_ai_node.spool import Spool

if TYPE_CHECKING:
    from dicom_ai_node.infer.prediction import SeriesPrediction
    from dicom_ai_node.infer.runtime import LoadedModel
    from dicom_ai_node.report import ResultObject, ScLayout

log = logging.getLogger(__name__)


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


def sc_layouts(destinations: Sequence[DestinationSettings], job: Job) -> list[ScLayout]:
    """The SC layouts the job's destinations need (each one once, in their order); the
    default one when none gets an SC (the outbox and the dashboard still show it)."""
    from dicom_ai_node.report import DEFAULT_SC_LAYOUT

    wanted = [d.sc_layout for d in destinations if d.name in job.destinations and "sc" in d.objects]
    return list(dict.fromkeys(wanted)) or [DEFAULT_SC_LAYOUT]


def chosen_results(
    destinations: Sequence[DestinationSettings], objects: Sequence[ResultObject]
) -> dict[str, set[str]]:
    """Each destination's output profile applied: the SOP Instance UIDs of the objects it
    gets, those of the kinds it lists and, of the SCs, the one of its layout."""
    return {
        d.name: {
            str(o.dataset.SOPInstanceUID)
            for o in objects
            if o.kind in d.objects and o.layout in (None, d.sc_layout)
        }
        for d in destinations
    }


class JobRunner:
    """Runs claimed jobs with ``models`` (model name -> loaded model)."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        read_sessions: sessionmaker[Session],
        spool: Spool,
        models: dict[str, LoadedModel],
        owner: str,
        metrics: NodeMetrics,
        on_results: Callable[[int], None] = lambda _deliveries: None,
        audit: AuditTrail | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.read_sessions = read_sessions
        self.spool = spool
        self.models = models
        self.owner = owner
        self.metrics = metrics
        self.on_results = on_results
        self.audit = audit

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
        paths = [self.spool.locate(instance.path) for instance in instances]
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
            [self.spool.locate(i.path) for i in instances if i.sop_instance_uid in used],
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
            deliveries = (
                0
                if job.shadow
                else plan_deliveries(
                    session, job, results, chosen_results(self.settings.destinations, datasets)
                )
            )
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
        if self.audit is not None:
            self.audit.record(
                created_event(
                    f"{self.settings.node_name}/{prediction.model} {prediction.model_version}",
                    job.study_instance_uid,
                    str(datasets[0].dataset.get("PatientID", "")) if datasets else "",
                    Counter(str(result.dataset.SOPClassUID) for result in datasets),
                    utcnow(),
                )
            )
        self.on_results(deliveries)

    def _report(
        self, job: Job, model: LoadedModel, paths: list[Path], prediction: SeriesPrediction
    ) -> list[ResultObject]:
        from dicom_ai_node.report import (
            Output,
            ReportContext,
            build_results,
            predecessor,
            result_uids,
        )

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
        return build_results(
            sources,
            usable(dcmread(key_path)),
            prediction,
            model.card,
            [cast(Output, output) for output in job.outputs],
            result_uids(f"job:{job.id}:{job.study_instance_uid}:{job.generation}"),
            context,
            [
                predecessor(job.study_instance_uid, *identifiers)
                for identifiers in self._earlier_srs(job)
            ],
            sc_layouts(self.settings.destinations, job),
        )

    def _earlier_srs(self, job: Job) -> list[tuple[str, str, str]]:
        """The SR of the latest earlier run of ``job``'s series and route, which the new SR
        amends (the earlier one names its own predecessor)."""
        with self.sessions() as session:
            earlier = [j.id for j in versions(session, job) if j.generation < job.generation]
            if not earlier:
                return []
            rows = session.execute(
                select(Result.series_instance_uid, Result.sop_class_uid, Result.sop_instance_uid)
                .where(Result.job_id == earlier[-1], Result.kind == "sr")
                .order_by(Result.sop_instance_uid)
            ).all()
            return [(series, sop_class, uid) for series, sop_class, uid in rows]

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

    def _write_results(
        self, session: Session, job: Job, objects: list[ResultObject]
    ) -> list[Result]:
        results = []
        for obj in objects:
            ds = obj.dataset
            path = self.spool.result_path(
                ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID
            )
            buffer = BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            self.spool.write(path, buffer.getvalue())
            values = {
                "job_id": job.id,
                "kind": obj.kind,
                "sop_class_uid": str(ds.SOPClassUID),
                "series_instance_uid": str(ds.SeriesInstanceUID),
                "path": self.spool.stored(path),
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
