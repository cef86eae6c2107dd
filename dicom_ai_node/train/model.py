"""The small CNN the trainer builds: a few conv blocks, global average pooling, softmax.

Its last convolution block's activation is named :data:`EXPLAIN_LAYER` (recorded in the card
as ``explain_layer``) for Grad-CAM, and the softmax is a separate final layer so that the
runtime can take gradients of the logits rather than of saturated probabilities.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dicom_ai_node.infer.card import InputSpec
from dicom_ai_node.infer.runtime import configure_tensorflow

if TYPE_CHECKING:
    import keras

EXPLAIN_LAYER = "explain_conv"


def build_classifier(input_spec: InputSpec, labels: int, *, filters: int = 16) -> keras.Model:
    """Four conv blocks (``filters`` doubling to 8x), GAP, dropout, dense logits, softmax."""
    configure_tensorflow()
    import keras

    inputs = keras.Input((input_spec.height, input_spec.width, input_spec.channels), name="image")
    x = inputs
    widths = (filters, filters * 2, filters * 4, filters * 8)
    for block, width in enumerate(widths, start=1):
        x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"conv{block}")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{block}")(x)
        last = block == len(widths)
        x = keras.layers.Activation("relu", name=EXPLAIN_LAYER if last else f"relu{block}")(x)
        if not last:
            x = keras.layers.MaxPooling2D(name=f"pool{block}")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.Dropout(0.2, name="dropout")(x)
    x = keras.layers.Dense(labels, name="logits")(x)
    outputs = keras.layers.Activation("softmax", name="probabilities")(x)
    return keras.Model(inputs, outputs, name="classifier")
