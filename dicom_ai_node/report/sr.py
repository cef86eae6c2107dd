"""The classification as a Comprehensive 3D SR with a TID 1500 Measurement Report.

This is the encoding the IHE AI Results (AIR) profile asks for: PS3.16 TID 1500 at the
root with the algorithm as observer device (TID 1002/1004), the procedure reported
(CID 100), the source images in an image library (TID 1600), and one TID 1501
Measurement and Qualitative Evaluation Group per classification: the series result, and
for multi-image series the key image and the other images the model found positive.

Each group is a TID 1410 Planar ROI group: its Image Region (SCOORD POLYLINE) outlines the
hot region of the heat map on its image (the key image for the series result), and its
measurement is named by the finding with the probability in percent. This is what OHIF v3
draws: a TID 1500 group without a region gives it nothing to show (and throws), and it
labels a region with the concept names of the group's NUM items, "<meaning>: <value>
<unit>" (extensions/cornerstone-dicom-sr, ``_processTID1410Measurement``), so the text
reads "Pneumonia: 87.00 %". The finding is also the group's qualitative evaluation, and the
anatomy is a Finding Site of the measurement (TID 300), not of the group, because OHIF
shows group-level finding sites by their code value.
"""

from __future__ import annotations

from collections.abc import Sequence
from copy import deepcopy

import highdicom as hd
from highdicom._standard_utils import get_anatomic_region_map
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from dicom_ai_node.infer.card import Aggregation, LabelSpec, ModelCard
from dicom_ai_node.infer.prediction import ImagePrediction, SeriesPrediction
from dicom_ai_node.report.common import (
    ReportContext,
    check_inputs,
    coded,
    copy_study_level,
    equipment_kwargs,
    finish,
    flagged_images,
    label_spec,
    observer_device,
    series_description,
    study_header,
)
from dicom_ai_node.report.region import hot_region_outline

# Concept name of the qualitative evaluation (TID 1501 row "$QualitativeEvaluation"):
# the value is the label's own code. Not (121071, DCM, "Finding"): highdicom's reader
# skips CODE items so named when it collects qualitative evaluations.
FINDING = Code("404684003", "SCT", "Clinical finding")
# Unit of the probability (TID 300), from CID 7181: percent reads well where a viewer
# shows a unit by its code value (OHIF), which "1" (no units) does not.
PERCENT = codes.UCUM.Percent
# At most this many per-image groups, so that a long positive CT stays readable.
MAX_IMAGE_GROUPS = 10

# CID 100 Quantitative Diagnostic Imaging Procedures, by Modality (0008,0060); other
# modalities, X-ray ones included, get (363679005, SCT, "Imaging procedure"). The
# current CID 100 also has (43468-8, LN, "XR unspecified body region"), but pixelmed's
# validator (2022 dictionary) rejects it as not in the context group.
_PROCEDURES: dict[str, Code] = {
    "CT": codes.LN.CTUnspecifiedBodyRegion,
    "MR": codes.LN.MRIUnspecifiedBodyRegion,
    "NM": codes.LN.NMUnspecifiedBodyRegion,
    "PT": codes.LN.PETUnspecifiedBodyRegion,
}
# How images' probabilities became the series one, as a TID 300 Derivation (CID 7464).
_DERIVATIONS: dict[Aggregation, Code] = {
    Aggregation.MAX: codes.SCT.Maximum,
    Aggregation.MEAN: codes.SCT.Mean,
}
# Attributes (and their multiplicity) highdicom's TID 1603/1604 descriptors read
# unconditionally for projection and cross-sectional images.
_PROJECTION = {"PatientOrientation": 2, "ImagerPixelSpacing": 2}
_CROSS_SECTIONAL = {
    "PixelSpacing": 2,
    "ImageOrientationPatient": 6,
    "ImagePositionPatient": 3,
    "SliceThickness": 1,
}
_LIBRARY_DESCRIPTORS: dict[str, dict[str, int]] = {
    **dict.fromkeys(("CT", "MR", "PT"), _CROSS_SECTIONAL),
    **dict.fromkeys(("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA"), _PROJECTION),
}


