"""The result as a picture every viewer shows: a Secondary Capture Image (PS3.3 A.8.1).

One RGB image per layout, rendered from the key image (the most positive one, or the
radiograph) with the heat map and the result burned in (above, below or over the image:
:data:`~dicom_ai_node.report.render.ScLayout`), in a new series of the study.

The layouts of one result are instances of one series. PS3.3 A.1.2.3 puts instances in
one series when they have the same modality, the same equipment and the same series
information (C.7.3.1 General Series, C.7.5.1 General Equipment, C.8.6.1 SC Equipment): the
layouts differ only in their pixels. Each is an instance of its own (SOP Instance UID,
Instance Number), as two different images are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.infer.prediction import SeriesPrediction, percent
from dicom_ai_node.report.common import (
    NOT_FOR_DIAGNOSTIC_USE,
    ReportContext,
    check_inputs,
    copy_study_level,
    equipment_kwargs,
    finish,
    label_spec,
    series_description,
    study_header,
)
from dicom_ai_node.report.render import DEFAULT_SC_LAYOUT, SC_LAYOUTS, ScLayout, render

_WHITE, _YELLOW, _ORANGE = (255, 255, 255), (255, 220, 0), (255, 150, 40)
# Modalities for which OHIF v3 opens its cine player over the image (its
# "autoCineModalities" customisation): the SC keeps "OT" only for such sources.
_CINE_MODALITIES = frozenset({"OT", "US"})
# Patient direction letters of the +/- x, y, z axes of the patient coordinate system
# (PS3.3 C.7.6.1.1.1 and C.7.6.2.1.1).
_AXIS_LETTERS = (("L", "R"), ("P", "A"), ("H", "F"))


def build_sc(
    key_source: Dataset,
    prediction: SeriesPrediction,
    card: ModelCard,
    *,
    series_uid: str,
    sop_instance_uid: str,
    context: ReportContext,
    layout: ScLayout = DEFAULT_SC_LAYOUT,
) -> hd.sc.SCImage:
    """Build the Secondary Capture of ``prediction`` from ``key_source`` (with pixels),
    its text placed as ``layout`` says.

    ``key_source`` must be the prediction's key image. The image is marked Burned In
    Annotation YES (C.7.6.1.1.2 reason: the result text is in the pixels), Conversion Type
    WSD ("workstation", C.8.6.1), and references its source image (Source Image
    Sequence, C.7.6.1). Its Instance Number is the layout's place in
    :data:`~dicom_ai_node.report.render.SC_LAYOUTS` (1 for "below"), so that the layouts
    of one series are told apart. Raises ``ValueError`` on inconsistent inputs.
    """
    if layout not in SC_LAYOUTS:
        raise ValueError(f"unknown SC layout {layout!r}, expected one of {SC_LAYOUTS}")
    key = prediction.key_image
    given = key_source.get("SOPInstanceUID")
    if key.sop_instance_uid != given:
        raise ValueError(f"key_source is {given}, the key image is {key.sop_instance_uid}")
    check_inputs([key_source], _only_key(prediction), card)
    if "PixelData" not in key_source:
        raise ValueError("key_source has no pixel data")
    pixels = render(
        key_source,
        key.frame_number,
        key.heatmap,
        _text_lines(prediction, card),
        card.preprocessing.keep_aspect,
        layout,
    )
    orientation = _patient_orientation(key_source)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=study_header(key_source),
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=series_uid,
        series_number=context.series_number_base + 1,
        sop_instance_uid=sop_instance_uid,
        instance_number=SC_LAYOUTS.index(layout) + 1,
        patient_orientation=orientation or ("L", "P"),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=series_description(card, " result image"),
        **equipment_kwargs(card, context),  # type: ignore[arg-type]
    )
    if orientation is None:
        sc.PatientOrientation = []  # type 2C: unknown, so present and empty
    sc.Laterality = str(key_source.get("Laterality") or "")  # type 2C (C.7.3.1), as the source
    # The SC Equipment Module's Modality (PS3.3 C.8.6.1, type 3) names the source
    # equipment and overrides "OT" of the General Series Module: the source's modality,
    # so that viewers do not treat the image as a cine clip.
    source_modality = str(key_source.get("Modality") or "")
    if source_modality and source_modality not in _CINE_MODALITIES:
        sc.Modality = source_modality
    sc.ConversionType = "WSD"
    sc.BurnedInAnnotation = "YES"
    sc.DateOfSecondaryCapture = sc.ContentDate
    sc.TimeOfSecondaryCapture = sc.ContentTime
    where = "over the image" if layout == "overlay" else f"{layout} the image"
    sc.DerivationDescription = f"Source image with the AI heat map, result burned in {where}"
    sc.SourceImageSequence = [_source_reference(key_source, key.frame_number)]
    if key_source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"  # C.7.6.1.1.5: once lossy, derived images stay so
        for keyword in ("LossyImageCompressionRatio", "LossyImageCompressionMethod"):
            if keyword in key_source:
                sc[keyword] = key_source[keyword]
    copy_study_level(sc, key_source)
    finish(sc, context)
    return sc


def _only_key(prediction: SeriesPrediction) -> SeriesPrediction:
    """The prediction restricted to its key image, to validate against the key source."""
    return replace(prediction, images=(prediction.key_image,), skipped=())


def _text_lines(
    prediction: SeriesPrediction, card: ModelCard
) -> list[tuple[str, tuple[int, int, int]]]:
    """Result, model, weights hash (its first 16 hex digits), heat map method, and the
    not-for-diagnostic-use notice when the card asks for it."""
    meaning = label_spec(card, prediction.label).code.meaning
    probability = prediction.probabilities[prediction.label]
    lines = [
        (f"AI: {meaning} {percent(probability)}", _YELLOW if prediction.positive else _WHITE),
        (f"{card.name} {card.version} ({card.manufacturer})", _WHITE),
        (f"weights sha256 {prediction.weights_sha256[:16]}", _WHITE),
        (
            f"heat map: {prediction.explanation}"
            if prediction.key_image.heatmap is not None
            else "no heat map made by this model",
            _WHITE,
        ),
    ]
    if card.not_for_diagnostic_use:
        lines.append((NOT_FOR_DIAGNOSTIC_USE, _ORANGE))
    return lines


def _patient_orientation(source: Dataset) -> tuple[str, str] | None:
    """Principal row and column directions, from Patient Orientation or Image
    Orientation (Patient); ``None`` when the source gives neither.

    highdicom accepts single letters only; the first letter of each value is the
    principal direction (C.7.6.1.1.1).
    """
    given = source.get("PatientOrientation")
    if given and len(given) == 2 and all(v and v[0] in "LRAPHF" for v in given):
        return str(given[0])[0], str(given[1])[0]
    cosines = source.get("ImageOrientationPatient")
    if cosines and len(cosines) == 6:
        return _direction(cosines[:3]), _direction(cosines[3:])
    return None


def _direction(cosines: Sequence[float]) -> str:
    axis = max(range(3), key=lambda i: abs(float(cosines[i])))
    return _AXIS_LETTERS[axis][0 if float(cosines[axis]) > 0 else 1]


def _source_reference(source: Dataset, frame_number: int | None) -> Dataset:
    """A Source Image Sequence item (PS3.3 C.7.6.1, purpose from CID 7202)."""
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if frame_number is not None:
        item.ReferencedFrameNumber = frame_number
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item
