"""The model card: what a model package says about itself (``model.toml``).

A model package is a folder with the weights (``model.keras``, a TensorFlow SavedModel in
``saved_model/`` or ``model.onnx``: see :mod:`dicom_ai_node.infer.backends`) and
``model.toml`` (this card).
The card carries everything the node needs besides the weights: the labels and their coded
concepts (DICOM PS3.3 Section 8.8, Code Sequence Macro, as the SR in PS3.16 TID 1501 needs
them), the input the network expects, the preprocessing from DICOM pixels to that input, how
image probabilities are aggregated to one per series, and what the model is meant for.
"""

from __future__ import annotations

import tomllib
from enum import StrEnum
from pathlib import Path
from typing import Literal

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodedConcept(_Strict):
    """A coded concept: (value, scheme designator, meaning), PS3.3 Section 8.8."""

    value: str
    scheme: str = Field(description="Coding Scheme Designator, e.g. SCT or RADLEX")
    meaning: str
    scheme_version: str | None = None


class LabelSpec(_Strict):
    """One output of the network (one class), in the order of the network's outputs."""

    name: str
    code: CodedConcept
    positive: bool = Field(description="True when this label is a finding to flag")


class InputSpec(_Strict):
    """The tensor shape the network takes per image (height, width, channels)."""

    height: int = Field(gt=0)
    width: int = Field(gt=0)
    channels: Literal[1, 3] = 1
    layout: Literal["NHWC", "NCHW"] = Field(
        default="NHWC", description="Tensor layout of an ONNX network's input (PyTorch: NCHW)"
    )


class Window(_Strict):
    """A fixed VOI window (PS3.3 C.11.2.1.2: window center and width, in output units)."""

    center: float
    width: float = Field(gt=0)


class PreprocessSpec(_Strict):
    """How DICOM pixels become the network input.

    ``window``: ``"file"`` uses the VOI LUT or window in the file (PS3.3 C.11.2), a
    :class:`Window` applies a fixed one (e.g. a brain window for head CT), ``"minmax"``
    scales the modality values to their own range.
    """

    window: Literal["file", "minmax"] | Window = "file"
    invert_monochrome1: bool = True
    keep_aspect: bool = True
    normalize: Literal["unit", "zscore"] = "unit"


class Aggregation(StrEnum):
    """How per-image probabilities become one per series."""

    MAX = "max"
    MEAN = "mean"
    TOPK_MEAN = "topk_mean"


class ModelCard(_Strict):
    """The parsed ``model.toml`` of a model package."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str
    manufacturer: str
    description: str = ""
    intended_use: str = ""
    not_for_diagnostic_use: bool = False
    input: InputSpec
    labels: list[LabelSpec] = Field(min_length=2)
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    preprocessing: PreprocessSpec = PreprocessSpec()
    aggregation: Aggregation = Aggregation.MAX
    top_k: int = Field(default=3, gt=0)
    modalities: list[str] = []
    body_parts: list[str] = []
    explain_layer: str | None = Field(
        default=None,
        description="Layer whose activations Grad-CAM uses; None means the last 4-D conv layer",
    )
    explanation: Literal["auto", "gradcam", "input_gradient", "occlusion", "none"] = Field(
        default="auto",
        description="Heat map method; auto: Grad-CAM (Keras), input gradient (SavedModel), "
        "occlusion (ONNX); none: no map, and the results say so",
    )
    batch_size: int | None = Field(
        default=None,
        gt=0,
        description="Images per batch; None: automatic from the input size (runtime."
        "auto_batch_size: 8 at 224x224, 2 at 512x512)",
    )
    threads: int = Field(
        default=0,
        ge=0,
        description="ONNX Runtime intra-op threads, at most the process's ([worker] "
        "inference_threads); 0: the process's. TensorFlow's threads are per process",
    )
    evaluation_prevalence: tuple[float, float, float] | None = Field(
        default=None,
        description="Positive rate expected in use (estimate, low, high), for drift warnings",
    )

    @model_validator(mode="after")
    def _one_positive_label(self) -> ModelCard:
        if not any(label.positive for label in self.labels):
            raise ValueError("labels: at least one label must have positive = true")
        names = [label.name for label in self.labels]
        if len(set(names)) != len(names):
            raise ValueError("labels: label names must be unique")
        return self

    @property
    def positive_label(self) -> LabelSpec:
        """The first label flagged as a positive finding."""
        return next(label for label in self.labels if label.positive)

    @classmethod
    def load(cls, path: Path) -> ModelCard:
        """Read and validate a ``model.toml``."""
        with path.open("rb") as f:
            return cls.model_validate(tomllib.load(f))

    def dump(self, path: Path) -> None:
        """Write this card as a ``model.toml`` (unset optional fields are left out)."""
        path.write_bytes(tomli_w.dumps(self.model_dump(mode="json", exclude_none=True)).encode())