def build_sr(
    sources: Sequence[Dataset],
    prediction: SeriesPrediction,
    card: ModelCard,
    *,
    series_uid: str,
    sop_instance_uid: str,
    context: ReportContext,
    predecessors: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 SR of ``prediction`` on the series made of ``sources``.

    ``predecessors`` are the SRs this one amends (the results of the series before late
    instances reopened it, see :func:`predecessor`): named in the Predecessor Documents
    Sequence (PS3.3 C.17.2.3).

    ``sources`` are the headers of the series' images (pixel data not needed). The SR
    is COMPLETE (the algorithm adds nothing later), UNVERIFIED (no person attested it)
    and PRELIMINARY (the radiologist's report, not this, is final): PS3.3 C.17.2.
    Raises ``ValueError`` on inconsistent inputs.
    """
    by_uid = check_inputs(sources, prediction, card)
    algorithm = hd.sr.AlgorithmIdentification(
        name=card.name,
        version=card.version,
        family=codes.DCM.ArtificialIntelligence,
        parameters=_algorithm_parameters(prediction),
    )
    sites = _finding_sites(sources[0])
    key = prediction.key_image
    groups = [
        _group(
            image=key,
            source=by_uid[key.sop_instance_uid],
            label=label_spec(card, prediction.label),
            probability=prediction.probabilities[prediction.label],
            derivation=_DERIVATIONS.get(card.aggregation),
            identifier=f"{card.name} series result",
            tracking_uid=_tracking_uid(sop_instance_uid, "series"),
            card=card,
            algorithm=algorithm,
            sites=sites,
        )
    ]
    # The image library (TID 1600) lists the images the content references: the key image
    # and those of the per-image groups. Every source image is still listed in the
    # evidence (Current Requested Procedure Evidence Sequence); describing all of them
    # again in the library made a 200-slice CT's SR take seconds to build.
    referenced = [by_uid[key.sop_instance_uid]]
    if len(prediction.images) > 1:
        for image in flagged_images(prediction, card)[:MAX_IMAGE_GROUPS]:
            source = by_uid[image.sop_instance_uid]
            groups.append(_image_group(image, source, card, algorithm, sites, sop_instance_uid))
            if source not in referenced:
                referenced.append(source)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=observer_device(card, context)
        ),
        procedure_reported=_PROCEDURES.get(
            sources[0].get("Modality", ""), codes.SCT.ImagingProcedure
        ),
        imaging_measurements=groups,
        title=codes.cid7021.ImagingMeasurementReport,
        referenced_images=[_library_entry(ds) for ds in referenced],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[study_header(sources[0]), *sources[1:]],
        content=report,
        series_instance_uid=series_uid,
        series_number=context.series_number_base,
        sop_instance_uid=sop_instance_uid,
        instance_number=1,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=list(predecessors) or None,
        series_description=series_description(card),
        **equipment_kwargs(card, context),  # type: ignore[arg-type]
    )
    copy_study_level(sr, sources[0])
    finish(sr, context)
    return sr


def predecessor(study_uid: str, series_uid: str, sop_class_uid: str, sop_uid: str) -> Dataset:
    """The identifiers of an earlier SR, as the Predecessor Documents Sequence cites it."""
    ds = Dataset()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = sop_uid
    return ds


def _algorithm_parameters(prediction: SeriesPrediction) -> list[str] | None:
    """Algorithm Parameters (TID 4019, 111002) naming the weights and the heat map method:
    with name and version they identify the model that produced the result."""
    if not prediction.weights_sha256:
        return None
    return [f"weights sha256 {prediction.weights_sha256}", f"heat map {prediction.explanation}"]


def _image_group(
    image: ImagePrediction,
    source: Dataset,
    card: ModelCard,
    algorithm: hd.sr.AlgorithmIdentification,
    sites: list[hd.sr.FindingSite],
    sop_instance_uid: str,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The group of one image (or frame), its region on that image."""
    where = image.sop_instance_uid
    if image.frame_number is not None:
        where = f"{where}#{image.frame_number}"
    number = source.get("InstanceNumber")
    return _group(
        image=image,
        source=source,
        label=label_spec(card, image.label),
        probability=image.probabilities[image.label],
        derivation=None,
        identifier=f"{card.name} image {number if number is not None else where}",
        tracking_uid=_tracking_uid(sop_instance_uid, where),
        card=card,
        algorithm=algorithm,
        sites=sites,
    )


def _group(
    *,
    image: ImagePrediction,
    source: Dataset,
    label: LabelSpec,
    probability: float,
    derivation: Code | None,
    identifier: str,
    tracking_uid: str,
    card: ModelCard,
    algorithm: hd.sr.AlgorithmIdentification,
    sites: list[hd.sr.FindingSite],
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A TID 1410 group: the finding and its probability on the hot region of ``image``.

    The measurement (TID 300) is named by the finding's code and valued in percent, with
    the anatomy as its Finding Site and, for an aggregate, its Derivation (CID 7464).
    """
    frames = None if image.frame_number is None else [image.frame_number]
    outline = hot_region_outline(
        source, image.frame_number, image.heatmap, card.preprocessing.keep_aspect
    )
    finding = coded(label)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid, identifier=identifier[:64]),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=outline,
            source_image=hd.sr.SourceImageForRegion.from_source_image(source, frames),
        ),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(
                name=finding,
                value=round(100 * probability, 4),
                unit=PERCENT,
                derivation=derivation,
                finding_sites=sites,
            )
        ],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(FINDING, finding)],
    )


def _tracking_uid(sop_instance_uid: str, part: str) -> str:
    """A Tracking Unique Identifier derived from the SR's UID (deterministic)."""
    return str(generate_uid(entropy_srcs=[sop_instance_uid, part]))


def _finding_sites(source: Dataset) -> list[hd.sr.FindingSite]:
    """Body Part Examined as a Finding Site, mapped to SNOMED CT by PS3.16 Annex L."""
    region = get_anatomic_region_map().get(str(source.get("BodyPartExamined", "")).upper())
    return [] if region is None else [hd.sr.FindingSite(region[0])]


def _library_entry(source: Dataset) -> Dataset:
    """The attributes of ``source`` that highdicom's image library entry reads.

    highdicom adds the TID 1603 (projection) or TID 1604 (cross-sectional) descriptors
    by Modality and reads their attributes unconditionally, but these are type 2 or 3
    in the CR, DX and CT IODs. When one is absent or empty, the entry's Modality is
    blanked, so that it keeps the TID 1602 descriptors (modality, which highdicom
    takes from the SOP Class, rows, columns, frame of reference).
    """
    entry = Dataset()
    modality = str(source.get("Modality", ""))
    needed = _LIBRARY_DESCRIPTORS.get(modality, {})
    optional = ("FrameOfReferenceUID", "SpacingBetweenSlices")
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", *optional, *needed):
        if source.get(keyword) not in (None, ""):
            entry[keyword] = deepcopy(source[keyword])
    complete = all(_multiplicity(entry.get(k)) == vm for k, vm in needed.items())
    entry.Modality = modality if complete else ""
    return entry


def _multiplicity(value: object) -> int:
    if value is None or value == "":
        return 0
    return len(value) if isinstance(value, Sequence) and not isinstance(value, str) else 1
