"""build_results and result_uids: selection, determinism, and pixelmed's SR validator."""

from __future__ import annotations

import io

import pytest

from dicom_ai_node.report import SC_LAYOUTS, build_results, predecessor, result_uids
from tests.support.helpers import write
from tests.support.validators import dciodvfy_errors, sr_validator

SERIES_P = [0.2, 0.7, 0.9, 0.6, 0.1]


def _results(
    ct_series, prediction, card, context, outputs=("sr", "sc", "kos"), seed="job-1", amends=()
):
    key = next(ds for ds in ct_series if ds.SOPInstanceUID == prediction.key_image.sop_instance_uid)
    uids = result_uids(seed)
    built = build_results(ct_series, key, prediction, card, outputs, uids, context, amends)
    assert [r.kind for r in built] == [o for o in ("sr", "sc", "kos") if o in outputs][: len(built)]
    return [r.dataset for r in built]


def test_outputs_and_new_series(ct_series, predict, card, context):
    results = _results(ct_series, predict(ct_series, SERIES_P), card, context)
    assert [r.Modality for r in results] == ["SR", "CT", "KO"]  # SC: the source's, not OT
    assert {r.StudyDescription for r in results} == {"CT CHEST"}
    series = {r.SeriesInstanceUID for r in results}
    assert len(series) == 3 and not series & {ds.SeriesInstanceUID for ds in ct_series}
    assert {r.StudyInstanceUID for r in results} == {ct_series[0].StudyInstanceUID}
    assert [r.SeriesNumber for r in results] == [9100, 9101, 9102]

    negative = _results(ct_series, predict(ct_series, [0.1] * 5), card, context)
    assert [r.Modality for r in negative] == ["SR", "CT"]  # no KOS for a negative result
    only_sr = _results(ct_series, predict(ct_series, SERIES_P), card, context, outputs=["sr"])
    assert [r.Modality for r in only_sr] == ["SR"]
    with pytest.raises(ValueError, match="unknown outputs"):
        _results(ct_series, predict(ct_series, SERIES_P), card, context, outputs=["pdf"])


def test_one_sc_per_layout_in_one_series(ct_series, predict, card, context):
    prediction = predict(ct_series, SERIES_P)
    key = next(ds for ds in ct_series if ds.SOPInstanceUID == prediction.key_image.sop_instance_uid)
    uids = result_uids("job-1")

    def build(layouts):
        return build_results(
            ct_series, key, prediction, card, ["sr", "sc"], uids, context, sc_layouts=layouts
        )

    built = build(["above", "below", "above"])  # each layout once, in the order given
    assert [(r.kind, r.layout) for r in built] == [("sr", None), ("sc", "above"), ("sc", "below")]
    above, below = (r.dataset for r in built[1:])
    assert above.SOPInstanceUID == uids.sc_instances["above"] != below.SOPInstanceUID
    assert above.SeriesInstanceUID == below.SeriesInstanceUID == uids.sc_series
    assert (below.InstanceNumber, above.InstanceNumber) == (1, 2)
    assert above.Rows == below.Rows > key.Rows
    assert [r.layout for r in build(["overlay"])[1:]] == ["overlay"]
    assert build(["below"])[1].dataset.SOPInstanceUID == below.SOPInstanceUID
    with pytest.raises(ValueError, match="unknown SC layouts"):
        build(["left"])
    with pytest.raises(ValueError, match="no layout"):
        build([])


def _cited(sr):
    return predecessor(sr.StudyInstanceUID, sr.SeriesInstanceUID, sr.SOPClassUID, sr.SOPInstanceUID)


def test_amended_sr_names_the_earlier_one(cr_mono1, predict, card, context):
    """PS3.3 C.17.2.3: the Predecessor Documents Sequence, by study, series and instance."""
    earlier = _results([cr_mono1], predict([cr_mono1], [0.8]), card, context, ("sr",))[0]
    amended = _results(
        [cr_mono1],
        predict([cr_mono1], [0.9]),
        card,
        context,
        ("sr", "sc"),
        "job-2",
        [_cited(earlier)],
    )
    assert "PredecessorDocumentsSequence" not in earlier
    study = amended[0].PredecessorDocumentsSequence[0]
    assert study.StudyInstanceUID == earlier.StudyInstanceUID
    series = study.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == earlier.SeriesInstanceUID
    cited = series.ReferencedSOPSequence[0]
    assert (cited.ReferencedSOPClassUID, cited.ReferencedSOPInstanceUID) == (
        earlier.SOPClassUID,
        earlier.SOPInstanceUID,
    )
    assert amended[0].SOPInstanceUID != earlier.SOPInstanceUID
    assert "PredecessorDocumentsSequence" not in amended[1]  # the SC is new, not an SR


def test_same_seed_same_uids_and_bytes(ct_series, predict, card, context):
    assert result_uids("job-1") == result_uids("job-1")
    assert result_uids("job-1") != result_uids("job-2")
    uids = result_uids("job-1")
    singles = {getattr(uids, f) for f in uids.__dataclass_fields__ if f != "sc_instances"}
    assert len(singles | set(uids.sc_instances.values())) == 5 + len(SC_LAYOUTS)

    def encoded():
        out = []
        for dataset in _results(ct_series, predict(ct_series, SERIES_P), card, context):
            buffer = io.BytesIO()
            dataset.save_as(buffer, enforce_file_format=True)
            out.append(buffer.getvalue())
        return out

    assert encoded() == encoded()


@pytest.mark.peers
def test_pixelmed_validates_sr_and_kos(tmp_path, ct_series, cr_mono1, predict, card, context):
    """DicomSRValidator on the multi-image SR, the radiograph SR and the KOS, in parallel
    (a JVM each). Errors fail; its warnings are listed in docs/results.md."""
    series = _results(ct_series, predict(ct_series, SERIES_P), card, context, ("sr", "kos"))
    radiograph = _results([cr_mono1], predict([cr_mono1], [0.8]), card, context, ("sr",))
    earlier = radiograph[0]
    amended = _results(
        [cr_mono1], predict([cr_mono1], [0.9]), card, context, ("sr",), "job-2", [_cited(earlier)]
    )
    paths = [write(ds, tmp_path) for ds in [*series, *radiograph, *amended]]
    assert dciodvfy_errors(paths[-1]) == []
    for path, findings in zip(paths, sr_validator(paths), strict=True):
        assert findings.errors == [], f"{path}: {findings.errors}"
        # only the qualitative evaluation row, which pixelmed's TID 1501 does not list
        assert all(
            'CODE (404684003,SCT,"Clinical finding"): Content Item not in template' in w
            for w in findings.warnings
        )
