"""Synthetic DICOM studies and training arrays from the phantoms, reproducible from a seed.

Every study draws its pixels and identifiers from its own random stream, seeded by
(seed, task, label, study index), and its UIDs from ``generate_uid`` with the same entropy, so
the same seed always gives the same pixels, UIDs and headers. Studies cycle through a mix of
transfer syntaxes (explicit and implicit VR little endian, RLE lossless, JPEG 2000 lossless) as
a PACS sends them.

The headers fill the modules of the IODs (PS3.3 A.2 CR Image, A.26 Digital X-Ray Image,
A.3 CT Image): Patient (C.7.1.1), General Study (C.7.2.1), General Series (C.7.3.1), Frame of
Reference (C.7.4.1), General Equipment (C.7.5.1), General Image (C.7.6.1), Image Plane
(C.7.6.2), Image Pixel (C.7.6.3), CR/DX/CT Image (C.8.1.2, C.8.11.7, C.8.2.1), VOI LUT
(C.11.2) and SOP Common (C.12.1).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from dicom_ai_node.infer.card import InputSpec, Window
from dicom_ai_node.infer.preprocess import apply_window, fit_to_input
from dicom_ai_node.synth.phantoms import (
    HeadGeometry,
    chest_radiograph,
    head_ct_slice,
    slice_heights,
)


class Task(StrEnum):
    """The synthetic classification tasks."""

    CXR_OPACITY = "cxr-opacity"
    HEAD_CT_HEMORRHAGE = "head-ct-hemorrhage"


class Label(StrEnum):
    """Ground truth of a synthetic study."""

    POSITIVE = "positive"
    NEGATIVE = "negative"


#: The brain window (centre 40 HU, width 80 HU) head CT is read with, and the demo model uses.
BRAIN_WINDOW = Window(center=40.0, width=80.0)

#: Transfer syntaxes the studies cycle through, one per study.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    RLELossless,
    JPEG2000Lossless,
    ImplicitVRLittleEndian,
)

_FIRST_NAMES = ("Alex", "Sam", "Robin", "Kim", "Jo", "Charlie", "Max", "Lee", "Noor", "Yuki")
_LAST_NAMES = ("Phantom", "Synthetic", "Doe", "Test", "Model", "Sample")
_TASK_CODE = {Task.CXR_OPACITY: 1, Task.HEAD_CT_HEMORRHAGE: 2}
_LABEL_CODE = {Label.NEGATIVE: 0, Label.POSITIVE: 1}
_DEFAULT_SIZE = {Task.CXR_OPACITY: 512, Task.HEAD_CT_HEMORRHAGE: 256}


def generate_studies(
    task: Task,
    label: Label,
    count: int,
    out_dir: Path,
    seed: int = 0,
    *,
    size: int | None = None,
    slices: int = 24,
    start: int = 0,
) -> list[Path]:
    """Write ``count`` studies as ``out_dir/<StudyInstanceUID>/<SeriesInstanceUID>/<n>.dcm``.

    ``size`` is the image matrix (default 512 for radiographs, 256 for CT); ``slices`` the
    number of axial CT slices; ``start`` the index of the first study (studies ``start`` to
    ``start + count - 1`` of the seed's sequence). Returns the study directories, in order.
    """
    studies = []
    for index in range(start, start + count):
        datasets = _study(Task(task), Label(label), index, seed, size, slices)
        study_dir = out_dir / datasets[0].StudyInstanceUID
        series_dir = study_dir / datasets[0].SeriesInstanceUID
        series_dir.mkdir(parents=True, exist_ok=True)
        for ds in datasets:
            ds.save_as(series_dir / f"{ds.InstanceNumber:04d}.dcm", enforce_file_format=True)
        studies.append(study_dir)
    return studies


def _study(
    task: Task, label: Label, index: int, seed: int, size: int | None, slices: int
) -> list[Dataset]:
    """The datasets of one study (one series), ready to save."""
    stream = [seed, _TASK_CODE[task], _LABEL_CODE[label], index]
    rng = np.random.default_rng(stream)
    entropy = [str(value) for value in stream]
    study = _patient_and_study(rng, task, entropy)
    syntax = TRANSFER_SYNTAXES[index % len(TRANSFER_SYNTAXES)]
    positive = label is Label.POSITIVE
    if task is Task.CXR_OPACITY:
        datasets = [_radiograph(rng, study, size or _DEFAULT_SIZE[task], positive, entropy)]
    else:
        datasets = _head_ct(rng, study, size or _DEFAULT_SIZE[task], slices, positive, entropy)
    for ds in datasets:
        if syntax in (RLELossless, JPEG2000Lossless):
            ds.compress(syntax, generate_instance_uid=False)
        else:
            ds.file_meta.TransferSyntaxUID = syntax
    return datasets


def _patient_and_study(rng: np.random.Generator, task: Task, entropy: list[str]) -> Dataset:
    """Patient (PS3.3 C.7.1.1) and General Study (C.7.2.1) attributes shared by a study."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}"
    ds.PatientID = f"SYN{rng.integers(10**7, 10**8)}"
    birth = dt.date(1940, 1, 1) + dt.timedelta(days=int(rng.integers(0, 60 * 365)))
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M", "O"]))
    ds.PatientIdentityRemoved = "YES"  # PS3.3 C.7.1.1: synthetic, no real patient behind it
    ds.DeidentificationMethod = "Synthetic phantom, no patient data"  # type 1C with the above
    study_day = dt.date(2024, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365)))
    seconds = int(rng.integers(7 * 3600, 19 * 3600))
    ds.StudyDate = study_day.strftime("%Y%m%d")
    ds.StudyTime = f"{seconds // 3600:02d}{seconds // 60 % 60:02d}{seconds % 60:02d}"
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[*entropy, "study"])
    ds.AccessionNumber = f"A{rng.integers(10**8, 10**9)}"
    ds.StudyID = f"{rng.integers(1, 10**6)}"
    ds.ReferringPhysicianName = "Referrer^Demo"
    ds.StudyDescription = "XR CHEST PA" if task is Task.CXR_OPACITY else "CT HEAD WO CONTRAST"
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[*entropy, "series"])
    ds.SeriesNumber = 1
    ds.SeriesDate = ds.StudyDate
    ds.SeriesTime = ds.StudyTime
    ds.Manufacturer = "dicom-ai-node synth"
    ds.ManufacturerModelName = "Phantom"
    ds.SoftwareVersions = "0.1"
    ds.InstitutionName = "Synthetic Hospital"
    ds.StationName = "SYNTH1"
    ds.ImageComments = "Synthetic phantom generated by dicom-ai-node; not patient data"
    return ds


