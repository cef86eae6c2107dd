"""Test helpers: a job log filled with the ORM, and HTTP servers over loopback.

Result images are real Secondary Captures built by ``dicom_ai_node.report`` from a
synthetic radiograph (``dicom_ai_node.synth``).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicom_ai_node.infer.card import CodedConcept, InputSpec, LabelSpec, ModelCard
from dicom_ai_node.infer.prediction import ImagePrediction, SeriesPrediction
from dicom_ai_node.jobs.models import (
    Delivery,
    Job,
    JobState,
    Result,
    Series,
    Study,
    utcnow,
)
from dicom_ai_node.jobs.store import add_event
from dicom_ai_node.report import DEFAULT_SC_LAYOUT, ReportContext, build_sc, result_uids
from dicom_ai_node.synth.studies import Label, Task, generate_studies
from dicom_ai_node.web.server import HttpServer

TOKEN = "test-token-0123456789"
CARD = ModelCard(
    name="cxr-demo",
    version="1.0.0",
    manufacturer="dicom-ai-node tests",
    input=InputSpec(height=64, width=64),
    labels=[
        LabelSpec(
            name="normal",
            code=CodedConcept(value="17621005", scheme="SCT", meaning="Normal"),
            positive=False,
        ),
        LabelSpec(
            name="opacity",
            code=CodedConcept(value="263534008", scheme="SCT", meaning="Opacity"),
            positive=True,
        ),
    ],
)


def build_result(out_dir: Path, index: int, p: float) -> tuple[Dataset, Dataset]:
    """A synthetic radiograph and the Secondary Capture of a prediction ``p`` for it."""
    label = Label.POSITIVE if p >= 0.5 else Label.NEGATIVE
    study_dir = generate_studies(Task.CXR_OPACITY, label, 1, out_dir, seed=7, size=96, start=index)
    source = dcmread(next(study_dir[0].rglob("*.dcm")))
    y, x = np.mgrid[0:64, 0:64] / 63
    heatmap = np.exp(-((y - 0.4) ** 2 + (x - 0.6) ** 2) / 0.03).astype(np.float32)
    positive = p >= CARD.threshold
    probabilities = {"normal": 1 - p, "opacity": p}
    prediction = SeriesPrediction(
        model=CARD.name,
        model_version=CARD.version,
        positive_label="opacity",
        label="opacity" if positive else "normal",
        probability=p,
        positive=positive,
        probabilities=probabilities,
        images=(
            ImagePrediction(
                sop_instance_uid=str(source.SOPInstanceUID),
                frame_number=None,
                probabilities=probabilities,
                label="opacity" if positive else "normal",
                heatmap=heatmap,
            ),
        ),
    )
    uids = result_uids(f"test:{source.StudyInstanceUID}")
    context = ReportContext(
        station_ae_title="AINODE",
        device_uid=result_uids("device:test").sr_series,
        software_version="0.1.0",
        created=datetime.datetime.now(datetime.UTC),
    )
    sc = build_sc(
        source,
        prediction,
        CARD,
        series_uid=uids.sc_series,
        sop_instance_uid=uids.sc_instances[DEFAULT_SC_LAYOUT],
        context=context,
    )
    return source, sc


@dataclass
class JobLog:
    """Writes jobs, their studies, results and deliveries into the job log, as the node
    would."""

    sessions: sessionmaker[Session]
    folder: Path
    count: int = 0
    ids: dict[str, int] = field(default_factory=dict)

    def add(
        self,
        name: str,
        state: JobState,
        p: float | None = None,
        *,
        priority: int = 0,
        image: bool = False,
        deliveries: dict[str, str] | None = None,
        created: datetime.datetime | None = None,
    ) -> int:
        """A job named ``name`` in ``state``; with ``p``, its result (and, with ``image``, a
        real Secondary Capture); ``deliveries`` maps destinations to delivery states."""
        self.count += 1
        study_uid = f"1.2.826.0.1.3680043.8.498.1.{self.count}"
        series_uid = f"{study_uid}.1"
        sc: Dataset | None = None
        if image:
            assert p is not None
            source, sc = build_result(self.folder / "sources", self.count, p)
            study_uid, series_uid = str(source.StudyInstanceUID), str(source.SeriesInstanceUID)
        now = created or utcnow()
        with self.sessions.begin() as session:
            session.add(
                Study(
                    study_instance_uid=study_uid,
                    patient_id=f"PID-{name}",
                    accession_number=f"ACC-{name}",
                    study_date="20250301",
                    study_description="Chest PA",
                )
            )
            session.flush()  # no ORM relationships order the inserts: the study goes first
            session.add(
                Series(series_instance_uid=series_uid, study_instance_uid=study_uid, modality="CR")
            )
            job = Job(
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                modality="CR",
                route="chest",
                model=CARD.name,
                model_version=CARD.version,
                outputs=["sr", "sc"],
                destinations=list(deliveries or {}),
                priority=priority,
                state=state.value,
                created_at=now,
                updated_at=now,
                error="model crashed" if state == JobState.FAILED else None,
            )
            if p is not None:
                job.probability = p
                job.positive = p >= CARD.threshold
                job.label = "opacity" if job.positive else "normal"
                job.finished_at = now
            session.add(job)
            session.flush()
            add_event(session, "job_queued", f"job {job.id} queued", job_id=job.id)
            if sc is not None:
                path = self.folder / "results" / f"{sc.SOPInstanceUID}.dcm"
                path.parent.mkdir(parents=True, exist_ok=True)
                sc.save_as(path, enforce_file_format=True)
                session.add(
                    Result(
                        sop_instance_uid=str(sc.SOPInstanceUID),
                        job_id=job.id,
                        kind="sc",
                        sop_class_uid=str(sc.SOPClassUID),
                        series_instance_uid=str(sc.SeriesInstanceUID),
                        path=str(path),
                    )
                )
                session.flush()
                for destination, delivery_state in (deliveries or {}).items():
                    session.add(
                        Delivery(
                            job_id=job.id,
                            result_uid=str(sc.SOPInstanceUID),
                            destination=destination,
                            state=delivery_state,
                            attempts=1,
                            delivered_at=now if delivery_state == "done" else None,
                            last_error="connection refused" if delivery_state == "failed" else None,
                        )
                    )
            self.ids[name] = job.id
            return job.id


@dataclass
class Running:
    server: HttpServer
    problems: list[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def client(self, token: str | None = TOKEN) -> httpx.Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.base, headers=headers, timeout=10)


def job_with_results(
    session: Session, destinations: list[str], kinds: tuple[str, ...]
) -> tuple[Job, list[Result]]:
    """A job to ``destinations`` with one result row of each kind (no files behind them)."""
    job = Job(study_instance_uid="1.2", series_instance_uid="1.2.3", destinations=destinations)
    session.add(job)
    session.flush()
    results = [
        Result(
            sop_instance_uid=f"1.2.9.{n}",
            job_id=job.id,
            kind=kind,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
            series_instance_uid="1.2.9",
            path=f"outbox/1.2/1.2.9/1.2.9.{n}.dcm",
        )
        for n, kind in enumerate(kinds)
    ]
    session.add_all(results)
    session.flush()
    return job, results
