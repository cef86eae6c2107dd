"""The model runtime: load a model package once, check it, warm it up, run series in batches.

TensorFlow is imported lazily (importing it costs ~1.5 s and much memory), so that importing
``dicom_ai_node.infer`` stays cheap for the receiving node. Inference runs through one
``tf.function`` per model on fixed-size batches (a partial last batch is zero-padded), so the
graph is traced once at warm-up and never again; ``model.predict`` is built for large datasets
and costs ~10x more per call. A series is streamed: files are decoded one batch at a time while
the previous batch runs on TensorFlow's own threads, so memory stays bounded by the batch size
whatever the number of images.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import ValidationError
from pydicom import dcmread

from dicom_ai_node.infer.backends import (
    EXPLANATION_NAMES,
    BackendError,
    load_backend,
    weights_path,
    weights_sha256,
)
from dicom_ai_node.infer.card import Aggregation, InputSpec, ModelCard
from dicom_ai_node.infer.prediction import ImagePrediction, SeriesPrediction
from dicom_ai_node.infer.preprocess import number_of_frames, to_model_input

log = logging.getLogger(__name__)

#: Where the model packages shipped with the node live.
BUNDLED_MODELS_DIR = Path(__file__).resolve().parent.parent / "models"

#: Which images keep a Grad-CAM heat map: only the key image (computed once at the end), every
#: image at or above the card's threshold plus the key image, or every image. With "positive"
#: and "all" the maps come from the same pass as the probabilities; "positive" keeps memory
#: bounded by the findings (a 128x128 map is 64 KiB).
HeatmapPolicy = Literal["key", "positive", "all"]

_tf_lock = threading.Lock()
#: The thread counts asked for by :func:`configure_threads` (zeros: automatic).
_requested = (0, 0)
#: What TensorFlow runs with, once :func:`configure_tensorflow` has applied it.
_tf_threads: ThreadSettings | None = None

#: Pixels per batch that :func:`auto_batch_size` aims at: 8 images of 224x224, 16 of 128x128,
#: 2 of 512x512. On CPU the throughput per image hardly grows beyond this, while memory (the
#: activations, and so the peak RSS of a worker) grows with the batch.
_BATCH_PIXELS = 2**19
_MAX_BATCH = 16


class ModelPackageError(Exception):
    """A model package cannot be used: card missing or invalid, weights missing or broken, or
    card and weights disagree. The message names the package."""


class NoUsableImagesError(ValueError):
    """None of the files of a series could be decoded into a model input."""


class InferenceTimeoutError(TimeoutError):
    """A series took longer than its time limit; its inference was stopped."""


@dataclass(frozen=True)
class ThreadSettings:
    """Threads of TensorFlow and ONNX Runtime in this process: ``intra_op`` run one operation
    (a convolution) in parallel, ``inter_op`` run independent operations side by side."""

    intra_op: int
    inter_op: int


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity, which a container or ``taskset``
    narrows), not the host's count."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def resolve_threads(intra_op: int = 0, inter_op: int = 0) -> ThreadSettings:
    """Thread counts with 0 made automatic: intra-op one per usable core; inter-op 1 (a CNN is
    a chain of operations, each large enough to fill the cores on its own; Intel's advice for
    TensorFlow on CPU is one inter-op thread per socket)."""
    if intra_op < 0 or inter_op < 0:
        raise ValueError(f"thread counts must be >= 0, not {intra_op}, {inter_op}")
    return ThreadSettings(intra_op or usable_cores(), inter_op or 1)


def configure_threads(intra_op: int = 0, inter_op: int = 0) -> ThreadSettings:
    """Set the inference threads of this process (0 = automatic), for TensorFlow and ONNX Runtime.

    A worker process that shares the host's cores with receivers gives inference fewer threads
    than cores (``[worker] inference_threads``), so that a long series cannot starve them.
    TensorFlow fixes its thread pools when it runs its first op: call this before any model
    is loaded. It does not import TensorFlow. Raises ``RuntimeError`` when TensorFlow already
    runs with other counts (a second call with the same counts is harmless).
    """
    global _requested
    wanted = resolve_threads(intra_op, inter_op)
    with _tf_lock:
        if _tf_threads is not None and _tf_threads != wanted:
            raise RuntimeError(
                f"TensorFlow already runs with {_tf_threads}: configure_threads({intra_op}, "
                f"{inter_op}) must be called before the first model is loaded"
            )
        _requested = (intra_op, inter_op)
    return wanted


def thread_settings() -> ThreadSettings:
    """The thread counts models loaded now will use (TensorFlow's, once it runs)."""
    with _tf_lock:
        return _tf_threads or resolve_threads(*_requested)


def configure_tensorflow() -> None:
    """Import TensorFlow with its C++ logs silenced and the threads of :func:`configure_threads`
    applied; the first call does it, later ones return at once. Called before any TensorFlow
    model is loaded or trained."""
    global _tf_threads
    with _tf_lock:
        if _tf_threads is not None:
            return
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf

        tf.get_logger().setLevel(logging.ERROR)
        threads = resolve_threads(*_requested)
        tf.config.threading.set_intra_op_parallelism_threads(threads.intra_op)
        tf.config.threading.set_inter_op_parallelism_threads(threads.inter_op)
        _tf_threads = threads


def auto_batch_size(input_spec: InputSpec) -> int:
    """Images per batch for a card that does not set ``batch_size``: the largest power of two
    whose images hold at most ``_BATCH_PIXELS`` pixels, from 1 to 16."""
    fit = max(1, _BATCH_PIXELS // (input_spec.height * input_spec.width))
    return int(min(_MAX_BATCH, 2 ** (fit.bit_length() - 1)))


def find_packages(dirs: Sequence[Path]) -> list[Path]:
    """Model package folders in ``dirs``: each dir is a package itself or holds packages."""
    found: list[Path] = []
    for directory in dirs:
        if (directory / "model.toml").is_file():
            found.append(directory)
        elif directory.is_dir():
            found.extend(sorted(p.parent for p in directory.glob("*/model.toml")))
        else:
            raise ModelPackageError(f"model directory {directory} does not exist")
    return found


def read_card(package: Path) -> ModelCard:
    """The validated card of a package folder (or of a ``.toml`` file itself), or
    :class:`ModelPackageError` saying what is wrong."""
    try:
        return ModelCard.load(package if package.suffix == ".toml" else package / "model.toml")
    except FileNotFoundError as exc:
        raise ModelPackageError(f"model package {package}: no model.toml") from exc
    except (ValidationError, ValueError) as exc:
        raise ModelPackageError(f"model package {package}: invalid model.toml: {exc}") from exc


def read_cards(extra_dirs: Sequence[Path] = ()) -> dict[str, tuple[Path, ModelCard]]:
    """Cards of the bundled and extra packages by model name, without loading any weights.

    A package in a later directory replaces an earlier one of the same name (so a deployment
    can ship a newer version of a bundled model); the replacement is logged.
    """
    cards: dict[str, tuple[Path, ModelCard]] = {}
    for package in find_packages([BUNDLED_MODELS_DIR, *extra_dirs]):
        card = read_card(package)
        if card.name in cards:
            log.warning("model %s in %s replaces %s", card.name, package, cards[card.name][0])
        cards[card.name] = (package, card)
    return cards


def load_models(
    extra_dirs: Sequence[Path] = (),
    *,
    batch_size: int | None = None,
    heatmaps: HeatmapPolicy = "positive",
) -> dict[str, LoadedModel]:
    """Load, check and warm up every bundled and extra model package, by model name."""
    return {
        name: LoadedModel(package, card=card, batch_size=batch_size, heatmaps=heatmaps)
        for name, (package, card) in read_cards(extra_dirs).items()
    }


@dataclass
class _Pending:
    """A batch handed to TensorFlow: where its images came from and its input array."""

    sources: list[tuple[str, int | None]]
    inputs: npt.NDArray[np.float32]
    result: Future[tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]]


class LoadedModel:
    """A model package in memory: card, backend (Keras, SavedModel or ONNX), weights hash."""

    def __init__(
        self,
        package: Path,
        *,
        card: ModelCard | None = None,
        batch_size: int | None = None,
        heatmaps: HeatmapPolicy = "positive",
    ) -> None:
        self.package = package
        self.card = card or read_card(package)
        #: Images per batch: the card's, else the caller's, else :func:`auto_batch_size`.
        self.batch_size = self.card.batch_size or batch_size or auto_batch_size(self.card.input)
        self.heatmaps: HeatmapPolicy = heatmaps
        self._positive_index = next(i for i, label in enumerate(self.card.labels) if label.positive)
        where = f"model package {self.card.name} ({package})"
        try:
            path = weights_path(package)
            if path.name != "model.onnx":
                configure_tensorflow()
            self.threads = thread_settings()
            if self.card.threads:  # the card may ask for fewer than the process has, not more
                self.threads = replace(
                    self.threads, intra_op=min(self.card.threads, self.threads.intra_op)
                )
            self.backend, self.weights = load_backend(
                package, self.card, self.batch_size, self._positive_index, self.threads.intra_op
            )
        except BackendError as exc:
            raise ModelPackageError(f"{where}: {exc}") from exc
        self.weights_sha256 = weights_sha256(self.weights)
        self._empty = np.zeros(self.backend.shape, dtype=np.float32)
        try:  # warm up: trace the graphs once, now, at the sizes a series uses
            self.backend.forward(self._empty)
            if self.backend.explain_in_pass and self.backend.explanation != "none":
                self.backend.explain(self._empty, self.batch_size)
                if not self.backend.fixed_batch:  # the key image's map, made on its own
                    self.backend.explain(self._empty[:1], 1)
        except Exception as exc:  # a network that loads but does not run on its own input
            raise ModelPackageError(f"{where}: the weights do not run: {exc}") from exc

    @property
    def explanation(self) -> str:
        """How heat maps are made (a name from ``EXPLANATION_NAMES``), or ``"none"``."""
        return EXPLANATION_NAMES[self.backend.explanation]

    # -- running -------------------------------------------------------------------------------

    def predict_batch(
        self, images: npt.NDArray[np.float32], *, explain: bool = False
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32] | None]:
        """Probabilities (n, labels) and, with ``explain``, heat maps (n, h, w) of up to
        ``batch_size`` preprocessed images. A short batch runs as it is when the network takes
        any batch size (the key image's map costs one image, not a batch), else zero-padded."""
        count = len(images)
        if count > self.batch_size:
            raise ValueError(f"{count} images exceed the batch size {self.batch_size}")
        batch = images
        if count < self.batch_size and self.backend.fixed_batch:
            batch = self._empty.copy()
            batch[:count] = images
        if explain and self.backend.explanation != "none":
            probabilities, cams = self.backend.explain(batch, count)
            return probabilities[:count], cams[:count]
        return self.backend.forward(batch)[:count], None

    def predict_series(
        self, paths: Sequence[Path], *, timeout: float | None = None
    ) -> SeriesPrediction:
        """Classify a series from its DICOM files and aggregate per the card.

        Files or frames that cannot be decoded are skipped and listed in ``skipped``;
        :class:`NoUsableImagesError` is raised only when no image at all could be used.
        With ``timeout`` (seconds), :class:`InferenceTimeoutError` is raised once it has
        passed: the clock is checked before each frame is decoded, so the run stops within
        one frame's decoding and one batch's inference of the limit, and no thread is left
        running.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        skipped: list[tuple[str, str]] = []
        images: list[ImagePrediction] = []
        best: tuple[float, int, npt.NDArray[np.float32]] | None = None  # key image candidate
        # Grad-CAM in the same pass costs ~8 % over the forward pass alone (measured with
        # benchmarks/inference.py), far less than a second pass over batches with findings.
        explain = self.heatmaps != "key" and self.backend.explain_in_pass
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="infer") as executor:
            pending: _Pending | None = None
            for sources, inputs in self._batches(paths, skipped, deadline, timeout):
                # Submit this batch before collecting the previous one, so that TensorFlow
                # computes while the next batch is decoded.
                future = executor.submit(self.predict_batch, inputs, explain=explain)
                if pending is not None:
                    best = self._collect(pending, images, best)
                pending = _Pending(sources, inputs, future)
            if pending is not None:
                best = self._collect(pending, images, best)
        if best is None:
            reasons = "; ".join(f"{uid}: {reason}" for uid, reason in skipped[:5])
            raise NoUsableImagesError(f"no usable image among {len(paths)} files ({reasons})")
        _, key_index, key_input = best
        if images[key_index].heatmap is None and self.backend.explanation != "none":
            _, cams = self.predict_batch(key_input[np.newaxis], explain=True)
            assert cams is not None
            images[key_index] = replace(images[key_index], heatmap=cams[0])
        return self._aggregate(images, skipped)

    def _batches(
        self,
        paths: Sequence[Path],
        skipped: list[tuple[str, str]],
        deadline: float | None = None,
        timeout: float | None = None,
    ) -> Iterator[tuple[list[tuple[str, int | None]], npt.NDArray[np.float32]]]:
        """Decode the files into batches of model inputs, recording what had to be skipped.

        A file stops at its first frame that cannot be decoded (the rest of it is skipped
        with the same reason): a header that lies, say Number of Frames = 10^6 over one
        frame's pixel data, fails the same way for every frame, and trying each would take
        the worker for hours.
        """
        shape = self._empty.shape[1:]
        buffer = np.empty((self.batch_size, *shape), dtype=np.float32)
        sources: list[tuple[str, int | None]] = []
        for done, path in enumerate(paths):
            try:
                ds = dcmread(path)
                uid = str(ds.SOPInstanceUID)
                frames = number_of_frames(ds)
                if frames < 1:
                    raise ValueError(f"Number of Frames is {frames}")
            except Exception as exc:  # pydicom raises many types on a malformed file
                skipped.append((path.name, f"not a readable DICOM image: {exc}"))
                continue
            for frame in range(frames):
                if deadline is not None and time.monotonic() > deadline:
                    raise InferenceTimeoutError(
                        f"inference stopped after {timeout:g} s (the job time limit), "
                        f"at file {done + 1} of {len(paths)}"
                    )
                try:
                    image = to_model_input(ds, self.card.input, self.card.preprocessing, frame)
                except Exception as exc:  # decoders raise anything from ValueError to RuntimeError
                    where = f" frame {frame + 1} of {frames}" if frames > 1 else ""
                    rest = f" (frames {frame + 1}-{frames} skipped)" if frame + 1 < frames else ""
                    skipped.append(
                        (uid, f"cannot decode{where}: {type(exc).__name__}: {exc}{rest}")
                    )
                    break
                buffer[len(sources)] = image
                sources.append((uid, frame + 1 if frames > 1 else None))
                if len(sources) == self.batch_size:
                    yield sources, buffer
                    buffer = np.empty_like(buffer)  # the yielded one is still being computed
                    sources = []
        if sources:
            yield sources, buffer[: len(sources)]

    def _collect(
        self,
        pending: _Pending,
        images: list[ImagePrediction],
        best: tuple[float, int, npt.NDArray[np.float32]] | None,
    ) -> tuple[float, int, npt.NDArray[np.float32]] | None:
        """Turn a computed batch into ImagePredictions, with heat maps per the policy."""
        probabilities, cams = pending.result.result()
        positive = probabilities[:, self._positive_index]
        names = [label.name for label in self.card.labels]
        for i, (uid, frame) in enumerate(pending.sources):
            probs = {name: float(p) for name, p in zip(names, probabilities[i], strict=True)}
            keep = cams is not None and (
                self.heatmaps == "all" or positive[i] >= self.card.threshold
            )
            images.append(
                ImagePrediction(
                    sop_instance_uid=uid,
                    frame_number=frame,
                    probabilities=probs,
                    label=self.label_for(probs),
                    heatmap=cams[i].copy() if keep and cams is not None else None,
                )
            )
            if best is None or positive[i] > best[0]:
                best = (float(positive[i]), len(images) - 1, pending.inputs[i].copy())
        return best

    def label_for(self, probabilities: dict[str, float]) -> str:
        """The positive label at or above the card's threshold, else the likeliest other one."""
        positive = self.card.positive_label.name
        if probabilities[positive] >= self.card.threshold:
            return positive
        return max((n for n in probabilities if n != positive), key=probabilities.__getitem__)

    def _aggregate(
        self, images: list[ImagePrediction], skipped: list[tuple[str, str]]
    ) -> SeriesPrediction:
        """Series probabilities from image ones, per the card's aggregation.

        Each label's image probabilities are aggregated; with two labels the other label gets
        ``1 - p`` of the positive one, so the pair still sums to one.
        """
        card = self.card
        names = [label.name for label in card.labels]
        table = np.array([[image.probabilities[n] for n in names] for image in images])
        series = {
            n: _aggregate(table[:, i], card.aggregation, card.top_k) for i, n in enumerate(names)
        }
        positive_name = card.positive_label.name
        if len(names) == 2:
            other = next(n for n in names if n != positive_name)
            series[other] = 1.0 - series[positive_name]
        is_positive = series[positive_name] >= card.threshold
        return SeriesPrediction(
            model=card.name,
            model_version=card.version,
            weights_sha256=self.weights_sha256,
            explanation=self.explanation,
            positive_label=positive_name,
            label=self.label_for(series),
            probability=series[positive_name],
            positive=is_positive,
            probabilities=series,
            images=tuple(images),
            skipped=tuple(skipped),
        )


def _aggregate(values: npt.NDArray[np.float64], how: Aggregation, top_k: int) -> float:
    """One number from per-image probabilities: max, mean or mean of the ``top_k`` largest."""
    if how is Aggregation.MAX:
        return float(values.max())
    if how is Aggregation.MEAN:
        return float(values.mean())
    return float(np.sort(values)[-top_k:].mean())
