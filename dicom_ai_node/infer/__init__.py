"""infer: model packages, DICOM-aware preprocessing and batched CNN inference.

Importing this package does not import TensorFlow; loading a model does.
"""

from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.infer.prediction import ImagePrediction, SeriesPrediction
from dicom_ai_node.infer.preprocess import to_model_input
from dicom_ai_node.infer.runtime import (
    BUNDLED_MODELS_DIR,
    HeatmapPolicy,
    LoadedModel,
    ModelPackageError,
    NoUsableImagesError,
    configure_tensorflow,
    configure_threads,
    load_models,
    read_cards,
)

__all__ = [
    "BUNDLED_MODELS_DIR",
    "HeatmapPolicy",
    "ImagePrediction",
    "LoadedModel",
    "ModelCard",
    "ModelPackageError",
    "NoUsableImagesError",
    "SeriesPrediction",
    "configure_tensorflow",
    "configure_threads",
    "load_models",
    "read_cards",
    "to_model_input",
]
