"""A tiny, untrained model package and a small synthetic CT series, shared by runtime tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_ai_node.infer.card import InputSpec, ModelCard
from dicom_ai_node.synth import Label, Task, generate_studies
from dicom_ai_node.train.tasks import TASK_CARDS
from tests.support.models import write_package


@pytest.fixture(scope="session")
def tiny_card() -> ModelCard:
    return TASK_CARDS[Task.HEAD_CT_HEMORRHAGE].model_copy(
        update={"name": "tiny-ct", "input": InputSpec(height=32, width=32)}
    )


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory, tiny_card: ModelCard) -> Path:
    root = tmp_path_factory.mktemp("packages")
    return write_package(root, tiny_card, tiny_card.input, len(tiny_card.labels))


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Five 64x64 slices of one synthetic head CT (more than one batch of 2)."""
    out = tmp_path_factory.mktemp("ct")
    (study,) = generate_studies(
        Task.HEAD_CT_HEMORRHAGE, Label.POSITIVE, 1, out, 3, size=64, slices=5
    )
    return sorted(study.glob("*/*.dcm"))
