"""The Key Object Selection: which images, title, validator; none when negative."""

from __future__ import annotations

import highdicom as hd
import pydicom
import pytest

from dicom_ai_node.report import build_kos, result_uids
from tests.support.helpers import write
from tests.support.validators import dciodvfy_errors


def _kos(sources, prediction, card, context):
    uids = result_uids("job-kos")
    return build_kos(
        sources,
        prediction,
        card,
        series_uid=uids.kos_series,
        sop_instance_uid=uids.kos_instance,
        context=context,
    )


@pytest.mark.peers
def test_flags_key_and_positive_images(tmp_path, ct_series, predict, card, context):
    kos = _kos(ct_series, predict(ct_series, [0.2, 0.7, 0.9, 0.6, 0.1]), card, context)
    assert kos is not None
    path = write(kos, tmp_path)
    read = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))

    assert read.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest
    images = [i for i in read.ContentSequence if i.ValueType == "IMAGE"]
    assert [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in images] == [
        ct_series[2].SOPInstanceUID,
        ct_series[1].SOPInstanceUID,
        ct_series[3].SOPInstanceUID,
    ]
    assert all("ConceptNameCodeSequence" not in i for i in images)  # TID 2010
    text = next(
        i for i in read.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113012"
    )
    assert text.TextValue.startswith("Pneumonia (90%) by pneumo-cnn 1.4.2: 3 image(s)")
    assert read.StudyInstanceUID == ct_series[0].StudyInstanceUID
    assert read.SeriesInstanceUID == result_uids("job-kos").kos_series
    assert dciodvfy_errors(path) == []


def test_negative_gives_none(ct_series, predict, card, context):
    assert _kos(ct_series, predict(ct_series, [0.2, 0.3, 0.1, 0.4, 0.1]), card, context) is None
