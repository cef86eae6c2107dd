"""The TID 1500 SR: content read back with highdicom, identity, validators."""

from __future__ import annotations

from typing import Any

import highdicom as hd
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_ai_node.report import build_sr, result_uids
from dicom_ai_node.report.sr import FINDING, PERCENT
from tests.support.helpers import write
from tests.support.validators import dciodvfy_errors, dcmtk_sr

PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
NORMAL = hd.sr.CodedConcept("17621005", "SCT", "Normal")
SERIES_P = [0.2, 0.7, 0.9, 0.6, 0.1]


def report(sr: hd.sr.EnhancedSR | hd.sr.ComprehensiveSR | hd.sr.Comprehensive3DSR) -> Any:
    """The TID 1500 Measurement Report at the root of an SR read back."""
    return sr.content


def _sr(sources, prediction, card, context, seed="job-sr"):
    uids = result_uids(seed)
    return build_sr(
        sources,
        prediction,
        card,
        series_uid=uids.sr_series,
        sop_instance_uid=uids.sr_instance,
        context=context,
    )


def test_finding_and_probability_are_read_back(tmp_path, ct_series, predict, card, context):
    prediction = predict(ct_series, SERIES_P)
    path = write(_sr(ct_series, prediction, card, context), tmp_path)

    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    groups = report(sr).get_planar_roi_measurement_groups()
    # the series result (on the key image), then the key image and the other positive
    # images (0.7, 0.6), each a region on its image
    assert len(groups) == 4
    series = groups[0]
    (evaluation,) = series.get_qualitative_evaluations(name=FINDING)
    assert evaluation.name == FINDING and evaluation.value == PNEUMONIA
    (probability,) = series.get_measurements(name=PNEUMONIA)
    assert probability.value == pytest.approx(90.0)
    assert probability.unit == PERCENT
    assert probability.derivation == codes.SCT.Maximum
    assert [site.value for site in probability.finding_sites] == [codes.SCT.Chest]
    assert series.finding_sites == []  # OHIF shows group-level sites by code value

    expected = [(ct_series[2], 0.9), (ct_series[2], 0.9), (ct_series[1], 0.7), (ct_series[3], 0.6)]
    for group, (source, p) in zip(groups, expected, strict=True):
        region = group.roi
        assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        assert region.value.shape == (5, 2)
        (image,) = region.ContentSequence
        assert image.referenced_sop_instance_uid == source.SOPInstanceUID
        assert group.get_measurements()[0].value == pytest.approx(100 * p)
        assert group.get_qualitative_evaluations(name=FINDING)[0].value == PNEUMONIA


def test_observer_algorithm_and_image_library(tmp_path, ct_series, predict, card, context):
    path = write(_sr(ct_series, predict(ct_series, SERIES_P), card, context), tmp_path)
    sr = hd.sr.srread(path)

    (device,) = report(sr).get_observer_contexts(observer_type=codes.DCM.Device)
    attributes = device.observer_identifying_attributes
    assert attributes.name == card.name and attributes.manufacturer_name == card.manufacturer
    group = report(sr).get_planar_roi_measurement_groups()[0][0]
    names = {
        item.name.meaning: item.value for item in group.ContentSequence if item.ValueType == "TEXT"
    }
    assert names["Algorithm Name"] == card.name and names["Algorithm Version"] == card.version
    procedure = [
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "25045-6"  # CT unspecified region
    assert {uid for *_, uid, _ in sr.get_evidence()} == {ds.SOPInstanceUID for ds in ct_series}
    library = next(
        i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "111028"
    )
    entries = library.ContentSequence[0].ContentSequence
    # the library lists the images the regions are on (p >= 0.5), the evidence above
    # lists every source image
    listed = {
        e.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for e in entries
        if e.ValueType == "IMAGE"
    }
    flagged = {ds.SOPInstanceUID for ds, p in zip(ct_series, SERIES_P, strict=True) if p >= 0.5}
    assert listed == flagged


def test_identity_flags_and_equipment(ct_series, predict, card, context):
    sr = _sr(ct_series, predict(ct_series, SERIES_P), card, context)
    source = ct_series[0]

    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    assert (sr.PatientID, sr.PatientName, sr.PatientSex) == ("P-0042", "Doe^Jane", "F")
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in ct_series}
    assert sr.SeriesInstanceUID == result_uids("job-sr").sr_series
    assert sr.SeriesDescription == "AI: pneumo-cnn 1.4.2"
    assert (sr.CompletionFlag, sr.VerificationFlag, sr.PreliminaryFlag) == (
        "COMPLETE",
        "UNVERIFIED",
        "PRELIMINARY",
    )
    # type 2 attributes the source lacks are present and empty
    for keyword in ("PatientBirthDate", "AccessionNumber", "StudyID", "ReferringPhysicianName"):
        assert keyword in sr and sr[keyword].is_empty
    algorithm = sr.ContributingEquipmentSequence[1]  # after the source's acquisition equipment
    assert algorithm.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert (algorithm.Manufacturer, algorithm.ManufacturerModelName) == (
        card.manufacturer,
        card.name,
    )
    assert algorithm.SoftwareVersions == card.version
    assert (sr.Manufacturer, sr.ManufacturerModelName) == (card.manufacturer, card.name)
    assert str(sr.ContentDate) == "20250304" and str(sr.InstanceCreationTime) == "101112"


def test_single_radiograph_has_one_group(tmp_path, cr_mono1, predict, card, context):
    path = write(_sr([cr_mono1], predict([cr_mono1], [0.3]), card, context), tmp_path)
    sr = hd.sr.srread(path)

    (group,) = report(sr).get_planar_roi_measurement_groups()
    assert group.get_qualitative_evaluations(name=FINDING)[0].value == NORMAL
    assert group.get_measurements()[0].value == pytest.approx(70.0)  # P(normal)
    assert sr.PatientName == cr_mono1.PatientName  # Japanese name survives ISO 2022 IR 87
    assert sr.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"]


@pytest.mark.peers
@pytest.mark.parametrize("name", ["ct_series", "cr_mono1", "ct_small"])
def test_dciodvfy_reports_no_errors(request, tmp_path, name, predict, card, context):
    source = request.getfixturevalue(name)
    sources = source if isinstance(source, list) else [source]
    path = write(_sr(sources, predict(sources, SERIES_P[: len(sources)]), card, context), tmp_path)
    assert dciodvfy_errors(path) == []


@pytest.mark.peers
def test_dsr2html_renders_finding_and_probability(tmp_path, cr_mono1, predict, card, context):
    path = write(_sr([cr_mono1], predict([cr_mono1], [0.87]), card, context), tmp_path)
    html = dcmtk_sr("dsr2html", path)
    assert "Pneumonia" in html and "87" in html


def test_invalid_inputs_raise(ct_series, ct_small, predict, card, context):
    prediction = predict(ct_series, SERIES_P)
    with pytest.raises(ValueError, match="no source"):
        _sr([], prediction, card, context)
    with pytest.raises(ValueError, match="not among the sources"):
        _sr(ct_series[:2], prediction, card, context)
    with pytest.raises(ValueError, match="2 studies"):
        _sr([*ct_series, ct_small], prediction, card, context)
    other = card.model_copy(update={"version": "9.9"})
    with pytest.raises(ValueError, match=r"card is pneumo-cnn 9\.9"):
        _sr(ct_series, prediction, other, context)
    headless = ct_series[0].copy()
    headless.SOPInstanceUID = generate_uid()
    del headless.Rows
    with pytest.raises(ValueError, match="Rows/Columns"):
        _sr([headless], prediction, card, context)
