"""export: de-identified copies of received images, for training, labelled by their jobs.

:func:`deidentify` applies the Basic Application Level Confidentiality Profile (PS3.15
E.2) with the Retain Longitudinal Temporal Information with Full Dates Option (E.3.6) and
the Clean Descriptors Option (E.3.5), in its strictest form: the output keeps only the
attributes of :data:`KEEP` (image pixel description, geometry, acquisition technique, dates
and times), which Table E.1-1 lets a de-identifier retain; every other attribute, private
ones included, is removed. Patient Name and Patient ID become a pseudonym, the Type 2
attributes of the Patient, General Study and General Equipment modules are present and empty
(action Z), Study, Series, SOP Instance and Frame of Reference UIDs are replaced (action U)
by the same new UID wherever and whenever the same original appears, descriptors (Study and
Series Description, Protocol Name, Image Comments) are kept only with every identifying value
of the source cut out of them, and Patient Identity Removed, De-identification Method and its
Code Sequence (PS3.3 C.7.1.1) say what was done. An image whose Burned In Annotation is not
NO is not exported (removing burned-in text needs the Clean Pixel Data Option, not done).

The map from originals to pseudonyms lives in the job log (``pseudonyms``), never in the
export: :class:`Pseudonyms` looks originals up there, so exports made at different times
agree. :func:`export_jobs` writes ``OUT/<label>/<study>/<series>/<sop>.dcm``, which is the
class-folder layout ``dicom-ai-node train --data OUT`` reads, and ``OUT/labels.csv`` with one
row per exported series (pseudonymous UIDs, the model and its finding, the radiologist's
feedback and the label used). The label is the radiologist-confirmed one where there is
feedback: the latest feedback on the job decides; agreeing keeps the model's label, disagreeing
with a two-label model gives the other label, and a disagreed series of a model with more
labels has no confirmed label and is left out.
"""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicom_ai_node.jobs.models import Feedback, Instance, Job, JobState, Pseudonym
from dicom_ai_node.jobs.store import add_event
from dicom_ai_node.spool import Spool, check_uid

log = logging.getLogger(__name__)

KEEP = frozenset(
    {
        "SpecificCharacterSet",
        "ImageType",
        "SOPClassUID",
        "StudyDate",
        "SeriesDate",
        "AcquisitionDate",
        "ContentDate",
        "StudyTime",
        "SeriesTime",
        "AcquisitionTime",
        "ContentTime",
        "Modality",
        "ConversionType",
        "Manufacturer",
        "ManufacturerModelName",
        "BodyPartExamined",
        "ScanningSequence",
        "SequenceVariant",
        "ScanOptions",
        "MRAcquisitionType",
        "SliceThickness",
        "KVP",
        "RepetitionTime",
        "EchoTime",
        "InversionTime",
        "NumberOfAverages",
        "ImagingFrequency",
        "ImagedNucleus",
        "EchoNumbers",
        "MagneticFieldStrength",
        "SpacingBetweenSlices",
        "EchoTrainLength",
        "FlipAngle",
        "DataCollectionDiameter",
        "ReconstructionDiameter",
        "GantryDetectorTilt",
        "TableHeight",
        "RotationDirection",
        "ExposureTime",
        "XRayTubeCurrent",
        "Exposure",
        "FilterType",
        "GeneratorPower",
        "FocalSpots",
        "ConvolutionKernel",
        "PatientPosition",
        "ViewPosition",
        "SeriesNumber",
        "AcquisitionNumber",
        "InstanceNumber",
        "PatientOrientation",
        "ImagePositionPatient",
        "ImageOrientationPatient",
        "PositionReferenceIndicator",
        "SliceLocation",
        "ImagesInAcquisition",
        "Laterality",
        "ImageLaterality",
        "SamplesPerPixel",
        "PhotometricInterpretation",
        "PlanarConfiguration",
        "NumberOfFrames",
        "FrameIncrementPointer",
        "Rows",
        "Columns",
        "PixelSpacing",
        "ImagerPixelSpacing",
        "BitsAllocated",
        "BitsStored",
        "HighBit",
        "PixelRepresentation",
        "SmallestImagePixelValue",
        "LargestImagePixelValue",
        "PixelPaddingValue",
        "BurnedInAnnotation",
        "PresentationLUTShape",
        "WindowCenter",
        "WindowWidth",
        "RescaleIntercept",
        "RescaleSlope",
        "RescaleType",
        "LossyImageCompression",
        "LossyImageCompressionRatio",
        "LossyImageCompressionMethod",
        "PixelData",
    }
)
# Type 2 attributes of the Patient, General Study and General Equipment modules (PS3.3
# C.7.1.1, C.7.2.1, C.7.5.1): present, empty (action Z of Table E.1-1).
EMPTY = ("PatientBirthDate", "PatientSex", "ReferringPhysicianName", "StudyID", "AccessionNumber")
REPLACED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")
DESCRIPTORS = ("StudyDescription", "SeriesDescription", "ProtocolName", "ImageComments")
# Text that may identify the patient, from which descriptors are cleaned (E.3.5).
IDENTIFYING = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "InstitutionName",
    "InstitutionAddress",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StationName",
)
METHOD_CODES = (  # PS3.16 CID 7050 De-identification Method
    ("113100", "Basic Application Confidentiality Profile"),
    ("113106", "Retain Longitudinal Temporal Information Full Dates Option"),
    ("113105", "Clean Descriptors Option"),
)


