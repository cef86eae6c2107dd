"""Model packages made in code for the inference tests."""

from __future__ import annotations

from pathlib import Path

from dicom_ai_node.infer.card import InputSpec, ModelCard
from dicom_ai_node.train.model import build_classifier


def write_package(root: Path, card: ModelCard, weights_input: InputSpec, outputs: int) -> Path:
    """A package whose weights take ``weights_input`` and give ``outputs`` probabilities."""
    package = root / card.name
    package.mkdir(parents=True)
    build_classifier(weights_input, outputs, filters=2).save(package / "model.keras")
    card.dump(package / "model.toml")
    return package
