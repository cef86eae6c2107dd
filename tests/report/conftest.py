"""Sources, predictions and a model card for the report tests, all made in code."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence

import numpy as np
import pydicom
import pytest
from pydicom.data import get_charset_files, get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from dicom_ai_node.infer.card import CodedConcept, InputSpec, LabelSpec, ModelCard
from dicom_ai_node.infer.prediction import ImagePrediction, SeriesPrediction
from dicom_ai_node.report import ReportContext

INPUT = 64  # the card's model input size (square)


@pytest.fixture
def card() -> ModelCard:
    return ModelCard(
        name="pneumo-cnn",
        version="1.4.2",
        manufacturer="Example AI Lab",
        not_for_diagnostic_use=True,
        input=InputSpec(height=INPUT, width=INPUT),
        labels=[
            LabelSpec(
                name="normal",
                code=CodedConcept(value="17621005", scheme="SCT", meaning="Normal"),
                positive=False,
            ),
            LabelSpec(
                name="pneumonia",
                code=CodedConcept(value="233604007", scheme="SCT", meaning="Pneumonia"),
                positive=True,
            ),
        ],
    )


@pytest.fixture
def context() -> ReportContext:
    return ReportContext(
        station_ae_title="AI_NODE",
        device_uid="1.2.826.0.1.3680043.8.498.4242",
        software_version="0.1.0",
        created=datetime.datetime(2025, 3, 4, 10, 11, 12),
        institution_name="Example Hospital",
    )


def blob(center: tuple[float, float] = (0.4, 0.6), sigma: float = 0.12) -> np.ndarray:
    """A Gaussian heat map at model input size, peak 1 at ``center`` (row, col fractions)."""
    y, x = np.mgrid[0:INPUT, 0:INPUT] / (INPUT - 1)
    heatmap: np.ndarray = np.exp(
        -((y - center[0]) ** 2 + (x - center[1]) ** 2) / (2 * sigma**2)
    ).astype(np.float32)
    return heatmap


PredictionFactory = Callable[[Sequence[Dataset], Sequence[float]], SeriesPrediction]


@pytest.fixture
def predict(card: ModelCard) -> PredictionFactory:
    """A max-aggregated prediction with the given pneumonia probability per source image."""

    def make(sources: Sequence[Dataset], p_pneumonia: Sequence[float]) -> SeriesPrediction:
        images = tuple(
            ImagePrediction(
                sop_instance_uid=str(ds.SOPInstanceUID),
                frame_number=None,
                probabilities={"normal": 1 - p, "pneumonia": p},
                label="pneumonia" if p >= card.threshold else "normal",
                heatmap=blob(),
            )
            for ds, p in zip(sources, p_pneumonia, strict=True)
        )
        p_series = max(p_pneumonia)
        positive = p_series >= card.threshold
        return SeriesPrediction(
            model=card.name,
            model_version=card.version,
            positive_label="pneumonia",
            label="pneumonia" if positive else "normal",
            probability=p_series,
            positive=positive,
            probabilities={"normal": 1 - p_series, "pneumonia": p_series},
            images=images,
        )

    return make


@pytest.fixture
def ct_small() -> Dataset:
    """pydicom's CT_small.dcm: one 128x128 CT slice, all patient and study attributes."""
    return pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))


@pytest.fixture
def cr_mono1() -> Dataset:
    """A real Agfa CR chest header (MONOCHROME1, window 2048/4096, ISO 2022 IR 87 Japanese
    patient name) with synthetic 12-bit pixels: two dark lungs in a bright body as
    displayed, stored inverted as MONOCHROME1 requires."""
    ds = pydicom.dcmread(get_charset_files("chrJapMulti.dcm")[0])
    y, x = np.mgrid[0:400, 0:320]
    body = ((y - 210) / 190) ** 2 + ((x - 160) / 150) ** 2 <= 1
    lungs = (((y - 190) / 120) ** 2 + ((np.abs(x - 160) - 65) / 45) ** 2) <= 1
    shown = np.where(body, 3000, 300) - np.where(lungs, 2200, 0)
    ds.Rows, ds.Columns = shown.shape
    ds.PixelData = (4095 - shown).astype(np.uint16).tobytes()
    ds["PixelData"].VR = "OW"
    return ds


@pytest.fixture
def ct_j2k() -> Dataset:
    """A 512x512 CT slice in lossy JPEG 2000 (decoded through pylibjpeg)."""
    return pydicom.dcmread(str(get_testdata_file("693_J2KI.dcm")))


@pytest.fixture
def ct_series() -> list[Dataset]:
    """Five synthetic 96x96 CT slices of one series; patient birth date, accession
    number, study ID and referring physician are absent (type 2 attributes omitted)."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    y, x = np.mgrid[0:96, 0:96]
    body = ((y - 48) ** 2 / 40**2 + (x - 48) ** 2 / 44**2) <= 1
    slices = []
    for i in range(5):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientSex = "Doe^Jane", "P-0042", "F"
        ds.StudyDate, ds.StudyTime = "20250301", "081500"
        ds.StudyDescription = "CT CHEST"
        ds.Modality, ds.BodyPartExamined, ds.Manufacturer = "CT", "CHEST", "Synthetic"
        ds.SeriesNumber, ds.InstanceNumber = 3, i + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [-120.0, -120.0, -50.0 + 5 * i]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [2.5, 2.5], 5.0
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = 96
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        hu = np.where(body, 0, -1000) - 700 * np.exp(-((y - 40) ** 2 + (x - 60) ** 2) / 200) * body
        ds.PixelData = (hu + 1024).astype(np.int16).tobytes()
        ds["PixelData"].VR = "OW"
        slices.append(ds)
    return slices
