"""The runtime: package checks, batched streaming prediction, skipping, heat maps."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dicom_ai_node.infer import (
    LoadedModel,
    ModelPackageError,
    NoUsableImagesError,
    load_models,
)
from dicom_ai_node.infer.card import Aggregation, InputSpec, LabelSpec, ModelCard
from tests.support.models import write_package


def test_importing_infer_does_not_import_tensorflow():
    code = "import sys, dicom_ai_node.infer; assert 'tensorflow' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_load_models_finds_bundled_and_extra_packages(tiny_package: Path):
    models = load_models([tiny_package.parent], batch_size=2)
    assert "tiny-ct" in models
    assert {"cxr-opacity-demo", "head-ct-hemorrhage-demo"} <= set(models)


def test_card_with_wrong_input_shape_is_refused(tmp_path: Path, tiny_card: ModelCard):
    card = tiny_card.model_copy(update={"name": "wrong-shape"})
    write_package(tmp_path, card, InputSpec(height=48, width=48), len(card.labels))
    with pytest.raises(ModelPackageError, match=r"wrong-shape.*\(32, 32, 1\).*\(48, 48, 1\)"):
        load_models([tmp_path])


def test_card_with_wrong_label_count_is_refused(tmp_path: Path, tiny_card: ModelCard):
    extra = LabelSpec(name="other", code=tiny_card.labels[0].code, positive=False)
    card = tiny_card.model_copy(
        update={"name": "three-labels", "labels": [*tiny_card.labels, extra]}
    )
    write_package(tmp_path, card, card.input, 2)
    with pytest.raises(ModelPackageError, match=r"three-labels.*3 labels.*2 outputs"):
        LoadedModel(tmp_path / "three-labels")


def test_invalid_card_is_refused_with_the_package_path(tmp_path: Path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.toml").write_text('name = "broken"\n')
    with pytest.raises(ModelPackageError, match=r"broken.*invalid model\.toml"):
        load_models([tmp_path])


def test_predict_series_streams_batches_and_aggregates(tiny_package: Path, ct_series: list[Path]):
    model = LoadedModel(tiny_package, batch_size=2, heatmaps="all")
    result = model.predict_series(ct_series)
    assert len(result.images) == 5 and result.skipped == ()
    assert [image.sop_instance_uid for image in result.images] == [
        __import__("pydicom").dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in ct_series
    ]
    positive = np.array([image.probabilities["hemorrhage"] for image in result.images])
    assert result.probability == pytest.approx(positive.max())  # card aggregation: max
    assert result.probabilities["normal"] == pytest.approx(1 - result.probability)
    assert result.positive == (result.probability >= model.card.threshold)
    for image in result.images:
        assert sum(image.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert image.heatmap is not None and image.heatmap.shape == (32, 32)
        assert image.heatmap.dtype == np.float32
        assert image.heatmap.min() >= 0.0 and image.heatmap.max() <= 1.0
    # Same images one at a time give the same probabilities: padding does not leak.
    single = LoadedModel(tiny_package, batch_size=1, heatmaps="key").predict_series(ct_series)
    np.testing.assert_allclose(
        [i.probabilities["hemorrhage"] for i in single.images], positive, atol=1e-5
    )
    assert single.key_image.heatmap is not None
    assert sum(i.heatmap is not None for i in single.images) == 1


def test_mean_aggregation(tmp_path: Path, tiny_package: Path, ct_series: list[Path]):
    card = ModelCard.load(tiny_package / "model.toml")
    mean_card = card.model_copy(update={"aggregation": Aggregation.MEAN, "threshold": 0.0})
    model = LoadedModel(tiny_package, card=mean_card, batch_size=4)
    result = model.predict_series(ct_series)
    probs = [image.probabilities["hemorrhage"] for image in result.images]
    assert result.probability == pytest.approx(float(np.mean(probs)))
    assert result.positive and result.label == "hemorrhage"


def test_undecodable_files_are_skipped_with_a_reason(
    tmp_path: Path, tiny_package: Path, ct_series: list[Path]
):
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"not dicom at all")
    model = LoadedModel(tiny_package, batch_size=2)
    result = model.predict_series([garbage, *ct_series[:2]])
    assert len(result.images) == 2
    assert result.skipped[0][0] == "garbage.dcm" and "not a readable DICOM" in result.skipped[0][1]
    with pytest.raises(NoUsableImagesError, match="no usable image among 1 files"):
        model.predict_series([garbage])
