"""A model that crashes its process, or stalls, on demand: the crash policy's test subject.

The ``Tripwire`` layer passes its input through, but while the file ``abort`` exists in the
folder named by ``$DICOM_AI_NODE_TEST_TRIPWIRE`` it aborts the process (SIGABRT, as a broken
native library would), and while ``stall`` exists it waits, so that a test can kill the
process in the middle of the job at a moment it chooses. Warm-up batches (all zeros) pass.

A ``serve`` process loads the layer class through :func:`sitecustomize`, a ``sitecustomize``
module put on its ``PYTHONPATH`` (Keras finds registered classes only once imported). It
registers the layer when Keras is imported, in a worker after the fork server forked it: the
fork server itself must not import TensorFlow.
"""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from dicom_ai_node.infer.runtime import configure_tensorflow, read_cards
from tests.support.helpers import ROOT

ENV = "DICOM_AI_NODE_TEST_TRIPWIRE"


def _trip(batch: np.ndarray) -> np.ndarray:
    folder = Path(os.environ[ENV])
    if np.any(batch):  # not a warm-up batch
        if (folder / "abort").exists():
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file in the checkout
            os.abort()
        while (folder / "stall").exists():
            time.sleep(0.05)
    return batch


@keras.saving.register_keras_serializable(package="dicom_ai_node_tests")
class Tripwire(keras.layers.Layer):  # type: ignore[misc]
    def call(self, inputs: Any) -> Any:
        out = tf.numpy_function(_trip, [inputs], inputs.dtype, stateful=True)
        return tf.ensure_shape(out, inputs.shape)

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape


def write_package(root: Path, name: str = "tripwire") -> Path:
    """A chest radiograph package (the demo card, renamed) whose network has a tripwire."""
    configure_tensorflow()  # before the first op, or the node's thread settings fail
    card = read_cards()["cxr-opacity-demo"][1].model_copy(update={"name": name})
    size = (card.input.height, card.input.width, card.input.channels)
    inputs = keras.Input(size, name="image")
    x = Tripwire(name="tripwire")(inputs)
    x = keras.layers.Conv2D(2, 3, padding="same", name="conv1")(x)
    x = keras.layers.Activation("relu", name=card.explain_layer)(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dense(len(card.labels), name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probabilities")(x)
    package = root / name
    package.mkdir(parents=True)
    keras.Model(inputs, outputs).save(package / "model.keras")
    card.dump(package / "model.toml")
    return package


_SITECUSTOMIZE = """\
import importlib.machinery
import sys


class _AfterKeras:
    \"\"\"Imports tests.support.poison (which registers the layer) once keras has run.\"\"\"

    def find_spec(self, name, path, target=None):
        if name != "keras":  # a find_spec alone (TensorFlow's probe) imports nothing
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run_keras = spec.loader.exec_module

        def exec_module(module):
            sys.meta_path.remove(self)
            run_keras(module)
            import tests.support.poison  # noqa: F401

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _AfterKeras())
"""


def sitecustomize(folder: Path) -> str:
    """Write a ``sitecustomize`` that registers the layer once Keras is imported; returns the
    ``PYTHONPATH`` to use."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    return os.pathsep.join([str(folder), str(ROOT)])
