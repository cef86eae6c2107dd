"""What the SR, SC and KOS builders share: inputs, validation, identity and equipment.

Every result object goes into the source study (PS3.3 C.7.2.1 General Study: the Study
Instance UID is reused) as a new series, names the algorithm in the General Equipment
module (C.7.5.1) and in the Contributing Equipment Sequence (0018,A001) of the SOP Common
module (C.12.1), and is fully determined by its inputs: UIDs and the creation time are
arguments, so building twice gives the same bytes.
"""

from __future__ import annotations

import datetime
import functools
from collections.abc import Sequence
from copy import deepcopy
from dataclasses import dataclass

import highdicom as hd
from highdicom._standard_utils import does_iod_have_pixel_data
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import PYDICOM_ROOT_UID, generate_uid
from pydicom.valuerep import DA, DT, TM

from dicom_ai_node.infer.card import LabelSpec, ModelCard
from dicom_ai_node.infer.prediction import ImagePrediction, SeriesPrediction
from dicom_ai_node.report.render import SC_LAYOUTS, ScLayout

NODE_NAME = "dicom-ai-node"
NOT_FOR_DIAGNOSTIC_USE = "AI result, not for diagnostic use"

# Type 2 attributes of the Patient (C.7.1.1) and General Study (C.7.2.1) modules that
# highdicom's SR and KOS constructors read from the first evidence dataset.
_TYPE2_PATIENT_STUDY = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)
_PIXEL_DATA_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)
_REQUIRED_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")


@dataclass(frozen=True)
class ResultUIDs:
    """Series and SOP Instance UIDs of the result objects of one job: one SR, one SC per
    layout (all in one series, see :mod:`dicom_ai_node.report.sc`), one KOS."""

    sr_series: str
    sr_instance: str
    sc_series: str
    sc_instances: dict[ScLayout, str]
    kos_series: str
    kos_instance: str


@dataclass(frozen=True)
class ReportContext:
    """Who produces the results, where and when (the same for the three objects of a job).

    ``device_uid`` identifies this node installation; the Device Observer UID of a model
    (PS3.16 TID 1004) is derived from it, the model name and version, so that each model
    version is one stable observer device. ``created`` is the Content and Instance Creation
    Date/Time (e.g. when the job finished): pass the same value on a retry to rebuild
    identical objects. The SR, SC and KOS get Series Numbers ``series_number_base`` + 0,
    1 and 2.
    """

    station_ae_title: str
    device_uid: str
    software_version: str
    created: datetime.datetime
    institution_name: str | None = None
    series_number_base: int = 9100

    def __post_init__(self) -> None:
        if not self.station_ae_title or len(self.station_ae_title) > 16:
            raise ValueError("station_ae_title must be 1 to 16 characters (VR AE)")
        if self.series_number_base < 1:
            raise ValueError("series_number_base must be a positive integer")
        hd.UID(self.device_uid)  # raises ValueError when malformed


def result_uids(seed: str, prefix: str = PYDICOM_ROOT_UID) -> ResultUIDs:
    """UIDs for the results of one job, derived from ``seed`` (e.g. the job key).

    The same seed gives the same UIDs, so a retried job re-creates, and a PACS receives,
    the same instances instead of duplicates (PS3.5 Section 9: UIDs derived by hashing).
    """
    if not seed:
        raise ValueError("seed must not be empty")

    def uid(part: str) -> str:
        return str(generate_uid(prefix=prefix, entropy_srcs=[seed, part]))

    return ResultUIDs(
        sr_series=uid("sr-series"),
        sr_instance=uid("sr-instance"),
        sc_series=uid("sc-series"),
        sc_instances={layout: uid(f"sc-instance:{layout}") for layout in SC_LAYOUTS},
        kos_series=uid("kos-series"),
        kos_instance=uid("kos-instance"),
    )


@functools.cache
def _is_image_class(sop_class_uid: str) -> bool:
    """Whether the IOD of a SOP Class has pixel data (cached: the lookup is slow, and a
    series has one SOP Class for hundreds of images)."""
    return bool(does_iod_have_pixel_data(sop_class_uid))