class NotExportableError(ValueError):
    """An instance the profile cannot de-identify (the message says why)."""


class Pseudonyms:
    """Originals to pseudonyms, kept in the job log's ``pseudonyms`` table (in the
    caller's session), so every export maps the same original to the same pseudonym."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self._known: dict[tuple[str, str], str] = {}

    def get(self, kind: str, original: str) -> str:
        """The pseudonym of ``original``; ``kind`` is ``uid`` (a new UID) or ``patient``."""
        key = (kind, original)
        if key in self._known:
            return self._known[key]
        row = self.session.get(Pseudonym, key)
        if row is None:
            value = generate_uid() if kind == "uid" else f"ANON-{generate_uid()[-12:]}"
            row = Pseudonym(kind=kind, original=original, pseudonym=value)
            self.session.add(row)
        self._known[key] = row.pseudonym
        return row.pseudonym


def identifying_values(ds: Dataset) -> list[str]:
    """The identifying text of a data set (and the parts of person names), longest first."""
    found: set[str] = set()
    for keyword in IDENTIFYING:
        value = ds.get(keyword)
        if value in (None, ""):
            continue
        for item in value if isinstance(value, MultiValue | list) else [value]:
            text = str(item).strip()
            if len(text) >= 2:
                found.add(text)
            found.update(part for part in re.split(r"[\^=\s,]+", text) if len(part) >= 2)
    return sorted(found, key=len, reverse=True)


def clean(text: str, identifying: Iterable[str]) -> str:
    """``text`` with every identifying value cut out (case-insensitive), as the Clean
    Descriptors Option asks (PS3.15 E.3.5); at most 64 characters."""
    for value in identifying:
        text = re.sub(re.escape(value), "", text, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip(" -_^,")[:64]


def deidentify(source: Dataset, pseudonyms: Pseudonyms) -> Dataset:
    """A de-identified copy of ``source`` (see the module's docstring). Raises
    :class:`NotExportableError`."""
    burned_in = str(source.get("BurnedInAnnotation", "")).upper()
    if burned_in != "NO":
        raise NotExportableError(
            f"Burned In Annotation is {burned_in or 'not stated'}: it may show identities "
            "in its pixels (Clean Pixel Data is not applied)"
        )
    out = Dataset()
    for element in source:
        if element.keyword in KEEP and element.VR != "SQ":
            out.add(element)
    patient = pseudonyms.get("patient", str(source.get("PatientID", "")))
    out.PatientID = patient
    out.PatientName = patient.replace("-", "^", 1)  # family^given: not the retired form
    for keyword in EMPTY:
        setattr(out, keyword, "")
    out.Manufacturer = source.get("Manufacturer", "")
    for keyword in REPLACED_UIDS:
        original = str(source.get(keyword, "") or "")
        if original:
            setattr(out, keyword, pseudonyms.get("uid", original))
    identifying = identifying_values(source)
    for keyword in DESCRIPTORS:
        if keyword in source:
            cleaned = clean(str(source.get(keyword) or ""), identifying)
            if cleaned:
                setattr(out, keyword, cleaned)
    out.PatientIdentityRemoved = "YES"
    out.DeidentificationMethod = "; ".join(meaning for _, meaning in METHOD_CODES)[:64]
    codes = []
    for value, meaning in METHOD_CODES:
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = value, "DCM", meaning
        codes.append(code)
    out.DeidentificationMethodCodeSequence = codes
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = out.SOPClassUID
    meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    meta.TransferSyntaxUID = source.file_meta.TransferSyntaxUID
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    out.file_meta = meta
    return out


LABELS_FILE = "labels.csv"
LABEL_COLUMNS = (
    "study_instance_uid",
    "series_instance_uid",
    "model",
    "model_version",
    "weights_sha256",
    "model_label",
    "probability",
    "feedback",
    "label",
)


def confirmed_label(model_label: str, agree: bool | None, labels: Sequence[str]) -> str | None:
    """The label a series is exported under: the model's, unless the latest feedback
    disagrees, then the other label of a two-label model (``None`` with more labels: the
    radiologist said what it is not, not what it is)."""
    if agree is None or agree:
        return model_label
    others = [name for name in labels if name != model_label]
    return others[0] if len(labels) == 2 and len(others) == 1 else None


def _latest_feedback(session: Session, job_ids: Sequence[int]) -> dict[int, bool]:
    """The latest feedback's agreement per job (jobs without feedback are absent)."""
    rows = session.execute(
        select(Feedback.job_id, Feedback.agree)
        .where(Feedback.job_id.in_(job_ids))
        .order_by(Feedback.id)
    ).all()
    return {job_id: agree for job_id, agree in rows}  # later rows overwrite earlier ones


@dataclass(frozen=True)
class Exported:
    """What an export wrote: files per label, and the instances it left out (and why)."""

    files: dict[str, int]
    skipped: dict[str, str]
    series: int  # rows of the labels file


def export_jobs(
    session: Session,
    spool: Spool,
    route: str,
    since: datetime,
    out: Path,
    model_labels: Mapping[str, Sequence[str]],
    advance: Callable[[int], None] | None = None,
) -> Exported:
    """De-identified copies of the received images of the finished (``done``) series jobs of
    ``route`` finished since ``since``, under ``out/<label>/``, and ``out/labels.csv`` (in
    the caller's transaction, which records the pseudonyms and an ``exported`` event).
    ``model_labels`` holds each model's label names, in the card's order."""
    jobs = session.scalars(
        select(Job).where(
            Job.route == route,
            Job.state == JobState.DONE.value,
            Job.finished_at >= since,
            Job.series_instance_uid.is_not(None),
            Job.label.is_not(None),
        )
    ).all()
    pseudonyms = Pseudonyms(session)
    feedback = _latest_feedback(session, [job.id for job in jobs])
    files: dict[str, int] = {}
    skipped: dict[str, str] = {}
    rows: list[dict[str, str]] = []
    for job in jobs:
        instances = session.scalars(
            select(Instance).where(Instance.series_instance_uid == job.series_instance_uid)
        ).all()
        agree = feedback.get(job.id)
        confirmed = confirmed_label(str(job.label), agree, model_labels.get(str(job.model), ()))
        if confirmed is None:
            for row in instances:
                skipped[row.sop_instance_uid] = (
                    f"the radiologist disagrees with {job.label} and model {job.model} has "
                    "more than two labels: no confirmed label"
                )
            continue
        label = re.sub(r"[^A-Za-z0-9._-]", "_", confirmed)
        exported = 0
        for row in instances:
            try:
                ds = deidentify(dcmread(spool.locate(row.path)), pseudonyms)
            except (NotExportableError, OSError) as exc:
                skipped[row.sop_instance_uid] = str(exc)
                continue
            path = (
                out
                / label
                / check_uid(str(ds.StudyInstanceUID), "Study Instance UID")
                / check_uid(str(ds.SeriesInstanceUID), "Series Instance UID")
                / f"{check_uid(str(ds.SOPInstanceUID), 'SOP Instance UID')}.dcm"
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files[label] = files.get(label, 0) + 1
            exported += 1
            if advance is not None:
                advance(1)
        if exported:
            rows.append(
                {
                    "study_instance_uid": pseudonyms.get("uid", job.study_instance_uid),
                    "series_instance_uid": pseudonyms.get("uid", str(job.series_instance_uid)),
                    "model": str(job.model or ""),
                    "model_version": str(job.model_version or ""),
                    "weights_sha256": str(job.weights_sha256 or ""),
                    "model_label": str(job.label),
                    "probability": "" if job.probability is None else f"{job.probability:.6f}",
                    "feedback": "none" if agree is None else ("agree" if agree else "disagree"),
                    "label": confirmed,
                }
            )
    out.mkdir(parents=True, exist_ok=True)
    with (out / LABELS_FILE).open("w", newline="", encoding="utf-8") as labels_file:
        writer = csv.DictWriter(labels_file, fieldnames=LABEL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    add_event(
        session,
        "exported",
        f"de-identified export of route {route} since {since:%Y-%m-%d}: "
        f"{sum(files.values())} images of {len(rows)} series, {len(skipped)} left out",
        route=route,
        files=files,
        series_exported=len(rows),
        skipped=len(skipped),
    )
    return Exported(files, skipped, len(rows))
