"""What inference produces: typed values handed from ``infer`` to ``report`` and the job log."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt


@dataclass(frozen=True)
class ImagePrediction:
    """The model's output for one image (one frame of a multi-frame image).

    ``heatmap`` is a float32 array in [0, 1] at the model's input resolution, for the
    positive class (by the model's explanation method), or ``None`` when none was computed.
    """

    sop_instance_uid: str
    frame_number: int | None
    probabilities: dict[str, float]
    label: str
    heatmap: npt.NDArray[np.float32] | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class SeriesPrediction:
    """The model's answer for a series: the aggregated label and probability.

    ``probability`` is the aggregated probability of the card's positive label
    (``positive_label``); ``positive`` is whether it reached the card's threshold; ``label``
    is the name of the resulting label. ``skipped`` lists the instances (SOP Instance UID, or
    the file name when the file could not even be parsed, with the reason) that could not be
    used; ``images`` holds only the ones that were. ``weights_sha256`` identifies the weights
    (with ``model`` and ``model_version``, the model's identity); ``explanation`` names the
    heat map method, ``"none"`` when the model makes no map.
    """

    model: str
    model_version: str
    positive_label: str
    label: str
    probability: float
    positive: bool
    probabilities: dict[str, float]
    images: tuple[ImagePrediction, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    weights_sha256: str = ""
    explanation: str = "Grad-CAM"

    @property
    def key_image(self) -> ImagePrediction:
        """The image with the highest positive-label probability (the one to show)."""
        return max(self.images, key=lambda image: image.probabilities[self.positive_label])


def percent(probability: float) -> str:
    """A probability as a whole percentage that never rounds to certainty: 0.9996 is
    ">99%", not "100%", and 0.0004 is "<1%" (a model's output is never 0 or 1 exactly)."""
    if 0.0 < probability < 0.005:
        return "<1%"
    if 0.995 <= probability < 1.0:
        return ">99%"
    return f"{probability:.0%}"