def check_inputs(
    sources: Sequence[Dataset], prediction: SeriesPrediction, card: ModelCard
) -> dict[str, Dataset]:
    """Validate the builders' inputs; return the sources by SOP Instance UID.

    Raises ``ValueError`` when the sources are not images of one study, when the
    prediction belongs to another model, names an unknown label, or refers to an image
    that is not among the sources.
    """
    if not sources:
        raise ValueError("no source datasets given")
    by_uid: dict[str, Dataset] = {}
    for ds in sources:
        missing = [k for k in _REQUIRED_UIDS if not ds.get(k)]
        if missing:
            raise ValueError(f"source dataset lacks {', '.join(missing)}")
        if not _is_image_class(str(ds.SOPClassUID)):
            raise ValueError(
                f"source {ds.SOPInstanceUID} is not an image (SOP Class {ds.SOPClassUID})"
            )
        if not ds.get("Rows") or not ds.get("Columns"):
            raise ValueError(f"source {ds.SOPInstanceUID} lacks Rows/Columns")
        by_uid[str(ds.SOPInstanceUID)] = ds
    studies = {str(ds.StudyInstanceUID) for ds in sources}
    if len(studies) != 1:
        raise ValueError(f"sources belong to {len(studies)} studies, expected one")
    if (prediction.model, prediction.model_version) != (card.name, card.version):
        raise ValueError(
            f"prediction is from {prediction.model} {prediction.model_version}, "
            f"card is {card.name} {card.version}"
        )
    if not prediction.images:
        raise ValueError("prediction has no image predictions")
    label_spec(card, prediction.label)
    label_spec(card, prediction.positive_label)
    for image in prediction.images:
        if image.sop_instance_uid not in by_uid:
            raise ValueError(f"predicted image {image.sop_instance_uid} is not among the sources")
        label_spec(card, image.label)
        for name, p in (*image.probabilities.items(), *prediction.probabilities.items()):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"probability of {name!r} is {p}, outside [0, 1]")
        if prediction.positive_label not in image.probabilities:
            raise ValueError(
                f"image {image.sop_instance_uid} has no probability for the positive label"
            )
    if prediction.label not in prediction.probabilities:
        raise ValueError(f"prediction has no probability for its label {prediction.label!r}")
    return by_uid


def label_spec(card: ModelCard, name: str) -> LabelSpec:
    """The card's label called ``name``; ``ValueError`` if the card has none."""
    for label in card.labels:
        if label.name == name:
            return label
    raise ValueError(f"label {name!r} is not in model card {card.name} {card.version}")


def coded(label: LabelSpec) -> hd.sr.CodedConcept:
    """The label's code as a Code Sequence Macro item (PS3.3 Section 8.8)."""
    code = label.code
    return hd.sr.CodedConcept(
        value=code.value,
        scheme_designator=code.scheme,
        meaning=code.meaning,
        scheme_version=code.scheme_version,
    )


def flagged_images(prediction: SeriesPrediction, card: ModelCard) -> list[ImagePrediction]:
    """The images behind a positive result, most probable first.

    These are the images whose own label is a positive one; the key image (highest
    positive-label probability) is always first, even when only the aggregate reached
    the threshold.
    """
    ranked = sorted(
        prediction.images,
        key=lambda image: image.probabilities[prediction.positive_label],
        reverse=True,
    )
    return [ranked[0], *(i for i in ranked[1:] if label_spec(card, i.label).positive)]


def study_header(source: Dataset) -> Dataset:
    """A copy of the source header (no pixel data) fit to seed a result object.

    Patient and study attributes are type 2 (PS3.3 C.7.1.1, C.7.2.1): present but
    possibly empty. Studies in the wild omit some, and highdicom reads them all from the
    first evidence dataset, so the copy gets empty values for missing ones. Patient's Sex
    outside the enumerated values M, F, O is emptied rather than rejected. An empty first
    value of Specific Character Set (the default repertoire before code extensions, as in
    ``\\ISO 2022 IR 87``, PS3.3 C.12.1.1.2) is spelt ``ISO 2022 IR 6``, which highdicom
    accepts.
    """
    header = Dataset()
    for elem in source:
        if elem.tag not in _PIXEL_DATA_TAGS:
            header.add(deepcopy(elem))
    for keyword in _TYPE2_PATIENT_STUDY:
        if keyword not in header:
            setattr(header, keyword, None)
    if header.PatientSex not in ("M", "F", "O"):
        header.PatientSex = None
    charsets = header.get("SpecificCharacterSet")
    if isinstance(charsets, MultiValue) and len(charsets) > 1 and not charsets[0]:
        header.SpecificCharacterSet = ["ISO 2022 IR 6", *charsets[1:]]
    return header


