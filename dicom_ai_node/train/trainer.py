"""Train a model package from prepared samples, and evaluate packages.

Training: class-weighted softmax cross-entropy (weights inversely proportional to class
frequency), light augmentation (shift, zoom, horizontal flip), Adam, early stopping on the
validation loss with the best weights restored, and the card's threshold set where the
validation split's sensitivity + specificity is highest (Youden's J). The package written is
loaded back through the runtime (which checks the card against the weights) and evaluated on
the held-out test split, so the report describes exactly what the node will run.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydicom import dcmread
from pydicom.misc import is_dicom

from dicom_ai_node.infer.card import ModelCard
from dicom_ai_node.infer.runtime import LoadedModel, configure_tensorflow
from dicom_ai_node.train.data import Samples, Splits, class_files
from dicom_ai_node.train.metrics import build_report, write_report, youden_threshold
from dicom_ai_node.train.model import EXPLAIN_LAYER, build_classifier

if TYPE_CHECKING:
    import keras

#: Called after each epoch with (epoch, epochs, logs) and after each batch with (None, 0, {}).
ProgressHook = Callable[[int | None, int, dict[str, float]], None]


def train_package(
    splits: Splits,
    card: ModelCard,
    out_dir: Path,
    *,
    epochs: int = 15,
    batch_size: int = 32,
    seed: int = 0,
    patience: int = 4,
    learning_rate: float = 1e-3,
    filters: int = 8,
    on_progress: ProgressHook | None = None,
) -> Path:
    """Train, write ``out_dir/<card.name>/`` (model.keras, model.toml) and return that path."""
    configure_tensorflow()
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    card = card.model_copy(update={"explain_layer": EXPLAIN_LAYER})
    model = build_classifier(card.input, len(card.labels), filters=filters)
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=["accuracy"],
    )
    augment = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=seed),
            keras.layers.RandomTranslation(0.05, 0.05, fill_mode="constant", seed=seed),
            keras.layers.RandomZoom(0.05, fill_mode="constant", seed=seed),
        ]
    )
    train_data = (
        tf.data.Dataset.from_tensor_slices((splits.train.images, splits.train.labels))
        .shuffle(len(splits.train), seed=seed)
        .batch(batch_size)
        .map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(tf.data.AUTOTUNE)
    )
    counts = np.bincount(splits.train.labels, minlength=len(card.labels))
    class_weight = {
        i: float(len(splits.train) / (len(counts) * n)) for i, n in enumerate(counts) if n
    }
    callbacks: list[keras.callbacks.Callback] = [
        keras.callbacks.EarlyStopping(patience=patience, restore_best_weights=True)
    ]
    if on_progress is not None:
        callbacks.append(_progress_callback(on_progress, epochs))
    model.fit(
        train_data,
        validation_data=(splits.val.images, splits.val.labels),
        epochs=epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=0,
    )
    package = out_dir / card.name
    package.mkdir(parents=True, exist_ok=True)
    # A fresh, uncompiled copy: the package holds the weights only, not the optimizer state.
    clean = build_classifier(card.input, len(card.labels), filters=filters)
    clean.set_weights(model.get_weights())
    clean.save(package / "model.keras")
    card.dump(package / "model.toml")
    # Operating point chosen on the validation split, never on the test split.
    val_scores = score_samples(LoadedModel(package, card=card), splits.val)
    threshold = youden_threshold(
        np.array(positive_truth(card, splits.val.labels), dtype=np.int64), val_scores
    )
    card.model_copy(update={"threshold": round(threshold, 4)}).dump(package / "model.toml")
    return package


def _progress_callback(hook: ProgressHook, epochs: int) -> keras.callbacks.Callback:
    """A Keras callback forwarding per-batch and per-epoch events to ``hook``."""
    import keras

    class ProgressCallback(keras.callbacks.Callback):  # type: ignore[misc]
        def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
            hook(None, 0, {})

        def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
            hook(epoch + 1, epochs, {k: float(v) for k, v in (logs or {}).items()})

    callback: keras.callbacks.Callback = ProgressCallback()
    return callback


def score_samples(model: LoadedModel, samples: Samples) -> np.ndarray[Any, np.dtype[np.float64]]:
    """Positive-label probability of each sample, in batches of the runtime."""
    index = next(i for i, label in enumerate(model.card.labels) if label.positive)
    scores = [
        model.predict_batch(samples.images[start : start + model.batch_size])[0][:, index]
        for start in range(0, len(samples), model.batch_size)
    ]
    return np.concatenate(scores).astype(np.float64)


def positive_truth(card: ModelCard, labels: np.ndarray[Any, np.dtype[np.int64]]) -> list[int]:
    """1 where the label index is a positive finding of the card, else 0."""
    positive = {i for i, label in enumerate(card.labels) if label.positive}
    return [int(label in positive) for label in labels]


def evaluate_samples(
    model: LoadedModel, samples: Samples, out_dir: Path, *, data: str, seed: int = 0
) -> dict[str, Any]:
    """Image-level evaluation of prepared samples; writes the report files into ``out_dir``."""
    report = build_report(
        positive_truth(model.card, samples.labels),
        score_samples(model, samples).tolist(),
        samples.ids,
        model.card.threshold,
        about=_about(model, data, "image"),
        seed=seed,
    )
    write_report(report, out_dir)
    return report


def evaluate_series(
    model: LoadedModel,
    root: Path,
    out_dir: Path,
    *,
    seed: int = 0,
    advance: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Series-level evaluation of a folder of class sub-folders of DICOM files.

    Each series goes through :meth:`LoadedModel.predict_series`, aggregation included, which is
    what the node does; a series is positive when its class folder is a positive label.
    """
    names = [label.name for label in model.card.labels]
    positive = {label.name for label in model.card.labels if label.positive}
    series: dict[tuple[str, str], list[Path]] = defaultdict(list)
    for label, files in class_files(root, model.card).items():
        for path in files:
            if is_dicom(path):
                uid = str(dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
                series[(names[label], uid)].append(path)
    truth, scores, ids = [], [], []
    for (label_name, uid), paths in series.items():
        prediction = model.predict_series(sorted(paths))
        truth.append(int(label_name in positive))
        scores.append(prediction.probability)
        ids.append(uid)
        if advance is not None:
            advance(1)
    report = build_report(
        truth,
        scores,
        ids,
        model.card.threshold,
        about=_about(model, str(root), "series"),
        seed=seed,
    )
    write_report(report, out_dir)
    return report


def _about(model: LoadedModel, data: str, level: str) -> dict[str, Any]:
    return {
        "model": model.card.name,
        "model_version": model.card.version,
        "data": data,
        "level": level,
    }