def _image(study: Dataset, sop_class: UID, instance: int, entropy: list[str]) -> Dataset:
    """A copy of the study attributes with file meta and SOP Common (PS3.3 C.12.1)."""
    ds = Dataset()
    ds.update(study)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid(entropy_srcs=[*entropy, "instance", str(instance)])
    ds.InstanceNumber = instance
    ds.ContentDate = study.StudyDate
    ds.ContentTime = study.StudyTime
    ds.AcquisitionNumber = 1
    ds.BurnedInAnnotation = "NO"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _radiograph(
    rng: np.random.Generator, study: Dataset, size: int, opacity: bool, entropy: list[str]
) -> Dataset:
    """A CR (MONOCHROME1) or DX (MONOCHROME1 or 2) chest radiograph with a window in the file."""
    kind = int(rng.integers(0, 3))
    sop_class = (
        ComputedRadiographyImageStorage if kind == 0 else DigitalXRayImageStorageForPresentation
    )
    photometric = "MONOCHROME1" if kind < 2 else "MONOCHROME2"
    display = chest_radiograph(rng, size, opacity)
    ds = _image(study, sop_class, 1, entropy)
    ds.Modality = "CR" if kind == 0 else "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]  # PS3.3 C.7.6.1.1.1: rows towards patient left, feet
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesDescription = "CHEST PA"
    ds.ImagerPixelSpacing = [0.7, 0.7]
    ds.KVP = 120
    stored = np.round((1.0 - display if photometric == "MONOCHROME1" else display) * 4000 + 48)
    ds.set_pixel_data(stored.astype(np.uint16), photometric, 12, generate_instance_uid=False)
    if kind > 0:  # DX Image module, PS3.3 C.8.11.7 (For Presentation)
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.DetectorType = "SCINTILLATOR"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
        ds.LossyImageCompression = "00"
    ds.WindowCenter = 2048
    ds.WindowWidth = 4000
    return ds