def series_description(card: ModelCard, suffix: str = "") -> str:
    """Series Description (VR LO, 64 characters at most): "AI: <model> <version>[ suffix]"."""
    return f"AI: {card.name} {card.version}{suffix}"[:64]


def device_observer_uid(card: ModelCard, context: ReportContext) -> str:
    """The Device Observer UID of this model version on this node (PS3.16 TID 1004)."""
    return str(generate_uid(entropy_srcs=[context.device_uid, card.name, card.version]))


def observer_device(card: ModelCard, context: ReportContext) -> hd.sr.ObserverContext:
    """The algorithm as the observer device (PS3.16 TID 1002/1004)."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(card, context),
            name=card.name,
            manufacturer_name=card.manufacturer,
            model_name=card.name,
        ),
    )


def contributing_equipment(
    card: ModelCard, context: ReportContext
) -> list[hd.ContributingEquipment]:
    """Contributing Equipment items (PS3.3 C.12.1.1.5) for the algorithm and the node.

    Purpose of Reference is (109102, DCM, "Processing Equipment") from CID 7005: it is
    the only code there for equipment that processed the data (109103 is "Modifying
    Equipment"). highdicom adds the source's acquisition equipment and itself.
    """
    when = DT(context.created)
    return [
        hd.ContributingEquipment(
            manufacturer=card.manufacturer,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=card.name,
            software_versions=card.version,
            institution_name=context.institution_name,
            station_name=context.station_ae_title,
            contribution_datetime=when,
            contribution_description=f"AI classification by {card.name} {card.version}"[:64],
        ),
        hd.ContributingEquipment(
            manufacturer=NODE_NAME,
            purpose_of_reference=codes.DCM.ProcessingEquipment,
            manufacturer_model_name=NODE_NAME,
            software_versions=context.software_version,
            institution_name=context.institution_name,
            station_name=context.station_ae_title,
            contribution_datetime=when,
            contribution_description="DICOM node that ran the model and built this object",
        ),
    ]


def equipment_kwargs(card: ModelCard, context: ReportContext) -> dict[str, object]:
    """General Equipment (PS3.3 C.7.5.1) and timing arguments for highdicom's constructors.

    The equipment that produced the result is the algorithm: its manufacturer, name as
    model name and version as software version, so that viewers show which model spoke.
    """
    created = context.created
    return {
        "manufacturer": card.manufacturer,
        "manufacturer_model_name": card.name,
        "software_versions": card.version,
        "institution_name": context.institution_name,
        "content_date": created.date(),
        "content_time": created.time(),
        "series_date": created.date(),
        "series_time": created.time(),
        "contributing_equipment": contributing_equipment(card, context),
    }


def finish(dataset: Dataset, context: ReportContext) -> None:
    """Set what highdicom leaves to the clock, and the station, from the context.

    Instance Creation Date/Time (C.12.1) and highdicom's own Contribution DateTime
    otherwise come from ``datetime.now()``; with them fixed, the output is a pure
    function of the inputs.
    """
    created = context.created
    dataset.InstanceCreationDate = DA(created.date())
    dataset.InstanceCreationTime = TM(created.time())
    dataset.StationName = context.station_ae_title
    for item in dataset.ContributingEquipmentSequence:
        if item.get("ManufacturerModelName") == "highdicom":
            item.ContributionDateTime = DT(created)


# Patient Study (C.7.2.2) and General Study (C.7.2.1) attributes that highdicom's
# constructors do not copy. Viewers' study lists are fed from one instance of the study
# (Orthanc's DICOMweb QIDO-RS takes Study Description from whichever it reads), so every
# object the node adds carries them as the source has them.
_STUDY_LEVEL = (
    "StudyDescription",
    "ProcedureCodeSequence",
    "IssuerOfAccessionNumberSequence",
    "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy",
    "AdmittingDiagnosesDescription",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
)


def copy_study_level(dataset: Dataset, source: Dataset) -> None:
    """Give ``dataset`` the study-level attributes of ``source`` that it lacks (PS3.3
    C.7.2.1, C.7.2.2: the same for every instance of a study)."""
    for keyword in _STUDY_LEVEL:
        if keyword in source and keyword not in dataset and not source[keyword].is_empty:
            dataset[keyword] = deepcopy(source[keyword])
