"""The Secondary Capture: pixels (grey levels, heat map, text), attributes, validator."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_ai_node.report import SC_LAYOUTS, build_sc, result_uids
from dicom_ai_node.report.render import MIN_SIDE
from tests.support.helpers import rows_with_colour, write
from tests.support.validators import dciodvfy_errors

YELLOW = (255, 220, 0)


def _sc(source, prediction, card, context, seed="job-sc", layout="below"):
    uids = result_uids(seed)
    return build_sc(
        source,
        prediction,
        card,
        series_uid=uids.sc_series,
        sop_instance_uid=uids.sc_instances[layout],
        context=context,
        layout=layout,
    )


def test_radiograph_rendering(tmp_path, cr_mono1, predict, card, context):
    sc = _sc(cr_mono1, predict([cr_mono1], [0.87]), card, context, layout="overlay")
    path = write(sc, tmp_path)
    pixels = pydicom.dcmread(path).pixel_array
    Image.fromarray(pixels).save(tmp_path / "sc.png")  # to look at

    assert pixels.dtype == np.uint8 and pixels.shape == (MIN_SIDE, 410, 3)  # 400x320 enlarged
    assert (sc.SamplesPerPixel, sc.PhotometricInterpretation, sc.BitsAllocated) == (3, "RGB", 8)
    grey = pixels.mean(axis=-1)
    # MONOCHROME1 inverted: the lungs (stored high) are dark, the body bright; left lung and
    # lower body are far from the heat map blob and the text box
    assert grey[300, 125] < 80 < 150 < grey[470, 205]
    # the heat map: red and not grey around its peak (model input (0.4, 0.6), lettered)
    peak = pixels[round(0.4 * MIN_SIDE), round(0.62 * 410)].astype(int)
    assert peak[0] > peak[2] + 60
    # the result burned in: yellow text (positive) in the top left box
    box = pixels[: MIN_SIDE // 6, : 410 * 2 // 3].reshape(-1, 3).astype(int)
    assert (np.abs(box - YELLOW).max(axis=1) < 40).sum() > 50
    assert (pixels[: MIN_SIDE // 6] != pixels[: MIN_SIDE // 6].mean(axis=-1, keepdims=True)).any()


def test_text_band_below_or_above_the_image(tmp_path, cr_mono1, predict, card, context):
    """ "below" and "above" add a black band with the text to the same image; "overlay"
    draws it over the image's top left corner, in the image's rows."""
    prediction = predict([cr_mono1], [0.87])
    below, above, overlay = (
        _sc(cr_mono1, prediction, card, context, layout=layout).pixel_array
        for layout in ("below", "above", "overlay")
    )
    for name, pixels in (("below", below), ("above", above)):
        Image.fromarray(pixels).save(tmp_path / f"sc-{name}.png")  # to look at
    band = below.shape[0] - MIN_SIDE
    assert overlay.shape == (MIN_SIDE, 410, 3)
    assert below.shape == above.shape == (MIN_SIDE + band, 410, 3) and band > 5 * 12
    # the image rows are the same image, untouched by text, in both
    assert np.array_equal(below[:MIN_SIDE], above[band:])
    assert not np.array_equal(below[: MIN_SIDE // 6], overlay[: MIN_SIDE // 6])
    # the text (the result line in yellow) only in the band: after the image, or before it
    text = rows_with_colour(below, YELLOW)
    assert text.size > 5 and text.min() >= MIN_SIDE, text
    text = rows_with_colour(above, YELLOW)
    assert text.size > 5 and text.max() < band, text
    assert rows_with_colour(overlay, YELLOW).max() < band
    # the band is black where there is no text, and the text is centred in it
    strip = below[MIN_SIDE:].max(axis=(0, 2))
    assert strip[:4].max() == strip[-4:].max() == 0
    inked = np.flatnonzero(strip)
    assert abs((inked.min() + inked.max()) / 2 - 410 / 2) < 410 * 0.05, inked
    with pytest.raises(ValueError, match="unknown SC layout"):
        build_sc(
            cr_mono1,
            prediction,
            card,
            series_uid=result_uids("job-sc").sc_series,
            sop_instance_uid=result_uids("job-sc").sc_instances["below"],
            context=context,
            layout="left",  # type: ignore[arg-type]
        )


def test_attributes(cr_mono1, predict, card, context):
    sc = _sc(cr_mono1, predict([cr_mono1], [0.87]), card, context)

    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.StudyInstanceUID == cr_mono1.StudyInstanceUID
    assert sc.SeriesInstanceUID == result_uids("job-sc").sc_series != cr_mono1.SeriesInstanceUID
    assert sc.PatientID == cr_mono1.PatientID and sc.PatientName == cr_mono1.PatientName
    assert (sc.BurnedInAnnotation, sc.ConversionType) == ("YES", "WSD")
    assert sc.PatientOrientation == ["L", "F"]
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == cr_mono1.SOPInstanceUID
    assert sc.SeriesNumber == context.series_number_base + 1
    assert sc.InstanceNumber == 1 and "below the image" in sc.DerivationDescription
    purposes = [
        item.PurposeOfReferenceCodeSequence[0].CodeValue
        for item in sc.ContributingEquipmentSequence
    ]
    assert "109102" in purposes
    assert sc.ContributingEquipmentSequence[1].ManufacturerModelName == card.name


def test_negative_result_has_no_yellow(cr_mono1, predict, card, context):
    pixels = _sc(cr_mono1, predict([cr_mono1], [0.1]), card, context).pixel_array
    box = pixels[MIN_SIDE:].reshape(-1, 3).astype(int)  # the band below the image
    assert (np.abs(box - YELLOW).max(axis=1) < 40).sum() == 0
    assert (box.min(axis=1) > 240).sum() > 50  # white text instead


def test_orientation_from_image_orientation(ct_series, predict, card, context):
    prediction = predict(ct_series, [0.2, 0.7, 0.9, 0.6, 0.1])
    sc = _sc(ct_series[2], prediction, card, context)
    assert sc.PatientOrientation == ["L", "P"]
    with pytest.raises(ValueError, match="the key image is"):
        _sc(ct_series[0], prediction, card, context)


@pytest.mark.peers
@pytest.mark.parametrize("layout", SC_LAYOUTS)
@pytest.mark.parametrize("name", ["cr_mono1", "ct_small", "ct_j2k"])
def test_dciodvfy_adds_no_errors(request, tmp_path, name, layout, predict, card, context):
    source = request.getfixturevalue(name)
    path = write(_sc(source, predict([source], [0.9]), card, context, layout=layout), tmp_path)
    source_path = write(source, tmp_path)
    # the JPEG 2000 test file itself lacks Laterality and de-identification details
    assert set(dciodvfy_errors(path)) <= set(dciodvfy_errors(source_path))
    if name != "ct_j2k":
        assert dciodvfy_errors(path) == []