def _head_ct(
    rng: np.random.Generator,
    study: Dataset,
    size: int,
    slices: int,
    hemorrhage: bool,
    entropy: list[str],
) -> list[Dataset]:
    """An axial head CT series, stored as HU + 1024 (rescale intercept -1024, PS3.3 C.11.1)."""
    head = HeadGeometry.random(rng, hemorrhage)
    spacing, thickness = 230.0 / size, 5.0
    frame_of_reference = generate_uid(entropy_srcs=[*entropy, "frame-of-reference"])
    datasets = []
    for number, z in enumerate(slice_heights(slices), start=1):
        hu = head_ct_slice(rng, size, head, float(z))
        ds = _image(study, CTImageStorage, number, entropy)
        ds.Modality = "CT"
        ds.BodyPartExamined = "HEAD"
        ds.SeriesDescription = "HEAD 5mm"
        ds.PatientPosition = "HFS"
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = thickness
        location = (number - 1) * thickness
        ds.ImagePositionPatient = [-size * spacing / 2, -size * spacing / 2, location]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = location
        ds.KVP = 120
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = BRAIN_WINDOW.center
        ds.WindowWidth = BRAIN_WINDOW.width
        stored = np.clip(np.round(hu + 1024), 0, 4095).astype(np.uint16)
        ds.set_pixel_data(stored, "MONOCHROME2", 12, generate_instance_uid=False)
        datasets.append(ds)
    return datasets


def phantom_arrays(
    task: Task,
    labels: Sequence[int] | npt.NDArray[np.int64],
    input_spec: InputSpec,
    seed: int = 0,
    *,
    size: int | None = None,
) -> npt.NDArray[np.float32]:
    """Model inputs (n, h, w, c) in [0, 1] for the given 0/1 labels, without writing DICOM.

    The fast path for training: the same phantoms, rendered at ``size`` and taken through the
    same display transform (the file window for radiographs, the brain window for CT) and the
    same resize as :func:`dicom_ai_node.infer.preprocess.to_model_input`; ``size`` defaults to
    the matrix :func:`generate_studies` writes. Head CT samples are
    single slices at random heights; a positive slice crosses the hyperdensity.
    """
    rng = np.random.default_rng([seed, _TASK_CODE[task]])
    size = size or _DEFAULT_SIZE[task]
    out = np.empty(
        (len(labels), input_spec.height, input_spec.width, input_spec.channels), np.float32
    )
    for i, label in enumerate(labels):
        if task is Task.CXR_OPACITY:
            display = chest_radiograph(rng, size, bool(label))
        else:
            head = HeadGeometry.random(rng, bool(label))
            z = (
                head.bleed[0] + rng.uniform(-0.5, 0.5) * head.bleed[3]
                if head.bleed
                else rng.uniform(-0.7, 0.7)
            )
            display = apply_window(
                head_ct_slice(rng, size, head, z), BRAIN_WINDOW.center, BRAIN_WINDOW.width
            )
        image = display.astype(np.float32)[..., np.newaxis]
        out[i] = fit_to_input(np.repeat(image, input_spec.channels, axis=-1), input_spec)
    return out
