"""The bundled demo models classify freshly synthesized studies (a seed unseen in training)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_ai_node.infer import load_models
from dicom_ai_node.synth import Label, Task, generate_studies

pytestmark = pytest.mark.slow  # loads and runs both bundled TensorFlow models

CASES = [
    (Task.CXR_OPACITY, "cxr-opacity-demo", "opacity"),
    (Task.HEAD_CT_HEMORRHAGE, "head-ct-hemorrhage-demo", "hemorrhage"),
]


@pytest.mark.parametrize(("task", "name", "finding"), CASES)
def test_demo_model_classifies_new_synthetic_studies(
    tmp_path: Path, task: Task, name: str, finding: str
):
    model = load_models([])[name]
    assert model.card.not_for_diagnostic_use and len(model.card.labels) == 2
    for label in (Label.POSITIVE, Label.NEGATIVE):
        for study in generate_studies(task, label, 4, tmp_path / label.value, seed=20240917):
            result = model.predict_series(sorted(study.glob("*/*.dcm")))
            assert result.positive == (label is Label.POSITIVE), (study, result.probability)
            assert result.label == (finding if label is Label.POSITIVE else "normal")
            assert result.key_image.heatmap is not None
