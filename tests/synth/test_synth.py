"""Synthetic studies: reproducible, decodable, a mix of transfer syntaxes, complete headers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.pixels.processing import apply_modality_lut

from dicom_ai_node.infer.card import InputSpec, PreprocessSpec
from dicom_ai_node.infer.preprocess import to_model_input
from dicom_ai_node.synth import TRANSFER_SYNTAXES, Label, Task, generate_studies
from dicom_ai_node.synth.phantoms import HeadGeometry, head_ct_slice

REQUIRED = (
    "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
    "StudyDate", "StudyTime", "ReferringPhysicianName", "Manufacturer", "InstanceNumber",
    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID", "Modality",
    "BodyPartExamined",
)  # fmt: skip
CT_REQUIRED = (
    "ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness",
    "RescaleIntercept", "RescaleSlope", "FrameOfReferenceUID",
)  # fmt: skip


def _files(root: Path) -> list[Path]:
    return sorted(root.rglob("*.dcm"))


def test_same_seed_same_bytes_other_seed_other_uids(tmp_path: Path):
    kwargs = {"size": 64, "slices": 3}
    a = generate_studies(Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 2, tmp_path / "a", 5, **kwargs)
    b = generate_studies(Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 2, tmp_path / "b", 5, **kwargs)
    c = generate_studies(Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 2, tmp_path / "c", 6, **kwargs)
    assert [p.name for p in a] == [p.name for p in b] != [p.name for p in c]
    for fa, fb in zip(_files(tmp_path / "a"), _files(tmp_path / "b"), strict=True):
        assert fa.relative_to(tmp_path / "a") == fb.relative_to(tmp_path / "b")
        assert fa.read_bytes() == fb.read_bytes()
    negative = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 1, tmp_path / "n", 5, **kwargs
    )
    assert negative[0].name != a[0].name


def test_ct_headers_decoding_and_hounsfield_units(tmp_path: Path):
    studies = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.NEGATIVE, 4, tmp_path, 1, size=64, slices=4
    )
    syntaxes = set()
    for study in studies:
        files = sorted(study.glob("*/*.dcm"))
        assert len(files) == 4
        positions = []
        for path in files:
            ds = dcmread(path)
            for keyword in (*REQUIRED, *CT_REQUIRED):
                assert keyword in ds and ds[keyword].value not in (None, ""), keyword
            assert ds.Modality == "CT" and ds.BodyPartExamined == "HEAD"
            syntaxes.add(ds.file_meta.TransferSyntaxUID)
            hu = apply_modality_lut(ds.pixel_array, ds)
            assert hu[0, 0] < -900  # air in the corner
            assert hu.max() > 1000  # skull
            positions.append(float(ds.ImagePositionPatient[2]))
        assert positions == sorted(positions) and len(set(positions)) == 4
    assert syntaxes == set(TRANSFER_SYNTAXES)


def test_hemorrhage_is_a_hyperdensity_of_50_to_90_hu():
    rng = np.random.default_rng(3)
    head = HeadGeometry.random(rng, hemorrhage=True)
    assert head.bleed is not None
    z, y, x, _, hu = head.bleed
    assert 50 <= hu <= 90 and head.bleeds_at(z)
    image = head_ct_slice(rng, 256, head, z)
    cy, cx = head.centre
    row = round((cy + y * np.sqrt(1 - (z / 1.15) ** 2) + 1) / 2 * 255)
    col = round((cx + x * np.sqrt(1 - (z / 1.15) ** 2) + 1) / 2 * 255)
    assert abs(image[row - 2 : row + 3, col - 2 : col + 3].mean() - hu) < 8
    normal = head_ct_slice(rng, 256, HeadGeometry.random(rng, hemorrhage=False), z)
    brain = normal[96:160, 96:160]
    assert np.mean((brain > 55) & (brain < 95)) < 0.01


def test_radiographs_mix_monochrome1_and_2_and_display_the_same_way(tmp_path: Path):
    studies = generate_studies(Task.CXR_OPACITY, Label.NEGATIVE, 6, tmp_path, 2, size=128)
    photometric = set()
    for study in studies:
        (path,) = study.glob("*/*.dcm")
        ds = dcmread(path)
        for keyword in (*REQUIRED, "ImagerPixelSpacing", "WindowCenter", "WindowWidth"):
            assert keyword in ds, keyword
        assert ds.Modality in ("CR", "DX") and ds.BodyPartExamined == "CHEST"
        photometric.add(ds.PhotometricInterpretation)
        image = to_model_input(ds, InputSpec(height=128, width=128), PreprocessSpec())[..., 0]
        # Whatever the photometric interpretation, lungs display dark and the spine bright.
        assert image[55:65, 25:35].mean() < 0.35 < image[55:65, 60:68].mean()
    assert photometric == {"MONOCHROME1", "MONOCHROME2"}
