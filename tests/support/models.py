"""Model packages made in code for the inference tests: Keras, SavedModel or ONNX weights."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np

from dicom_ai_node.infer.card import InputSpec, ModelCard
from dicom_ai_node.infer.runtime import configure_tensorflow
from dicom_ai_node.train.model import build_classifier

Kind = Literal["keras", "saved_model", "onnx"]


def write_package(
    root: Path, card: ModelCard, weights_input: InputSpec, outputs: int, kind: Kind = "keras"
) -> Path:
    """A package whose weights take ``weights_input`` and give ``outputs`` probabilities."""
    package = root / card.name
    package.mkdir(parents=True)
    export(build_classifier(weights_input, outputs, filters=2), package, kind)
    card.dump(package / "model.toml")
    return package


def export(model: object, package: Path, kind: Kind) -> Path:
    """Write a Keras model into ``package`` as ``kind`` weights; the weights' path."""
    import keras

    assert isinstance(model, keras.Model)
    if kind == "keras":
        model.save(package / "model.keras")
        return package / "model.keras"
    model(np.zeros((1, *model.input_shape[1:]), dtype=np.float32))  # export needs a built call
    name = "model.onnx" if kind == "onnx" else "saved_model"
    model.export(
        package / name, format="onnx" if kind == "onnx" else "tf_saved_model", verbose=False
    )
    return package / name


def convert_package(source: Path, root: Path, kind: Kind, name: str | None = None) -> Path:
    """A copy of a Keras package (card and weights) with its weights exported as ``kind``."""
    configure_tensorflow()  # before the first op, or the node's thread settings fail
    import keras

    card = ModelCard.load(source / "model.toml")
    card = card.model_copy(update={"name": name or f"{card.name}-{kind}"})
    package = root / card.name
    package.mkdir(parents=True)
    export(keras.models.load_model(source / "model.keras", compile=False), package, kind)
    card.dump(package / "model.toml")
    return package
